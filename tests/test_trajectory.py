"""Whole training runs against the reference trainers (tests/golden/TRAJECTORY_README.md).

For every ``*.trajectory.json`` present, promptclip's own ``fit`` is driven over the golden's batch order with the
config, class names, inputs and initial values read from the files; the per-step learning rate, loss and loss terms,
the parameters after every epoch and at the end, and the eval logits before and after training must match the
reference within the README's bars (the movement bar of a parameter never below one float32 ulp of its value per
optimizer step taken; docs/parity.md says why). Other configurations dropped in under the same names must pass
unchanged.
"""

import pytest
import torch

from parity import (
    adam_undetermined,
    epoch_floors,
    logits_error,
    moves_by_noise,
    replay_trajectory,
    scalar_error,
    step_lrs,
    steps_until,
    stored_part,
    trajectory_golden_names,
    trajectory_param_errors,
)

TRAJECTORIES = trajectory_golden_names()


def test_trajectory_goldens_are_present():
    assert len(TRAJECTORIES) >= 11


@pytest.fixture(scope="module", params=TRAJECTORIES)
def replay(request):
    return replay_trajectory(request.param)


def test_eval_logits_before_training(replay):
    err = logits_error(replay.logits_init, replay.golden.tensors["eval.logits_init"])
    assert err <= 1, f"{replay.golden.name}: eval.logits_init off by {err:.2f}x the bar"


def test_every_step_has_the_reference_lr_loss_and_terms(replay):
    golden_steps = replay.trajectory["steps"]
    assert len(replay.steps) == len(golden_steps)
    assert replay.golden.tensors["trajectory.loss"].tolist() == pytest.approx([s["loss"] for s in golden_steps])
    for ours, ref in zip(replay.steps, golden_steps, strict=True):
        where = f"{replay.golden.name} step {ref['step']} (epoch {ref['epoch']}, batch {ref['batch_idx']})"
        assert (ours["epoch"] - 1, ours["batch"] - 1, ours["step"] - 1) == (ref["epoch"], ref["batch_idx"],
                                                                            ref["step"]), where
        assert abs(ours["lr"] - ref["lr"]) <= 1e-9 * ref["lr"], f"{where}: lr {ours['lr']} vs {ref['lr']}"
        if "lrs" in ref:  # one rate per parameter group (e.g. DePT's staged learning rates)
            mine = step_lrs(ours)
            assert len(mine) == len(ref["lrs"]), f"{where}: {len(mine)} parameter groups, the reference has " \
                                                 f"{len(ref['lrs'])}"
            for group, (a, b) in enumerate(zip(mine, ref["lrs"], strict=True)):
                assert abs(a - b) <= 1e-9 * b, f"{where}: group {group} lr {a} vs {b}"
        assert scalar_error(ours["loss"], ref["loss"]) <= 1, f"{where}: loss {ours['loss']} vs {ref['loss']}"
        terms = replay.method.reference_loss_terms(ours)
        for key, value in ref.get("terms", {}).items():
            mine = ours["acc"] if key == "acc" else terms.get(key)
            assert mine is not None, f"{where}: the reference reports term {key!r}, ours has no counterpart"
            assert scalar_error(mine, value) <= 1, f"{where}: {key} {mine} vs {value}"


def _check_params(replay, entries, ours_by_name, label, steps, floors=None):
    tensors = replay.golden.tensors
    for entry in entries:
        ours, init = ours_by_name[entry["name"]], replay.init_params[entry["name"]]
        golden = tensors[entry["key"]]
        floor = (floors or {}).get(entry["name"])
        err, value_ratio, move_ratio = trajectory_param_errors(stored_part(ours, entry), golden,
                                                               stored_part(init, entry), steps,
                                                               None if floor is None else stored_part(floor, entry))
        what = f"{replay.golden.name} {label} {entry['name']}"
        if moves_by_noise(entry, entries):  # its movement is float noise: the value bar only
            move_ratio = 0.0
        assert value_ratio <= 1 and move_ratio <= 1, (
            f"{what}: max abs error {err:.3g} is {value_ratio:.2f}x the value bar and {move_ratio:.2f}x the "
            f"movement bar (after {steps} optimizer steps)")
        if not entry["stored"]:  # the whole tensor's movement, from its float64 sum
            delta = (ours.double() - init.double()).abs().sum().item()
            assert delta == pytest.approx(entry["delta_abs_sum"], rel=2e-3), f"{what}: delta_abs_sum"


