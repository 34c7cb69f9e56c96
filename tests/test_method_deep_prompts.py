"""VPT-deep, IVLP, MaPLe and PromptSRC beyond the parity harness: depth semantics against an independent
implementation, unequal tower widths, golden intermediates, parameter counts, presets, GPA and clear errors."""

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from parity import assert_close_values, build_method, load_golden
from promptclip.clip.architectures import ARCHITECTURES, build_random
from promptclip.clip.model import CLIP, CLIPConfig
from promptclip.clip.tokenizer import tokenize
from promptclip.config import from_dict
from promptclip.errors import ConfigError
from promptclip.methods import create_method, get_method_class
from promptclip.methods.prompts import prompt_texts
from promptclip.methods.promptsrc import check_gpa, gpa_weights, promptsrc_templates
from promptclip.presets import PRESETS_DIR

CONFIGS = PRESETS_DIR
GOLDEN = Path(__file__).parent / "golden"
CLASSES = ["annual crop land", "forest", "sea_or_lake"]
DEEP_METHODS = ["vpt", "ivlp", "maple", "promptsrc"]

# 4 layers per tower and unequal widths (text 128, vision 192), like ViT-L/14's 768 / 1024: no hard-coded dims.
SMALL = CLIPConfig(embed_dim=64, image_size=32, vision_layers=4, vision_width=192, vision_patch_size=16,
                   vision_heads=3, context_length=77, vocab_size=49408, text_width=128, text_heads=2, text_layers=4)


@pytest.fixture(scope="module")
def backbone():
    return build_random(SMALL, seed=3)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def perturb(method, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in method.named_trainable():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


# -- an independent implementation of the deep-prompt semantics (SPEC 3.4, golden README) ----------------------


def manual_image_features(clip, images, prompts):
    """Prompts[0] appended after the positional embedding, replaced before block i for 1 <= i < depth."""
    v = clip.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
    n = prompts[0].shape[0] if prompts else 0
    if prompts:
        x = torch.cat([x, prompts[0].expand(x.shape[0], -1, -1)], dim=1)
    x = v.ln_pre(x)
    for i, block in enumerate(v.transformer.resblocks):
        if 1 <= i < len(prompts):
            x = torch.cat([x[:, : x.shape[1] - n], prompts[i].expand(x.shape[0], -1, -1)], dim=1)
        x = block(x)
    return v.ln_post(x[:, 0]) @ v.proj


def manual_text_features(clip, texts, prompts):
    """Token embeddings of the full prompt strings; positions 1..n hold prompts[0], then prompts[i] before block i."""
    tokens = tokenize(texts)
    n = prompts[0].shape[0]
    x = clip.token_embedding(tokens)
    x = torch.cat([x[:, :1], prompts[0].expand(len(texts), -1, -1), x[:, 1 + n :]], dim=1)
    x = x + clip.positional_embedding
    for i, block in enumerate(clip.transformer.resblocks):
        if 1 <= i < len(prompts):
            x = torch.cat([x[:, :1], prompts[i].expand(len(texts), -1, -1), x[:, 1 + n :]], dim=1)
        x = block(x)
    x = clip.ln_final(x[torch.arange(len(texts)), tokens.argmax(-1)])
    return x @ clip.text_projection


def manual_logits(image_features, text_features, scale=100.0):
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return scale * image_features @ text_features.t()


SHALLOW = {"vpt": {"depth_vision": 2}, "ivlp": {"depth_text": 2, "depth_vision": 2}, "maple": {"depth": 2},
           "promptsrc": {"depth_text": 2, "depth_vision": 2}}
SPACED = [name.replace("_", " ") for name in CLASSES]


@pytest.mark.parametrize("depth_text, depth_vision", [(1, 1), (2, 3), (4, 4), (3, 0)])
def test_ivlp_matches_an_independent_implementation(backbone, images, depth_text, depth_vision):
    method = create_method("ivlp", backbone, CLASSES, {"depth_text": depth_text, "depth_vision": depth_vision,
                                                       "n_ctx_text": 2, "n_ctx_vision": 3})
    perturb(method)
    assert len(method.text_prompts) == depth_text and len(method.vision_prompts) == depth_vision
    with torch.no_grad():
        texts = [f"a photo of a {name}." for name in SPACED]  # all init words stay in the string
        text = manual_text_features(backbone, texts, list(method.text_prompts))
        image = manual_image_features(backbone, images, list(method.vision_prompts))
        expected = manual_logits(image, text)
        assert torch.allclose(method.encode_classes(), text, atol=1e-5)
        assert torch.allclose(method.eval()({"image": images}), expected, atol=1e-4)


def test_maple_matches_an_independent_implementation_with_unequal_widths(backbone, images):
    method = create_method("maple", backbone, CLASSES, {"depth": 3})
    perturb(method)
    assert [tuple(c.weight.shape) for c in method.couplers] == [(192, 128)] * 3
    assert [tuple(p.shape) for p in method.text_prompts] == [(2, 128)] * 3
    with torch.no_grad():
        vision = [c(p) for c, p in zip(method.couplers, method.text_prompts, strict=True)]
        text = manual_text_features(backbone, [f"a photo of a {n}." for n in SPACED], list(method.text_prompts))
        expected = manual_logits(manual_image_features(backbone, images, vision), text)
        assert torch.allclose(method.eval()({"image": images}), expected, atol=1e-4)


def test_vpt_matches_an_independent_implementation(backbone, images):
    method = create_method("vpt", backbone, CLASSES, {"depth_vision": 2, "n_ctx_vision": 4})
    perturb(method)
    with torch.no_grad():
        text = backbone.encode_text(tokenize([f"a photo of a {n}." for n in SPACED]))
        expected = manual_logits(manual_image_features(backbone, images, list(method.vision_prompts)), text)
        assert torch.allclose(method.eval()({"image": images}), expected, atol=1e-4)


def record_block_inputs(blocks):
    inputs, handles = {}, []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].detach())))
    outputs = {}
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out.detach())))
    return inputs, outputs, handles


