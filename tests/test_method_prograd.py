"""ProGrad (promptclip.methods.prograd): what the generic golden tests do not cover -- the two raw gradients, the
projection decision of every trajectory step, mutation checks (projection off: the gradient and trajectory
comparisons fail), the init rule and the templates.
"""

import pytest
import torch

from parity import (
    build_method,
    golden_batch,
    load_golden,
    run_replay,
    trajectory_errors,
)
from promptclip.errors import ConfigError
from promptclip.methods import create_method
from promptclip.methods.prograd import ProGrad, ProGradConfig, init_words
from promptclip.testing import contract_backbone


@pytest.fixture(scope="module")
def golden():
    return load_golden("prograd")


def grad_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    """max|ours - golden| / (1e-4 * max|golden|): <= 1 passes (README.md's gradient bar)."""
    return (ours.detach() - expected).abs().max().item() / (1e-4 * expected.abs().max().item())


def step(golden, method=None):
    method = method or build_method(golden)[0]
    method.train()
    _, losses = method.training_step(golden_batch(golden, train=True))
    return method, losses


def test_config_comes_from_the_goldens_loss_node(golden):
    method, _ = build_method(golden)
    loss = golden.meta["cfg"]["loss"]
    assert (method.config.lambda_, method.config.temperature) == (loss["LAMBDA"], loss["T"])
    assert method.config.n_ctx == golden.trainer_cfg["N_CTX"]


def test_context_init_zero_rows_and_template_words(golden):
    method, _ = build_method(golden)
    init = golden.tensors["init.prompt_learner.ctx"]
    zero_rows = [i for i in range(init.shape[0]) if not init[i].any()]
    assert zero_rows == golden.meta["extra"]["ctx_rows_zero_at_init"]
    # Our own init (before the golden's values replaced it) follows the same rule.
    config = ProGrad.config_from_reference({**golden.trainer_cfg, "loss": golden.meta["cfg"]["loss"]})
    ours = create_method("prograd", method.clip, golden.classnames, config, template=method.template)
    assert torch.equal(ours.ctx.detach(), init)
    assert init_words(ours.zs_template) == golden.meta["extra"]["ctx_init_words"]


def test_raw_gradients_and_losses_match(golden):
    method, losses = step(golden)
    params = [p for _, p in method.named_trainable()]
    g_kl = torch.autograd.grad(losses["kl_loss"], params, retain_graph=True)
    g_ce = torch.autograd.grad(losses["xe_loss"], params)
    for ref, ours in method.reference_name_map().items():
        index = [n for n, _ in method.named_trainable()].index(ours)
        assert grad_error(g_kl[index], golden.tensors[f"grad_kl.{ref}"]) <= 1, ref
        assert grad_error(g_ce[index], golden.tensors[f"grad_ce.{ref}"]) <= 1, ref
    for key in ("xe_loss", "kl_loss"):
        expected = golden.tensors[f"train.{key}"]
        assert abs(losses[key].item() - expected.item()) <= 1e-4 * max(1.0, abs(expected.item())), key
    with torch.no_grad():
        teacher = method.zero_shot_logits(method.clip.encode_image(golden.images()))
    expected = golden.tensors["train.zs_logits"]
    assert (teacher - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())


def test_projection_decision_matches_the_reference(golden):
    method, losses = step(golden)
    method.backward(losses, lambda loss: loss)
    for ref, ours in method.reference_name_map().items():
        expected = golden.meta["extra"]["prograd_projection"][ref]
        assert method.last_projection[ours]["fired"] == expected["fired"]
        assert method.last_projection[ours]["cos"] == pytest.approx(expected["cos"], abs=1e-4)


def test_mutation_projection_off_fails_the_gradient_comparison(golden, monkeypatch):
    """Mechanism check: without the projection the step's gradient is the raw CE gradient, off the golden's."""
    assert any(p["fired"] for p in golden.meta["extra"]["prograd_projection"].values()), "the golden must fire"
    monkeypatch.setattr(ProGrad, "project", lambda self, g_ce, g_kl: (g_ce, {"cos": 0.0, "fired": False}))
    method, losses = step(golden)
    method.backward(losses, lambda loss: loss)
    params = dict(method.named_trainable())
    ratio = max(grad_error(params[ours].grad, golden.tensors[f"grad.{ref}"])
                for ref, ours in method.reference_name_map().items())
    print(f"prograd without projection: gradient {ratio:.3g}x the bar")
    assert ratio > 10


