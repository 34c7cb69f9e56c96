"""The backbone's stages, hooks, lockstep driver, EOT truncation and the golden-mini weight recipe."""

import json
from pathlib import Path

import pytest
import torch

from promptclip.clip.architectures import ARCHITECTURES, build_random, recipe_state_dict, state_dict_sha256
from promptclip.clip.model import CLIP, eot_positions
from tolerance import assert_close

GOLDEN = Path(__file__).parent / "golden"
SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def tiny():
    return build_random("tiny", seed=7)


def random_tokens(n: int, lengths: list[int], seed: int = 0) -> torch.Tensor:
    """Token ids with SOT, random words, EOT at ``lengths[i]`` and zero padding (EOT is the largest id)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, 77, dtype=torch.long)
    for i, eot in enumerate(lengths):
        tokens[i, 0] = SOT
        tokens[i, 1:eot] = torch.randint(1, 40000, (eot - 1,), generator=g)
        tokens[i, eot] = EOT
    return tokens


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_golden_mini_regenerates_every_recorded_checksum():
    recorded = json.loads((GOLDEN / "golden_mini_weights.json").read_text())
    state = recipe_state_dict(ARCHITECTURES["golden-mini"])
    assert sorted(state) == sorted(recorded["tensors"]), "key names differ from the reference's OpenAI layout"
    assert len(state) == recorded["n_tensors"]
    assert sum(t.numel() for t in state.values()) == recorded["n_params"]
    for key, info in recorded["tensors"].items():
        tensor = state[key].double()
        assert list(tensor.shape) == info["shape"], key
        assert tensor.sum().item() == pytest.approx(info["sum"], rel=1e-9, abs=1e-9), key
        assert tensor.abs().sum().item() == pytest.approx(info["abs_sum"], rel=1e-9, abs=1e-9), key
        assert tensor.flatten()[:4].tolist() == pytest.approx(info["first4"], rel=0, abs=0), key
    assert state_dict_sha256(state) == recorded["sha256_fp32_sorted"]


def test_golden_mini_config_matches_recorded_architecture():
    recorded = json.loads((GOLDEN / "golden_mini_weights.json").read_text())["config"]
    config = ARCHITECTURES["golden-mini"]
    for key in ("embed_dim", "vision_width", "vision_layers", "vision_heads", "image_size", "context_length",
                "vocab_size", "text_width", "text_layers", "text_heads"):
        assert getattr(config, key) == recorded[key], key
    assert config.vision_patch_size == recorded["patch_size"]


def test_eot_truncated_text_features_equal_full_length(tiny):
    tokens = random_tokens(4, [3, 9, 17, 30])
    with torch.no_grad():
        full = tiny.encode_text(tokens, truncate=False)
        cut = tiny.encode_text(tokens, truncate=True)
    assert_close(cut, full, rel=1e-5)
    # The truncated path really runs fewer positions: recompute its length from the tokens.
    assert int(eot_positions(tokens).max()) + 1 == 31


def test_text_pool_uses_explicit_eot_positions(tiny):
    tokens = random_tokens(2, [5, 12])
    text = tiny.text
    with torch.no_grad():
        states = text.forward_blocks(text.embed(tokens))
        at_eot = text.pool(states, torch.tensor([5, 12]))
        at_other = text.pool(states, torch.tensor([4, 12]))
    assert torch.allclose(at_eot, tiny.encode_text(tokens, truncate=False), atol=1e-5)
    assert not torch.allclose(at_eot[0], at_other[0])
    assert torch.equal(at_eot[1], at_other[1])


def test_identity_hooks_change_nothing_and_see_every_layer(tiny):
    x = images(2, 224)
    tokens = random_tokens(3, [4, 6, 8])
    seen = {"vision": [], "text": []}

    def identity(tower):
        def hook(layer, h):
            seen[tower].append(layer)
            return h
        return hook

    with torch.no_grad():
        img_plain = tiny.encode_image(x)
        img_hooked = tiny.visual.pool(tiny.visual.forward_blocks(tiny.visual.embed(x), identity("vision")))
        eot = eot_positions(tokens)
        txt_plain = tiny.encode_text(tokens, truncate=False)
        txt_hooked = tiny.text.pool(tiny.text.forward_blocks(tiny.text.embed(tokens), identity("text")), eot)
    assert torch.equal(img_plain, img_hooked)
    assert torch.equal(txt_plain, txt_hooked)
    layers = list(range(tiny.config.vision_layers))
    assert seen == {"vision": layers, "text": list(range(tiny.config.text_layers))}


def test_hook_replacing_tokens_changes_the_output(tiny):
    x = images(1, 224)
    with torch.no_grad():
        plain = tiny.encode_image(x)
        zeroed = tiny.visual.pool(
            tiny.visual.forward_blocks(tiny.visual.embed(x), lambda layer, h: h.clone().fill_(0) if layer == 5 else h)
        )
    assert not torch.allclose(plain, zeroed)


def test_lockstep_with_identity_couple_equals_separate_towers(tiny):
    x = images(2, 224)
    tokens = random_tokens(3, [4, 6, 8])
    eot = eot_positions(tokens)
    layers = []

    def couple(layer, x_img, x_txt):
        layers.append(layer)
        return x_img, x_txt

    with torch.no_grad():
        img_state, txt_state = tiny.forward_lockstep(tiny.visual.embed(x), tiny.text.embed(tokens), couple)
        assert torch.equal(tiny.visual.pool(img_state), tiny.encode_image(x))
        assert torch.equal(tiny.text.pool(txt_state, eot), tiny.encode_text(tokens, truncate=False))
    assert layers == list(range(tiny.config.vision_layers))


def test_lockstep_couple_can_exchange_information(tiny):
    x = images(1, 224)
    tokens = random_tokens(1, [6])

    def write_image_mean_into_text(layer, x_img, x_txt):
        x_txt = x_txt.clone()
        x_txt[:, 1] = x_img[:, 0, : x_txt.shape[-1]]
        return x_img, x_txt

    with torch.no_grad():
        _, coupled = tiny.forward_lockstep(tiny.visual.embed(x), tiny.text.embed(tokens), write_image_mean_into_text)
        _, plain = tiny.forward_lockstep(tiny.visual.embed(x), tiny.text.embed(tokens))
    assert not torch.allclose(coupled, plain)


def test_vision_prompts_are_appended_after_positions_before_ln_pre(tiny):
    x = images(2, 224)
    prompts = torch.randn(3, tiny.visual.width, generator=torch.Generator().manual_seed(1))
    visual = tiny.visual
    with torch.no_grad():
        seq = visual.embed(x, prompts)
        plain = visual.embed(x)
    assert seq.shape == (2, visual.num_tokens + 3, visual.width)
    # ln_pre is per token, so the image tokens are unchanged and the prompt rows are ln_pre(prompts) for each image.
    assert torch.equal(seq[:, : visual.num_tokens], plain)
    expected = torch.nn.functional.layer_norm(prompts, (visual.width,), visual.ln_pre.weight, visual.ln_pre.bias)
    assert torch.allclose(seq[0, visual.num_tokens:], expected, atol=1e-6)
    assert torch.allclose(seq[1, visual.num_tokens:], expected, atol=1e-6)


def test_per_image_vision_prompts(tiny):
    x = images(2, 224)
    prompts = torch.randn(2, 3, tiny.visual.width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        seq = tiny.visual.embed(x, prompts)
    assert not torch.allclose(seq[0, -3:], seq[1, -3:])


def test_wrong_image_size_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="expects 224x224"):
        tiny.encode_image(images(1, 64))


def test_logits_and_forward_shapes(tiny):
    x = images(2, 224)
    tokens = random_tokens(3, [4, 6, 8])
    with torch.no_grad():
        per_image, per_text = tiny(x, tokens)
    assert per_image.shape == (2, 3)
    assert torch.equal(per_image.t(), per_text)
    cosine = per_image / tiny.logit_scale.exp()
    assert cosine.abs().max() <= 1.0 + 1e-6


def test_resnet_tower_encodes_and_refuses_prompt_tokens():
    model = build_random("tiny-rn", seed=3)
    x = images(2, 64)
    with torch.no_grad():
        feats = model.encode_image(x)
        staged = model.visual.pool(model.visual.forward_blocks(model.visual.embed(x), lambda layer, h: h))
        text = model.encode_text(random_tokens(2, [3, 5]))
    assert feats.shape == (2, 64) and text.shape == (2, 64)
    assert torch.equal(feats, staged)
    with pytest.raises(ValueError, match="needs a ViT"):
        model.visual.embed(x, torch.zeros(2, 16))
    with pytest.raises(ValueError, match="needs a ViT"):
        model.forward_lockstep(torch.zeros(1), torch.zeros(1))


def test_bf16_autocast_is_close_to_fp32(tiny):
    from promptclip.precision import autocast

    x = images(2, 224)
    with torch.no_grad():
        ref = tiny.encode_image(x)
        with autocast("bf16", "cpu"):
            low = tiny.encode_image(x)
    assert low.dtype == torch.bfloat16
    assert tiny.visual.conv1.weight.dtype == torch.float32  # master weights stay fp32
    cos = torch.nn.functional.cosine_similarity(ref, low.float(), dim=-1)
    assert cos.min() > 0.99


def test_config_rejects_inconsistent_heads():
    from promptclip.clip.model import CLIPConfig

    with pytest.raises(ValueError, match="not divisible"):
        CLIPConfig(embed_dim=8, image_size=32, vision_layers=1, vision_width=10, vision_patch_size=8, vision_heads=3,
                   context_length=77, vocab_size=10, text_width=8, text_heads=2, text_layers=1)


def test_every_architecture_builds_with_openai_key_names():
    for name, config in ARCHITECTURES.items():
        with torch.device("meta"):
            keys = set(CLIP(config).state_dict())
        assert {"text_projection", "logit_scale", "token_embedding.weight", "ln_final.weight"} <= keys, name
        assert ("visual.proj" in keys) == config.is_vit, name
