"""Experiment logging: every training run writes its metrics to ``metrics.jsonl`` in its run directory (beside its
adapter and records), always; TensorBoard and Weights & Biases writers mirror them when asked (``--log-to``).

One JSON object per line, keys sorted:

- ``"kind": "step"``, after every optimizer step: ``epoch`` and ``step`` (1-based; ``step`` counts the run's
  optimizer steps), ``batch`` / ``batches`` (within the epoch), ``lr``, ``batch_size`` (global under data
  parallelism), ``acc`` (percent, this batch), every loss term (``loss`` is the back-propagated total),
  ``step_seconds`` (wall time since the previous step, waiting for the batch included), ``data_seconds`` (of which
  waiting for the batch), ``images_per_second`` and ``peak_memory_mb`` (CUDA: the most memory torch allocated during
  the step; CPU: the process's peak resident memory so far);
- ``"kind": "epoch"``, after each epoch: the epoch's ``lr``, ``train_acc``, ``steps``, ``seconds``, the means of the
  loss terms, ``images_per_second`` and ``peak_memory_mb`` (the epoch's largest).

Resuming: a run restarts from its last finished epoch and runs an interrupted epoch again, so the log first drops
every line of the epochs after the last finished one (and a torn last line); an epoch's line is written and synced
before its training state, so the log never holds an epoch that the state does not. The result has every step and
epoch exactly once. TensorBoard gets the same guarantee from ``purge_step`` (its reader drops the events of the
re-run steps); W&B keeps the first value logged at a step.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id.txt"
TRACKERS = ("tensorboard", "wandb")
INSTALL_HINTS = {"tensorboard": 'pip install "promptclip[tensorboard]"', "wandb": 'pip install "promptclip[wandb]"'}
#: Step-record keys that index a step rather than measure it (not sent to the trackers as curves).
INDEX_KEYS = ("kind", "epoch", "step", "batch", "batches")


def check_trackers(names: Iterable[str]) -> None:
    """A :class:`ConfigError` with the install command for the first tracker that is unknown or not installed."""
    import importlib.util

    modules = {"tensorboard": "tensorboard", "wandb": "wandb"}
    for name in names:
        if name not in modules:
            raise ConfigError(f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        if importlib.util.find_spec(modules[name]) is None:
            raise ConfigError(f"--log-to {name} needs the {name} package, which is not installed: "
                              f"{INSTALL_HINTS[name]}")


def peak_memory_mb(device) -> float:
    """CUDA: the most memory torch allocated on ``device`` since the last reset; CPU: the process's peak resident
    set size so far (both in MiB)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def read_metrics(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(steps, epochs)`` of a ``metrics.jsonl`` file (a torn last line is skipped)."""
    steps, epochs = [], []
    for line in _lines(Path(path)):
        (steps if line.get("kind") == "step" else epochs).append(line)
    return steps, epochs


def _lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    if path.exists():
        for raw in path.read_bytes().splitlines():
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a torn last line (a crash mid-write)
            if isinstance(obj, dict):
                lines.append(obj)
    return lines


def keep_finished_epochs(path: Path, finished: int) -> None:
    """Rewrite ``path`` with only the lines of epochs ``1..finished`` (an interrupted epoch is run again)."""
    from .checkpoint import atomic_write_text

    if not path.exists():
        return
    kept = [line for line in _lines(path) if int(line.get("epoch", 0)) <= finished]
    atomic_write_text(path, "".join(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n" for line in kept))


class RunLog:
    """The metrics of one training run: ``metrics.jsonl`` plus the chosen trackers (rank 0 only).

    ``finished_epochs`` and ``steps_before``: where the run (re)starts; lines of later epochs are dropped first.
    Nothing is created before the first line to write: a run that fails before its first step (an undecodable
    image in the first batch) leaves no file and no folder behind.
    """

    def __init__(self, run_dir: str | os.PathLike, finished_epochs: int = 0, steps_before: int = 0,
                 trackers: Sequence[str] = (), name: str | None = None, config: Mapping[str, Any] | None = None):
        check_trackers(trackers)
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self._start = (finished_epochs, steps_before, tuple(trackers), name, dict(config or {}))
        self._handle = None
        self._writers: list[Any] = []

    def _open(self) -> None:
        from .jsonl import cut_torn_tail

        finished_epochs, steps_before, trackers, name, config = self._start
        self.run_dir.mkdir(parents=True, exist_ok=True)
        keep_finished_epochs(self.path, finished_epochs)
        self._handle = open(self.path, "a+b")
        cut_torn_tail(self._handle)
        try:
            for tracker in trackers:
                if tracker == "tensorboard":
                    self._writers.append(TensorBoardWriter(self.run_dir / TENSORBOARD_DIR, steps_before + 1))
                else:
                    self._writers.append(WandbWriter(self.run_dir, finished_epochs, name or self.run_dir.name,
                                                     config))
        except BaseException:
            self.close()
            raise

    def step(self, record: Mapping[str, Any]) -> None:
        self._write({"kind": "step", **record}, sync=False)  # a lost step belongs to an epoch that is run again
        for writer in self._writers:
            writer.write("train", record, int(record["step"]))

    def epoch(self, record: Mapping[str, Any], last_step: int) -> None:
        """The epoch's line, synced (call before saving the epoch's training state); ``last_step``: its last step."""
        self._write({"kind": "epoch", **record}, sync=True)
        for writer in self._writers:
            writer.write("epoch", record, last_step)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers = []
        if self._handle is not None and not self._handle.closed:
            self._handle.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, line: Mapping[str, Any], sync: bool) -> None:
        from .jsonl import write_json_lines

        if self._handle is None:
            self._open()
        write_json_lines(self._handle, [line], sync=sync)


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k not in INDEX_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardWriter:
    """Scalars ``train/<key>`` per step and ``epoch/<key>`` at each epoch's last step, in ``<run dir>/tensorboard``.
    ``purge_step``: events of this step and later, left by an interrupted attempt, are discarded by TensorBoard."""

    def __init__(self, log_dir: Path, purge_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def write(self, prefix: str, record: Mapping[str, Any], step: int) -> None:
        for key, value in _scalars(record).items():
            self._writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self._writer.close()


class WandbWriter:
    """One W&B run per training run (``<run dir>/wandb``): its id is kept in the run directory, so a resumed run
    continues the same W&B run. ``WANDB_MODE=offline`` (or ``wandb offline``) logs without a network;
    ``WANDB_PROJECT`` names the project (default ``promptclip``)."""

    def __init__(self, run_dir: Path, finished_epochs: int, name: str, config: Mapping[str, Any]):
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        if finished_epochs > 0 and id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            from .checkpoint import atomic_write_text

            run_id = secrets.token_hex(8)
            atomic_write_text(id_file, run_id + "\n")
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "promptclip"), name=name, id=run_id,
                               resume="allow", dir=str(run_dir), config=dict(config),
                               settings=wandb.Settings(console="off", silent=True))

    def write(self, prefix: str, record: Mapping[str, Any], step: int) -> None:
        self._run.log({f"{prefix}/{k}": v for k, v in _scalars(record).items()}, step=step)

    def close(self) -> None:
        self._run.finish()


__all__ = ["METRICS_FILE", "TRACKERS", "RunLog", "read_metrics", "check_trackers", "peak_memory_mb",
           "keep_finished_epochs"]
