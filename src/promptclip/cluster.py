"""Protocol grids on a cluster through submitit (optional extra: ``pip install "promptclip[slurm]"``).

``promptclip run <protocol> ... --executor slurm`` submits one job per unfinished grid cell as one SLURM job array
(``--partition``, ``--gpus-per-job``, ``--cpus-per-job``, ``--mem-gb``, ``--time`` minutes,
``--array-parallelism`` running at once; logs and pickles under ``--executor-folder``, default ``<out>/submitit``).
``--executor submitit-local`` runs the same jobs as subprocesses of this machine (submitit's LocalExecutor: a way to
try a cluster configuration without a cluster), ``--executor local`` (the default) runs the grid in this process.

Every job runs :func:`promptclip.protocols.run_one` — the same claim, done marker (``<run dir>/records.json``) and
locked append-once to ``<out>/records.jsonl`` as a local grid — so local and cluster grids write identical records,
a rerun (on any machine that sees the output directory) skips finished cells, resumes interrupted ones from their last
finished epoch, skips cells that another process is running, and never appends a record twice.

A job loads the plugins of its cell's method (files and modules given to ``--plugin``, recorded by
:func:`promptclip.methods.method_source`; installed packages load through their entry points) and the backbone itself
(by the name or path given to the launcher, which must resolve to the same weights on the compute nodes: the
fingerprint is checked). With ``--gpus-per-job N`` > 1 the job runs N tasks, one per GPU, and trains the cell
data-parallel (:mod:`promptclip.distributed`, environment from submitit).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import distributed
from .errors import ConfigError, PromptClipError
from .protocols import (
    RECORDS_FILE,
    Backbone,
    Cell,
    RunOptions,
    append_records_once,
    cell_is_busy,
    check_grid_data,
    describe,
    read_done_records,
    run_one,
)

EXECUTORS = ("local", "slurm", "submitit-local")
INSTALL_HINT = 'pip install "promptclip[slurm]"'


@dataclass
class ClusterOptions:
    executor: str = "slurm"
    #: Job scripts, pickles and logs (default ``<out>/submitit``).
    folder: str | Path | None = None
    partition: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    mem_gb: int | None = None
    #: Time limit of one job (one cell), minutes.
    time_min: int = 24 * 60
    #: Jobs of the array running at the same time (SLURM).
    array_parallelism: int = 16
    #: Processes per job; default one per GPU (data-parallel over the job's GPUs), at least one.
    tasks_per_job: int | None = None
    #: Wait for the jobs and report failures; False: submit and return.
    wait: bool = True

    def __post_init__(self):
        if self.executor not in EXECUTORS[1:]:
            raise ConfigError(f"cluster executor must be one of {', '.join(EXECUTORS[1:])}, got {self.executor!r}")
        for name, minimum in (("gpus_per_job", 0), ("time_min", 1), ("array_parallelism", 1)):
            if getattr(self, name) < minimum:
                raise ConfigError(f"cluster option {name} must be at least {minimum}, got {getattr(self, name)}")


@dataclass
class ClusterResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    submitted: int = 0
    skipped: int = 0
    busy: int = 0
    job_ids: list[str] = field(default_factory=list)
    #: (cell, error line, log file) of jobs that failed (when waiting).
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    folder: Path | None = None


def import_submitit(executor: str = "slurm"):
    try:
        import submitit
    except ImportError:
        raise ConfigError(f"--executor {executor} needs submitit, which is not installed: {INSTALL_HINT} "
                          "(or pip install submitit)") from None
    return submitit


def make_executor(cluster: ClusterOptions, folder: Path):
    submitit = import_submitit(cluster.executor)
    kind = "slurm" if cluster.executor == "slurm" else "local"
    executor = submitit.AutoExecutor(folder=folder, cluster=kind)
    params: dict[str, Any] = {
        "name": "promptclip", "timeout_min": cluster.time_min, "nodes": 1,
        "tasks_per_node": cluster.tasks_per_job or max(1, cluster.gpus_per_job),
        "slurm_array_parallelism": cluster.array_parallelism,
    }
    if cluster.gpus_per_job:
        params["gpus_per_node"] = cluster.gpus_per_job
    if cluster.cpus_per_job:
        params["cpus_per_task"] = cluster.cpus_per_job
    if cluster.mem_gb:
        params["mem_gb"] = cluster.mem_gb
    if cluster.partition:
        params["slurm_partition"] = cluster.partition
    executor.update_parameters(**params)
    return executor


def _job_log(text: str) -> None:
    if distributed.is_main():
        print(text, flush=True)


def run_cell_job(cell: Cell, backbone_source: str, fingerprint: str, out: str, options: RunOptions,
                 plugins: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """One grid cell inside a submitit job: every task of the job runs it (data-parallel when there are several);
    task 0 writes the done marker and appends the records. ``plugins``: the plugin specs the cell's method needs
    (a job is a new process). Returns the cell's records."""
    from .api import load_backbone
    from .methods import load_plugin

    for spec in plugins:
        load_plugin(spec)
    ctx = None
    if _job_tasks() > 1:
        import submitit.helpers

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        ctx, device = distributed.setup(options.device)
        options = dataclasses.replace(options, device=device)
    try:
        with distributed.main_first():
            backbone = load_backbone(backbone_source, device=options.device, progress=False)
        if backbone.fingerprint != fingerprint:
            raise ConfigError(
                f"backbone {backbone_source!r} loads weights with fingerprint {backbone.fingerprint} on this node, "
                f"but the grid was planned with {fingerprint}: point --backbone at the same weights on every machine"
            )
        records, _ = run_one(cell, backbone, Path(out), options)
        return records
    finally:
        if ctx is not None:
            distributed.shutdown()


