"""Data-parallel training with PyTorch's process groups, launched by ``torchrun``.

``torchrun --nproc-per-node N -m promptclip train ...`` (or ``run``) starts N processes with ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` set; the CLI calls :func:`setup` (gloo on CPU, nccl on CUDA, one GPU per process) and
:func:`promptclip.train.fit` trains data-parallel whenever a process group with more than one rank is initialised
(a library user can initialise one and call ``fit`` the same way).

How a step is synchronised (:func:`all_reduce_step`): each rank runs forward and backward on its share of the global
batch; then ONE all-reduce sums, over ranks, ``n_r * grad_r`` of every trainable tensor (the frozen backbone has no
gradient and is never communicated), a has-gradient flag per tensor, the local batch sizes and the loss terms. Every
rank divides by the global batch size, so the gradient is that of the mean loss over the global batch — exact even if
the last batch is split unevenly — and a tensor that got no gradient on any rank (DCP's reference mode) keeps
``grad=None`` and is skipped by the optimizer exactly as in a single process. All ranks then take the same optimizer
step, so their tensors stay identical without broadcasting them.

How data is sharded (:class:`ShardedSeededSampler`): the single-process order (the seeded permutation of the epoch)
is cut into global batches of ``per-rank batch x world size`` and each global batch is dealt to the ranks
(``batch[rank::world]``). A run on W ranks with per-rank batch b therefore sees the same global batches as one
process with batch W x b, and augmentation is seeded per sample from (seed, epoch, index), whichever rank loads it.

Evaluation is sharded by whole batches (batch j on rank ``j % world``), so every batch holds the same images as in a
single process, and the predictions are gathered on every rank. Only rank 0 writes checkpoints, adapters, records
and reports.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .errors import ConfigError, PromptClipError

#: Minutes a rank waits in a collective before giving up (e.g. on a rank that hangs); torchrun stops the whole job
#: as soon as a rank exits with an error, so this only matters for hangs.
TIMEOUT_ENV = "PROMPTCLIP_DIST_TIMEOUT_MIN"


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def label(self) -> str:
        return f"rank {self.rank}/{self.world_size}"


def requested() -> bool:
    """Whether this process was started by torchrun (or a SLURM/submitit job) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Dist | None:
    """The initialised process group with more than one rank, or None (single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world < 2:
        return None
    return Dist(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def is_main() -> bool:
    ctx = current()
    return ctx is None or ctx.is_main


def setup(device: str) -> tuple[Dist, str]:
    """Join the process group described by torchrun's environment; returns it and this rank's device.

    ``cuda`` becomes ``cuda:<LOCAL_RANK>`` (one GPU per process) with the nccl backend; anything else uses gloo.
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"distributed run: environment variable(s) {', '.join(missing)} are not set; launch with "
                          "`torchrun --nproc-per-node N -m promptclip ...`")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    from .device import check_device

    kind = torch.device(check_device(device)).type
    if kind == "cuda":
        if device == "cuda":
            device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(device))
        backend = "nccl"
    else:
        backend = "gloo"
    minutes = float(os.environ.get(TIMEOUT_ENV, "30"))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=minutes))
    ctx = current()
    if ctx is None:
        raise ConfigError("distributed run: the process group has a single rank")
    return ctx, device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def report_failure(ctx: Dist | None, message: str) -> None:
    """Print a failing rank's error (stderr) and hand it to torchrun's error summary (its error file)."""
    if ctx is None:
        return
    if any(word in message for word in ("peer", "remote worker", "Connection reset", "NCCL error")):
        message += " (a collective lost its peer: most likely another rank failed first, see its message)"
    text = f"promptclip {ctx.label()} failed: {message}. torchrun stops the other ranks; finished epochs and runs " \
           "are kept, rerun the same command to resume."
    print(text, file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(Exception):
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            ErrorHandler().record_exception(PromptClipError(text))


def barrier() -> None:
    if current() is not None:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. a download into a shared cache), the other ranks after it."""
    ctx = current()
    if ctx is not None and not ctx.is_main:
        dist.barrier()
    yield
    if ctx is not None and ctx.is_main:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (tensors inside should be on the CPU)."""
    if current() is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    ctx = current()
    if ctx is None:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_step(params: Sequence[torch.Tensor], local_batch: int, stats: Sequence[float]) -> list[float]:
    """Make every ``param.grad`` the gradient of the mean loss over the global batch; returns the ``stats`` summed
    over ranks, with the global batch size first (``stats`` are per-rank sums, e.g. batch size x mean loss).

    One all-reduce of ``[n_r * grad_r ..., has_grad ..., n_r, stats ...]``; see the module docstring.
    """
    if not params:
        raise PromptClipError("nothing to synchronise: the method has no trainable tensor")
    device = params[0].device
    parts = []
    for p in params:
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        parts.append(g.detach().reshape(-1).float() * float(local_batch))
    flags = torch.tensor([float(p.grad is not None) for p in params], device=device)
    extra = torch.tensor([float(local_batch), *map(float, stats)], dtype=torch.float32, device=device)
    flat = torch.cat([*parts, flags, extra])
    dist.all_reduce(flat)
    total = float(flat[-len(extra)])
    offset = 0
    grads = []
    for p in params:
        grads.append(flat[offset : offset + p.numel()])
        offset += p.numel()
    flags = flat[offset : offset + len(params)]
    for p, g, flag in zip(params, grads, flags.tolist(), strict=True):
        p.grad = (g / total).view_as(p).to(p.dtype) if flag > 0 else None
    return flat[offset + len(params):].tolist()


