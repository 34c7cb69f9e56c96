"""CoCoOp and KgCoOp: intermediate values against the goldens, batched instance-conditioned text encoding, the KG
term, reference-option mapping, parameter counts of the official ViT-B/16 configs and the shipped presets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from parity import assert_close_values, build_method, load_golden
from promptclip.clip.architectures import ARCHITECTURES, build_random
from promptclip.clip.model import CLIP
from promptclip.clip.tokenizer import get_tokenizer, tokenize
from promptclip.config import from_dict
from promptclip.errors import ConfigError
from promptclip.methods import create_method, get_method_class
from promptclip.presets import PRESETS_DIR
from tolerance import assert_close, assert_differ

CONFIGS = PRESETS_DIR
CLASSES = ["golden retriever", "tabby_cat", "sea or lake"]


@pytest.fixture(scope="module")
def tiny():
    return build_random("tiny")


@pytest.fixture(scope="module")
def vit_b16():
    """ViT-B/16 architecture with uninitialised weights: enough to count the methods' parameters."""
    with torch.device("meta"):
        model = CLIP(ARCHITECTURES["ViT-B/16"])
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def tiny_images(n: int, seed: int = 0) -> torch.Tensor:
    size = ARCHITECTURES["tiny"].image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomise(method, seed: int = 7) -> None:
    """Give every trainable tensor a non-trivial value (the Meta-Net's last layer must not be negligible)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in method.named_trainable():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


# -- CoCoOp ----------------------------------------------------------------------------------------------------------


def test_cocoop_intermediate_values_match_golden():
    golden = load_golden("cocoop")
    method, _ = build_method(golden)
    method.eval()
    images = golden.images()
    with torch.no_grad():
        image_features = method.clip.encode_image(images)
        bias = method.image_bias(image_features)
        text = method.instance_text_features(method.ctx.unsqueeze(0) + bias.unsqueeze(1))
    assert_close_values(image_features, golden.tensors["eval.image_features"], "eval.image_features")
    assert_close_values(bias, golden.tensors["eval.meta_net_out"], "eval.meta_net_out")
    assert_close_values(text, golden.tensors["eval.text_features"], "eval.text_features")


def test_cocoop_matches_a_per_image_loop_on_the_golden():
    """The reference's own recipe, one image at a time: C prompts with that image's context, its own logits."""
    golden = load_golden("cocoop")
    method, _ = build_method(golden)
    method.eval()
    images = golden.images()
    clip = method.clip
    tokens = tokenize([f"a photo of a {name.replace('_', ' ')}." for name in golden.classnames])
    with torch.no_grad():
        batched = method({"image": images})
        rows = []
        for image in images:
            feat = clip.encode_image(image[None])
            feat = feat / feat.norm(dim=-1, keepdim=True)
            ctx = method.ctx + method.meta_net(feat)  # [n_ctx, W]
            embeds = clip.token_embedding(tokens).clone()
            embeds[:, 1 : 1 + ctx.shape[0]] = ctx
            x = clip.transformer(embeds + clip.positional_embedding)  # full 77 tokens, no truncation
            text = clip.ln_final(x[torch.arange(len(tokens)), tokens.argmax(-1)]) @ clip.text_projection
            text = text / text.norm(dim=-1, keepdim=True)
            rows.append(clip.logit_scale.exp() * feat[0] @ text.t())
    assert_close_values(batched, torch.stack(rows), "per-image loop")
    assert_close_values(batched, golden.tensors["eval.logits"], "eval.logits")


@pytest.mark.parametrize("chunk_size", [None, 2, 5])
def test_cocoop_batch_logits_equal_one_image_at_a_time(tiny, chunk_size):
    method = create_method("cocoop", tiny, CLASSES, {"text_chunk_size": chunk_size})
    randomise(method)
    method.eval()
    images = tiny_images(4)
    with torch.no_grad():
        batched = method({"image": images})
        single = torch.cat([method({"image": images[i : i + 1]}) for i in range(4)])
    assert batched.shape == (4, len(CLASSES))
    assert_close(single, batched, rel=1e-5)
    # images really get different text features (the Meta-Net matters)
    with torch.no_grad():
        bias = method.image_bias(tiny.encode_image(images))
    assert_differ(bias[1], bias[0], rel=1e-3)


@pytest.mark.parametrize("chunk_size, expected_calls", [(None, 1), (5, 3), (12, 1)])
def test_cocoop_text_tower_runs_batched(tiny, chunk_size, expected_calls):
    method = create_method("cocoop", tiny, CLASSES, {"text_chunk_size": chunk_size})
    calls = []
    handle = tiny.transformer.resblocks[0].register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    try:
        method.train()
        batch = {"image": tiny_images(4), "label": torch.tensor([0, 1, 2, 0])}
        loss = method.loss(batch, method(batch))["loss"]
        forward_calls = list(calls)  # the backward re-runs checkpointed chunks (promptclip.memory)
        loss.backward()
    finally:
        handle.remove()
    assert len(forward_calls) == expected_calls
    assert sum(forward_calls) == 4 * len(CLASSES)
    assert method.ctx.grad is not None and method.meta_net.linear1.weight.grad is not None


def test_cocoop_official_vit_b16_parameter_count(vit_b16):
    method = create_method("cocoop", vit_b16, CLASSES)
    params = dict(method.named_trainable())
    assert method.num_trainable() == 35_360
    assert params["ctx"].shape == (4, 512)
    assert sum(p.numel() for n, p in params.items() if n.startswith("meta_net.linear1")) == 16_416
    assert sum(p.numel() for n, p in params.items() if n.startswith("meta_net.linear2")) == 16_896
    assert set(method.adapter_state()) == set(params)
    assert not any(n.startswith("clip.") for n in method.adapter_state())


def test_cocoop_resnet_backbone_and_widths_from_backbone():
    rn = build_random("tiny-rn")
    method = create_method("cocoop", rn, CLASSES)
    dim, width = rn.visual.output_dim, rn.text.width
    assert method.meta_net.linear1.weight.shape == (dim // 16, dim)
    assert method.meta_net.linear2.weight.shape == (width, dim // 16)
    method.eval()
    size = rn.config.image_size
    with torch.no_grad():
        logits = method({"image": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))})
    assert logits.shape == (2, len(CLASSES)) and torch.isfinite(logits).all()


def test_cocoop_init_is_seeded_and_leaves_global_rng_alone(tiny):
    state = torch.get_rng_state()
    a = create_method("cocoop", tiny, CLASSES, {"ctx_init": "", "n_ctx": 3, "init_seed": 3})
    assert torch.equal(torch.get_rng_state(), state)
    b = create_method("cocoop", tiny, CLASSES, {"ctx_init": "", "n_ctx": 3, "init_seed": 3})
    c = create_method("cocoop", tiny, CLASSES, {"ctx_init": "", "n_ctx": 3, "init_seed": 4})
    for name, value in a.adapter_state().items():
        assert torch.equal(value, b.adapter_state()[name])
        assert not torch.equal(value, c.adapter_state()[name])
    assert a.ctx.shape == (3, tiny.text.width)
    bound = 1 / math.sqrt(tiny.visual.output_dim)
    assert a.meta_net.linear1.weight.abs().max() <= bound and a.meta_net.linear1.weight.std() > bound / 4


def test_cocoop_context_length_is_the_number_of_init_words(tiny):
    """The reference takes as many vectors as words; extra BPE tokens of the init text stay frozen in the prompt."""
    words = "a photo of zyxwvutsr"
    ids = get_tokenizer().encode(words)
    assert len(ids) > 4  # the last word splits into several BPE tokens
    method = create_method("cocoop", tiny, ["cat"], {"ctx_init": words})
    assert method.ctx.shape[0] == 4
    torch.testing.assert_close(method.ctx.detach(), tiny.token_embedding.weight[ids[:4]])
    cat = get_tokenizer().encode("cat")
    expected_suffix = tiny.token_embedding.weight[ids[4:] + cat]
    torch.testing.assert_close(method.token_suffix[0, : len(expected_suffix)], expected_suffix)


def test_cocoop_new_class_names(tiny):
    method = create_method("cocoop", tiny, CLASSES)
    randomise(method)
    before = {n: v.clone() for n, v in method.adapter_state().items()}
    method.set_classnames(["airplane", "sun flower"])
    method.eval()
    with torch.no_grad():
        logits = method({"image": tiny_images(3)})
    assert logits.shape == (3, 2)
    for name, value in method.adapter_state().items():
        assert torch.equal(value, before[name])


def test_cocoop_reference_options():
    cls = get_method_class("cocoop")
    config = cls.config_from_reference({"N_CTX": 8, "CTX_INIT": "", "PREC": "fp16"})
    assert (config.n_ctx, config.ctx_init) == (8, "")
    with pytest.raises(ConfigError, match="CSC"):
        cls.config_from_reference({"N_CTX": 4, "CSC": True})
    with pytest.raises(ConfigError):
        create_method("cocoop", build_random("tiny"), CLASSES, {"meta_hidden": 8})


# -- KgCoOp ----------------------------------------------------------------------------------------------------------


def test_kgcoop_terms_match_golden():
    golden = load_golden("kgcoop")
    method, _ = build_method(golden)
    assert method.kg_template == golden.meta["extra"]["template_used"]
    assert_close_values(method.kg_text_features, golden.tensors["eval.kg_text_features"], "eval.kg_text_features")
    method.eval()
    with torch.no_grad():
        text = method.class_features()
    assert_close_values(text, golden.tensors["eval.text_features"], "eval.text_features")
    method.train()
    batch = {"image": golden.images(), "label": golden.labels()}
    losses = method.loss(batch, method(batch))
    assert_close_values(losses["loss_kg"], golden.tensors["train.kg_score"], "train.kg_score")
    assert_close_values(losses["loss_ce"], golden.tensors["train.loss_ce"], "train.loss_ce")
    w = golden.trainer_cfg["W"]
    torch.testing.assert_close(losses["loss"], losses["loss_ce"] + w * losses["loss_kg"])


def test_kgcoop_kg_term_formula(tiny):
    """1 - mean over classes of the cosine to the frozen template features, computed here from scratch."""
    method = create_method("kgcoop", tiny, CLASSES, template="a photo of a {}, a type of pet.")
    randomise(method)
    method.train()
    batch = {"image": tiny_images(2), "label": torch.tensor([0, 2])}
    losses = method.loss(batch, method(batch))
    with torch.no_grad():
        frozen = tiny.encode_text(tokenize([f"a photo of a {n.replace('_', ' ')}, a type of pet." for n in CLASSES]))
        learned = method.encode_classes()
    expected = 1 - F.cosine_similarity(learned, frozen, dim=-1).mean()
    assert_close(losses["loss_kg"], expected, rel=1e-5)
    assert losses["loss_kg"] > 1e-3
    losses["loss"].backward()
    assert method.ctx.grad is not None


def test_kgcoop_kg_term_vanishes_when_prompts_equal_the_template(tiny):
    """Context "a photo of a" + "{class}." is token for token the template "a photo of a {}.": the term is 0."""
    method = create_method("kgcoop", tiny, CLASSES, template="a photo of a {}.")
    method.train()
    batch = {"image": tiny_images(2), "label": torch.tensor([1, 0])}
    losses = method.loss(batch, method(batch))
    assert abs(losses["loss_kg"].item()) < 1e-6
    assert_close(losses["loss"], losses["loss_ce"], rel=1e-5)
    # a different template gives a positive term; kg_template overrides the given template
    other = create_method("kgcoop", tiny, CLASSES, template="a photo of a {}.",
                          config={"kg_template": "a centered satellite photo of {}."})
    other.train()
    assert other.loss(batch, other(batch))["loss_kg"] > 1e-4


def test_kgcoop_uses_its_own_template_for_textures(tiny):
    """KgCoOp's CUSTOM_TEMPLATES differ from CoOp's only for DTD; the dataset hands over CoOp's "{} texture."."""
    dtd = create_method("kgcoop", tiny, CLASSES, template="{} texture.")
    assert dtd.kg_template == "a photo of a {}, a type of texture."
    eurosat = create_method("kgcoop", tiny, CLASSES, template="a centered satellite photo of {}.")
    assert eurosat.kg_template == "a centered satellite photo of {}."
    chosen = create_method("kgcoop", tiny, CLASSES, {"kg_template": "{} texture."}, template="{} texture.")
    assert chosen.kg_template == "{} texture."


