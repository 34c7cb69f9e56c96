"""docs/new-method.md cannot rot: its python blocks are excerpts of the example files, and its bash blocks run (from
a copy of the repository's examples/, with the bundled sample) and produce what the page says."""

import csv
import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from promptclip.cli import main

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / "docs" / "new-method.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", TUTORIAL.read_text(), flags=re.MULTILINE | re.DOTALL)


def commands() -> list[str]:
    lines = []
    for block in blocks("bash"):
        lines += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return lines


def test_python_blocks_are_excerpts_of_the_example_files():
    found = blocks("python")
    assert len(found) >= 4
    for block in found:
        marker, _, body = block.partition("\n")
        assert marker.startswith("# examples/"), f"a python block of {TUTORIAL.name} does not name its file"
        assert body in (REPO / marker[2:]).read_text(), f"{TUTORIAL.name}: a block is not in {marker[2:]}:\n{body}"


def test_the_tutorial_runs(tmp_path, monkeypatch, isolated_registry, capsys):
    pytest.importorskip("matplotlib")
    work = tmp_path / "repo"
    shutil.copytree(REPO / "examples", work / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    (work / "src").symlink_to(REPO / "src")  # the bundled sample images that `predict` reads
    monkeypatch.chdir(work)
    ran = []
    for command in commands():
        argv = shlex.split(command)
        if argv[0] == "pytest":
            done = subprocess.run([sys.executable, "-m", "pytest", *argv[1:], "-p", "no:cacheprovider"], cwd=work,
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stdout + done.stderr
        else:
            assert argv[0] == "promptclip", command
            assert main(argv[1:]) == 0, command
        ran.append(argv[:2])
    assert ran == [["pytest", "-q"], ["promptclip", "train"], ["promptclip", "eval"], ["promptclip", "predict"],
                   ["promptclip", "run"], ["promptclip", "report"]]
    out = capsys.readouterr().out

    # train: adapter (naming its plugin), metrics, tensorboard events
    run = work / "runs" / "clip_adapter"
    meta = json.loads((run / "adapter.json").read_text())
    assert meta["method"] == "my_clip_adapter"
    assert meta["method_source"] == {"kind": "plugin", "spec": f"{work / 'examples' / 'clip_adapter.py'}:ClipAdapter"}
    assert (run / "metrics.jsonl").exists() and list((run / "tensorboard").glob("events.out.tfevents.*"))
    # eval on the novel classes, predict on a folder (csv)
    assert '"method": "my_clip_adapter"' in out and '"subsample": "new"' in out
    lines = out.splitlines()
    printed = itertools.takewhile(lambda line: line.count(",") == 3, lines[lines.index("path,rank,label,probability"):])
    rows = list(csv.DictReader(printed))
    assert len(rows) == 2 * 50 and {r["rank"] for r in rows} == {"1", "2"}
    assert all("/River/" in r["path"] for r in rows)

    # the grid: both methods on base and novel, in one report with their training curves
    report = work / "runs" / "tutorial" / "report"
    records = [json.loads(line) for line in (work / "runs" / "tutorial" / "records.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["split"]) for r in records) == [
        ("maple", "base"), ("maple", "novel"), ("my_clip_adapter", "base"), ("my_clip_adapter", "novel")]
    table = list(csv.DictReader((report / "base2novel.csv").open()))
    assert {r["method"] for r in table if r["dataset"] == "eurosat-sample"} == {"my_clip_adapter", "maple"}
    markdown = (report / "report.md").read_text()
    assert "| eurosat-sample | my_clip_adapter |" in markdown and "| eurosat-sample | maple |" in markdown
    for method in ("my_clip_adapter", "maple"):
        png = report / f"curves_base2novel_eurosat-sample_{method}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
