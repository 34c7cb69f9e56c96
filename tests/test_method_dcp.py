"""DCP / CMPA: the reference mode's intermediate values and batch-composition dependence (golden ``cmpa``), the
paper mode's bidirectional exchange and batch independence, parameter counts, presets and configuration errors.

Logits, loss and every gradient of reference mode are checked by tests/test_parity.py."""


import pytest
import torch
import yaml

from parity import assert_close_values, build_method, golden_backbone, load_golden
from promptclip.clip.architectures import ARCHITECTURES, build_random
from promptclip.clip.model import CLIP
from promptclip.clip.tokenizer import get_tokenizer
from promptclip.config import from_dict
from promptclip.errors import ConfigError
from promptclip.methods import create_method, get_method_class
from promptclip.methods.dcp import DCPConfig
from promptclip.presets import PRESETS_DIR
from tolerance import assert_close, assert_differ

PRESETS = PRESETS_DIR / "dcp"


@pytest.fixture(scope="module")
def golden():
    return load_golden("cmpa")


@pytest.fixture(scope="module")
def reference(golden):
    method, _ = build_method(golden)
    return method.eval()


@pytest.fixture(scope="module")
def mini(golden):
    return golden_backbone(golden)


@pytest.fixture(scope="module")
def tiny():
    return build_random("tiny", seed=7)


def record(method, images):
    values = {}
    with torch.no_grad():
        logits = method({"image": images}, recorder=values.__setitem__)
    return logits, values


def dcp(backbone, classnames, **config):
    return create_method("dcp", backbone, classnames, config).eval()


# -- reference mode against the golden ---------------------------------------------------------------------------


def test_reference_mode_intermediates_match_golden(golden, reference):
    calls = golden.meta["extra"]["cmpa_calls_per_forward"]
    assert reference.cmpa_layers == tuple(range(1, calls + 1))  # "CMPA applied before blocks 1..depth"
    _, values = record(reference, golden.images())
    for i in range(calls):
        for name in ("visual_prompts", "text_prompts_discarded"):
            ours = values[f"cmpa_call{i}.{name}"]
            assert ours.shape[0] == 1  # pooled over the batch: one set for all images
            assert_close_values(ours[0], golden.tensors[f"eval.cmpa_call{i}.{name}"], f"cmpa_call{i}.{name}")
    assert f"cmpa_call{calls}.visual_prompts" not in values
    for name in ("image_features", "text_features", "prompts_head"):
        assert_close_values(values[name], golden.tensors[f"eval.{name}"], name)


def test_reference_mode_logits_depend_on_batch_composition_as_golden(golden, reference):
    images, full = golden.images(), golden.tensors["eval.logits"]
    with torch.no_grad():
        first_two = reference({"image": images[0:2]})
        last_two = reference({"image": images[2:4]})
        alone = torch.cat([reference({"image": images[i : i + 1]}) for i in range(len(images))])
    assert_close_values(first_two, golden.tensors["eval.logits_batch2"], "eval.logits_batch2")
    assert_close_values(last_two, golden.tensors["eval.logits_batch2_last"], "eval.logits_batch2_last")
    assert_close_values(alone, golden.tensors["eval.logits_batch1"], "eval.logits_batch1")
    # The same image gets other logits in another batch: far beyond the parity tolerance.
    assert_differ(alone, full, rel=1e-3)
    assert_differ(torch.cat([first_two, last_two]), full, rel=1e-3)
    assert not reference.batch_independent


def test_reference_mode_gives_no_gradient_to_the_text_half(golden):
    method, _ = build_method(golden)
    method.train()
    batch = {"image": golden.images(), "label": golden.labels()}
    method.loss(batch, method(batch))["loss"].backward()
    for name, param in method.named_trainable():
        if name.startswith("cmpa.shared.text."):
            assert param.grad is None, name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


# -- paper mode ----------------------------------------------------------------------------------------------------


