"""MMA (Multi-Modal Adapter): the gradient-scale op, the towers' ``after`` block hook, the class-feature cache, the
layer outputs and the Dassl import of the reference's checkpoint, against the goldens (tests/golden/mma.*)."""

import json

import pytest
import torch

import promptclip.methods.mma as mma_module
from parity import (
    GOLDEN_DIR,
    assert_close_grad,
    assert_close_values,
    build_method,
    golden_backbone,
    golden_batch,
    load_golden,
    run_replay,
    trajectory_errors,
)
from promptclip.checkpoint import read_adapter
from promptclip.cli import main
from promptclip.clip.architectures import build_random
from promptclip.errors import ConfigError
from promptclip.methods import create_method
from promptclip.methods.autograd import scale_gradient
from promptclip.methods.mma import MMA, MMAConfig
from promptclip.reference.unpickle import load_torch_file
from promptclip.train import train_config_from_dassl


@pytest.fixture(scope="module")
def golden():
    return load_golden("mma")


def _no_gradient_scale(monkeypatch):
    monkeypatch.setattr(mma_module, "scale_gradient", lambda x, factor: x)


def _train_grads(method, golden):
    method.train()
    _, losses = method.training_step(golden_batch(golden, train=True))
    method.backward(losses, lambda loss: loss)
    params = dict(method.named_trainable())
    return losses["loss"], {ref: params[ours].grad for ref, ours in method.reference_name_map().items()}


# -- the gradient-scale op -------------------------------------------------------------------------------------------


def test_scale_gradient_is_the_identity_forward_and_scales_backward():
    x = torch.randn(3, 4, requires_grad=True)
    y = scale_gradient(x, 0.25)
    assert torch.equal(y, x)
    (y * torch.arange(4.0)).sum().backward()
    assert torch.equal(x.grad, 0.25 * torch.arange(4.0).expand(3, 4))
    assert scale_gradient(x, 1) is x


def test_adapter_gradients_are_one_over_scale_times_the_true_ones(golden, monkeypatch):
    """The reference's op: logits unchanged, every adapter tensor gets 1/s of its true gradient (read s from cfg)."""
    scale = golden.trainer_cfg["ADAPTER_SCALE"]
    loss, grads = _train_grads(build_method(golden)[0], golden)
    _no_gradient_scale(monkeypatch)
    plain_loss, plain = _train_grads(build_method(golden)[0], golden)
    assert torch.equal(loss, plain_loss)
    for name, grad in grads.items():
        assert_close_grad(plain[name] / scale, grad, name)


def test_mutation_without_the_gradient_scale_the_gradients_fail(golden, monkeypatch):
    """Turning the op off keeps the logits and the loss but misses every gradient by the factor 1/s."""
    _no_gradient_scale(monkeypatch)
    method, _ = build_method(golden)
    loss, grads = _train_grads(method, golden)
    assert_close_values(loss, golden.tensors["train.loss"], "train.loss")
    ratios = [golden.tensors[f"grad.{name}"].abs().max().item() / grad.abs().max().item() for name, grad in
              grads.items()]
    expected = 1 / golden.trainer_cfg["ADAPTER_SCALE"]
    assert min(ratios) == pytest.approx(expected, rel=1e-3) and max(ratios) == pytest.approx(expected, rel=1e-3)
    for name, grad in grads.items():
        with pytest.raises(AssertionError, match="max abs error"):
            assert_close_grad(grad, golden.tensors[f"grad.{name}"], name)


def test_mutation_without_the_gradient_scale_the_trajectory_fails(monkeypatch):
    _no_gradient_scale(monkeypatch)
    errors = trajectory_errors(run_replay("mma"))
    assert errors["logits_init"] <= 1  # nothing trained yet: the forward is the same
    assert errors["final_params"] > 100 and errors["epoch_params"] > 100 and errors["logits"] > 1, errors


# -- the towers' after-block hook -------------------------------------------------------------------------------------


