"""Experiment logging (promptclip.tracking): metrics.jsonl of every run (steps and epochs, with step time, throughput
and peak memory), exactly once per step and epoch after an interrupted and resumed run, TensorBoard event files read
back with tensorboard's own reader, W&B offline runs, the --log-to option, and the report's training curves."""

import json
import resource
import struct
from pathlib import Path

import pytest

from promptclip.cli import main
from promptclip.clip.architectures import build_random
from promptclip.methods import create_method
from promptclip.report import read_records, training_curves, write_report
from promptclip.tracking import METRICS_FILE, read_metrics
from promptclip.train import TrainConfig, fit
from toy_data import Separable

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def backbone():
    return build_random("tiny", seed=0)


def coop(backbone):
    return create_method("coop", backbone, ["a", "b"], {"n_ctx": 2, "init_seed": 3})


CONFIG = TrainConfig(batch_size=4, lr=0.02, max_epoch=3, precision="fp32", seed=5)  # 4 steps per epoch, 12 in all


class Interrupt(Exception):
    pass


def interrupted_then_resumed(backbone, out: Path, trackers=()):
    """Stopped in the middle of epoch 2 (a torn line left at the end of the log), then rerun to the end."""
    def stop(record):
        if record["epoch"] == 2 and record["batch"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(coop(backbone), Separable(16, 2), CONFIG, out_dir=out, progress=False, on_step=stop, trackers=trackers)
    with open(out / METRICS_FILE, "ab") as handle:
        handle.write(b'{"kind": "step", "epoch": 2, "st')  # killed in the middle of a write
    result = fit(coop(backbone), Separable(16, 2), CONFIG, out_dir=out, progress=False, trackers=trackers)
    assert result.resumed_from_epoch == 0
    return result


def test_metrics_of_a_run(backbone, tmp_path):
    steps_seen = []
    result = fit(coop(backbone), Separable(16, 2), CONFIG, out_dir=tmp_path, progress=False, on_step=steps_seen.append)
    steps, epochs = read_metrics(tmp_path / METRICS_FILE)
    assert [s["step"] for s in steps] == list(range(1, 13))
    assert [(s["epoch"], s["batch"], s["batches"]) for s in steps] == [(e, b, 4) for e in (1, 2, 3)
                                                                      for b in (1, 2, 3, 4)]
    assert steps == [{"kind": "step", **s} for s in steps_seen]  # the on_step records, as written
    assert [{k: v for k, v in e.items() if k != "kind"} for e in epochs] == result.history
    for s in steps:
        assert {"loss", "acc", "lr", "batch_size"} <= set(s)
        assert 0 <= s["data_seconds"] <= s["step_seconds"]
        assert s["images_per_second"] == pytest.approx(s["batch_size"] / s["step_seconds"], rel=1e-9)
        # CPU: the process's peak resident set so far, which only grows.
        assert 0 < s["peak_memory_mb"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert all(b["peak_memory_mb"] >= a["peak_memory_mb"] for a, b in zip(steps, steps[1:], strict=False))
    for epoch in epochs:
        mine = [s for s in steps if s["epoch"] == epoch["epoch"]]
        assert epoch["loss"] == pytest.approx(sum(s["loss"] for s in mine) / 4, rel=1e-9)
        assert epoch["peak_memory_mb"] == max(s["peak_memory_mb"] for s in mine)
        seconds = epoch["seconds"]  # rounded to the millisecond
        assert 16 / (seconds + 5e-4) <= epoch["images_per_second"] <= 16 / max(seconds - 5e-4, 1e-9)


def test_interrupted_and_resumed_run_logs_every_step_and_epoch_once(backbone, tmp_path):
    fit(coop(backbone), Separable(16, 2), CONFIG, out_dir=tmp_path / "straight", progress=False)
    interrupted_then_resumed(backbone, tmp_path / "resumed")
    straight_steps, straight_epochs = read_metrics(tmp_path / "straight" / METRICS_FILE)
    steps, epochs = read_metrics(tmp_path / "resumed" / METRICS_FILE)
    assert [s["step"] for s in steps] == list(range(1, 13))
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    # The same run: the re-run epoch repeats the same batches from the same state.
    assert [s["loss"] for s in steps] == [s["loss"] for s in straight_steps]
    assert [e["loss"] for e in epochs] == [e["loss"] for e in straight_epochs]
    # A finished run is not trained again and its log is left as it is.
    before = (tmp_path / "resumed" / METRICS_FILE).read_bytes()
    fit(coop(backbone), Separable(16, 2), CONFIG, out_dir=tmp_path / "resumed", progress=False)
    assert (tmp_path / "resumed" / METRICS_FILE).read_bytes() == before


def test_a_run_started_afresh_drops_the_old_log(backbone, tmp_path):
    fit(coop(backbone), Separable(16, 2), CONFIG, out_dir=tmp_path, progress=False)
    fit(coop(backbone), Separable(16, 2), CONFIG, out_dir=tmp_path, progress=False, resume=False)
    steps, epochs = read_metrics(tmp_path / METRICS_FILE)
    assert [s["step"] for s in steps] == list(range(1, 13)) and len(epochs) == 3


def test_tensorboard_events_read_back_with_tensorboard_after_a_resumed_run(backbone, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    interrupted_then_resumed(backbone, tmp_path, trackers=("tensorboard",))
    steps, epochs = read_metrics(tmp_path / METRICS_FILE)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/step_seconds", "train/peak_memory_mb", "epoch/train_acc"} <= set(
        events.Tags()["scalars"])
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 13))  # the steps written before the interruption were purged
    assert [e.value for e in loss] == pytest.approx([s["loss"] for s in steps], rel=1e-6)
    acc = events.Scalars("epoch/train_acc")
    assert [e.step for e in acc] == [4, 8, 12]
    assert [e.value for e in acc] == pytest.approx([e["train_acc"] for e in epochs], rel=1e-6)


