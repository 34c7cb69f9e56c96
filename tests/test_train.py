"""The training engine: Dassl's learning-rate table, resuming, non-finite losses, adapters and metrics."""

import json
from pathlib import Path

import pytest
import torch

from promptclip.checkpoint import AdapterError, load_adapter, read_adapter, save_adapter
from promptclip.clip.architectures import build_random
from promptclip.evaluate import classification_metrics, evaluate
from promptclip.methods import create_method
from promptclip.train import TrainConfig, TrainingDiverged, dassl_lr, fit
from toy_data import Separable

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def backbone():
    return build_random("tiny", seed=0)


def coop(backbone, classes=("a", "b", "c")):
    return create_method("coop", backbone, list(classes), {"n_ctx": 4, "init_seed": 3})


def small_config(**changes) -> TrainConfig:
    values = dict(batch_size=8, lr=0.02, max_epoch=3, precision="fp32", seed=5)
    values.update(changes)
    return TrainConfig(**values)


def test_learning_rate_of_every_epoch_equals_dassl_for_every_official_config():
    schedules = json.loads((GOLDEN / "golden_mini_weights.json").read_text())["lr_schedules"]
    assert schedules
    for name, entry in schedules.items():
        optim = entry["optim"]
        assert optim["warmup"] == "constant 1e-5 for 1 epoch", name
        config = TrainConfig(lr=optim["lr"], max_epoch=optim["max_epoch"], warmup_epoch=1, warmup_lr=1e-5,
                             momentum=optim["momentum"], weight_decay=optim["weight_decay"])
        ours = [dassl_lr(e, config) for e in range(config.max_epoch)]
        assert ours == pytest.approx(entry["lr_per_epoch"], rel=1e-12, abs=1e-15), name


def test_fit_learns_and_writes_an_adapter(backbone, tmp_path):
    method = coop(backbone)
    data = Separable()
    result = fit(method, data, small_config(max_epoch=4), out_dir=tmp_path, progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.adapter_path == tmp_path / "adapter.safetensors" and result.adapter_path.exists()
    loader = torch.utils.data.DataLoader(data, batch_size=10)
    assert evaluate(method, loader, precision="fp32", progress=False).accuracy > 60  # chance: 33 %


def test_interrupted_run_resumes_to_the_same_adapter(backbone, tmp_path):
    data = Separable()
    straight = coop(backbone)
    fit(straight, data, small_config(), out_dir=tmp_path / "straight", progress=False)

    class Interrupt(Exception):
        pass

    def stop_after_second_epoch(record):
        if record["epoch"] == 2:
            raise Interrupt

    interrupted = coop(backbone)
    with pytest.raises(Interrupt):
        fit(interrupted, data, small_config(), out_dir=tmp_path / "resumed", progress=False,
            on_epoch=stop_after_second_epoch)
    assert not (tmp_path / "resumed" / "adapter.safetensors").exists()
    resumed = coop(backbone)  # fresh tensors: everything must come from the saved state
    result = fit(resumed, data, small_config(), out_dir=tmp_path / "resumed", progress=False)
    assert result.resumed_from_epoch == 1
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert torch.equal(resumed.ctx, straight.ctx)
    # A finished run is not trained again.
    again = coop(backbone)
    assert fit(again, data, small_config(), out_dir=tmp_path / "resumed", progress=False).resumed_from_epoch == 2


def test_resuming_with_another_config_is_refused(backbone, tmp_path):
    data = Separable()
    fit(coop(backbone), data, small_config(max_epoch=1), out_dir=tmp_path, progress=False)
    with pytest.raises(Exception, match="another method or configuration"):
        fit(coop(backbone), data, small_config(max_epoch=1, lr=0.5), out_dir=tmp_path, progress=False)


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_last_good_state(backbone, tmp_path):
    method = coop(backbone)
    data = Separable()
    calls = {"n": 0}
    original = method.loss

    def poisoned(batch, logits):
        calls["n"] += 1
        losses = original(batch, logits)
        if calls["n"] == 5:  # epoch 2 (3 steps per epoch), step 2
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    method.loss = poisoned
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 2"):
        fit(method, data, small_config(), out_dir=tmp_path, progress=False)
    state = json.loads((tmp_path / "train_state.json").read_text())
    assert state["epoch"] == 0 and not state["finished"]


def test_seeded_runs_are_identical(backbone):
    data = Separable()
    a, b = coop(backbone), coop(backbone)
    fit(a, data, small_config(max_epoch=2), progress=False)
    fit(b, data, small_config(max_epoch=2), progress=False)
    assert torch.equal(a.ctx, b.ctx)
    c = coop(backbone)
    fit(c, data, small_config(max_epoch=2, seed=6), progress=False)
    assert not torch.equal(a.ctx, c.ctx)


def test_backbone_is_unchanged_by_training(backbone):
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    fit(coop(backbone), Separable(), small_config(max_epoch=2), progress=False)
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_adapter_round_trip_onto_other_class_names(backbone, tmp_path):
    method = coop(backbone)
    with torch.no_grad():
        method.ctx.add_(0.1)
    path = save_adapter(tmp_path / "run", method, "tiny", "fp-123")
    meta, tensors = read_adapter(path)
    assert set(tensors) == {"ctx"} and meta["classnames"] == ["a", "b", "c"] and meta["method"] == "coop"
    loaded = load_adapter(path, backbone, backbone_fingerprint="fp-123")
    images = Separable(n=4).images
    loaded.eval(), method.eval()
    with torch.no_grad():
        assert torch.equal(loaded({"image": images}), method({"image": images}))
    novel = load_adapter(tmp_path / "run.json", backbone, classnames=["x", "y"])
    with torch.no_grad():
        assert novel({"image": images}).shape == (4, 2)
    assert torch.equal(novel.ctx, method.ctx)


def test_adapter_errors_name_the_problem(backbone, tmp_path):
    method = coop(backbone)
    path = save_adapter(tmp_path / "run", method, "tiny", "fp-123")
    with pytest.raises(AdapterError, match="fingerprint fp-123.*fingerprint other"):
        load_adapter(path, backbone, backbone_fingerprint="other")
    with pytest.raises(AdapterError, match="trained with method 'coop', not 'maple'"):
        load_adapter(path, backbone, expect_method="maple")
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tmp_path / "missing", backbone)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        load_adapter(path, backbone)