def test_after_hook_sees_block_input_and_output_and_an_identity_hook_changes_nothing():
    clip = build_random("tiny").eval()
    x = clip.visual.embed(torch.randn(2, 3, clip.visual.input_resolution, clip.visual.input_resolution))
    plain = clip.visual.forward_blocks(x)
    seen = []

    def after(layer, x_in, x_out):
        seen.append((layer, x_in.shape, torch.equal(x_out, clip.visual.blocks[layer](x_in))))
        return x_out

    assert torch.equal(clip.visual.forward_blocks(x, after=after), plain)
    assert seen == [(i, x.shape, True) for i in range(len(clip.visual.blocks))]
    tokens = torch.randint(0, 1000, (3, 12))
    tokens[:, -1] = clip.config.vocab_size - 1
    text = clip.text.embed(tokens)
    assert torch.equal(clip.text.forward_blocks(text, after=lambda layer, x_in, x_out: x_out),
                       clip.text.forward_blocks(text))
    added = clip.text.forward_blocks(text, after=lambda layer, x_in, x_out: x_out + 1 if layer == 0 else x_out)
    assert not torch.equal(added, clip.text.forward_blocks(text))


# -- evaluation: the class-feature cache gives the trained features ----------------------------------------------------


def test_cached_class_features_follow_the_adapters(golden):
    method, _ = build_method(golden)
    method.eval()
    batch = golden_batch(golden, train=False)
    with torch.no_grad():
        before = method(batch)
        assert torch.equal(method(batch), before)  # the cache: the same features
    method.train()
    with torch.no_grad():
        for param in method.text_adapter.parameters():
            param.add_(0.01)
    method.eval()
    with torch.no_grad():
        after = method(batch)
        cached, fresh = method.class_features(), MMA.encode_classes(method)
    assert not torch.allclose(after, before)
    assert torch.equal(cached, fresh)


# -- the golden's block outputs ---------------------------------------------------------------------------------------


def test_every_block_output_matches_the_layers_golden(golden):
    layers = load_golden("mma.layers")
    length = layers.meta["prompts_head_len"]
    method, _ = build_method(golden)
    method.eval()
    outputs = {"visual": [], "text": []}

    def recording(tower, after):
        def hook(layer, x_in, x_out):
            out = after(layer, x_in, x_out)
            outputs[tower].append(out[0])
            return out
        return hook

    clip = method.clip
    with torch.no_grad():
        visual = clip.visual
        visual.forward_blocks(visual.embed(golden.images()),
                              after=recording("visual", method._after(method.visual_adapter, visual.blocks)))
        text = clip.text.embed(token_embeds=method.token_embeds)
        clip.text.forward_blocks(text, after=recording("text", method._after(method.text_adapter, clip.text.blocks)))
    for tower in ("visual", "text"):
        for i, ours in enumerate(outputs[tower]):
            expected = layers.tensors[f"layers.{tower}.{i}"]
            assert_close_values(ours[: expected.shape[0]], expected, f"layers.{tower}.{i}")
    assert len(outputs["text"]) == sum(k.startswith("layers.text.") for k in layers.tensors)
    assert method.token_embeds.shape[1] >= length


# -- config ------------------------------------------------------------------------------------------------------------


def test_config_from_reference_reads_every_option_and_rejects_unknown_ones(golden):
    config = MMA.config_from_reference(golden.trainer_cfg)
    cfg = golden.trainer_cfg
    assert (config.adapter_start, config.adapter_end, config.adapter_dim, config.adapter_scale,
            config.text_ctx_init) == (cfg["ADAPTER_START"], cfg["ADAPTER_END"], cfg["ADAPTER_DIM"],
                                      cfg["ADAPTER_SCALE"], cfg["TEXT_CTX_INIT"])
    with pytest.raises(ConfigError, match="N_CTX"):
        MMA.config_from_reference({**cfg, "N_CTX": 2})
    defaults = MMA.config_from_reference({})  # the reference's train.py defaults
    assert (defaults.adapter_start, defaults.adapter_scale, defaults.text_ctx_init) == (4, 0.1, "")


def test_other_ranges_widths_and_scales_build_and_scale_their_gradients(golden, monkeypatch):
    """A held-back-like variant (blocks 1..3, D 16, s 0.01): the modules, and a gradient factor of 100."""
    config = MMAConfig(adapter_start=1, adapter_end=3, adapter_dim=16, adapter_scale=0.01)
    backbone = golden_backbone(golden)
    batch = golden_batch(golden, train=True)

    def grads():
        method = create_method("mma", backbone, golden.classnames, config)
        method.train()
        _, losses = method.training_step(batch)
        losses["loss"].backward()
        return {n: p.grad.clone() for n, p in method.named_trainable()}

    scaled = grads()
    assert sorted({n.split(".")[1] for n in scaled}) == ["1", "2", "3"]
    assert scaled["shared_adapter.2.0.weight"].shape == (16, 16)
    assert scaled["visual_adapter.1.up.weight"].shape == (backbone.visual.width, 16)
    _no_gradient_scale(monkeypatch)
    plain = grads()
    for name, grad in scaled.items():
        assert torch.allclose(grad, 100 * plain[name], rtol=1e-4, atol=1e-4 * grad.abs().max().item()), name