def test_parameters_after_every_epoch(replay):
    golden_epochs = replay.trajectory["epoch_end_params"]
    assert len(replay.epoch_params) == len(golden_epochs) == replay.trajectory["epochs"]
    for e, (ours, entries) in enumerate(zip(replay.epoch_params, golden_epochs, strict=True)):
        _check_params(replay, entries, ours, f"epoch{e}", steps_until(replay, e), epoch_floors(replay, e))


def test_final_parameters(replay):
    _check_params(replay, replay.trajectory["final_params"], replay.final_params, "final", steps_until(replay),
                  replay.final_floors)


def test_eval_logits_after_training(replay):
    err = logits_error(replay.logits, replay.golden.tensors["eval.logits"])
    assert err <= 1, f"{replay.golden.name}: eval.logits off by {err:.2f}x the bar"


def test_gradient_free_parameters_stay_bit_identical(replay):
    frozen = replay.golden.meta["params_without_grad"]
    for name in frozen:
        init = replay.init_params[name]
        for e, params in enumerate(replay.epoch_params):
            assert torch.equal(params[name], init), f"{name} moved by epoch {e}"
        assert torch.equal(replay.final_params[name], init), f"{name} moved by the end of training"


def test_movement_bar_allows_one_rounding_per_step_and_nothing_more():
    init = torch.tensor([0.2, -0.1, 0.05])
    golden = init + torch.tensor([5e-6, -3e-6, 1e-6])  # a warm-up epoch: 2e-3 of the movement is < 1 ulp of 0.2
    one_ulp = torch.nextafter(golden, torch.full_like(golden, 1.0))
    assert trajectory_param_errors(one_ulp, golden, init, steps=1)[2] <= 1
    assert trajectory_param_errors(one_ulp, golden, init, steps=3)[2] <= 1 / 3 + 1e-9
    assert trajectory_param_errors(golden, golden, init, steps=0)[2] == 0
    assert trajectory_param_errors(one_ulp, golden, init, steps=0)[2] > 1  # no step: no floor, the bare bar
    off_by_an_epoch = init + 2 * (golden - init)  # an error of the order of the movement (a mutation)
    assert trajectory_param_errors(off_by_an_epoch, golden, init, steps=9)[2] > 10


def test_adam_floor_covers_only_steps_whose_gradient_the_parity_bar_leaves_undetermined():
    grad = torch.tensor([1.0, -0.5, 6e-8, 0.0, 2e-4])
    floor = adam_undetermined(grad, lr=1e-5)
    assert floor.tolist() == pytest.approx([0.0, 0.0, 2e-5, 2e-5, 0.0])  # |g| <= 1e-4 * max|g|: either direction
    init = torch.zeros(5)
    golden = torch.tensor([3e-5, -3e-5, 6.9e-6, 0.0, 3e-5])  # a warm-up epoch of 3 AdamW steps
    ours = golden + torch.tensor([0.0, 0.0, 9e-8, 0.0, 0.0])  # the ε-regime element off by 1% of a step
    assert trajectory_param_errors(ours, golden, init, steps=3)[2] > 1  # the bare bar fails it
    assert trajectory_param_errors(ours, golden, init, steps=3, floor=floor)[2] <= 1
    elsewhere = golden + torch.tensor([9e-8, 0.0, 0.0, 0.0, 0.0])  # the same error where the gradient is determined
    assert trajectory_param_errors(elsewhere, golden, init, steps=3, floor=floor)[2] > 1
    assert adam_undetermined(None, 1e-3).sum() == 0