def test_kgcoop_with_zero_weight_is_coop(tiny):
    coop = create_method("coop", tiny, CLASSES, {"n_ctx": 4, "ctx_init": "a photo of a"})
    kg = create_method("kgcoop", tiny, CLASSES, {"w": 0.0}, template="{} texture.")
    randomise(coop)
    kg.load_adapter_state(coop.adapter_state())
    batch = {"image": tiny_images(3), "label": torch.tensor([2, 0, 1])}
    coop.train()
    kg.train()
    coop_loss = coop.loss(batch, coop(batch))["loss"]
    kg_losses = kg.loss(batch, kg(batch))
    assert kg_losses["loss_kg"] > 1e-4  # the term exists, it is just not weighted
    assert_close(kg_losses["loss"], coop_loss, rel=1e-6)
    coop_loss.backward()
    kg_losses["loss"].backward()
    torch.testing.assert_close(kg.ctx.grad, coop.ctx.grad, rtol=1e-5, atol=1e-7)


def test_kgcoop_frozen_features_follow_class_names_and_stay_out_of_the_adapter(tiny):
    method = create_method("kgcoop", tiny, CLASSES, template="a photo of a {}.")
    assert set(method.adapter_state()) == {"ctx"}
    assert "kg_text_features" not in method.state_dict()
    method.set_classnames(["airplane", "ship"], template="a blurry photo of a {}.")
    assert method.kg_text_features.shape == (2, tiny.config.embed_dim)
    with torch.no_grad():
        expected = tiny.encode_text(tokenize(["a blurry photo of a airplane.", "a blurry photo of a ship."]))
    torch.testing.assert_close(method.kg_text_features, expected / expected.norm(dim=-1, keepdim=True))


