"""Data-parallel training under torchrun (promptclip.distributed): 2 CPU processes with gloo give the adapter of one
process with the same global batch, seed and sample order; one set of records; resume after a killed job; a failing
rank stops the job with its message."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from processes import descendants
from promptclip.cli import main
from promptclip.clip.architectures import build_random
from promptclip.data import load_splits
from promptclip.distributed import ShardedSeededSampler, batch_shard
from promptclip.methods import create_method

EPOCHS = 3
COMMON = ["fewshot", "--methods", "coop", "--datasets", "eurosat-sample", "--shots", "4", "--seeds", "1",
          "--backbone", "tiny", "--quiet", "--no-report", "--set", f"train.max_epoch={EPOCHS}",
          "--set", "train.precision=fp32", "--set", "train.lr=0.05", "--set", "train.warmup_epoch=0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def torchrun(*args: str) -> list[str]:
    launcher = Path(sys.executable).parent / "torchrun"
    head = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*head, "--standalone", "--nproc-per-node", "2", *args]


def run_dir(out: Path) -> Path:
    found = list((out / "runs").glob("*/*/*/*/*"))
    assert len(found) == 1, found
    return found[0]




def kill_job(pid: int) -> None:
    """SIGKILL torchrun and all its workers at once, as a scheduler ending a job does."""
    for target in [*descendants(pid), pid]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("n, batch, world, drop_last", [(20, 4, 2, True), (23, 4, 2, True), (23, 4, 2, False),
                                                        (10, 16, 2, False), (30, 3, 3, True)])
def test_ranks_share_each_global_batch_of_the_single_process_order(n, batch, world, drop_last):
    from promptclip.data.loader import SeededShuffleSampler

    single = SeededShuffleSampler(n, seed=5)
    single.set_epoch(2)
    order = list(single)
    global_batch = batch * world
    kept = (n // global_batch) * global_batch if drop_last else n
    expected = [sorted(order[i : i + global_batch]) for i in range(0, kept, global_batch)]
    shards = []
    for rank in range(world):
        sampler = ShardedSeededSampler(n, 5, batch, rank, world, drop_last)
        sampler.set_epoch(2)
        mine = list(sampler)
        assert len(mine) == len(sampler)
        shards.append([mine[i : i + batch] for i in range(0, len(mine), batch)])
    assert all(len(s) == len(expected) for s in shards)  # every rank takes the same number of steps
    assert [sorted(sum((s[k] for s in shards), [])) for k in range(len(expected))] == expected


def test_an_empty_rank_is_refused_and_eval_shards_whole_batches():
    with pytest.raises(Exception, match="some rank would get none"):
        ShardedSeededSampler(9, 0, 4, 0, 2, drop_last=False)  # last global batch: 1 sample for 2 ranks
    assert batch_shard(7, 2, 0, 2) == [0, 1, 4, 5] and batch_shard(7, 2, 1, 2) == [2, 3, 6]


def test_two_gloo_ranks_equal_one_process_with_the_global_batch_and_resume_after_a_kill(tmp_path):
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    command = torchrun("-m", "promptclip", "run", *COMMON, "--set", "train.batch_size=4", "--out", str(ddp_out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    # 1) Kill the whole job (both ranks and torchrun) as soon as the first epoch is saved.
    job = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and job.poll() is None:
        found = list(ddp_out.glob("runs/*/*/*/*/*/train_state.json"))
        if found:
            state = json.loads(found[0].read_text())
            break
        time.sleep(0.02)
    kill_job(job.pid)
    output = job.communicate()[0].decode()
    assert state is not None and not state["finished"], output
    killed_state = json.loads((run_dir(ddp_out) / "train_state.json").read_text())
    assert not killed_state["finished"] and len(killed_state["history"]) < EPOCHS
    assert not (ddp_out / "records.jsonl").exists()

    # 2) The same command resumes from the saved epoch and finishes.
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    final = json.loads((run_dir(ddp_out) / "train_state.json").read_text())
    assert final["finished"] and [h["epoch"] for h in final["history"]] == list(range(1, EPOCHS + 1))
    assert final["history"][: len(killed_state["history"])] == killed_state["history"]  # resumed, not redone
    records = [json.loads(line) for line in (ddp_out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 1  # rank 0 alone writes

    # 3) One process with the global batch (2 ranks x 4 = 8), same seed and order.
    assert main(["run", *COMMON, "--set", "train.batch_size=8", "--out", str(single_out)]) == 0
    single_records = [json.loads(line) for line in (single_out / "records.jsonl").read_text().splitlines()]
    ours = load_file(run_dir(ddp_out) / "adapter.safetensors")["ctx"]
    reference = load_file(run_dir(single_out) / "adapter.safetensors")["ctx"]
    splits = load_splits("eurosat-sample")
    init = create_method("coop", build_random("tiny"), splits.classnames,
                         json.loads((run_dir(single_out) / "adapter.json").read_text())["config"]).ctx.detach()
    assert rel(reference, init) > 1e-2  # training moved the context: the comparison below is not vacuous
    assert rel(ours, reference) <= 1e-4 and rel(ours - init, reference - init) <= 1e-3
    single_history = json.loads((run_dir(single_out) / "train_state.json").read_text())["history"]
    for a, b in zip(final["history"], single_history, strict=True):
        assert a["steps"] == b["steps"] and a["train_acc"] == b["train_acc"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert records[0]["accuracy"] == single_records[0]["accuracy"]
    assert records[0]["num_samples"] == single_records[0]["num_samples"] == 300


def test_a_failing_rank_stops_the_job_with_its_message(tmp_path):
    script = tmp_path / "fail_rank1.py"
    script.write_text(
        "import os, sys\n"
        "from promptclip import cli, train\n"
        "from promptclip.errors import DataError\n"
        "if os.environ['RANK'] == '1':\n"
        "    def broken(*args, **kwargs):\n"
        "        raise DataError('cannot decode image /data/x.jpg (simulated)')\n"
        "    train._data_parallel_step = broken\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    started = time.monotonic()
    done = subprocess.run(torchrun(str(script), "train", "--method", "coop", "--dataset", "eurosat-sample",
                                   "--shots", "2", "--backbone", "tiny", "--quiet", "--set", "train.batch_size=2",
                                   "--out", str(tmp_path / "run")),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert time.monotonic() - started < 60  # rank 0 was stopped, not left waiting in its all-reduce
    assert "rank 1/2 failed: cannot decode image /data/x.jpg (simulated)" in done.stderr
    assert not (tmp_path / "run" / "adapter.safetensors").exists()
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
