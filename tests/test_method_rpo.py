"""RPO (Read-only Prompt Optimization): the read-only attention masks through the backbone's general ``attn_mask``,
the reference's init from its recorded generator state, the pristine text input of every forward, the layer outputs
and the Dassl import of the reference's checkpoint, against the goldens (tests/golden/rpo.*)."""

import json

import pytest
import torch
import torch.nn.functional as F

import promptclip.methods.rpo as rpo_module
from parity import (
    GOLDEN_DIR,
    assert_close_values,
    build_method,
    golden_backbone,
    golden_batch,
    load_golden,
)
from promptclip.checkpoint import read_adapter
from promptclip.cli import main
from promptclip.clip.architectures import build_random
from promptclip.clip.tokenizer import ContextLengthError
from promptclip.errors import ConfigError
from promptclip.methods import create_method
from promptclip.methods.rpo import RPO, RPOConfig, initial_prompts
from promptclip.reference.unpickle import load_torch_file


@pytest.fixture(scope="module")
def golden():
    return load_golden("rpo")


# -- the backbone's attn_mask ------------------------------------------------------------------------------------------


def _old_block(block, x):
    """The residual block as it was before attn_mask existed (the same operations, written out)."""
    attn = block.attn
    batch, length, width = x.shape
    h = block.ln_1(x)
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    qkv = qkv.view(batch, length, 3, attn.heads, width // attn.heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=block.causal)
    x = x + F.linear(out.transpose(1, 2).reshape(batch, length, width), attn.out_proj.weight, attn.out_proj.bias)
    return x + block.mlp(block.ln_2(x))


def test_without_a_mask_the_blocks_compute_what_they_did_before():
    clip = build_random("tiny").eval()
    size = clip.visual.input_resolution
    with torch.no_grad():
        x = clip.visual.embed(torch.randn(2, 3, size, size))
        expected = x
        for block in clip.visual.blocks:
            expected = _old_block(block, expected)
        assert torch.allclose(clip.visual.forward_blocks(x), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(clip.visual.forward_blocks(x, attn_mask=None), clip.visual.forward_blocks(x))
        tokens = torch.randint(1, 1000, (3, 9))
        text = clip.text.embed(tokens)
        expected = text
        for block in clip.text.blocks:
            expected = _old_block(block, expected)
        assert torch.allclose(clip.text.forward_blocks(text), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(clip.text.forward_blocks(text, attn_mask=None), clip.text.forward_blocks(text))
        # A zero mask is no mask (on top of the text tower's causal one).
        zero = torch.zeros(9, 9)
        assert torch.allclose(clip.text.forward_blocks(text, attn_mask=zero), clip.text.forward_blocks(text),
                              atol=1e-5)


def test_masked_columns_are_read_only_for_the_other_tokens():
    """Tokens nobody attends to leave every other token's output as if they were not there."""
    clip = build_random("tiny").eval()
    size = clip.visual.input_resolution
    with torch.no_grad():
        images = torch.randn(2, 3, size, size)
        plain = clip.visual.forward_blocks(clip.visual.embed(images))
        x = clip.visual.embed(images, torch.randn(3, clip.visual.width))
        masked = clip.visual.forward_blocks(x, attn_mask=rpo_module.last_columns_blocked(x.shape[1], 3))
        assert torch.allclose(masked[:, :-3], plain, atol=1e-5)
        unmasked = clip.visual.forward_blocks(x)
        assert not torch.allclose(unmasked[:, :-3], plain, atol=1e-3)
        text = clip.text.embed(torch.randint(1, 1000, (2, 10)))
        lengths = torch.tensor([6, 8])
        out = clip.text.forward_blocks(text, attn_mask=rpo_module.read_only_columns(lengths, 10))
        for row, length in enumerate(lengths.tolist()):
            alone = clip.text.forward_blocks(text[row : row + 1, :length])
            assert torch.allclose(out[row, :length], alone[0], atol=1e-5)


def test_a_resnet_tower_refuses_a_mask():
    clip = build_random("tiny-rn")
    with pytest.raises(ValueError, match="attention mask"):
        clip.visual.forward_blocks(torch.zeros(1), attn_mask=torch.zeros(1, 1))


# -- mutations ---------------------------------------------------------------------------------------------------------


def _no_mask(size):
    return torch.zeros(size, size)


def _eval_logits(method, golden):
    method.eval()
    with torch.no_grad():
        return method(golden_batch(golden, train=False))


def test_mutation_prompts_that_can_be_read_fail_the_logits(golden, monkeypatch):
    """Without the read-only masks (everything attends to the prompts) the golden's logits are missed."""
    monkeypatch.setattr(rpo_module, "read_only_columns", lambda lengths, size, dtype=None: _no_mask(size))
    monkeypatch.setattr(rpo_module, "last_columns_blocked", lambda size, k, dtype=None, device=None: _no_mask(size))
    expected = golden.tensors["eval.logits"]
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_values(_eval_logits(build_method(golden)[0], golden), expected, "eval.logits")


def test_mutation_visual_mask_alone_fails_the_logits(golden, monkeypatch):
    monkeypatch.setattr(rpo_module, "last_columns_blocked", lambda size, k, dtype=None, device=None: _no_mask(size))
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_values(_eval_logits(build_method(golden)[0], golden), golden.tensors["eval.logits"], "logits")


# -- init, input, state ------------------------------------------------------------------------------------------------


def test_init_from_the_recorded_generator_state_is_bit_identical(golden):
    state = golden.tensors["init.rng_state_before_prompt_init"].to(torch.uint8)
    generator = torch.Generator()
    generator.set_state(state)
    k = golden.meta["extra"]["rpo"]["K"]
    text, visual = initial_prompts(golden_backbone(golden), k, generator)
    assert torch.equal(text, golden.tensors["init.prompt_learner.text_prompt"])
    assert torch.equal(visual, golden.tensors["init.prompt_learner.img_prompt"])


def test_text_input_is_the_pristine_embedding_and_lengths(golden):
    method, _ = build_method(golden)
    head = golden.tensors["eval.text_x_pristine_head"]
    assert method.lengths.tolist() == golden.meta["extra"]["rpo"]["len_prompts"]
    assert torch.allclose(method.text_x[:, : head.shape[1]], head, atol=1e-6)
    assert method.k == golden.meta["extra"]["rpo"]["K"]


def test_every_training_step_starts_from_the_pristine_input(golden):
    """The reference's GPU semantics: the prompts written into the text input never persist between forwards."""
    method, _ = build_method(golden)
    pristine = method.text_x.clone()
    batch = golden_batch(golden, train=True)
    method.train()
    grads = []
    for _ in range(2):
        _, losses = method.training_step(batch)
        method.backward(losses, lambda loss: loss)
        grads.append(method.text_prompt.grad.clone())
        method.zero_grad(set_to_none=True)
    assert torch.equal(method.text_x, pristine)
    assert torch.equal(grads[0], grads[1])


def test_every_block_output_matches_the_layers_golden(golden):
    layers = load_golden("rpo.layers")
    method, _ = build_method(golden)
    method.eval()
    k, length = method.k, int(method.lengths[0])
    outputs = {"visual": [], "text": []}

    def recorder(tower):
        return lambda layer, x_in, x_out: (outputs[tower].append(x_out[0]), x_out)[1]

    clip = method.clip
    with torch.no_grad():
        x = clip.visual.embed(golden.images(), method.img_prompt)
        mask = rpo_module.last_columns_blocked(x.shape[1], k)
        clip.visual.forward_blocks(x, attn_mask=mask, after=recorder("visual"))
        slots = method.lengths.unsqueeze(1) + torch.arange(k)
        index = slots.unsqueeze(-1).expand(-1, -1, method.text_x.shape[-1])
        t = method.text_x.scatter(1, index, method.text_prompt.unsqueeze(0).expand(len(method.lengths), -1, -1))
        clip.text.forward_blocks(t, attn_mask=rpo_module.read_only_columns(method.lengths, t.shape[1]),
                                 after=recorder("text"))
    for key, expected in layers.tensors.items():
        tower, i = key.split(".")[1], int(key.split(".")[2])
        ours = outputs[tower][i]
        ours = torch.cat([ours[:1], ours[-k:]]) if tower == "visual" else ours[: length + k]
        assert_close_values(ours, expected, key)


# -- config ------------------------------------------------------------------------------------------------------------


def test_config_from_reference_reads_k_and_rejects_unknown_options(golden):
    assert RPO.config_from_reference(golden.trainer_cfg).k == golden.trainer_cfg["K"]
    assert RPO.config_from_reference({"K": 5, "CTX_INIT": "a photo of a"}).k == 5
    with pytest.raises(ConfigError, match="N_CTX"):
        RPO.config_from_reference({"K": 5, "N_CTX": 4})


def test_other_k_builds_and_trains(golden):
    method = create_method("rpo", golden_backbone(golden), ["Sea_Lake", "Annual Crop Land"], RPOConfig(k=5))
    assert method.text_prompt.shape == (5, 512) and method.img_prompt.shape == (5, 768)
    method.train()
    images = golden.images()[:2]
    _, losses = method.training_step({"image": images, "label": torch.tensor([0, 1])})
    losses["loss"].backward()
    assert method.text_prompt.grad.abs().sum() > 0 and method.img_prompt.grad.abs().sum() > 0


def test_prompts_that_leave_no_room_for_k_tokens_are_refused():
    clip = build_random("tiny")
    context = clip.text.context_length
    with pytest.raises(ContextLengthError, match=f"needs {context + 3} tokens"):  # 8 tokens + K
        create_method("rpo", clip, ["cat", "dog"], RPOConfig(k=context - 5))
    with pytest.raises(ConfigError, match="'_'"):
        create_method("rpo", clip, ["cat", "dog"], RPOConfig(prompt="a photo of a {}."))


# -- importing the reference's checkpoint -----------------------------------------------------------------------------


def test_cli_import_of_the_reference_checkpoint(tmp_path):
    meta = json.loads((GOLDEN_DIR / "rpo.dassl.json").read_text())
    trajectory = load_golden("rpo.trajectory")
    assert main(["import", str(GOLDEN_DIR / "rpo.dassl"), "--method", "rpo", "--backbone", "golden-mini",
                 "--quiet", "--classnames", ",".join(trajectory.classnames), "--out", str(tmp_path),
                 "--set", f"method_config.k={trajectory.trainer_cfg['K']}"]) == 0
    adapter_meta, tensors = read_adapter(tmp_path / "adapter.safetensors")
    assert adapter_meta["method"] == "rpo"
    saved = load_torch_file(GOLDEN_DIR / meta["registered_model"]["file"])["state_dict"]
    assert set(tensors) == {"text_prompt", "img_prompt"}
    for key, value in tensors.items():
        assert torch.equal(value, saved[key]), key


# -- presets -----------------------------------------------------------------------------------------------------------


def test_presets_are_the_official_configs_with_the_official_parameter_counts():
    from promptclip.clip.architectures import ARCHITECTURES
    from promptclip.clip.model import CLIP
    from promptclip.presets import default_preset, load_preset

    vit_b16 = CLIP(ARCHITECTURES["ViT-B/16"]).requires_grad_(False)
    for name, k, lr in (("rpo/main_K24", 24, 0.01), ("rpo/main_K4", 4, 0.01), ("rpo/imagenet_k24_ep15", 24, 0.005)):
        preset = load_preset(name)
        train = preset.train
        assert (train.lr, train.max_epoch, train.batch_size, train.warmup_epoch, train.warmup_lr) == (
            lr, 15, 4, 1, 1e-5)
        method = create_method("rpo", vit_b16, ["cat", "dog"], preset.method_config)
        assert method.num_trainable() == k * (512 + 768)
    assert default_preset("base2novel", "rpo") == "rpo/main_K24"
    assert default_preset("domain_generalization", "rpo") == "rpo/imagenet_k24_ep15"