def test_prompts_are_replaced_before_blocks_1_to_depth_minus_1_and_carried_forward_after(backbone, images):
    method = create_method("maple", backbone, CLASSES, {"depth": 2, "n_ctx": 2}).eval()
    perturb(method)
    vin, vout, h1 = record_block_inputs(backbone.visual.transformer.resblocks)
    tin, tout, h2 = record_block_inputs(backbone.transformer.resblocks)
    try:
        with torch.no_grad():
            method({"image": images})
            vision = [c(p) for c, p in zip(method.couplers, method.text_prompts, strict=True)]
    finally:
        for h in h1 + h2:
            h.remove()
    n = 2
    # block 1 (< depth): fresh prompts, not the previous block's outputs
    assert torch.equal(vin[1][:, -n:], vision[1].expand(len(images), -1, -1))
    assert torch.equal(tin[1][:, 1 : 1 + n], method.text_prompts[1].detach().expand(len(CLASSES), -1, -1))
    assert not torch.allclose(vout[0][:, -n:], vin[1][:, -n:])
    # blocks 2, 3 (>= depth): the previous block's prompt-token outputs are carried forward unchanged
    for i in (2, 3):
        assert torch.equal(vin[i], vout[i - 1])
        assert torch.equal(tin[i], tout[i - 1])
    # non-prompt tokens are never replaced
    assert torch.equal(vin[1][:, :-n], vout[0][:, :-n])
    assert torch.equal(tin[1][:, 1 + n :], tout[0][:, 1 + n :])