def test_metrics_against_hand_computed_values():
    # labels:      0 0 1 1 2 ; predictions: 0 1 1 1 0
    result = classification_metrics(torch.tensor([0, 1, 1, 1, 0]), torch.tensor([0, 0, 1, 1, 2]), ["a", "b", "c"])
    assert result.accuracy == pytest.approx(60.0)
    # per class F1: a: p=1/2 r=1/2 -> 0.5 ; b: p=2/3 r=1 -> 0.8 ; c: p=0 r=0 -> 0
    assert result.macro_f1 == pytest.approx(100 * (0.5 + 0.8 + 0.0) / 3)
    assert result.per_class_accuracy == pytest.approx({"a": 50.0, "b": 100.0, "c": 0.0})


def test_zero_shot_has_nothing_to_train(backbone):
    method = create_method("zeroshot", backbone, ["a", "b"])
    with pytest.raises(Exception, match="nothing to train"):
        fit(method, Separable(n=4, classes=2), small_config(), progress=False)


def test_crash_between_state_writes_resumes_from_the_previous_consistent_epoch(backbone, tmp_path, monkeypatch):
    from promptclip import train as train_module

    data = Separable()
    straight = coop(backbone)
    fit(straight, data, small_config(), out_dir=tmp_path / "straight", progress=False)

    real_write = train_module.atomic_write_text
    writes = {"n": 0}

    def crash_on_second_state_json(path, text):
        writes["n"] += 1
        if writes["n"] == 2:  # epoch 2's tensors are on disk, its JSON is not
            raise KeyboardInterrupt
        real_write(path, text)

    monkeypatch.setattr(train_module, "atomic_write_text", crash_on_second_state_json)
    with pytest.raises(KeyboardInterrupt):
        fit(coop(backbone), data, small_config(), out_dir=tmp_path / "crashed", progress=False)
    monkeypatch.setattr(train_module, "atomic_write_text", real_write)
    state = json.loads((tmp_path / "crashed" / "train_state.json").read_text())
    assert state["epoch"] == 0 and (tmp_path / "crashed" / state["tensors"]).exists()
    resumed = coop(backbone)
    result = fit(resumed, data, small_config(), out_dir=tmp_path / "crashed", progress=False)
    assert result.resumed_from_epoch == 0
    assert torch.equal(resumed.ctx, straight.ctx)
    assert [p.name for p in (tmp_path / "crashed").glob("train_state-epoch*.safetensors")] == [
        "train_state-epoch2.safetensors"]
