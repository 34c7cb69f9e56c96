"""MuGCP (INFERRED design): ablation switches change the computation in the way they claim, per-image conditioning
independent of the batch, batched B x C text encoding, missing-caption policy, parameter count, presets."""

from __future__ import annotations

import warnings

import pytest
import torch

from promptclip.clip.architectures import ARCHITECTURES, build_random
from promptclip.clip.model import CLIP, CLIPConfig
from promptclip.errors import ConfigError, DataError
from promptclip.methods import create_method
from promptclip.methods import mugcp as mugcp_module
from promptclip.presets import default_preset, list_presets, load_preset

# Small and fast, unequal widths (hard-coded dims fail), 4 layers: the tests use depth 3.
SMALL = CLIPConfig(embed_dim=48, image_size=32, vision_layers=4, vision_width=64, vision_patch_size=16,
                   vision_heads=2, context_length=77, vocab_size=49408, text_width=96, text_heads=2, text_layers=4)
CLASSES = ["annual crop land", "forest", "sea or lake"]
FAST = {"depth": 3}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small():
    return build_random(SMALL, seed=3)


def make(backbone, seed: int = 7, **config):
    method = create_method("mugcp", backbone, CLASSES, {**FAST, **config}, template="a satellite photo of {}.")
    randomise(method, seed)
    return method.eval()


def randomise(method, seed: int = 7) -> None:
    """Non-trivial values everywhere (the attention outputs start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in method.named_trainable():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def batch_of(n: int = 4, seed: int = 0, captions=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(n, 3, 32, 32, generator=g),
        "label": torch.arange(n) % len(CLASSES),
        "caption": captions if captions is not None else [f"a field with {w} texture" for w in
                                                          ["green", "red", "striped", "blue", "grey", "dark"][:n]],
        "path": [f"/data/img_{i}.jpg" for i in range(n)],
    }


def logits_of(method, batch):
    with torch.no_grad():
        return method(batch)


def copy_shared(src, dst) -> None:
    """Give ``dst`` the values of every tensor it shares (by name) with ``src``."""
    dst.load_adapter_state({n: t for n, t in src.adapter_state().items() if n in dict(dst.named_trainable())},
                           strict=False)


class TextPassCounter:
    """Counts text-tower passes and the sequences in each (a forward pre-hook on the text transformer)."""

    def __init__(self, backbone):
        self.sizes = []
        self.handle = backbone.transformer.register_forward_pre_hook(self._record)

    def _record(self, module, args):
        self.sizes.append(args[0].shape[0])

    def close(self):
        self.handle.remove()


# -- ablation switches ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("switch", ["use_scp", "use_amg", "use_mpf"])
def test_each_switch_changes_the_logits(small, switch):
    full = make(small)
    ablated = make(small, **{switch: False})
    copy_shared(full, ablated)
    batch = batch_of()
    assert not torch.allclose(logits_of(full, batch), logits_of(ablated, batch), atol=1e-4)


def test_scp_switch_decides_whether_captions_matter(small):
    batch = batch_of()
    other = {**batch, "caption": ["a river between houses"] * 4}
    with_scp = make(small)
    assert not torch.allclose(logits_of(with_scp, batch), logits_of(with_scp, other), atol=1e-4)
    without = make(small, use_scp=False)
    assert torch.equal(logits_of(without, batch), logits_of(without, other))
    no_captions = {k: v for k, v in batch.items() if k != "caption"}
    assert torch.equal(logits_of(without, no_captions), logits_of(without, batch))


def test_amg_switch_decides_whether_the_image_tower_is_prompted(small):
    """AMG off: the image features are frozen CLIP's; on: VCP tokens are appended and change them."""
    images = batch_of()["image"]
    frozen = small.encode_image(images)
    seen = []
    handle = small.visual.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    try:
        off = make(small, use_amg=False)
        on = make(small, n_vcp=3)
        scp, _ = on.semantic_prompts(batch_of()["caption"])
        with torch.no_grad():
            features_off, _, vcps_off = off.encode_image(images, None)
            features_on, _, vcps_on = on.encode_image(images, scp)
    finally:
        handle.remove()
    tokens = small.visual.num_tokens
    assert seen == [tokens, tokens + 3]
    assert vcps_off is None and len(vcps_on) == 3 and vcps_on[0].shape == (4, 3, SMALL.vision_width)
    assert torch.equal(features_off, frozen)
    assert not torch.allclose(features_on, frozen, atol=1e-4)