class ShardedSeededSampler(Sampler[int]):
    """This rank's share of the single-process order: each global batch of ``batch_size * world_size`` samples of the
    seeded epoch permutation is dealt as ``global_batch[rank::world_size]``.

    With ``drop_last`` the trailing incomplete global batch is dropped (as a single process drops its incomplete
    batch). A kept incomplete global batch must give every rank at least one sample (else the ranks would take
    different numbers of steps).
    """

    def __init__(self, n: int, seed: int, batch_size: int, rank: int, world_size: int, drop_last: bool) -> None:
        from .data.loader import SeededShuffleSampler

        self._order = SeededShuffleSampler(n, seed)
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.global_batch = batch_size * world_size
        self.kept = (n // self.global_batch) * self.global_batch if drop_last else n
        tail = self.kept % self.global_batch
        if self.kept == 0:
            raise ConfigError(f"{n} training samples give no full global batch of {self.global_batch} "
                              f"({batch_size} per rank x {world_size} ranks); lower train.batch_size")
        if 0 < tail < world_size:
            raise ConfigError(
                f"the last global batch would hold {tail} sample(s) for {world_size} ranks, so some rank would get "
                f"none; set train.drop_last=true or change train.batch_size ({batch_size} per rank, global "
                f"{self.global_batch})"
            )

    def set_epoch(self, epoch: int) -> None:
        self._order.set_epoch(epoch)

    def indices(self) -> list[int]:
        order = list(self._order)[: self.kept]
        mine: list[int] = []
        for start in range(0, len(order), self.global_batch):
            mine.extend(order[start : start + self.global_batch][self.rank :: self.world_size])
        return mine

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        full, tail = divmod(self.kept, self.global_batch)
        return full * self.batch_size + len(range(self.rank, tail, self.world_size))


def batch_shard(n: int, batch_size: int, rank: int, world_size: int) -> list[int]:
    """Sequential indices of the evaluation batches ``j`` with ``j % world_size == rank`` (whole batches)."""
    mine: list[int] = []
    for j, start in enumerate(range(0, n, batch_size)):
        if j % world_size == rank:
            mine.extend(range(start, min(start + batch_size, n)))
    return mine


__all__ = ["Dist", "requested", "current", "is_main", "setup", "shutdown", "barrier", "main_first",
           "broadcast_object", "all_gather_objects", "all_reduce_step", "ShardedSeededSampler", "batch_shard",
           "report_failure"]