def _job_tasks() -> int:
    try:
        import submitit

        return submitit.JobEnvironment().num_tasks
    except Exception:  # noqa: BLE001 - not inside a submitit job
        return 1


def submit_grid(cells: list[Cell], backbone: Backbone, backbone_source: str, out: str | Path, options: RunOptions,
                cluster: ClusterOptions) -> ClusterResult:
    """Submit one job per unfinished cell (finished cells are skipped, cells running elsewhere are left alone);
    with ``cluster.wait``, wait for the jobs. Returns the records of the finished cells."""
    out = Path(out).resolve()
    folder = Path(cluster.folder).resolve() if cluster.folder else out / "submitit"
    check_grid_data(cells, options.root, backbone)
    result = ClusterResult(folder=folder)
    pending: list[Cell] = []
    for i, cell in enumerate(cells, 1):
        tag = f"[{i}/{len(cells)}] {describe(cell)}"
        run_dir = cell.run_dir(out, backbone)
        done = run_dir / "records.json"
        if done.exists():
            append_records_once(out / RECORDS_FILE, read_done_records(done))
            result.skipped += 1
            options.log(f"{tag}: done, skipped")
        elif cell_is_busy(run_dir):
            result.busy += 1
            options.log(f"{tag}: being run by another process, not submitted")
        else:
            pending.append(cell)
    if pending:
        plugins = job_plugins(pending)
        executor = make_executor(cluster, folder)
        job_options = dataclasses.replace(options, progress=False, log=_job_log, on_epoch=None)
        n = len(pending)
        jobs = executor.map_array(run_cell_job, pending, [backbone_source] * n, [backbone.fingerprint] * n,
                                  [str(out)] * n, [job_options] * n, [plugins] * n)
        result.submitted = n
        result.job_ids = [job.job_id for job in jobs]
        for cell, job in zip(pending, jobs, strict=True):
            options.log(f"submitted {describe(cell)}: job {job.job_id}")
        options.log(f"{n} job(s) submitted through submitit ({cluster.executor}); logs in {folder}")
        if cluster.wait:
            for cell, job in zip(pending, jobs, strict=True):
                try:
                    job.results()
                    options.log(f"{describe(cell)}: job {job.job_id} finished")
                except Exception as err:  # noqa: BLE001 - a failed job is reported, the others still count
                    lines = [line for line in str(err).strip().splitlines() if line.strip()]
                    message = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else
                                   type(err).__name__)
                    result.failed.append((describe(cell), message.strip(), str(job.paths.stderr)))
                    options.log(f"{describe(cell)}: job {job.job_id} FAILED: {message.strip()}")
    for cell in cells:
        done = cell.run_dir(out, backbone) / "records.json"
        if done.exists():
            result.records.extend(read_done_records(done))
    return result


def job_plugins(cells: list[Cell]) -> tuple[str, ...]:
    """The plugin specs that jobs load before building their cells' methods (installed packages need none: their
    entry points load by name)."""
    from .methods import method_source

    specs = []
    for method in sorted({cell.method for cell in cells}):
        source = method_source(method)
        if source.kind == "script":
            raise ConfigError(f"method {method!r} is defined in __main__ (a script or notebook), which cluster jobs "
                              "cannot import: put it in a file and pass --plugin FILE.py (docs/new-method.md)")
        if source.loadable and source.spec not in specs:
            specs.append(source.spec)
    return tuple(specs)


def check_failures(result: ClusterResult) -> None:
    if result.failed:
        shown = "; ".join(f"{cell}: {message} (log {log})" for cell, message, log in result.failed[:3])
        more = f" and {len(result.failed) - 3} more" if len(result.failed) > 3 else ""
        raise PromptClipError(f"{len(result.failed)} job(s) failed: {shown}{more}. Finished cells are kept; fix the "
                              "cause and rerun the same command to resume the others")


__all__ = ["EXECUTORS", "ClusterOptions", "ClusterResult", "submit_grid", "run_cell_job", "make_executor",
           "check_failures"]