def test_mpf_switch_decides_whether_text_is_conditioned_on_the_image(small):
    batch = batch_of()
    for use_mpf, expected in ((True, [4, 4 * len(CLASSES)]), (False, [4, len(CLASSES)])):
        method = make(small, use_mpf=use_mpf)
        counter = TextPassCounter(small)
        try:
            logits_of(method, batch)
        finally:
            counter.close()
        # one pass over the 4 captions, then one batched pass over the prompts (B x C, or C without MPF)
        assert counter.sizes == expected


def test_mutual_guidance_refines_the_semantic_prompts(small):
    """amg_mutual: the SCP entering the text prompts depends on the image (visual -> semantic guidance)."""
    batch = batch_of(2, captions=["the same caption"] * 2)
    for mutual in (True, False):
        method = make(small, amg_mutual=mutual)
        scp, _ = method.semantic_prompts(batch["caption"])
        with torch.no_grad():
            _, refined, _ = method.encode_image(batch["image"], scp)
        same = torch.allclose(refined[0], refined[1], atol=1e-6)
        assert same is (not mutual)


# -- per-image conditioning --------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [{}, {"fusion": "add"}, {"fusion": "deep"}, {"fusion": "late"},
                                    {"scp_source": "tokens"}, {"amg_shared": False}])
def test_predictions_do_not_depend_on_batch_composition(small, config):
    method = make(small, **config)
    batch = batch_of(5, seed=1, captions=["a", "a long winding river through fields and small villages", "",
                                          "roads", "lake"])
    whole = logits_of(method, batch)
    alone = torch.cat([logits_of(method, {k: v[i : i + 1] for k, v in batch.items()}) for i in range(5)])
    torch.testing.assert_close(alone, whole, atol=1e-5, rtol=1e-5)
    order = [3, 0, 4, 1, 2]
    permuted = {k: (v[order] if isinstance(v, torch.Tensor) else [v[i] for i in order]) for k, v in batch.items()}
    torch.testing.assert_close(logits_of(method, permuted), whole[order], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion", ["concat", "deep"])
def test_text_chunking_gives_the_same_logits(small, fusion):
    method = make(small, fusion=fusion)
    batch = batch_of(4)
    reference = logits_of(method, batch)
    method.config.text_chunk_size = 5  # one image (3 classes) per chunk for deep, 5 sequences for concat
    torch.testing.assert_close(logits_of(method, batch), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion", ["concat", "deep"])
def test_chunked_checkpointed_training_gives_the_same_gradients(small, fusion):
    """The engine's text-memory policy (chunks of whole images for deep fusion, checkpointing) is exact."""
    from promptclip.memory import text_memory

    batch = batch_of(4)
    results = []
    for mode, chunk_tokens in (("off", 1024), ("always", 40)):
        method = make(small, fusion=fusion).train()
        with text_memory(mode, chunk_tokens):
            loss = method.loss(batch, method(batch))["loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in method.named_trainable()}))
    (loss_off, grads_off), (loss_on, grads_on) = results
    torch.testing.assert_close(loss_on, loss_off, atol=1e-5, rtol=1e-5)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-5, rtol=1e-4, msg=name)


def test_long_captions_are_cut_to_the_context_keeping_eot(small):
    method = make(small)
    filler = " ".join(["field"] * 120)
    a = batch_of(1, captions=[filler + " cat"])
    b = batch_of(1, captions=[filler + " dog"])
    torch.testing.assert_close(logits_of(method, a), logits_of(method, b))
    assert mugcp_module._caption_ids(filler, 77)[-1] == max(mugcp_module._caption_ids(filler, 77))
    assert len(mugcp_module._caption_ids(filler, 77)) == 77


# -- missing captions --------------------------------------------------------------------------------------------


def test_missing_caption_is_an_error_naming_the_image(small):
    method = make(small)
    batch = batch_of(3, captions=["a", None, "c"])
    with pytest.raises(DataError, match="/data/img_1.jpg"):
        method(batch)
    with pytest.raises(DataError, match="captions build"):
        method({k: v for k, v in batch.items() if k != "caption"})


def test_fallback_caption_is_used_counted_and_reported(small):
    method = make(small, missing_caption="fallback", fallback_caption="a satellite image")
    batch = batch_of(3, captions=["a", None, "c"])
    explicit = {**batch, "caption": ["a", "a satellite image", "c"]}
    with pytest.warns(UserWarning, match="img_1.jpg has no caption"):
        got = logits_of(method, batch)
    torch.testing.assert_close(got, logits_of(method, explicit))
    assert method.caption_stats == {"images": 6, "missing": 1}
    method.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        terms = method.loss(batch, method(batch))
    assert terms["missing_captions"].item() == 1.0
    with pytest.warns(UserWarning, match="1 images of epoch 1 had no caption"):
        method.on_epoch_end(0, 2)


def test_caption_requirement_follows_the_config():
    cls = mugcp_module.MuGCP
    assert cls.caption_requirement({}) == "required"
    assert cls.caption_requirement({"missing_caption": "fallback"}) == "optional"
    assert cls.caption_requirement({"use_scp": False}) is None


# -- configuration ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, message", [
    ({"fusion": "add", "n_scp": 2}, "n_scp == n_ctx"),
    ({"use_amg": False, "use_mpf": False}, "use_scp has no effect"),
    ({"depth": 5}, "exceeds"),
    ({"n_vcp": 0}, "n_vcp"),
])
def test_bad_configs_are_refused(small, config, message):
    with pytest.raises(ConfigError, match=message):
        create_method("mugcp", small, CLASSES, {**FAST, **config})


