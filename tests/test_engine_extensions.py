"""The training extension points of the method interface (Adam/AdamW, parameter groups, a custom backward, the
per-epoch Python RNG, trainable buffers, the evaluation context): each changes what ``fit`` does through the method,
with the default behaviour unchanged."""

import math

import pytest
import torch

from promptclip.clip.architectures import build_random
from promptclip.methods import EvalContext, create_method, register
from promptclip.methods.coop import CoOp
from promptclip.train import TrainConfig, dassl_lr, fit, make_optimizer
from toy_data import Separable


@pytest.fixture(scope="module")
def backbone():
    return build_random("tiny", seed=0)


def coop(backbone, cls=None):
    if cls is None:
        return create_method("coop", backbone, ["a", "b", "c"], {"n_ctx": 4, "init_seed": 3})
    return cls(backbone, cls.config_class(n_ctx=4, init_seed=3), ["a", "b", "c"])


def config(**changes) -> TrainConfig:
    values = dict(batch_size=8, lr=0.02, max_epoch=2, precision="fp32", seed=5, warmup_epoch=0)
    values.update(changes)
    return TrainConfig(**values)


def hand_adam(param, grads, lr, betas, eps, weight_decay, decoupled):
    """Adam / AdamW written out from the papers' update rule (torch's default, non-amsgrad form)."""
    m = torch.zeros_like(param)
    v = torch.zeros_like(param)
    p = param.clone().double()
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat = m / (1 - betas[0] ** t)
        denom = (v / (1 - betas[1] ** t)).sqrt() + eps
        p = p - lr * m_hat / denom
    return p


class RecordGrads:
    def __init__(self, method):
        self.grads = []
        method.ctx.register_hook(lambda g: self.grads.append(g.detach().clone()))


@pytest.mark.parametrize("name,decoupled", [("adam", False), ("adamw", True)])
def test_adam_and_adamw_follow_the_update_rule_with_the_configured_eps(backbone, name, decoupled):
    method = coop(backbone)
    start = method.ctx.detach().clone()
    recorder = RecordGrads(method)
    cfg = config(optimizer=name, adam_eps=1e-3, adam_beta2=0.99, weight_decay=0.01, max_epoch=1)
    fit(method, Separable(n=16), cfg, progress=False)
    assert len(recorder.grads) == 2
    expected = hand_adam(start, recorder.grads, cfg.lr * 0.5 * (1 + math.cos(0)), (0.9, 0.99), 1e-3, 0.01,
                         decoupled)
    assert torch.allclose(method.ctx.double(), expected, rtol=1e-5, atol=1e-7)
    # With torch's default eps the result differs: the option is not ignored.
    other = hand_adam(start, recorder.grads, cfg.lr, (0.9, 0.99), 1e-8, 0.01, decoupled)
    assert not torch.allclose(method.ctx.double(), other, rtol=1e-5, atol=1e-7)


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(Exception, match="optimizer must be one of sgd, adam, adamw"):
        TrainConfig(optimizer="rmsprop")


class TwoGroups(CoOp):
    """CoOp with its context split in two groups: rows 0-1 at the run's rate x 3, rows 2-3 at a fixed base rate."""

    name = "coop_two_groups_test"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra = torch.nn.Parameter(torch.zeros(3))

    def param_groups(self):
        return [{"params": [self.ctx], "lr_mult": 3.0}, {"params": [self.extra], "lr": 0.5}]


def test_param_groups_get_their_own_base_rate_and_one_warmup_rate(backbone):
    method = coop(backbone, TwoGroups)
    steps = []
    cfg = config(max_epoch=3, warmup_epoch=1, warmup_lr=1e-5)
    fit(method, Separable(n=16), cfg, progress=False, on_step=steps.append)
    by_epoch = {s["epoch"]: s["lrs"] for s in steps}
    assert by_epoch[1] == [1e-5, 1e-5]  # Dassl's constant warm-up sets every group to the same rate
    for epoch in (2, 3):
        assert by_epoch[epoch] == pytest.approx([dassl_lr(epoch - 1, cfg, 0.06), dassl_lr(epoch - 1, cfg, 0.5)])
        assert steps[-1]["lr"] == by_epoch[3][0]


def test_param_groups_must_cover_every_trainable_tensor_once(backbone):
    class Missing(TwoGroups):
        def param_groups(self):
            return [{"params": [self.ctx]}]

    class Twice(TwoGroups):
        def param_groups(self):
            return [{"params": [self.ctx, self.extra]}, {"params": [self.extra]}]

    with pytest.raises(Exception, match="leaves out trainable tensors"):
        make_optimizer(coop(backbone, Missing), config())
    with pytest.raises(Exception, match="each once"):
        make_optimizer(coop(backbone, Twice), config())