def wandb_history(run_file: Path) -> list[dict]:
    """History rows of an offline W&B run file (LevelDB-log records of wandb's protobuf Record messages)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_metrics(backbone, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    fit(coop(backbone), Separable(16, 2), CONFIG, out_dir=tmp_path, progress=False, trackers=("wandb",),
        run_name="wandb-test")
    steps, _ = read_metrics(tmp_path / METRICS_FILE)
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    rows = [r for r in wandb_history(run_file) if "train/loss" in r]
    assert [r["_step"] for r in rows] == list(range(1, 13))
    assert [r["train/loss"] for r in rows] == pytest.approx([s["loss"] for s in steps], rel=1e-6)
    assert (tmp_path / "wandb_id.txt").read_text().strip() in run_file.name


def test_log_to_option(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    argv = ["train", "--method", "coop", "--dataset", "eurosat-sample", "--shots", "1", "--backbone", "tiny",
            "--quiet", "--set", "train.max_epoch=1", "--out", str(out)]
    assert main([*argv, "--log-to", "tensorboard"]) == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert read_metrics(out / METRICS_FILE)[1][0]["epoch"] == 1

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    capsys.readouterr()
    assert main([*argv, "--log-to", "wandb"]) == 2
    assert 'pip install "promptclip[wandb]"' in capsys.readouterr().err


def test_report_plots_training_curves_of_a_moved_output(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "grid"
    assert main(["run", "fewshot", "--methods", "coop", "--datasets", "eurosat-sample", "--shots", "1",
                 "--seeds", "1", "2", "--backbone", "tiny", "--quiet", "--set", "train.max_epoch=2", "--out",
                 str(out), "--no-report"]) == 0
    moved = tmp_path / "moved"
    out.rename(moved)
    records = [json.loads(line) for line in (moved / "records.jsonl").read_text().splitlines()]
    assert not Path(records[0]["run_dir"]).exists()
    assert read_records(moved) == records  # a folder's *.jsonl are records, its runs' metrics.jsonl are not
    (group,) = training_curves(records, moved)
    assert (group.protocol, group.dataset, group.method) == ("fewshot", "eurosat-sample", "coop")
    assert [(s.shots, s.seed) for s in group.series] == [(1, 1), (1, 2)]
    assert [e["epoch"] for e in group.series[0].epochs] == [1, 2]
    files = write_report(records, tmp_path / "report", records_dir=moved)
    curves = [f for f in files if f.name.startswith("curves_")]
    assert [f.name for f in curves] == ["curves_fewshot_eurosat-sample_coop.png"]
    assert curves[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in write_report(records, tmp_path / "report2") if f.name.startswith("curves_")]