def test_kgcoop_evaluation_and_class_swaps_never_encode_the_frozen_templates(tiny):
    """The frozen KG features are a training-loss term: building the method, swapping classes (base -> novel) and
    evaluating run the text tower only for the learned prompts' class features."""
    passes = []
    handle = tiny.transformer.resblocks[0].register_forward_pre_hook(lambda _m, args: passes.append(args[0].shape[0]))
    try:
        method = create_method("kgcoop", tiny, CLASSES, template="a photo of a {}.")
        method.set_classnames(["airplane", "ship", "truck"])
        method.eval()
        with torch.no_grad():
            for _ in range(2):
                method({"image": tiny_images(2)})
    finally:
        handle.remove()
    assert passes == [3]  # one pass: the three learned-prompt class features, cached for the second batch
    assert method._kg_text_features is None


def test_kgcoop_loss_needs_a_forward_first(tiny):
    method = create_method("kgcoop", tiny, CLASSES)
    batch = {"image": tiny_images(1), "label": torch.tensor([0])}
    logits = method(batch)
    method.loss(batch, logits)
    with pytest.raises(RuntimeError, match="before loss"):
        method.loss(batch, logits)


def test_kgcoop_official_vit_b16_parameter_count(vit_b16):
    method = create_method("kgcoop", vit_b16, CLASSES)
    assert method.num_trainable() == 2_048
    assert dict(method.named_trainable())["ctx"].shape == (4, 512)