class DoubledGradient(CoOp):
    name = "coop_doubled_gradient_test"

    def backward(self, losses, scale):
        scale(2 * losses["loss"]).backward()


def test_a_custom_backward_is_what_the_optimizer_steps_on(backbone):
    plain, doubled = coop(backbone), coop(backbone, DoubledGradient)
    start = plain.ctx.detach().clone()
    cfg = config(max_epoch=1, momentum=0.0, weight_decay=0.0)
    data = Separable(n=8)
    fit(plain, data, cfg, progress=False)
    fit(doubled, data, cfg, progress=False)
    assert torch.allclose(doubled.ctx - start, 2 * (plain.ctx - start), rtol=1e-5, atol=1e-9)
    assert not torch.allclose(doubled.ctx, plain.ctx)


class Draws(CoOp):
    name = "coop_draws_test"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.draws = []

    def training_step(self, batch):
        self.draws.append(self.train_rng.random())
        return super().training_step(batch)


def test_python_random_draws_in_the_step_are_seeded_per_epoch_and_replayable(backbone, tmp_path, isolated_registry):
    register(Draws)
    data = Separable(n=16)
    first, second = coop(backbone, Draws), coop(backbone, Draws)
    fit(first, data, config(max_epoch=2), progress=False)
    fit(second, data, config(max_epoch=2), progress=False)
    assert first.draws == second.draws and len(set(first.draws)) == len(first.draws) == 4
    other_seed = coop(backbone, Draws)
    fit(other_seed, data, config(max_epoch=2, seed=6), progress=False)
    assert other_seed.draws != first.draws

    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    interrupted = coop(backbone, Draws)
    with pytest.raises(Stop):
        fit(interrupted, data, config(max_epoch=2), out_dir=tmp_path, progress=False, on_epoch=stop)
    resumed = coop(backbone, Draws)
    fit(resumed, data, config(max_epoch=2), out_dir=tmp_path, progress=False)
    assert interrupted.draws + resumed.draws == first.draws


def test_adam_state_resumes_to_the_uninterrupted_result(backbone, tmp_path):
    data = Separable(n=16)
    cfg = config(optimizer="adamw", max_epoch=3)
    straight = coop(backbone)
    fit(straight, data, cfg, progress=False)

    class Stop(Exception):
        pass

    def stop_after_two(record):
        if record["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(coop(backbone), data, cfg, out_dir=tmp_path, progress=False, on_epoch=stop_after_two)
    resumed = coop(backbone)
    result = fit(resumed, data, cfg, out_dir=tmp_path, progress=False)
    assert result.resumed_from_epoch == 1
    assert torch.equal(resumed.ctx, straight.ctx)


class WithBuffer(CoOp):
    """A trained BatchNorm whose running statistics the adapter must carry."""

    name = "coop_buffer_test"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = torch.nn.BatchNorm1d(self.clip.config.embed_dim)

    def trainable_buffers(self):
        return ((f"norm.{n}", b) for n, b in self.norm.named_buffers())

    def forward(self, batch):
        image = self.clip.encode_image(batch["image"])
        image = self.norm(image) if self.training else image
        text = self.encode_classes()
        return 100 * torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).t()


def test_trainable_buffers_are_saved_in_adapters_and_training_states(backbone, tmp_path, isolated_registry):
    register(WithBuffer)
    method = coop(backbone, WithBuffer)
    fit(method, Separable(n=16), config(max_epoch=1), out_dir=tmp_path, progress=False)
    state = method.adapter_state()
    assert int(state["norm.num_batches_tracked"]) == 2
    assert not torch.equal(state["norm.running_mean"], torch.zeros_like(state["norm.running_mean"]))
    fresh = coop(backbone, WithBuffer)
    fresh.load_adapter_state(state)
    assert torch.equal(fresh.norm.running_var, method.norm.running_var)
    with pytest.raises(Exception, match="missing"):
        fresh.load_adapter_state({k: v for k, v in state.items() if not k.startswith("norm.running_mean")})


def test_eval_context_defaults_to_the_training_classes_and_names_transfer():
    assert EvalContext().training_classes
    assert not EvalContext("new").training_classes
    assert not EvalContext("all", source=False).training_classes
    assert EvalContext("all", source=True, protocol="fewshot").training_classes
