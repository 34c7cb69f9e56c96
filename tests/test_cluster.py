"""Grids through submitit (promptclip.cluster): its LocalExecutor (one subprocess per cell, as a SLURM array would
run them) writes the same records as the in-process grid; a grid whose jobs are killed resumes with no duplicate
or lost record; without submitit, --executor slurm says how to install it."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from processes import descendants
from promptclip.cli import main
from promptclip.cluster import ClusterOptions, submit_grid
from promptclip.protocols import RunOptions, make_cells

submitit = pytest.importorskip("submitit")

GRID = ["run", "fewshot", "--methods", "coop", "--datasets", "eurosat-sample", "--shots", "4", "--seeds", "1", "2",
        "--backbone", "tiny", "--quiet", "--no-report", "--set", "train.max_epoch=3", "--set", "train.batch_size=4",
        "--set", "train.precision=fp32"]
VOLATILE = ("run_dir", "seconds", "created")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def one_thread_per_job(monkeypatch):
    """Jobs compute with one thread each, like the in-process grid (no oversubscription of a small machine)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def records_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def stable(records: list[dict]) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if k not in VOLATILE} for r in records), key=lambda r: r["run_id"])


@pytest.fixture(scope="module")
def local_records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*GRID, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return records_of(out)


def test_submitit_jobs_write_the_records_of_the_local_grid(local_records, tmp_path):
    out = tmp_path / "cluster"
    assert main([*GRID, "--out", str(out), "--executor", "submitit-local"]) == 0
    assert len(local_records) == 2
    assert stable(records_of(out)) == stable(local_records)
    assert len(list((out / "submitit").glob("*_result.pkl"))) == 2  # one job per cell
    # A finished grid submits nothing and appends nothing.
    before = records_of(out)
    assert main([*GRID, "--out", str(out), "--executor", "submitit-local"]) == 0
    assert records_of(out) == before and len(list((out / "submitit").glob("*_submitted.pkl"))) == 2




def test_killed_grid_resumes_without_duplicate_or_lost_records(local_records, tmp_path):
    from promptclip.api import load_backbone

    out = tmp_path / "killed"
    cells = make_cells("fewshot", ["eurosat-sample"], ["coop"], [1, 2], [4],
                       overrides=["train.max_epoch=3", "train.batch_size=4", "train.precision=fp32"])
    backbone = load_backbone("tiny", progress=False)
    # Submit without waiting, then kill every job (controller and task, SIGKILL) once a cell has saved an epoch.
    result = submit_grid(cells, backbone, "tiny", out, RunOptions(progress=False, log=lambda text: None),
                         ClusterOptions("submitit-local", wait=False))
    assert result.submitted == 2 and len(result.job_ids) == 2
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(out.glob("runs/*/*/*/*/*/train_state.json")):
        time.sleep(0.02)
    for job_id in result.job_ids:
        for pid in [*descendants(int(job_id)), int(job_id)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    states = {p.parent.name: json.loads(p.read_text()) for p in out.glob("runs/*/*/*/*/*/train_state.json")}
    unfinished = {name: s for name, s in states.items() if not s["finished"]}
    assert unfinished, states  # a cell was killed in the middle of its training
    before = records_of(out) if (out / "records.jsonl").exists() else []
    assert len(before) < 2

    # The same grid, resubmitted: finished cells are skipped, the killed one resumes from its saved epoch.
    assert main([*GRID, "--out", str(out), "--executor", "submitit-local"]) == 0
    records = records_of(out)
    assert len(records) == len({r["run_id"] for r in records}) == 2
    assert records[: len(before)] == before
    assert stable(records) == stable(local_records)
    for name, state in unfinished.items():
        final = json.loads(next(out.glob(f"runs/*/*/*/*/{name}/train_state.json")).read_text())
        assert final["finished"] and final["history"][: len(state["history"])] == state["history"]


def test_slurm_without_submitit_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    code = main(["run", "fewshot", "--methods", "coop", "--datasets", "eurosat-sample", "--backbone", "tiny",
                 "--out", str(tmp_path), "--executor", "slurm", "--partition", "gpu", "--gpus-per-job", "1"])
    err = capsys.readouterr().err.replace("\n", " ")
    assert code == 2 and 'pip install "promptclip[slurm]"' in err
    assert not (tmp_path / "runs").exists()


def test_slurm_submission_is_one_job_array_with_the_options(tmp_path, monkeypatch, capsys):
    """Up to sbatch, with stand-ins for srun and sbatch (no cluster here): the array, partition, GPUs, time."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/submitted.sh\necho Submitted batch job 4242\n")
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "grid"
    assert main(["run", "fewshot", "--methods", "coop", "--datasets", "eurosat-sample", "--shots", "1", "2", "4",
                 "--seeds", "1", "--backbone", "tiny", "--quiet", "--out", str(out), "--executor", "slurm",
                 "--partition", "gpu", "--gpus-per-job", "1", "--time", "30", "--array-parallelism", "2",
                 "--no-wait"]) == 0
    script = (tmp_path / "submitted.sh").read_text()
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --time=30", "#SBATCH --ntasks-per-node=1", f"#SBATCH --output={out}/submitit/"):
        assert line in script, script
    assert "3 job(s) submitted" in capsys.readouterr().out
    assert not (out / "records.jsonl").exists()


def test_a_cell_claimed_by_another_process_is_left_alone_and_records_are_appended_once(tmp_path):
    from promptclip.api import load_backbone
    from promptclip.protocols import _claim, append_records_once, run_grid

    cells = make_cells("fewshot", ["eurosat-sample"], ["zeroshot"], [1], [1])
    backbone = load_backbone("tiny", progress=False)
    options = RunOptions(progress=False, log=lambda text: None)
    with _claim(cells[0].run_dir(tmp_path, backbone)) as claimed:  # another open file: flock conflicts
        assert claimed
        busy = run_grid(cells, backbone, tmp_path, options)
    assert (busy.busy, busy.ran, busy.records) == (1, 0, [])
    assert not (tmp_path / "records.jsonl").exists()
    done = run_grid(cells, backbone, tmp_path, options)
    assert (done.busy, done.ran, len(done.records)) == (0, 1, 1)
    assert not append_records_once(tmp_path / "records.jsonl", done.records)  # already there: nothing appended
    assert records_of(tmp_path) == done.records


def test_a_job_with_two_tasks_trains_its_cell_data_parallel(tmp_path):
    """--gpus-per-job N runs N tasks per job; here 2 CPU tasks (gloo) through submitit's LocalExecutor."""
    from promptclip.api import load_backbone

    cells = make_cells("fewshot", ["eurosat-sample"], ["coop"], [1], [2],
                       overrides=["train.max_epoch=1", "train.batch_size=4", "train.precision=fp32"])
    result = submit_grid(cells, load_backbone("tiny", progress=False), "tiny", tmp_path,
                         RunOptions(progress=False, log=lambda text: None),
                         ClusterOptions("submitit-local", tasks_per_job=2))
    assert not result.failed and len(records_of(tmp_path)) == 1
    assert len(list((tmp_path / "submitit").glob("*_result.pkl"))) == 2  # both tasks ran the cell
    state = json.loads(next(tmp_path.glob("runs/*/*/*/*/*/train_state.json")).read_text())
    assert state["history"][0]["steps"] == 20 // 8  # 20 images, global batch 2 x 4: one data-parallel run