def test_kgcoop_reference_options():
    cls = get_method_class("kgcoop")
    # CTX_INIT is a switch in KgCoOp: the init words are always "a photo of a"; the class position is never applied
    config = cls.config_from_reference({"ALPHA": 1.0, "N_CTX": 16, "CSC": True, "CTX_INIT": "X", "W": 8.0,
                                        "PREC": "fp16", "CLASS_TOKEN_POSITION": "middle"})
    assert (config.ctx_init, config.csc, config.w, config.class_token_position) == ("a photo of a", False, 8.0, "end")
    config = cls.config_from_reference({"N_CTX": 8, "CSC": True, "CTX_INIT": False, "W": 2.0})
    assert (config.n_ctx, config.ctx_init, config.csc, config.w) == (8, "", True, 2.0)
    with pytest.raises(ConfigError, match="LAMBDA"):
        cls.config_from_reference({"W": 8.0, "LAMBDA": 1.0})


# -- presets ---------------------------------------------------------------------------------------------------------

PRESET_DIRS = ["coop", "cocoop", "kgcoop", "zeroshot"]


def preset_files():
    return sorted(p for d in PRESET_DIRS for p in (CONFIGS / d).glob("*.yaml"))


def test_presets_exist():
    names = {f"{p.parent.name}/{p.stem}" for p in preset_files()}
    assert {"cocoop/vit_b16_c4_ep10_batch1_ctxv1", "kgcoop/vit_b16_ep100_ctxv1", "coop/vit_b16_ctxv1",
            "coop/vit_b16_ep50_ctxv1", "coop/rn50", "coop/rn50_ep50", "coop/rn50_ep100", "coop/vit_b16",
            "coop/vit_b16_ep50", "coop/vit_b16_ep100", "zeroshot/single_template",
            "zeroshot/imagenet_select"} <= names