def test_every_trajectory_step_fires_as_the_reference(monkeypatch):
    decisions = []
    original = ProGrad.backward

    def recording(self, losses, scale):
        original(self, losses, scale)
        decisions.append(dict(self.last_projection))

    monkeypatch.setattr(ProGrad, "backward", recording)
    replay = run_replay("prograd")
    steps = replay.trajectory["steps"]
    assert len(decisions) == len(steps)
    for ours, ref in zip(decisions, steps, strict=True):
        for name, record in ref["prograd"].items():
            mine = ours[replay.name_map[name]]
            assert mine["fired"] == record["fired"], f"step {ref['step']}: {name}"
            assert mine["cos"] == pytest.approx(record["cos"], abs=1e-4), f"step {ref['step']}: {name}"
    fired = [s["step"] for s in steps if any(r["fired"] for r in s["prograd"].values())]
    for name in replay.name_map:
        key = f"trajectory.fired_steps.{name}"
        if key in replay.golden.tensors:
            assert replay.golden.tensors[key].tolist() == fired


def test_mutation_projection_off_fails_the_trajectory(monkeypatch):
    monkeypatch.setattr(ProGrad, "project", lambda self, g_ce, g_kl: (g_ce, {"cos": 0.0, "fired": False}))
    errors = trajectory_errors(run_replay("prograd"))
    print("prograd without projection, trajectory errors (x bar): "
          + ", ".join(f"{k} {v:.3g}" for k, v in errors.items()))
    assert errors["final_params"] > 1 and errors["logits"] > 1


def test_templates_and_init_words():
    backbone = contract_backbone()
    names = ["forest", "annual crop"]

    def made(template, **config):
        return create_method("prograd", backbone, names, ProGradConfig(**config), template=template)

    pets = made("a photo of a {}, a type of pet.")  # CoOp's OxfordPets template -> ProGrad's
    assert pets.zs_template == "a type of pet, a photo of a {}."
    assert pets.prefix_text == "X X X X X X X X a type of pet, a photo of a"  # 8 words: 16 - 8 placeholders
    assert int((pets.ctx.detach().abs().sum(-1) == 0).sum()) == 8
    dtd = made("{} texture.")
    assert dtd.zs_template == "a texture of {}."
    assert made("a blurry photo of {}.").zs_template == "a blurry photo of {}."  # unknown: the template itself
    with pytest.raises(ConfigError, match="n_ctx"):
        made("a photo of a {}, a type of pet.", n_ctx=4)
    random = made("{} texture.", ctx_init=False, n_ctx=4)
    assert random.prefix_text == "X X X X" and random.ctx.shape == (4, backbone.text.width)
    # A new template (cross-dataset target) rebuilds the sentence around the same context.
    before = pets.ctx.detach().clone()
    pets.set_classnames(["sea"], template="a centered satellite photo of {}.")
    assert pets.prefix_text.endswith("a centered satellite photo of") and torch.equal(pets.ctx.detach(), before)


def test_reference_options_are_strict():
    base = {"N_CTX": 16, "CSC": False, "CTX_INIT": True, "CLASS_TOKEN_POSITION": "end",
            "loss": {"NAME": "prograd", "T": 2.0, "LAMBDA": 0.8, "GM": False, "ALPHA": 0.0}}
    config = ProGrad.config_from_reference(base)
    assert (config.lambda_, config.temperature, config.ctx_init) == (0.8, 2.0, True)
    with pytest.raises(ConfigError, match="no mapping"):
        ProGrad.config_from_reference({**base, "W": 1.0})
    with pytest.raises(ConfigError, match="LOSS.NAME"):
        ProGrad.config_from_reference({**base, "loss": {"NAME": "ce"}})


def test_loss_scaling_scales_the_projected_gradient_and_keeps_the_decision(golden):
    """Mixed precision scales both losses by the same factor: the decision and the direction are unchanged."""
    grads = []
    for factor in (1.0, 1024.0):
        method, losses = step(golden)
        method.backward(losses, lambda loss, f=factor: loss * f)
        grads.append((dict(method.named_trainable())["ctx"].grad / factor, method.last_projection["ctx"]["fired"]))
    assert grads[0][1] == grads[1][1]
    assert (grads[0][0] - grads[1][0]).abs().max() <= 1e-6 * grads[0][0].abs().max()