def test_a_prompt_of_layer_depth_or_deeper_does_not_exist_and_every_prompt_is_used(backbone, images):
    method = create_method("ivlp", backbone, CLASSES, {"depth_text": 2, "depth_vision": 3})
    names = method.reference_name_map()
    assert "image_encoder.transformer.resblocks.2.VPT_shallow" in names
    assert not any(f"resblocks.{i}." in k for k in names for i in (3,))
    assert "text_encoder.transformer.resblocks.2.VPT_shallow" not in names
    assert "image_encoder.transformer.resblocks.0.VPT_shallow" not in names  # layer 0 is the input prompt
    method.train()
    batch = {"image": images, "label": torch.tensor([0, 1, 2])}
    method.loss(batch, method(batch))["loss"].backward()
    for name, p in method.named_trainable():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # a deeper depth adds prompts before later blocks and changes the result
    deeper = create_method("ivlp", backbone, CLASSES, {"depth_text": 2, "depth_vision": 4})
    with torch.no_grad():
        for i in range(3):
            deeper.vision_prompts[i].copy_(method.vision_prompts[i])
        deeper.text_prompts[0].copy_(method.text_prompts[0])
        deeper.text_prompts[1].copy_(method.text_prompts[1])
        assert not torch.allclose(deeper.eval()({"image": images}), method.eval()({"image": images}))


# -- golden intermediates ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ivlp", "maple", "promptsrc"])
def test_prompt_strings_keep_all_init_words_and_the_head_matches_the_golden(name):
    golden = load_golden(name)
    method, _ = build_method(golden)
    classnames = [c.replace("_", " ") for c in golden.classnames]
    tokens = tokenize(prompt_texts(method.prefix_text, classnames))
    assert torch.equal(tokens, golden.tensors["input.tokenized_prompts"])
    head_len = golden.meta["extra"]["prompts_head_len"]
    with torch.no_grad():
        head = method.prompt_embeddings(method.text_prompts[0])[:, :head_len]
    assert_close_values(head, golden.tensors["eval.prompts_head"], f"{name} eval.prompts_head")


def test_maple_visual_prompts_per_layer_match_the_golden():
    golden = load_golden("maple")
    method, _ = build_method(golden)
    with torch.no_grad():
        prompts = method.vision_layer_prompts()
    depth = golden.trainer_cfg["PROMPT_DEPTH"]
    assert len(prompts) == depth
    for i in range(depth):
        assert_close_values(prompts[i], golden.tensors[f"eval.visual_prompts_layer{i}"], f"visual_prompts_layer{i}")


def test_vpt_fixed_text_features_match_the_golden():
    golden = load_golden("vpt")
    method, _ = build_method(golden)
    assert_close_values(method.fixed_text_features, golden.tensors["eval.fixed_text_features"], "fixed_text")


def test_promptsrc_teachers_and_loss_terms_match_the_golden():
    golden = load_golden("promptsrc")
    method, _ = build_method(golden)
    assert method.extra_state() == {}
    assert golden.meta["extra"]["teacher_templates"] == promptsrc_templates()
    images, labels = golden.images(), golden.labels()
    with torch.no_grad():
        teacher_text = method.teacher_text_features()
        # the reference averages raw (unnormalised) template features, then normalises the mean
        assert_close_values(method.teacher_text, golden.tensors["eval.fixed_text_features"], "fixed_text_features")
        assert_close_values(teacher_text, golden.tensors["train.fixed_text_features_normalised"], "normalised")
        zs_image, zs_logits = method.teacher(images)
        assert_close_values(zs_image, golden.tensors["train.zs_image_features"], "zs_image_features")
        assert_close_values(zs_logits, golden.tensors["train.zs_logits"], "zs_logits")
    method.train()
    batch = {"image": images, "label": labels}
    losses = method.loss(batch, method(batch))
    for term in ("loss_ce", "loss_scl_text", "loss_scl_image", "loss_scl_logits", "loss"):
        assert_close_values(losses[term], golden.tensors[f"train.{term}"], f"train.{term}")