def test_resnet_backbone_is_refused():
    with pytest.raises(ConfigError, match="ViT"):
        create_method("mugcp", build_random("tiny-rn"), CLASSES, {"depth": 1})


def test_consistency_terms_are_off_by_default_and_add_up_when_on(small):
    batch = batch_of(2)
    method = make(small)
    method.train()
    assert set(method.loss(batch, method(batch))) == {"loss", "loss_ce", "missing_captions"}
    method = make(small, text_consistency_weight=2.0, image_consistency_weight=1.0, logits_consistency_weight=1.0,
                  consistency_templates="dataset")
    method.train()
    terms = method.loss(batch, method(batch))
    parts = terms["loss_ce"] + terms["loss_text"] + terms["loss_image"] + terms["loss_logits"]
    torch.testing.assert_close(terms["loss"].detach(), parts)
    assert all(terms[k] > 0 for k in ("loss_text", "loss_image"))
    terms["loss"].backward()
    assert method.ctx.grad is not None and method.vcp_queries.grad is not None


def test_vit_b16_parameter_count():
    """Default (INFERRED) config on the ViT-B/16 architecture, counted from the module shapes by hand."""
    with torch.device("meta"):
        model = CLIP(ARCHITECTURES["ViT-B/16"])
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    method = create_method("mugcp", model, CLASSES)
    text, vision, embed, depth, n = 512, 768, 512, 9, 4
    ctx = n * text
    scp = embed * n * text + n * text
    amg = depth * n * vision + 4 * (vision * vision + vision) + (text * vision + vision)
    refine = (text * text + text) + 2 * (vision * text + text) + (text * text + text)
    assert method.num_trainable() == ctx + scp + amg + refine == 5_149_440


def test_presets_are_labelled_inferred_and_default():
    names = [p for p in list_presets() if p.startswith("mugcp/")]
    assert len(names) >= 2 and all("inferred" in p for p in names)
    for name in names:
        preset = load_preset(name)
        assert preset.method_config["mode"] == "inferred"
        assert "INFERRED" in preset.source
    for protocol in ("base2novel", "fewshot", "cross_dataset", "domain_generalization"):
        assert default_preset(protocol, "mugcp", "imagenet").startswith("mugcp/inferred")
    assert default_preset("cross_dataset", "mugcp") != default_preset("base2novel", "mugcp")