def unrolled_paper_logits(method, image):
    """Paper mode for one image, written out layer by layer: class 0's text prompt states (the same for every
    class under the causal mask) meet the image's visual prompt states; both updates are written back."""
    clip, n = method.clip, method.n_ctx
    block = method.cmpa["shared"]
    x_img = clip.visual.embed(image[None], method.visual_prompts)
    x_txt = clip.text.embed(token_embeds=method.prompt_embeddings())
    for layer, (img_block, txt_block) in enumerate(zip(clip.visual.blocks, clip.text.blocks, strict=True)):
        if 1 <= layer <= method.config.depth:
            visual, text = x_img[:, -n:], x_txt[:1, 1 : 1 + n]
            new_visual, new_text = block.visual(visual, text), block.text(text, visual)
            x_img = torch.cat([x_img[:, :-n], new_visual], dim=1)
            x_txt = torch.cat([x_txt[:, :1], new_text.expand(x_txt.shape[0], -1, -1), x_txt[:, 1 + n :]], dim=1)
        x_img, x_txt = img_block(x_img), txt_block(x_txt)
    image_features = clip.visual.pool(x_img)
    text_features = clip.text.pool(x_txt, method.eot)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return clip.logit_scale.exp() * image_features @ text_features.t()


def test_paper_mode_equals_each_image_alone_and_the_unrolled_exchange(golden, mini):
    method = dcp(mini, golden.classnames, depth=2, init_seed=3)
    assert method.batch_independent and method.config.mode == "paper"
    images = golden.images()[:3]
    logits, values = record(method, images)
    with torch.no_grad():
        alone = torch.cat([method({"image": images[i : i + 1]}) for i in range(len(images))])
        unrolled = torch.cat([unrolled_paper_logits(method, image) for image in images])
    assert_close(alone, logits, rel=1e-5, what="one image at a time")
    assert_close(unrolled, logits, rel=1e-5, what="unrolled exchange")
    # Per-image text: one text feature per (image, class), one set of prompt states per image.
    assert values["text_features"].shape == (len(images), len(golden.classnames), mini.config.embed_dim)
    assert values["cmpa_call0.text_prompts"].shape[0] == len(images)
    assert not any(key.endswith("_discarded") for key in values)


def test_paper_mode_text_chunks_give_the_same_logits(golden, mini):
    whole = dcp(mini, golden.classnames, depth=2, init_seed=3)
    chunked = dcp(mini, golden.classnames, depth=2, init_seed=3, text_chunk_size=2 * len(golden.classnames) + 1)
    images = golden.images()[:3]
    with torch.no_grad():
        assert_close(chunked({"image": images}), whole({"image": images}), rel=1e-5)


def test_paper_mode_gives_every_parameter_a_gradient(golden, mini):
    method = dcp(mini, golden.classnames, depth=2, init_seed=3).train()
    batch = {"image": golden.images(), "label": golden.labels()}
    method.loss(batch, method(batch))["loss"].backward()
    for name, param in method.named_trainable():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_paper_mode_differs_from_reference_mode(golden, mini):
    images = golden.images()
    paper = dcp(mini, golden.classnames, depth=2, init_seed=3)
    reference = dcp(mini, golden.classnames, depth=2, init_seed=3, mode="reference")
    with torch.no_grad():
        assert_differ(paper({"image": images}), reference({"image": images}), rel=1e-3)


@pytest.mark.parametrize(
    "mode, pooling, independent",
    [("paper", None, True), ("reference", None, False), ("paper", "batch", False), ("reference", "per_sample", True)],
)
def test_pooling_decides_batch_independence(tiny, mode, pooling, independent):
    method = dcp(tiny, ["cat", "dog", "sea or lake"], depth=1, mode=mode, pooling=pooling)
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        together = method({"image": images})
        alone = torch.cat([method({"image": images[i : i + 1]}) for i in range(3)])
    assert method.batch_independent is independent
    assert method.describe()["batch_independent"] is independent
    if independent:
        assert_close(alone, together, rel=1e-5)
    else:
        assert_differ(alone, together, rel=1e-4)


def test_fusing_first_and_max_pool_the_batch(tiny):
    classes = ["cat", "dog"]
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    first = dcp(tiny, classes, depth=1, mode="reference", fusing="first")
    largest = dcp(tiny, classes, depth=1, mode="reference", fusing="max")
    with torch.no_grad():
        # "first": every image gets the prompts computed from image 0's states.
        assert_close(first({"image": images[:1]})[0], first({"image": images})[0], rel=1e-5)
        assert_differ(first({"image": images[1:]})[0], first({"image": images})[1], rel=1e-4)
        # "max": an element-wise maximum over the batch, so the order of the images does not matter.
        swapped = largest({"image": images.flip(0)}).flip(0)
        assert_close(swapped, largest({"image": images}), rel=1e-5)