def test_promptsrc_loss_needs_the_training_forward(backbone, images):
    method = create_method("promptsrc", backbone, CLASSES, {"depth_text": 2, "depth_vision": 2})
    batch = {"image": images, "label": torch.tensor([0, 1, 2])}
    with pytest.raises(RuntimeError, match="training forward"):
        method.loss(batch, torch.zeros(3, 3))
    method.eval()
    with torch.no_grad():
        logits = method(batch)
    with pytest.raises(RuntimeError, match="training forward"):
        method.loss(batch, logits)


# -- GPA ------------------------------------------------------------------------------------------------------


def test_gpa_weights_equal_the_reference_weights():
    golden = json.loads((GOLDEN / "promptsrc.json").read_text())
    expected = golden["extra"]["gpa_weights_per_epoch"]
    cfg = golden["cfg"]
    weights = gpa_weights(cfg["trainer"]["GPA_MEAN"], cfg["trainer"]["GPA_STD"], cfg["optim"]["MAX_EPOCH"])
    assert weights.tolist() == pytest.approx(expected, rel=1e-9, abs=0)


def gaussian_weights(mean, std, epochs):
    w = [math.exp(-0.5 * ((e - mean) / std) ** 2) for e in range(1, epochs + 1)]
    return [x / sum(w) for x in w]


def fake_epoch_values(method, epoch):
    g = torch.Generator().manual_seed(100 + epoch)
    return {n: torch.randn(p.shape, generator=g) for n, p in method.named_trainable()}


def set_params(method, values):
    with torch.no_grad():
        for n, p in method.named_trainable():
            p.copy_(values[n])


GPA_CFG = {"depth_text": 2, "depth_vision": 2, "gpa_mean": 2.0, "gpa_std": 1.0}


# 15: the official mean in a run shortened to 3 epochs, as a held-back trajectory golden may hold; the reference runs
# it, so the hooks warn (the result is the last epoch's prompts) and aggregate with the reference's weights.
@pytest.mark.parametrize("mean", [2.0, 15.0])
def test_gpa_aggregate_is_the_weighted_sum_of_a_3_epoch_run(backbone, mean):
    method = create_method("promptsrc", backbone, CLASSES, {**GPA_CFG, "gpa_mean": mean})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        method.on_train_start(3)
    assert any("last epoch" in str(w.message) for w in caught) == (mean == 15.0)
    weights = gaussian_weights(mean, 1.0, 3)
    per_epoch = []
    for epoch in range(3):
        per_epoch.append(fake_epoch_values(method, epoch))
        set_params(method, per_epoch[-1])
        method.on_epoch_end(epoch, 3)
    method.on_train_end()
    for n, p in method.named_trainable():
        expected = sum(w * v[n].double() for w, v in zip(weights, per_epoch, strict=True))
        assert torch.allclose(p.double(), expected, atol=1e-6), n


def test_gpa_resumes_exactly_from_extra_state(backbone, tmp_path):
    full = create_method("promptsrc", backbone, CLASSES, GPA_CFG)
    first = create_method("promptsrc", backbone, CLASSES, GPA_CFG)
    for epoch in range(3):
        set_params(full, fake_epoch_values(full, epoch))
        full.on_epoch_end(epoch, 3)
    full.on_train_end()
    for epoch in range(2):
        set_params(first, fake_epoch_values(first, epoch))
        first.on_epoch_end(epoch, 3)
    save_file(first.extra_state(), tmp_path / "state.safetensors")
    resumed = create_method("promptsrc", backbone, CLASSES, GPA_CFG)
    resumed.load_extra_state(load_file(tmp_path / "state.safetensors"))
    set_params(resumed, fake_epoch_values(resumed, 2))
    resumed.on_epoch_end(2, 3)
    with pytest.raises(RuntimeError, match="already added"):
        resumed.on_epoch_end(2, 3)
    resumed.on_train_end()
    for (n, a), (_, b) in zip(full.named_trainable(), resumed.named_trainable(), strict=True):
        assert torch.equal(a, b), n