@pytest.mark.parametrize("path", preset_files(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_preset_schema(path):
    preset = yaml.safe_load(path.read_text())
    assert preset["method"] == path.parent.name
    cls = get_method_class(preset["method"])
    from_dict(cls.config_class, preset.get("method_config") or {}, where=preset["method"])
    assert preset["backbone"] in ARCHITECTURES
    assert preset["source"]
    if "train" in preset:
        assert set(preset["train"]) == {"batch_size", "lr", "max_epoch", "warmup_epoch", "warmup_lr", "momentum",
                                        "weight_decay", "precision"}


def test_official_hyper_parameters():
    def load(name):
        return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())

    cocoop = load("cocoop/vit_b16_c4_ep10_batch1_ctxv1")
    assert cocoop["train"]["batch_size"] == 1 and cocoop["train"]["max_epoch"] == 10
    kg = load("kgcoop/vit_b16_ep100_ctxv1")
    assert kg["method_config"]["w"] == 8.0 and kg["train"]["batch_size"] == 128 and kg["train"]["max_epoch"] == 100
    epochs = {name: load(f"coop/{name}")["train"]["max_epoch"]
              for name in ("rn50_ep50", "rn50_ep100", "rn50", "vit_b16_ep50", "vit_b16_ep100", "vit_b16",
                           "vit_b16_ctxv1", "vit_b16_ep50_ctxv1")}
    assert epochs == {"rn50_ep50": 50, "rn50_ep100": 100, "rn50": 200, "vit_b16_ep50": 50, "vit_b16_ep100": 100,
                      "vit_b16": 200, "vit_b16_ctxv1": 200, "vit_b16_ep50_ctxv1": 50}
    assert load("coop/vit_b16_ctxv1")["method_config"]["ctx_init"] == "a photo of a"
    assert load("zeroshot/imagenet_select")["method_config"]["templates"] == "imagenet_select"