# -- sizes, names, descriptions --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_b16():
    return CLIP(ARCHITECTURES["ViT-B/16"])


def test_official_parameter_count_vit_b16(vit_b16):
    method = create_method("dcp", vit_b16, ["cat", "dog"])  # defaults = the official config
    shared_block = sum(p.numel() for p in method.cmpa.parameters())
    prompts = method.text_prompts.numel() + method.visual_prompts.numel()
    assert shared_block == 11_027_968  # SPEC 3.5
    assert prompts == 20_480
    assert method.num_trainable() == 11_027_968 + 20_480
    # The half that receives a gradient in reference mode: "~7.48M" (SPEC 3.5); by hand: query projection
    # 512*768+768, attention 4*768*768+4*768, two LayerNorms 4*768, MLP 2*768*3072+3072+768.
    assert sum(p.numel() for p in method.cmpa["shared"].visual.parameters()) == 7_481_856


def test_unshared_parameter_counts_vit_b16(vit_b16):
    reference = create_method("dcp", vit_b16, ["cat"], {"shared": False, "mode": "reference"})
    assert reference.num_trainable() == 12 * 11_027_968 + 20_480  # one block per layer, as the reference: ~132M
    paper = create_method("dcp", vit_b16, ["cat"], {"shared": False})
    assert paper.num_trainable() == 9 * 11_027_968 + 20_480  # only the blocks that run
    assert paper.cmpa_layers == tuple(range(1, 10))


def test_reference_name_map_of_unshared_blocks(mini):
    method = dcp(mini, ["cat"], depth=2, shared=False, mode="reference")
    mapping = method.reference_name_map()
    assert mapping["encoder.resblocks.3.prompt_attn.proj_t2v.weight"] == "cmpa.layer3.visual.query_proj.weight"
    assert mapping["encoder.resblocks.0.prompt_attn.mlp_pa_text.c_fc.bias"] == "cmpa.layer0.text.mlp.c_fc.bias"
    assert set(mapping.values()) == {name for name, _ in method.named_trainable()}


def test_describe_records_the_mode(tiny):
    paper = dcp(tiny, ["cat"], depth=1).describe()
    assert (paper["mode"], paper["pooling"], paper["text_update"]) == ("paper", "per_sample", "written back")
    reference = dcp(tiny, ["cat"], depth=1, mode="reference").describe()
    assert (reference["mode"], reference["pooling"]) == ("reference", "batch")
    assert reference["text_update"].startswith("discarded")
    assert reference["variant"] != paper["variant"]


def test_new_class_names_keep_the_learned_tensors(tiny):
    method = dcp(tiny, ["cat", "dog"], depth=1)
    before = {name: p.detach().clone() for name, p in method.named_trainable()}
    method.set_classnames(["sea or lake", "river", "forest"])
    with torch.no_grad():
        logits = method({"image": torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))})
    assert logits.shape == (2, 3)
    for name, p in method.named_trainable():
        assert torch.equal(p, before[name]), name


def test_short_context_is_initialised_from_the_first_init_words(tiny):
    method = dcp(tiny, ["cat"], depth=1, n_ctx=2, ctx_init="a photo of a")
    words = get_tokenizer().encode("a photo of a")
    table = tiny.token_embedding.weight
    assert torch.equal(method.text_prompts.detach(), table[words[:2]])
    # The prompt string keeps every init word: "of a" follow the learned tokens as frozen embeddings.
    assert torch.equal(method.prompt_embeddings()[0, 3:5], table[words[2:]])


# -- configuration ---------------------------------------------------------------------------------------------