def test_gpa_off_keeps_the_final_prompts(backbone):
    method = create_method("promptsrc", backbone, CLASSES, {**GPA_CFG, "gpa": False})
    values = fake_epoch_values(method, 0)
    set_params(method, values)
    method.on_epoch_end(0, 3)
    method.on_train_end()
    assert method.extra_state() == {}
    assert all(torch.equal(p, values[n]) for n, p in method.named_trainable())


@pytest.mark.parametrize("mean, std, epochs", [(15, 1, 20), (6, 10, 20), (30, 30, 50), (45, 5, 50)])
def test_official_gpa_settings_are_accepted_silently(mean, std, epochs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights = check_gpa(mean, std, epochs)
    assert weights.sum().item() == pytest.approx(1.0)
    assert weights.tolist() == pytest.approx(gaussian_weights(mean, std, epochs), rel=1e-9)


@pytest.mark.parametrize("mean, std, epochs, match", [
    (500, 0.01, 20, "underflow"),
    (15, 0, 20, "positive"),
])
def test_gpa_settings_that_cannot_be_computed_are_rejected(mean, std, epochs, match):
    with pytest.raises(ConfigError, match=match):
        check_gpa(mean, std, epochs)


@pytest.mark.parametrize("mean, std, epochs, match", [
    (30, 1, 20, "last epoch, so the result is the final prompts"),
    (15, 1, 3, "last epoch, so the result is the final prompts"),  # the official GPA in a 3-epoch run
    (-3, 0.5, 20, "outside epochs 1..20 and reduces to the prompts of epoch 1"),  # all on the warm-up epoch
    (10, 0.05, 20, "reduces to the prompts of epoch 10"),
])
def test_gpa_settings_that_do_nothing_are_warned_about(mean, std, epochs, match):
    with pytest.warns(UserWarning, match=match):
        weights = check_gpa(mean, std, epochs)
    assert weights.tolist() == pytest.approx(gaussian_weights(mean, std, epochs), rel=1e-9)


def test_gpa_std_must_be_positive_when_the_method_is_built(backbone):
    with pytest.raises(ConfigError, match="positive"):
        create_method("promptsrc", backbone, CLASSES, {**GPA_CFG, "gpa_std": 0.0})


# -- class names, caching, teachers ---------------------------------------------------------------------------


def test_vpt_fixed_text_is_rebuilt_on_set_classnames(backbone):
    method = create_method("vpt", backbone, CLASSES, {"depth_vision": 2})
    method.set_classnames(["river", "pasture_land"])
    with torch.no_grad():
        expected = backbone.encode_text(tokenize(["a photo of a river.", "a photo of a pasture land."]))
    assert torch.allclose(method.fixed_text_features, expected, atol=1e-6)
    assert "fixed_text_features" not in method.state_dict()


@pytest.mark.parametrize("name", DEEP_METHODS)
def test_eval_caches_image_independent_text_features(backbone, name):
    method = create_method(name, backbone, CLASSES, SHALLOW[name])
    assert method.image_independent_text and not method.supports_resnet
    method.eval()
    with torch.no_grad():
        first = method.class_features()
        assert method.class_features() is first
        method.set_classnames(["river"])
        assert method.class_features().shape[0] == 1


def test_promptsrc_teacher_follows_the_class_names(backbone):
    method = create_method("promptsrc", backbone, CLASSES, GPA_CFG)
    assert method.teacher_text is None  # built lazily: evaluation never pays for the 60 templates
    with torch.no_grad():
        method.teacher_text_features()
        method.set_classnames(["river"])
        assert method.teacher_text is None
        teacher = method.teacher_text_features()
        templates = promptsrc_templates()
        raw = torch.stack([backbone.encode_text(tokenize([t.format("river")]))[0] for t in templates])
        mean = raw.mean(0)
        assert torch.allclose(teacher[0], mean / mean.norm(), atol=1e-5)
    assert len(templates) == 60


# -- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DEEP_METHODS)
def test_resnet_backbone_is_a_clear_config_error(name):
    with pytest.raises(ConfigError, match="ViT"):
        create_method(name, build_random("tiny-rn", seed=0), CLASSES)


@pytest.mark.parametrize("name, config, match", [
    ("maple", {"depth": 5}, "depth"),
    ("maple", {"depth": 0}, "depth"),
    ("ivlp", {"depth_text": 0}, "depth_text"),
    ("ivlp", {"depth_text": 2, "depth_vision": 5}, "depth_vision"),
    ("vpt", {"depth_vision": 0}, "depth_vision"),
    ("vpt", {"n_ctx_vision": 0, "depth_vision": 2}, "n_ctx_vision"),
    ("ivlp", {"n_ctx_text": 4, "ctx_init": "a photo", "depth_text": 2, "depth_vision": 2}, "fewer than n_ctx"),
    ("promptsrc", {"n_ctx_text": 0, "depth_text": 2, "depth_vision": 2}, "n_ctx"),
])
def test_bad_configs_are_clear_errors(backbone, name, config, match):
    with pytest.raises(ConfigError, match=match):
        create_method(name, backbone, CLASSES, config)


def test_more_than_4_context_tokens_are_random_behind_placeholders(backbone):
    method = create_method("ivlp", backbone, CLASSES, {"n_ctx_text": 5, "depth_text": 2, "depth_vision": 2})
    assert method.prefix_text == "X X X X X"
    short = create_method("maple", backbone, CLASSES, {"n_ctx": 2, "depth": 2})
    assert short.prefix_text == "a photo of a"
    ids = tokenize(["a photo"])[0, 1:3]
    assert torch.equal(short.text_prompts[0], backbone.token_embedding.weight[ids])


def test_reference_options_map_and_reject_unknown_keys():
    vpt = get_method_class("vpt").config_from_reference({"N_CTX_VISION": 8, "CTX_INIT": "a picture of",
                                                         "PROMPT_DEPTH_VISION": 12, "PREC": "fp16"})
    assert (vpt.n_ctx_vision, vpt.depth_vision, vpt.ctx_init) == (8, 12, "a photo of a")  # hard-coded prefix
    src = get_method_class("promptsrc").config_from_reference({"GPA_MEAN": 6, "GPA_STD": 10})
    assert (src.gpa_mean, src.gpa_std, src.depth_text, src.n_ctx_vision) == (6.0, 10.0, 9, 4)
    for name, key in [("maple", "PROMPT_DEPTH_VISION"), ("ivlp", "GPA_MEAN"), ("vpt", "N_CTX_TEXT")]:
        with pytest.raises(ConfigError, match=key):
            get_method_class(name).config_from_reference({key: 1})


# -- official configurations -----------------------------------------------------------------------------------

# SPEC 3.0 / 3.4 / 3.6 (published / computed counts), and the module shapes for the other presets.
PRESET_COUNTS = {
    "maple/vit_b16_c2_ep5_batch4_2ctx.yaml": 3_555_072,
    "maple/vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml": 3 * (2 * 512 + 512 * 768 + 768),
    "ivlp/vit_b16_c2_ep5_batch4_2+2ctx.yaml": 30_720,
    "ivlp/vit_b16_c2_ep5_batch4_4ctx_language_only.yaml": 12 * 4 * 512,
    "vpt/vit_b16_c2_ep5_batch4_4.yaml": 12 * 8 * 768,
    "promptsrc/vit_b16_c2_ep20_batch4_4+4ctx.yaml": 46_080,
    "promptsrc/vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets.yaml": 3 * 4 * (512 + 768),
    "promptsrc/vit_b16_c2_ep50_batch4_4+4ctx_few_shot_gpa30_30.yaml": 46_080,
    "promptsrc/vit_b16_c2_ep50_batch4_4+4ctx_few_shot_gpa45_5.yaml": 46_080,
    # PromptKD's teacher recipe is for ViT-L/14 (9 x 4 x (768 + 1024) = 64,512 there); counted on the ViT-B/16 fixture.
    "promptsrc/vit_l14_c2_ep20_batch8_4+4ctx.yaml": 46_080,
}
# SPEC 2.4: (lr, max_epoch, batch, depth(s), extra)
PRESET_VALUES = {
    "maple/vit_b16_c2_ep5_batch4_2ctx.yaml": (0.0035, 5, {"n_ctx": 2, "depth": 9}),
    "maple/vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml": (0.0026, 2, {"n_ctx": 2, "depth": 3}),
    "ivlp/vit_b16_c2_ep5_batch4_2+2ctx.yaml": (0.0035, 5, {"depth_text": 12, "depth_vision": 12}),
    "ivlp/vit_b16_c2_ep5_batch4_4ctx_language_only.yaml": (0.0025, 5, {"depth_text": 12, "depth_vision": 0}),
    "vpt/vit_b16_c2_ep5_batch4_4.yaml": (0.0025, 5, {"n_ctx_vision": 8, "depth_vision": 12}),
    "promptsrc/vit_b16_c2_ep20_batch4_4+4ctx.yaml": (0.0025, 20, {"gpa_mean": 15, "gpa_std": 1, "depth_text": 9}),
    "promptsrc/vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets.yaml": (0.0025, 20, {"gpa_mean": 6, "gpa_std": 10,
                                                                                "depth_vision": 3}),
    "promptsrc/vit_b16_c2_ep50_batch4_4+4ctx_few_shot_gpa30_30.yaml": (0.0025, 50, {"gpa_mean": 30, "gpa_std": 30}),
    "promptsrc/vit_b16_c2_ep50_batch4_4+4ctx_few_shot_gpa45_5.yaml": (0.0025, 50, {"gpa_mean": 45, "gpa_std": 5}),
    "promptsrc/vit_l14_c2_ep20_batch8_4+4ctx.yaml": (0.005, 20, {"gpa_mean": 15, "gpa_std": 1, "depth_text": 9}),
}


#: Presets whose official batch is not 4 (PromptKD's ViT-L/14 teacher recipe: 8).
BATCH_SIZES = {"promptsrc/vit_l14_c2_ep20_batch8_4+4ctx.yaml": 8}


def test_every_preset_of_these_methods_is_listed():
    found = {str(p.relative_to(CONFIGS)) for m in DEEP_METHODS for p in (CONFIGS / m).glob("*.yaml")}
    assert found == set(PRESET_COUNTS)


@pytest.fixture(scope="module")
def vit_b16():
    return CLIP(ARCHITECTURES["ViT-B/16"]).requires_grad_(False)


@pytest.mark.parametrize("preset", sorted(PRESET_COUNTS))
def test_presets_build_with_the_official_parameter_counts(preset, vit_b16):
    data = yaml.safe_load((CONFIGS / preset).read_text())
    assert data["method"] == preset.split("/")[0]
    config = from_dict(get_method_class(data["method"]).config_class, data["method_config"], where=preset)
    lr, max_epoch, values = PRESET_VALUES[preset]
    assert data["train"]["lr"] == lr and data["train"]["max_epoch"] == max_epoch
    assert data["train"]["batch_size"] == BATCH_SIZES.get(preset, 4) and data["train"]["warmup_epoch"] == 1
    assert all(getattr(config, k) == v for k, v in values.items())
    method = create_method(data["method"], vit_b16, ["cat", "dog"], config)
    assert method.num_trainable() == PRESET_COUNTS[preset]
    if data["method"] == "promptsrc":
        check_gpa(config.gpa_mean, config.gpa_std, max_epoch)


@pytest.mark.parametrize("name, count", [("maple", 3_555_072), ("ivlp", 30_720), ("promptsrc", 46_080),
                                         ("vpt", 12 * 8 * 768)])
def test_default_configs_are_the_official_ones(name, count, vit_b16):
    assert create_method(name, vit_b16, ["cat"]).num_trainable() == count
