"""The command line end to end, through ``main([...])``, on the tiny backbone and the bundled EuroSAT sample."""

import csv
import json
import shutil
from pathlib import Path

import pytest

from promptclip import protocols
from promptclip.cli import main
from promptclip.data import load_splits
from promptclip.protocols import append_records

FAST = ["--backbone", "tiny", "--quiet", "--set", "train.max_epoch=1"]


def records_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sample_folder(tmp_path_factory) -> Path:
    """A custom folder dataset (root/<class>/*.jpg) made of 3 classes of the bundled sample."""
    splits = load_splits("eurosat-sample")
    root = tmp_path_factory.mktemp("folder_ds")
    for rec in splits.test:
        if rec.label < 3:
            target = root / rec.classname.replace(" ", "_") / Path(rec.path).name
            target.parent.mkdir(exist_ok=True)
            shutil.copy(rec.path, target)
    return root


def test_demo_with_tiny_backbone_writes_table_and_plots(tmp_path, capsys):
    assert main(["demo", "--backbone", "tiny", "--quiet", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "RANDOM WEIGHTS" in err and "accuracy is meaningless" in err
    records = records_of(tmp_path)
    assert {(r["method"], r["split"]) for r in records} == {(m, s) for m in ("zeroshot", "maple")
                                                            for s in ("base", "novel")}
    assert all(r["num_samples"] == 150 and r["random_weights"] for r in records)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "random weights" in report.lower()
    rows = list(csv.DictReader((tmp_path / "report" / "base2novel.csv").open()))
    maple = next(r for r in rows if r["method"].startswith("maple") and r["dataset"] == "eurosat-sample")
    base = next(r["accuracy"] for r in records if r["method"] == "maple" and r["split"] == "base")
    assert float(maple["base_mean"]) == pytest.approx(base, abs=0.01)
    for png in ("base2novel_average.png", "base2novel_per_dataset.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| eurosat-sample | maple |" in out


def test_fewshot_grid_and_report_command(tmp_path):
    out = tmp_path / "fs"
    argv = ["run", "fewshot", "--methods", "coop", "--datasets", "eurosat-sample", "--shots", "1", "2",
            "--seeds", "1", "--out", str(out), "--no-plots", *FAST]
    assert main(argv) == 0
    records = records_of(out)
    assert sorted(r["shots"] for r in records) == [1, 2]
    assert all(r["split"] == "all" and r["num_samples"] == 300 for r in records)
    assert main(["report", str(out), "--out", str(tmp_path / "rep"), "--no-plots"]) == 0
    rows = list(csv.DictReader((tmp_path / "rep" / "fewshot.csv").open()))
    assert {int(r["shots"]) for r in rows if r["dataset"] == "eurosat-sample"} == {1, 2}


@pytest.mark.parametrize("protocol", ["cross_dataset", "domain_generalization"])
def test_transfer_protocols_evaluate_every_target_with_its_classes(protocol, tmp_path, sample_folder):
    out = tmp_path / protocol
    argv = ["run", protocol, "--methods", "coop", "--datasets", "eurosat-sample", "--shots", "1", "--seeds", "1",
            "--targets", f"folder:{sample_folder}", "--out", str(out), "--no-plots", *FAST]
    assert main(argv) == 0
    records = records_of(out)
    assert len(records) == 2
    source, target = records
    assert source["eval_dataset"] == "eurosat-sample" and source["num_samples"] == 300
    # the target is evaluated on its own test split (generated 50/20/30 for a folder of 3 x 30 images)
    assert target["eval_dataset"] != "eurosat-sample"
    assert target["num_samples"] == len(load_splits(f"folder:{sample_folder}").test) == 27


def test_train_then_eval_on_novel_classes_and_predict(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--method", "coop", "--dataset", "eurosat-sample", "--subsample", "base", "--shots", "2",
                 "--out", str(run), *FAST]) == 0
    assert (run / "adapter.safetensors").exists() and (run / "adapter.json").exists()
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run), "--dataset", "eurosat-sample", "--subsample", "new", "--quiet"]) == 0
    text = capsys.readouterr().out
    result = json.loads(text[text.index("{"):])
    assert result["subsample"] == "new" and result["num_samples"] == 150 and 0 <= result["accuracy"] <= 100
    images = str(Path(load_splits("eurosat-sample").test[0].path).parent)
    assert main(["predict", images, "--adapter", str(run), "--top-k", "2", "--format", "json", "--quiet"]) == 0
    text = capsys.readouterr().out
    rows = json.loads(text[text.index("["):])
    assert len(rows) > 10 and all(len(r["predictions"]) == 2 for r in rows)
    probabilities = [p["probability"] for p in rows[0]["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-6
    assert main(["predict", images, "--classnames", "forest,river", "--backbone", "tiny", "--format", "csv",
                 "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "path,rank,label,probability" and len(lines) == 1 + 2 * len(rows)


def test_list_commands(capsys):
    for what in ("methods", "datasets", "backbones", "presets"):
        assert main(["list", what]) == 0
    out = capsys.readouterr().out
    for expected in ("maple", "dcp", "eurosat-sample", "ViT-B/16", "maple/vit_b16_c2_ep5_batch4_2ctx"):
        assert expected in out


def test_data_verify_command(capsys, tmp_path):
    assert main(["data", "verify", "dtd", "--root", str(tmp_path)]) != 0
    assert "dtd" in capsys.readouterr().out.lower()


def test_data_prepare_without_download_prints_the_manual_steps_once(capsys, tmp_path):
    assert main(["data", "prepare", "sun397", "--root", str(tmp_path), "--no-download", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("prepare sun397") == 1
    assert "manual steps:" in out and "status: manual" in out


def test_killed_grid_resumes_without_duplicate_or_lost_records(tmp_path, monkeypatch):
    out = tmp_path / "grid"
    argv = ["run", "base2novel", "--methods", "zeroshot", "coop", "--datasets", "eurosat-sample", "--seeds", "1", "2",
            "--out", str(out), "--no-plots", "--backbone", "tiny", "--quiet", "--set", "train.max_epoch=2",
            "--shots", "2"]
    real_fit = protocols.fit
    calls = {"n": 0}

    def fit_killed_in_second_training(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            def die(record):
                raise KeyboardInterrupt
            kwargs["on_epoch"] = die
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(protocols, "fit", fit_killed_in_second_training)
    assert main(argv) == 130
    first = records_of(out)
    # zeroshot seed 1, zeroshot seed 2, coop seed 1 finished; coop seed 2 was killed after its first epoch
    assert len(first) == 6
    monkeypatch.setattr(protocols, "fit", real_fit)
    assert main(argv) == 0
    records = records_of(out)
    keys = [(r["method"], r["seed"], r["split"]) for r in records]
    assert len(keys) == len(set(keys)) == 8
    assert records[:6] == first
    resumed = [r for r in records if r["method"] == "coop" and r["seed"] == 2]
    state = json.loads((Path(resumed[0]["run_dir"]) / "train_state.json").read_text())
    assert [h["epoch"] for h in state["history"]] == [1, 2] and state["finished"]
    assert main(argv) == 0  # a finished grid: nothing runs, nothing is appended
    assert records_of(out) == records


def test_torn_last_record_line_is_repaired_before_appending(tmp_path):
    path = tmp_path / "records.jsonl"
    append_records(path, [{"run_id": "a", "x": 1}])
    with open(path, "ab") as handle:
        handle.write(b'{"run_id": "b", "x"')  # a crash in the middle of a write
    append_records(path, [{"run_id": "c", "x": 3}])
    assert [json.loads(line)["run_id"] for line in path.read_text().splitlines()] == ["a", "c"]


@pytest.mark.parametrize("argv, message", [
    (["run", "base2novel", "--methods", "mapel", "--datasets", "eurosat-sample"], "did you mean 'maple'"),
    (["run", "base2novel", "--methods", "maple", "--datasets", "eurosat-smaple"], "eurosat-sample"),
    (["run", "base2novel", "--methods", "maple", "--datasets", "eurosat-sample", "--set", "train.max_epochs=1"],
     "did you mean 'max_epoch'"),
    (["run", "base2novel", "--methods", "maple", "--datasets", "eurosat-sample", "--preset", "maple=maple/nope"],
     "unknown preset"),
    (["run", "baes2novel", "--methods", "maple", "--datasets", "eurosat-sample"], "did you mean 'base2novel'"),
    (["predict", "/definitely/missing.jpg", "--classnames", "a,b"], "does not exist"),
])
def test_bad_input_is_one_paragraph_and_nonzero(argv, message, tmp_path, capsys):
    code = main([*argv, "--out", str(tmp_path)] if argv[0] == "run" else argv)
    err = capsys.readouterr().err
    assert code != 0
    assert message in err.replace("\n", " ")
    assert "Traceback" not in err


def test_offline_download_says_how_to_pass_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROMPTCLIP_CACHE", str(tmp_path / "cache"))
    from promptclip.clip import weights

    def offline(*args, **kwargs):
        raise weights.WeightsError("could not download https://example.invalid/ViT-B-16.pt: offline. "
                                   "Pass --backbone /path/to/ViT-B-16.pt")

    monkeypatch.setattr(weights.load, "download", offline)  # where resolve() looks it up
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "--backbone /path/to/ViT-B-16.pt" in err and "--backbone tiny" in err


def test_adapter_for_another_backbone_or_method_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--method", "coop", "--dataset", "eurosat-sample", "--shots", "1", "--out", str(run),
                 *FAST]) == 0
    meta = json.loads((run / "adapter.json").read_text())
    meta["backbone"]["fingerprint"] = "0" * 16
    (run / "adapter.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run), "--dataset", "eurosat-sample", "--quiet"]) == 2
    assert "fingerprint" in capsys.readouterr().err
    assert main(["eval", "--adapter", str(run), "--method", "maple", "--dataset", "eurosat-sample", "--quiet"]) == 2


def test_debug_shows_the_traceback():
    with pytest.raises(Exception, match="did you mean 'maple'"):
        main(["run", "base2novel", "--methods", "mapel", "--datasets", "eurosat-sample", "--out", "/tmp/x",
              "--debug"])


def test_predict_on_an_empty_folder_or_an_unreadable_image_names_the_file(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(empty), "--classnames", "a,b", "--backbone", "tiny", "--quiet"]) == 2
    assert f"folder {empty} holds no image files" in capsys.readouterr().err.replace("\n", " ")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert main(["predict", str(broken), "--classnames", "a,b", "--backbone", "tiny", "--quiet"]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "cannot decode image" in err and "broken.jpg" in err and "Traceback" not in err


def test_grid_without_matplotlib_writes_tables_and_says_how_to_get_plots(tmp_path, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    argv = ["run", "base2novel", "--methods", "zeroshot", "--datasets", "eurosat-sample", "--seeds", "1",
            "--out", str(tmp_path), "--backbone", "tiny", "--quiet"]
    assert main(argv) == 0
    assert 'pip install "promptclip[plot]"' in capsys.readouterr().out
    assert (tmp_path / "report" / "report.md").exists() and not list((tmp_path / "report").glob("*.png"))


def test_train_replays_an_explicit_batch_order(tmp_path, capsys):
    order_file, run = tmp_path / "order.json", tmp_path / "run"
    # --shots 2 on the 5 base classes: 10 training images; two epochs of explicit batches of 3 and 7, then 10.
    order = [[[9, 0, 4], [1, 2, 3, 5, 6, 7, 8]], [[5, 6, 7, 8, 9, 0, 1, 2, 3, 4]]]
    order_file.write_text(json.dumps({"orders": order}))
    argv = ["train", "--method", "coop", "--dataset", "eurosat-sample", "--subsample", "base", "--shots", "2",
            "--backbone", "tiny", "--quiet", "--set", "train.max_epoch=2", "--batch-order", str(order_file)]
    assert main([*argv, "--out", str(run)]) == 0
    state = json.loads((run / "train_state.json").read_text())
    assert [r["steps"] for r in state["history"]] == [2, 1] and state["batch_order"]
    order_file.write_text(json.dumps([[[0, 10]], [[1]]]))
    assert main([*argv, "--out", str(tmp_path / "bad")]) == 2
    err = " ".join(capsys.readouterr().err.split())  # the message names the file: it wraps where the path ends
    assert "epoch 1, batch 1 has index 10" in err and "10 samples" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