def test_index_zero_adapts_the_inputs():
    clip = build_random("tiny")
    method = create_method("mma", clip, ["cat", "dog"], MMAConfig(adapter_start=0, adapter_end=1, adapter_scale=0.5))
    images = torch.randn(2, 3, clip.visual.input_resolution, clip.visual.input_resolution)
    method.eval()
    with torch.no_grad():
        with_zero = method({"image": images})
        for p in method.visual_adapter["0"].up.parameters():
            p.zero_()
        method.set_classnames(["cat", "dog"])
        assert not torch.allclose(method({"image": images}), with_zero)


def test_bad_ranges_are_config_errors():
    clip = build_random("tiny")
    layers = len(clip.visual.blocks)
    for config in (MMAConfig(adapter_start=3, adapter_end=2), MMAConfig(adapter_start=1, adapter_end=layers + 1),
                   MMAConfig(adapter_dim=0, adapter_start=1, adapter_end=1),
                   MMAConfig(adapter_scale=0, adapter_start=1, adapter_end=1)):
        with pytest.raises(ConfigError, match="mma:"):
            create_method("mma", clip, ["cat", "dog"], config)


def test_dassl_optim_without_warmup_ignores_the_warmup_type(golden):
    config = train_config_from_dassl(golden.meta["cfg"]["optim"], 4)
    assert config.warmup_epoch == 0 and config.lr == golden.meta["cfg"]["optim"]["LR"]


# -- importing the reference's checkpoint -----------------------------------------------------------------------------


def test_cli_import_of_the_reference_checkpoint(tmp_path, capsys):
    meta = json.loads((GOLDEN_DIR / "mma.dassl.json").read_text())
    trajectory = load_golden("mma.trajectory")
    cfg = trajectory.trainer_cfg
    args = ["import", str(GOLDEN_DIR / "mma.dassl"), "--method", "mma", "--backbone", "golden-mini", "--quiet",
            "--classnames", ",".join(trajectory.classnames)]
    code = main([*args, "--out", str(tmp_path / "default")])  # the official preset: other blocks
    assert code == 2 and f"adapter_start={cfg['ADAPTER_START']}" in capsys.readouterr().err
    options = [f"method_config.adapter_start={cfg['ADAPTER_START']}", f"method_config.adapter_end={cfg['ADAPTER_END']}",
               f"method_config.adapter_dim={cfg['ADAPTER_DIM']}", f"method_config.adapter_scale={cfg['ADAPTER_SCALE']}"]
    assert main([*args, "--out", str(tmp_path / "ok"), *[x for o in options for x in ("--set", o)]]) == 0
    adapter_meta, tensors = read_adapter(tmp_path / "ok" / "adapter.safetensors")
    assert adapter_meta["method"] == "mma"
    assert sorted(adapter_meta["imported_from"]["dropped_buffers"]) == ["adapter_learner.token_embedding",
                                                                        "adapter_learner.tokenized_prompts"]
    saved = load_torch_file(GOLDEN_DIR / meta["registered_model"]["file"])["state_dict"]
    assert set(tensors) == {k for k in saved if "adapter." in k}
    for key, value in tensors.items():
        assert torch.equal(value, saved[key]), key


# -- presets -----------------------------------------------------------------------------------------------------------


def test_presets_are_the_official_config_with_the_official_parameter_count():
    from promptclip.clip.architectures import ARCHITECTURES
    from promptclip.clip.model import CLIP
    from promptclip.presets import default_preset, load_preset

    vit_b16 = CLIP(ARCHITECTURES["ViT-B/16"]).requires_grad_(False)
    for name, batch in (("mma/vit_b16_ep5", 16), ("mma/vit_b16_ep5_imnet", 128)):
        preset = load_preset(name)
        train = preset.train
        assert (train.lr, train.max_epoch, train.batch_size, train.warmup_epoch) == (0.0015, 5, batch, 0)
        method = create_method("mma", vit_b16, ["cat", "dog"], preset.method_config)
        assert method.num_trainable() == 8 * (2 * 32 * (512 + 768) + 32 + 512 + 32 + 768 + 32 * 32 + 32)  # 674,560
    assert default_preset("base2novel", "mma") == "mma/vit_b16_ep5"
    assert default_preset("cross_dataset", "mma", "imagenet") == "mma/vit_b16_ep5_imnet"
