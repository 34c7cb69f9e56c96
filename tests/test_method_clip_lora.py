"""CLIP-LoRA against its reference goldens (tests/golden/methods/clip_lora.md: their own format, not Dassl's), the
backbone view (the shared backbone is never changed), merged vs unmerged evaluation, and the engine's per-step LR
hook. Every fact (arguments, class names, template, data rules, orders, number of steps) comes from the files."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from parity import golden_backbone, load_golden, scalar_error
from promptclip.data.loader import TensorDataset
from promptclip.methods import create_method, get_method_class
from promptclip.methods.base import PromptMethod
from promptclip.train import TrainConfig, fit


def _config(golden, **changes):
    cls = get_method_class("clip_lora")
    config = cls.config_from_reference(golden.meta["cfg"]["used_args"])
    # The goldens zero every LoRA dropout after building (changes_vs_official.dropout_rate): run without it.
    config.dropout_rate = 0.0
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def build(golden, **changes):
    template = golden.meta["cfg"]["template"][0]
    method = create_method("clip_lora", golden_backbone(golden), golden.classnames, _config(golden, **changes),
                           template=template)
    name_map = method.reference_name_map()
    ours = dict(method.named_trainable())
    assert set(name_map) == {e["name"] for e in golden.meta["trainable_params"]}
    assert set(name_map.values()) == set(ours)
    with torch.no_grad():
        for entry in golden.meta["trainable_params"]:
            ours[name_map[entry["name"]]].copy_(golden.tensors[f"init.{entry['name']}"])
    return method, name_map


def views(golden, count: int) -> torch.Tensor:
    """Training images of views 0..count-1, stacked (the golden's data rule)."""
    base = golden.tensors["input.train_images_base"]
    data = golden.meta["inputs"]["data"]
    out = []
    for a in range(count):
        g = torch.Generator().manual_seed(data["view_seed"] + 1000 * (a + 1))
        out.append(base + data["view_noise"] * torch.randn(base.shape, generator=g))
    return torch.cat(out)


def close(ours, golden, bound_scale=1e-4) -> float:
    """max|ours - golden| as a multiple of bound_scale * max(1, max|golden|)."""
    return (ours.detach().double() - golden.double()).abs().max().item() / (
        bound_scale * max(1.0, golden.abs().max().item()))


# -- one step ---------------------------------------------------------------------------------------------------------


def one_step(**changes):
    golden = load_golden("clip_lora")
    method, name_map = build(golden, **changes)
    batch = golden.meta["batch"]
    images = views(golden, batch["view"] + 1)[batch["view"] * len(golden.tensors["input.train_labels"]):]
    index = torch.tensor(batch["index"])
    method.train()
    logits, losses = method.training_step({"image": images[index],
                                           "label": golden.tensors["input.train_labels"][index]})
    losses["loss"].backward()
    params = dict(method.named_trainable())
    grads = {ref: close(params[ours].grad, golden.tensors[f"grad.{ref}"]) * max(
        1.0, golden.tensors[f"grad.{ref}"].abs().max().item()) / golden.tensors[f"grad.{ref}"].abs().max().item()
        for ref, ours in name_map.items()}
    return (golden, close(logits, golden.tensors["train.logits"]), close(losses["loss"], golden.tensors["train.loss"]),
            grads)


def test_one_step_logits_loss_and_every_gradient():
    golden, logits, loss, grads = one_step()
    assert logits <= 1 and loss <= 1, (logits, loss)
    worst = max(grads, key=grads.get)
    assert grads[worst] <= 1, f"{worst}: {grads[worst]:.2f}x the gradient bar"


def test_mutation_alpha_over_r_scaling_fails_the_golden():
    cls = get_method_class("clip_lora")
    golden = load_golden("clip_lora")
    if _config(golden).r == 1:  # the rules agree, nothing to detect
        pytest.skip("alpha/r equals alpha/sqrt(r) for r = 1")
    # The usual LoRA rule alpha / r in place of the reference's alpha / sqrt(r).
    original = cls.config_class.scaling
    try:
        cls.config_class.scaling = property(lambda self: self.alpha / self.r)
        _, logits, loss, grads = one_step()
    finally:
        cls.config_class.scaling = original
    assert max(logits, loss, *grads.values()) > 10


def test_zero_shot_logits_of_the_untouched_backbone():
    """``eval.zs_clip_logits`` (100 · cos of the frozen model, the reference's zero-shot print) from the backbone the
    method leaves untouched: checks the backbone, the template and the class names of the golden."""
    golden = load_golden("clip_lora")
    method, _ = build(golden)
    clip = method.clip
    with torch.no_grad():
        image = torch.nn.functional.normalize(clip.encode_image(golden.tensors["input.test_images"]), dim=-1)
        text = torch.nn.functional.normalize(clip.encode_text(method.tokens), dim=-1)
    assert close(100 * image @ text.t(), golden.tensors["eval.zs_clip_logits"]) <= 1


# -- trajectory -------------------------------------------------------------------------------------------------------


@functools.cache
def replay(merge: bool = True):
    golden = load_golden("clip_lora.trajectory")
    method, name_map = build(golden, merge_on_eval=merge)
    traj = golden.meta["trajectory"]
    n = len(golden.tensors["input.train_labels"])
    total = int(traj["total_iters"])
    passes = math.ceil(total / len(traj["orders"][0])) if traj["orders"] else 0
    orders, left = [], total
    for e, epoch in enumerate(traj["orders"][:passes]):
        orders.append([[i + e * n for i in batch] for batch in epoch[:left]])
        left -= len(orders[-1])
    data = TensorDataset(views(golden, len(orders)), golden.tensors["input.train_labels"].repeat(len(orders)))
    args = golden.meta["cfg"]["used_args"]
    optim = golden.meta["optimizer"]["defaults"]
    assert golden.meta["optimizer"]["type"] == "AdamW" and optim["betas"] == "(0.9, 0.999)"
    config = TrainConfig(lr=float(args["lr"]), batch_size=int(traj["batch_size"]), max_epoch=len(orders),
                         precision="fp32", warmup_epoch=0, optimizer="adamw", weight_decay=optim["weight_decay"],
                         adam_eps=optim["eps"])
    params = dict(method.named_trainable())
    steps, epochs, grads = [], [], {}

    def on_step(record):
        if not steps:  # the first step's gradients (still in .grad after the optimizer step)
            grads.update({ref: params[ours].grad.detach().clone() for ref, ours in name_map.items()})
        steps.append(record)
        if record["batch"] == record["batches"] and record["step"] < total:
            epochs.append({ref: params[ours].detach().clone() for ref, ours in name_map.items()})

    fit(method, data, config, progress=False, on_step=on_step, batch_order=orders)
    final = {ref: params[ours].detach().clone() for ref, ours in name_map.items()}
    method.eval()
    with torch.no_grad():
        logits = method({"image": golden.tensors["input.test_images"]})
        text = method.class_features()
    init = {e["name"]: golden.tensors[f"init.{e['name']}"] for e in golden.meta["trainable_params"]}
    return golden, method, steps, epochs, final, init, logits, text, grads


def test_trajectory_lr_and_loss_of_every_step():
    golden, _, steps, *_ = replay()
    ref = golden.meta["trajectory"]["steps"]
    assert len(steps) == len(ref) == golden.meta["trajectory"]["total_iters"]
    for ours, theirs in zip(steps, ref, strict=True):
        assert abs(ours["lr"] - theirs["lr"]) <= 1e-9 * theirs["lr"], (ours["step"], ours["lr"], theirs["lr"])
        assert scalar_error(ours["loss"], theirs["loss"]) <= 1, (ours["step"], ours["loss"], theirs["loss"])


def _params_ratio(entries, ours, init, steps) -> float:
    """The card's bar: every LoRA tensor within 1e-4 * max|golden| (AdamW moves each element by about lr per step,
    so a wrong sign or a missed step exceeds it) — except elements whose first gradient is at round-off level
    (|g0| <= 1e-5 * max|g0| of the tensor): Adam's eps is 1e-8, so such an element's normalised step is set by the
    round-off of its gradient; it may differ by up to lr per step taken. At most 0.5% of a tensor may be such."""
    golden, _, _, _, _, _, _, _, grads = replay()
    lr = max(step["lr"] for step in golden.meta["trajectory"]["steps"])
    worst = 0.0
    for entry in entries:
        name = entry["name"]
        target = golden.tensors[entry["key"]]
        diff = (ours[name].double() - target.double()).abs()
        g0 = grads[name].abs()
        noisy = g0 <= 1e-5 * g0.max()
        assert noisy.sum() <= 0.005 * g0.numel(), f"{name}: {int(noisy.sum())} elements with round-off gradients"
        value_bar = 1e-4 * target.abs().max().item()
        worst = max(worst, diff[~noisy].max().item() / value_bar,
                    (diff[noisy].max().item() / (steps * lr)) if noisy.any() else 0.0)
    return worst


def test_trajectory_parameters_after_every_pass_and_at_the_end():
    golden, _, steps, epochs, final, init, *_ = replay()
    traj = golden.meta["trajectory"]
    assert len(epochs) == len(traj["epoch_end_params"])
    per_pass = len(traj["orders"][0])
    for e, (ours, entries) in enumerate(zip(epochs, traj["epoch_end_params"], strict=True)):
        assert _params_ratio(entries, ours, init, (e + 1) * per_pass) <= 1, f"pass {e}"
    assert _params_ratio(traj["final_params"], final, init, len(steps)) <= 1


def test_trajectory_eval_logits_merged_and_unmerged():
    golden, *_, logits, text, _ = replay(True)
    assert (logits - golden.tensors["eval.logits"]).abs().max().item() <= 1e-5
    assert close(torch.nn.functional.normalize(text, dim=-1), golden.tensors["eval.text_features"]) <= 1
    unmerged = replay(False)
    assert (unmerged[6] - golden.tensors["eval.logits"]).abs().max().item() <= 1e-5
    assert (unmerged[6] - logits).abs().max().item() <= 1e-6


def test_mutation_per_epoch_schedule_fails_the_trajectory(monkeypatch):
    cls = get_method_class("clip_lora")
    monkeypatch.setattr(cls, "lr_schedule", PromptMethod.lr_schedule)
    try:
        golden, _, steps, *_ = replay.__wrapped__(True)
    finally:
        monkeypatch.undo()
    ref = golden.meta["trajectory"]["steps"]
    worst = max(abs(o["lr"] - t["lr"]) / (1e-9 * t["lr"]) for o, t in zip(steps, ref, strict=True))
    assert worst > 1e3


# -- the backbone view ------------------------------------------------------------------------------------------------


def test_training_leaves_the_shared_backbone_untouched_for_the_next_method():
    golden = load_golden("clip_lora")
    backbone = golden_backbone(golden)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    modules = [type(m) for m in backbone.modules()]
    config = _config(golden, dropout_rate=0.25)
    method = create_method("clip_lora", backbone, golden.classnames, config, template="a photo of a {}.")
    with torch.no_grad():
        for _, p in method.named_trainable():  # B != 0, so the view differs from the backbone
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    images = golden.tensors["input.test_images"][:4]
    fit(method, TensorDataset(images, [0, 1, 2, 3]), TrainConfig(lr=1e-3, batch_size=2, max_epoch=1,
                                                                 precision="fp32", warmup_epoch=0), progress=False)
    method.eval()
    with torch.no_grad():
        adapted = method({"image": images})
    after = backbone.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert [type(m) for m in backbone.modules()] == modules
    # The next method of a grid, on the same backbone: zero-shot CLIP exactly as before.
    zs = create_method("zeroshot", backbone, golden.classnames, get_method_class("zeroshot").config_class(),
                       template="a photo of a {}.")
    fresh = golden_backbone(golden)
    zs_fresh = create_method("zeroshot", fresh, golden.classnames, get_method_class("zeroshot").config_class(),
                             template="a photo of a {}.")
    zs.eval(), zs_fresh.eval()
    with torch.no_grad():
        assert torch.equal(zs({"image": images}), zs_fresh({"image": images}))
        plain = torch.nn.functional.normalize(backbone.encode_image(images), dim=-1)
    assert not torch.allclose(torch.nn.functional.normalize(method.view.encode_image(images), dim=-1), plain)
    assert adapted.shape == (4, len(golden.classnames))


def test_reference_init_starts_at_the_frozen_model_and_scaling_is_alpha_over_sqrt_r():
    golden = load_golden("clip_lora")
    backbone = golden_backbone(golden)
    config = _config(golden, r=4, alpha=2.0)
    assert config.scaling == pytest.approx(2.0 / 2.0)
    method = create_method("clip_lora", backbone, golden.classnames, config, template="a photo of a {}.")
    for name, p in method.named_trainable():
        if name.endswith("_B"):
            assert torch.count_nonzero(p) == 0
        else:
            assert p.abs().max() <= p.shape[1] ** -0.5 and torch.count_nonzero(p) == p.numel()
    images = golden.tensors["input.test_images"][:3]
    method.eval()
    with torch.no_grad():
        cos = method({"image": images})
        image = torch.nn.functional.normalize(backbone.encode_image(images), dim=-1)
        text = torch.nn.functional.normalize(backbone.encode_text(method.tokens), dim=-1)
    assert torch.allclose(cos, image @ text.t(), atol=1e-6)


def test_reference_arguments_are_strict():
    cls = get_method_class("clip_lora")
    config = cls.config_from_reference({"r": 4, "alpha": 2, "params": ["q", "k", "v", "o"], "encoder": "vision",
                                        "position": "bottom", "shots": 2, "n_iters": 5})
    assert (config.r, config.scaling, config.params, config.encoder) == (4, 1.0, ["q", "k", "v", "o"], "vision")
    with pytest.raises(Exception, match="rank_dropout"):
        cls.config_from_reference({"rank_dropout": 0.1})


# -- the engine's per-step learning-rate hook (general: a toy method) -------------------------------------------------


def test_lr_schedule_hook_sets_every_step_and_defaults_to_the_per_epoch_table():
    from promptclip.clip.architectures import build_random
    from promptclip.methods.coop import CoOp
    from promptclip.train import dassl_lr
    from toy_data import Separable

    class Stepped(CoOp):  # a toy: not registered, only its schedule differs
        def lr_schedule(self, base_lr, step, total_steps, epoch, config):
            return base_lr * (total_steps - step) / total_steps

    backbone = build_random("tiny", seed=0)
    data = Separable(n=12, classes=3, size=backbone.config.image_size)
    config = TrainConfig(batch_size=4, lr=0.02, max_epoch=2, precision="fp32", seed=5, warmup_epoch=1)
    for cls, expected in ((Stepped, [0.02 * (6 - s) / 6 for s in range(6)]),
                          (CoOp, [dassl_lr(e, config) for e in (0, 0, 0, 1, 1, 1)])):
        method = cls(backbone, cls.config_class(n_ctx=4, init_seed=3), ["a", "b", "c"])
        seen = []
        fit(method, data, config, progress=False, on_step=lambda r, seen=seen: seen.append(r["lr"]))
        assert seen == pytest.approx(expected, rel=1e-12), cls.__name__


def test_lora_dropout_masks_are_reproducible_per_step_and_differ_between_steps():
    golden = load_golden("clip_lora")
    method, _ = build(golden, dropout_rate=0.25)
    images = golden.tensors["input.test_images"][:4]
    batch = {"image": images, "label": torch.tensor([0, 1, 2, 3])}
    method.train()
    with torch.no_grad():
        first, second = method(batch), method(batch)  # the same train_rng state: the same masks
        step1, _ = method.training_step(batch)  # advances train_rng after its forward
        step2, _ = method.training_step(batch)
        method.config.dropout_rate = 0.0
        for module in method.lora.values():
            module.dropout = 0.0
        plain = method(batch)
    assert torch.equal(first, second) and torch.equal(first, step1)
    assert not torch.equal(step1, step2) and not torch.equal(step1, plain)