def test_config_from_reference():
    cls = get_method_class("dcp")
    official = cls.config_from_reference({"N_CTX": 16, "CTX_INIT": "a photo of a", "PREC": "fp16",
                                          "PROMPT_DEPTH": 9, "FUSING": "mean", "PS": True})
    assert (official.n_ctx, official.ctx_init, official.depth, official.mode) == (16, "", 9, "reference")
    assert official.effective_pooling == "batch"
    short = cls.config_from_reference({"N_CTX": 2, "CTX_INIT": "a photo of a", "PROMPT_DEPTH": 3, "FUSING": "max",
                                       "PS": False})
    assert (short.ctx_init, short.fusing, short.shared) == ("a photo of a", "max", False)
    with pytest.raises(ConfigError, match="COMPOUND"):
        cls.config_from_reference({"N_CTX": 16, "COMPOUND": 1})


@pytest.mark.parametrize(
    "config, message",
    [
        ({"fusing": "max"}, "fusing"),  # per-sample pooling reduces nothing over the batch
        ({"mode": "reference", "pooling": "per_sample", "fusing": "first"}, "fusing"),
        ({"mode": "reference", "text_chunk_size": 100}, "text_chunk_size"),
        ({"pooling": "batch", "text_chunk_size": 100}, "text_chunk_size"),
        ({"ctx_init": "a photo of a"}, "n_ctx <= 4"),
        ({"n_ctx": 0}, "n_ctx"),
        ({"depth": 0}, "depth"),
        ({"mode": "code_faithful"}, "mode"),
        ({"pooling": "batch_mean"}, "pooling"),
    ],
)
def test_invalid_configs_are_rejected(tiny, config, message):
    with pytest.raises(ConfigError, match=message):
        create_method("dcp", tiny, ["cat"], config)


def test_depth_is_bounded_by_the_towers(tiny):
    layers = tiny.config.vision_layers
    with pytest.raises(ConfigError, match=f"at most {layers}"):
        create_method("dcp", tiny, ["cat"], {"depth": layers + 1})
    # the reference's counter: before blocks 1..depth, capped at the last block
    assert create_method("dcp", tiny, ["cat"], {"depth": 2}).cmpa_layers == (1, 2)
    assert create_method("dcp", tiny, ["cat"], {"depth": layers}).cmpa_layers == tuple(range(1, layers))
    with pytest.raises(ConfigError, match="fewer than n_ctx"):
        create_method("dcp", tiny, ["cat"], {"depth": 1, "n_ctx": 4, "ctx_init": "a photo"})


def test_resnet_backbone_is_rejected():
    with pytest.raises(ConfigError, match="ViT"):
        create_method("dcp", build_random("tiny-rn", seed=7), ["cat"], {"depth": 1})


def test_presets_are_the_official_config_in_both_modes():
    presets = {path.name: yaml.safe_load(path.read_text()) for path in sorted(PRESETS.glob("*.yaml"))}
    assert {preset["method_config"]["mode"] for preset in presets.values()} == {"paper", "reference"}
    for name, preset in presets.items():
        assert preset["method"] == "dcp"
        config = from_dict(DCPConfig, preset["method_config"], where=name)
        assert (config.n_ctx, config.ctx_init, config.depth, config.fusing, config.shared) == (16, "", 9, "mean", True)
        train = preset["train"]
        assert (train["batch_size"], train["lr"], train["max_epoch"], train["warmup_epoch"]) == (4, 0.0035, 20, 1)
        assert (train["warmup_lr"], train["momentum"], train["weight_decay"]) == (1e-5, 0.9, 5e-4)
        assert "CMPA/vit_b16_c2_ep20_batch4_16ctx.yaml" in preset["source"]
    assert DCPConfig().mode == "paper" and DCPConfig().effective_pooling == "per_sample"


def test_init_is_seeded_and_leaves_the_global_rng_alone(tiny):
    state = torch.get_rng_state()
    first = dcp(tiny, ["cat"], depth=1, init_seed=5)
    second = dcp(tiny, ["cat"], depth=1, init_seed=5)
    other = dcp(tiny, ["cat"], depth=1, init_seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, a), (_, b), (_, c) in zip(first.named_trainable(), second.named_trainable(), other.named_trainable(),
                                         strict=True):
        assert torch.equal(a, b), name
        if a.numel() > 1 and "ln_" not in name and "attn.in_proj_bias" not in name and "out_proj.bias" not in name:
            assert not torch.equal(a, c), name
