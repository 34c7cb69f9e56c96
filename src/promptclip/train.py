"""The training engine: Dassl's recipe (SGD, Adam or AdamW; one constant warm-up epoch, then cosine stepped per
epoch), autocast with fp32 master tensors, seeded data order, per-epoch resumable state, and a clear stop on a
non-finite loss.

What a method changes about its training goes through the method's extension points (:class:`PromptMethod`:
``training_step``, ``backward``, ``param_groups``, ``build_optimizer``, ``trainable_buffers``, ``train_rng``), never
through branches here.

Scaling: the text tower runs under the run's text-memory policy (``text_memory``, :mod:`promptclip.memory`), and
when a process group with several ranks is initialised (``torchrun``, :mod:`promptclip.distributed`) training is
data-parallel: ``batch_size`` is per rank, the global batch is ``batch_size x world size``, the learning rate follows
the same per-epoch schedule (an epoch is one pass over the data, whatever the number of ranks), and only rank 0
writes state and adapters."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import ADAPTER_STEM, FitResult, atomic_save_tensors, atomic_write_text, save_adapter
from .config import to_dict
from .errors import ConfigError, PromptClipError
from .evaluate import move_batch
from .memory import DEFAULT_CHUNK_TOKENS, TextMemory, text_memory
from .precision import autocast, resolve_precision
from .tracking import RunLog, peak_memory_mb

TRAIN_STATE_JSON = "train_state.json"
TRAIN_STATE_TENSORS = "train_state-epoch{epoch}.safetensors"


@dataclass
class TrainConfig:
    batch_size: int = 32
    lr: float = 0.002
    max_epoch: int = 10
    warmup_epoch: int = 1
    warmup_lr: float = 1e-5
    warmup_type: Literal["constant"] = "constant"
    lr_scheduler: Literal["cosine"] = "cosine"
    #: Dassl's ``OPTIM.NAME``: ``sgd`` (momentum, coupled weight decay), ``adam`` (coupled L2 weight decay, as
    #: torch's Adam) or ``adamw`` (decoupled weight decay). A method's ``build_optimizer`` may replace it.
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    #: Adam/AdamW betas and eps (Dassl's ``ADAM_BETA1``/``ADAM_BETA2``; eps is torch's default unless a method's
    #: reference changed it, e.g. TCP's 1e-3).
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    #: Max gradient norm; None (default, as the reference) means no clipping.
    grad_clip: float | None = None
    seed: int = 1
    num_workers: int = 0
    #: Dassl drops the last incomplete training batch when the data has at least one full batch.
    drop_last: bool = True
    #: Text-tower memory (promptclip.memory): "auto" chunks and checkpoints above ``text_chunk_tokens`` sequences x
    #: tokens, "always" does so whatever the size, "off" keeps every activation. Same results; not part of a run's
    #: identity.
    text_memory: Literal["auto", "always", "off"] = "auto"
    #: Sequences x tokens per text-tower chunk.
    text_chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def __post_init__(self):
        require = (
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("max_epoch", self.max_epoch >= 1, "at least 1"),
            ("lr", self.lr > 0, "greater than 0"),
            ("warmup_epoch", self.warmup_epoch >= 0, "0 or more"),
            ("warmup_lr", self.warmup_lr > 0, "greater than 0"),
            ("optimizer", self.optimizer in ("sgd", "adam", "adamw"), "one of sgd, adam, adamw"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("adam_beta1", 0 <= self.adam_beta1 < 1, "in [0, 1)"),
            ("adam_beta2", 0 <= self.adam_beta2 < 1, "in [0, 1)"),
            ("adam_eps", self.adam_eps > 0, "greater than 0"),
            ("weight_decay", self.weight_decay >= 0, "0 or more"),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "null (no clipping) or greater than 0"),
            ("num_workers", self.num_workers >= 0, "0 or more"),
        )
        for name, ok, expected in require:
            if not ok:
                raise ConfigError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        self.memory_policy()  # validates text_memory and text_chunk_tokens

    def memory_policy(self) -> TextMemory:
        return TextMemory(self.text_memory, self.text_chunk_tokens)


#: TrainConfig fields that change how a run computes, not what it computes: left out of a run's identity (resume
#: check, protocol run directories), so they can differ between a run and its resumption.
RUNTIME_FIELDS = ("text_memory", "text_chunk_tokens")


def train_identity(config: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    values = dict(config) if isinstance(config, Mapping) else to_dict(config)
    return {k: v for k, v in values.items() if k not in RUNTIME_FIELDS}


class TrainingDiverged(PromptClipError):
    """The loss became NaN or infinite."""


def dassl_lr(epoch: int, config: TrainConfig, base_lr: float | None = None) -> float:
    """Learning rate in effect during 0-based ``epoch``: Dassl's ConstantWarmupScheduler around
    CosineAnnealingLR(T_max=max_epoch), stepped at the end of each epoch. The cosine restarts after warm-up.
    ``base_lr``: a parameter group's own base rate (default ``config.lr``); the warm-up rate is every group's."""
    if epoch < config.warmup_epoch:
        return config.warmup_lr
    step = epoch - config.warmup_epoch
    base = config.lr if base_lr is None else base_lr
    return 0.5 * base * (1 + math.cos(math.pi * step / config.max_epoch))


#: Dassl ``OPTIM`` values that promptclip's engine reproduces (anything else is refused, never approximated).
_DASSL_FIXED = {"LR_SCHEDULER": "cosine", "WARMUP_TYPE": "constant", "STAGED_LR": False,
                "SGD_DAMPNING": 0, "SGD_NESTEROV": False}
_DASSL_OPTIMIZERS = ("sgd", "adam", "adamw")


def train_config_from_dassl(optim: Mapping[str, Any], batch_size: int, method_options: Sequence[str] = (),
                            **overrides: Any) -> TrainConfig:
    """Our TrainConfig for a Dassl run: its ``cfg.OPTIM`` (as a dict) and ``DATALOADER.TRAIN_X.BATCH_SIZE``.

    ``overrides`` set other TrainConfig fields (precision, seed, ...). An optimizer, scheduler or warm-up that the
    engine does not implement is a :class:`ConfigError` naming the option. ``method_options``: ``OPTIM`` keys the
    method's own config maps (its ``reference_optim_options``, e.g. DePT's ``STAGED_LR``), not checked here."""
    from .errors import ConfigError

    for key, expected in _DASSL_FIXED.items():
        if key == "WARMUP_TYPE" and int(optim.get("WARMUP_EPOCH", 0)) == 0:
            continue  # no warm-up epoch: its type plays no part (MMA's config keeps Dassl's default "linear")
        if key in optim and optim[key] != expected and key not in method_options:
            raise ConfigError(f"Dassl option OPTIM.{key}={optim[key]!r} is not supported (promptclip trains with "
                              f"{key}={expected!r})")
    name = optim.get("NAME", "sgd")
    if name not in _DASSL_OPTIMIZERS:
        raise ConfigError(f"Dassl option OPTIM.NAME={name!r} is not supported (promptclip trains with "
                          f"{', '.join(_DASSL_OPTIMIZERS)})")
    warmup = int(optim.get("WARMUP_EPOCH", 0))
    if warmup > 0 and optim.get("WARMUP_RECOUNT", True) is not True:
        raise ConfigError("Dassl option OPTIM.WARMUP_RECOUNT=False is not supported (the cosine restarts after "
                          "warm-up, as with Dassl's default True)")
    values = {"batch_size": int(batch_size), "lr": float(optim["LR"]), "max_epoch": int(optim["MAX_EPOCH"]),
              "warmup_epoch": warmup, "warmup_lr": float(optim.get("WARMUP_CONS_LR", 1e-5)),
              "momentum": float(optim.get("MOMENTUM", 0.9)), "weight_decay": float(optim.get("WEIGHT_DECAY", 5e-4)),
              "optimizer": name, "adam_beta1": float(optim.get("ADAM_BETA1", 0.9)),
              "adam_beta2": float(optim.get("ADAM_BETA2", 0.999))}
    values.update(overrides)
    return TrainConfig(**values)


def batch_order_digest(order: Sequence[Sequence[Sequence[int]]] | None) -> str | None:
    """A short hash of an explicit batch order (part of a run's identity: a resumed run must replay the same one)."""
    if order is None:
        return None
    return hashlib.sha256(json.dumps(order, separators=(",", ":")).encode()).hexdigest()[:16]


def make_train_loader(data: Dataset, config: TrainConfig,
                      batch_order: Sequence[Sequence[Sequence[int]]] | None = None):
    """Shuffled batches whose order depends only on (seed, epoch): a resumed run sees the same order.

    With ``batch_order`` (``batch_order[e][k]``: the dataset indices of batch ``k`` of epoch ``e``) exactly those
    batches, in that order (:class:`promptclip.data.loader.ExplicitBatchSampler`).
    Data-parallel: this rank's share of each global batch of the same order (:class:`ShardedSeededSampler`)."""
    from .data.loader import ExplicitBatchSampler, PromptLoader, collate_samples, make_loader, sample_seed

    ctx = distributed.current()
    if batch_order is not None:
        rank, world = (0, 1) if ctx is None else (ctx.rank, ctx.world_size)
        sampler = ExplicitBatchSampler(batch_order, len(data), rank, world)
        return PromptLoader(data, batch_sampler=sampler, num_workers=config.num_workers, collate_fn=collate_samples,
                            generator=torch.Generator().manual_seed(sample_seed(config.seed, 0, -2)))
    if ctx is None:
        drop_last = config.drop_last and len(data) >= config.batch_size
        return make_loader(data, config.batch_size, shuffle=True, seed=config.seed, num_workers=config.num_workers,
                           drop_last=drop_last)
    drop_last = config.drop_last and len(data) >= config.batch_size * ctx.world_size
    sampler = distributed.ShardedSeededSampler(len(data), config.seed, config.batch_size, ctx.rank, ctx.world_size,
                                               drop_last)
    return PromptLoader(data, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers,
                        drop_last=False, collate_fn=collate_samples,
                        generator=torch.Generator().manual_seed(sample_seed(config.seed, 0, -2)))


def make_optimizer(method, config: TrainConfig) -> torch.optim.Optimizer:
    """The method's optimizer: its ``param_groups()`` (each group's ``base_lr`` recorded for the schedule), built by
    its ``build_optimizer`` or, by default, as Dassl's ``build_optimizer`` builds ``config.optimizer``."""
    groups = []
    seen: set[int] = set()
    trainable = {id(p) for _, p in method.named_trainable()}
    for group in method.param_groups():
        group = dict(group)
        params = list(group.pop("params"))
        if any(id(p) in seen for p in params) or any(id(p) not in trainable for p in params):
            raise PromptClipError(f"method {method.name!r}: param_groups() must list trainable tensors, each once")
        seen.update(id(p) for p in params)
        lr = group.pop("lr", config.lr)
        base_lr = float(lr(config.lr) if callable(lr) else lr) * float(group.pop("lr_mult", 1.0))
        groups.append({"params": params, "lr": base_lr, "base_lr": base_lr, **group})
    if seen != trainable:
        raise PromptClipError(f"method {method.name!r}: param_groups() leaves out trainable tensors")
    optimizer = method.build_optimizer(groups, config)
    if optimizer is not None:
        return optimizer
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                eps=config.adam_eps, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                 eps=config.adam_eps, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                           dampening=0, nesterov=False)


def _group_lrs(optimizer: torch.optim.Optimizer, epoch: int, config: TrainConfig) -> list[float]:
    """Set and return every parameter group's learning rate for ``epoch``."""
    for group in optimizer.param_groups:
        group["lr"] = dassl_lr(epoch, config, group.get("base_lr", config.lr))
    return [group["lr"] for group in optimizer.param_groups]


def _step_lrs(method, optimizer, step: int, total_steps: int, epoch: int, config: TrainConfig) -> list[float] | None:
    """Set every group's rate for this step from the method's :meth:`lr_schedule`, if it has one (else None)."""
    rates = [method.lr_schedule(g.get("base_lr", config.lr), step, total_steps, epoch, config)
             for g in optimizer.param_groups]
    if any(rate is None for rate in rates):
        return None
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    return rates


def fit(method, train_data: Dataset, config: TrainConfig, out_dir: str | Path | None = None,
        device: str | torch.device = "cpu", progress: bool = True, resume: bool = True,
        backbone_name: str = "unknown", backbone_fingerprint: str = "unknown",
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        batch_order: Sequence[Sequence[Sequence[int]]] | None = None, trackers: Sequence[str] = (),
        run_name: str | None = None, eval_data: Mapping[str, Dataset] | None = None,
        feature_cache=None, log: Callable[[str], None] | None = None) -> FitResult:
    """Train ``method`` on ``train_data`` (a Dataset of batch dicts with ``image`` and ``label``).

    ``batch_order`` replaces the seeded shuffle with explicit batches: ``batch_order[e][k]`` lists the dataset indices
    of batch ``k`` of epoch ``e``, for every one of ``config.max_epoch`` epochs (e.g. to replay another tool's run,
    or a curriculum); batch sizes are those of the lists, nothing is dropped. A resumed run must get the same order.

    ``on_step(record)`` is called after every optimizer step with ``epoch`` and ``step`` (1-based; ``step`` counts
    the run's optimizer steps), ``batch`` (1-based within the epoch), ``batches`` (in the epoch), ``lr`` (the rate
    the step used), ``batch_size``, ``acc`` (percent, this batch), every loss term as a float, ``step_seconds``,
    ``data_seconds``, ``images_per_second`` and ``peak_memory_mb``; ``on_epoch(record)`` after each epoch's
    end-of-epoch logic, with the epoch's means (:mod:`promptclip.tracking` defines every key).

    With ``out_dir`` the state is saved after every epoch and a rerun resumes from the last finished epoch;
    the final adapter is written to ``out_dir/adapter.safetensors`` (+ ``.json``), and every step and epoch record
    to ``out_dir/metrics.jsonl`` (also to the ``trackers``, ``tensorboard`` and/or ``wandb``, as ``run_name``;
    :class:`promptclip.tracking.RunLog`).

    The text tower runs under ``config.text_memory`` for the whole run (:func:`promptclip.memory.text_memory`).
    Data-parallel when a process group with several ranks is initialised (module docstring): every rank calls
    ``fit`` with the same arguments; rank 0 alone reads and writes ``out_dir`` (the others get its state).

    A method with ``fits_on_features`` is fitted by its ``fit_features`` on frozen features instead
    (:func:`promptclip.feature_fit.fit_on_features`): ``eval_data`` (split name -> dataset, e.g. ``val``) gives
    it the splits it selects or searches on, ``feature_cache`` (a :class:`promptclip.features.FeatureCache`)
    keeps the features of every augmented view, ``log`` gets its messages (e.g. views encoded vs cached).
    """
    if method.fits_on_features:
        from .feature_fit import fit_on_features

        return fit_on_features(method, train_data, config, out_dir, device, backbone_name, backbone_fingerprint,
                               on_step, batch_order, trackers, run_name, eval_data, feature_cache, log)
    device = torch.device(device)
    ctx = distributed.current()
    main = ctx is None or ctx.is_main
    method.to(device)
    if method.num_trainable() == 0:
        raise PromptClipError(f"method {method.name!r} has nothing to train; evaluate it directly")
    method.on_train_start(config.max_epoch)
    if batch_order is not None:
        from .data.loader import check_batch_order

        batch_order = check_batch_order(batch_order, len(train_data))
        if len(batch_order) != config.max_epoch:
            raise PromptClipError(f"the batch order has {len(batch_order)} epoch(s), the run has max_epoch="
                                  f"{config.max_epoch}; give one list of batches per epoch")
    order_digest = batch_order_digest(batch_order)
    optimizer = make_optimizer(method, config)
    scaler = _grad_scaler(config.precision, device)
    out = Path(out_dir) if out_dir is not None else None
    result = FitResult()
    start_epoch = 0
    state = None
    if out is not None and resume:
        state = _read_train_state(out, method, config, order_digest) if main else None
        state = distributed.broadcast_object(state)  # single process: unchanged
        if isinstance(state, str):  # the saved state cannot be resumed: every rank stops with the same message
            raise PromptClipError(state)
    if state is not None:
        meta = _apply_train_state(method, optimizer, *state)
        result.history, result.resumed_from_epoch = meta["history"], meta["epoch"]
        if meta.get("finished"):
            result.adapter_path = out / f"{ADAPTER_STEM}.safetensors"
            return result
        start_epoch = meta["epoch"] + 1

    loader = make_train_loader(train_data, config, batch_order)
    total_steps = sum(map(len, batch_order)) if batch_order is not None else config.max_epoch * len(loader)
    steps_before = sum(r["steps"] for r in result.history)
    log = None
    if out is not None and main:
        log = RunLog(out, len(result.history), steps_before, trackers, run_name or out.name,
                     {"method": method.name, "method_config": to_dict(method.config), "train": to_dict(config)})

    def step_done(record: dict[str, Any]) -> None:
        if log is not None:
            log.step(record)
        if on_step is not None:
            on_step(record)

    with text_memory(config.memory_policy()), log or contextlib.nullcontext():
        for epoch in range(start_epoch, config.max_epoch):
            loader.set_epoch(epoch)
            record = _run_epoch(method, loader, config, optimizer, scaler, epoch, device, progress and main, ctx,
                                step_done, steps_before, total_steps)
            steps_before += record["steps"]
            method.on_epoch_end(epoch, config.max_epoch)
            result.history.append(record)
            if log is not None:
                log.epoch(record, steps_before)  # before the state: the log never holds an unsaved epoch
            if out is not None and main:
                _save_train_state(out, method, optimizer, config, epoch, result.history, False, order_digest)
            if on_epoch is not None:
                on_epoch(record)

    method.on_train_end()
    if out is not None:
        result.adapter_path = out / f"{ADAPTER_STEM}.safetensors"
        if main:
            save_adapter(out / ADAPTER_STEM, method, backbone_name, backbone_fingerprint,
                         extra={"train": to_dict(config), "history": result.history})
            _save_train_state(out, method, optimizer, config, config.max_epoch - 1, result.history, True, order_digest)
        distributed.barrier()  # fit returns on every rank once the adapter is on disk
    return result


def _grad_scaler(precision: str, device: torch.device):
    if device.type == "cuda" and resolve_precision(precision, device) == "fp16":
        return torch.amp.GradScaler("cuda")
    return None


def _run_epoch(method, loader, config, optimizer, scaler, epoch, device, progress, ctx=None, on_step=None,
               steps_before: int = 0, total_steps: int = 0) -> dict[str, Any]:
    lrs = _group_lrs(optimizer, epoch, config)
    lr = lrs[0]
    from .data.loader import sample_seed

    method.train_rng = random.Random(sample_seed(config.seed, epoch, -3))
    method.train()
    totals: dict[str, float] = {}
    correct = seen = steps = 0
    peak = 0.0
    started = last = time.perf_counter()
    batches = len(loader)
    # The bar is advanced by hand: tqdm.auto's bar calls iter() on what it wraps when it is created, which would start
    # a second pass over the loader (and its worker processes) and move the loader's epoch counter on by one.
    bar = tqdm(total=batches, desc=f"epoch {epoch + 1}/{config.max_epoch}", disable=not progress, leave=False,
               unit="batch")
    for step, batch in enumerate(loader):
        loaded = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batch = move_batch(batch, device)
        lrs = _step_lrs(method, optimizer, steps_before + step, total_steps, epoch, config) or lrs
        with autocast(config.precision, device):
            logits, losses = method.training_step(batch)
        loss = losses["loss"].float()
        size = len(logits)
        hits = int((logits.argmax(dim=1) == batch["label"]).sum()) if "label" in batch else 0
        if ctx is None:
            _check_finite(loss, {k: float(v.detach()) for k, v in losses.items()}, epoch, step)
            _step(method, optimizer, scaler, losses, config.grad_clip)
            values = {k: float(v.detach()) for k, v in losses.items()}
        else:
            values, size, hits = _data_parallel_step(method, optimizer, scaler, losses, hits, size,
                                                     config.grad_clip, epoch, step)
        steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's kernels are done: its time is its own
        now = time.perf_counter()
        memory = peak_memory_mb(device)
        peak = max(peak, memory)
        if on_step is not None:
            lr_values = {"lr": lrs[0]} if len(lrs) == 1 else {"lr": lrs[0], "lrs": lrs}
            on_step({"epoch": epoch + 1, "step": steps_before + steps, "batch": step + 1, "batches": batches,
                     **lr_values, "batch_size": size, "acc": 100 * hits / max(size, 1),
                     **values, "step_seconds": now - last, "data_seconds": loaded - last,
                     "images_per_second": size / max(now - last, 1e-9), "peak_memory_mb": memory})
        last = now
        for key, value in values.items():
            totals[key] = totals.get(key, 0.0) + value
        correct += hits
        seen += size
        bar.update(1)
        bar.set_postfix(loss=f"{totals['loss'] / steps:.4f}", acc=f"{100 * correct / seen:.1f}", lr=f"{lr:.2e}")
    bar.close()
    if steps == 0:
        raise PromptClipError("the training data produced no batch (is the dataset empty?)")
    seconds = time.perf_counter() - started
    record = {"epoch": epoch + 1, "lr": lr, "train_acc": 100 * correct / seen, "steps": steps,
              "seconds": round(seconds, 3), "images_per_second": seen / max(seconds, 1e-9), "peak_memory_mb": peak}
    record.update({k: v / steps for k, v in totals.items()})
    return record


def _check_finite(loss: torch.Tensor, terms: Mapping[str, float], epoch: int, step: int) -> None:
    if not torch.isfinite(loss):
        shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        raise TrainingDiverged(
            f"the training loss became {float(loss.detach())} at epoch {epoch + 1}, step {step + 1} ({shown}); "
            "the last finished epoch's state is kept. Try a lower learning rate or precision fp32."
        )


def _scale(scaler) -> Callable[[torch.Tensor], torch.Tensor]:
    return (lambda t: t) if scaler is None else scaler.scale


def _data_parallel_step(method, optimizer, scaler, losses, hits, size, grad_clip, epoch, step):
    """Backward on this rank's share, one all-reduce (gradients of the global-batch mean, batch sizes, hits and loss
    terms), then the same clipped optimizer step on every rank. Returns the global loss terms, batch size, hits."""
    optimizer.zero_grad(set_to_none=True)
    method.backward(losses, _scale(scaler))
    keys = sorted(losses)
    params = [p for _, p in method.named_trainable()]
    summed = distributed.all_reduce_step(params, size, [hits, *(float(losses[k].detach()) * size for k in keys)])
    total, hits = summed[0], summed[1]
    values = {k: v / total for k, v in zip(keys, summed[2:], strict=True)}
    # The same global loss on every rank: all ranks stop together on a non-finite one.
    _check_finite(torch.tensor(values["loss"]), values, epoch, step)
    if scaler is not None:
        scaler.unscale_(optimizer)
    _clip_and_step(method, optimizer, scaler, grad_clip)
    return values, int(round(total)), int(round(hits))


def _step(method, optimizer, scaler, losses, grad_clip) -> None:
    optimizer.zero_grad(set_to_none=True)
    method.backward(losses, _scale(scaler))
    if scaler is not None:
        scaler.unscale_(optimizer)
    _clip_and_step(method, optimizer, scaler, grad_clip)


def _clip_and_step(method, optimizer, scaler, grad_clip) -> None:
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for _, p in method.named_trainable()], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def _save_train_state(out: Path, method, optimizer, config, epoch, history, finished: bool,
                      order_digest: str | None = None) -> None:
    tensors = {f"param.{n}": p for n, p in method.named_trainable()}
    tensors.update({f"buffer.{n}": b for n, b in method.trainable_buffers()})
    names = {id(p): n for n, p in method.named_trainable()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    value = torch.tensor(value)
                # SGD's momentum keeps its earlier name, so states written before other optimizers resume.
                prefix = "momentum" if key == "momentum_buffer" else f"optim.{key}"
                tensors[f"{prefix}.{names[id(p)]}"] = value
    tensors.update({f"extra.{k}": v for k, v in method.extra_state().items()})
    # The tensors go to a file named by the epoch and the JSON, written last, points to it: a crash between the two
    # writes leaves the previous epoch's JSON and tensors intact and consistent.
    name = TRAIN_STATE_TENSORS.format(epoch=epoch)
    atomic_save_tensors(tensors, out / name)
    meta = {"method": method.name, "method_config": to_dict(method.config), "train": to_dict(config),
            "epoch": epoch, "finished": finished, "tensors": name, "history": history, "batch_order": order_digest}
    atomic_write_text(out / TRAIN_STATE_JSON, json.dumps(meta, indent=2) + "\n")
    for old in out.glob(TRAIN_STATE_TENSORS.format(epoch="*")):
        if old.name != name:
            old.unlink(missing_ok=True)


def _read_train_state(out: Path, method, config, order_digest: str | None = None
                      ) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | str | None:
    """The saved state of ``out`` (None: nothing saved; a string: why it cannot be resumed)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = out / TRAIN_STATE_JSON
    if not path.exists():
        return None
    start_over = f"delete {path} and {TRAIN_STATE_TENSORS.format(epoch='*')} there to start over"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        same = (meta["method"] == method.name and meta["method_config"] == to_dict(method.config)
                and train_identity(meta["train"]) == train_identity(config))
        tensors_path = out / meta["tensors"]
    except (ValueError, KeyError, TypeError) as err:  # only a hand edit or another program can break it
        return f"the training state {path} is unreadable ({type(err).__name__}: {err}); {start_over}"
    if not same:
        return (f"{out} holds a run of another method or configuration ({meta['method']}); "
                "use another output directory or delete it to start over")
    if meta.get("batch_order") != order_digest:
        return (f"{out} holds a run with another batch order (saved {meta.get('batch_order') or 'seeded shuffle'}, "
                f"now {order_digest or 'seeded shuffle'}); use another output directory or delete it to start over")
    try:
        tensors = load_file(tensors_path)
    except (OSError, SafetensorError) as err:
        return f"the training state {path} names {tensors_path}, which cannot be read ({err}); {start_over}"
    from .finite import non_finite_message

    if (problem := non_finite_message(tensors)) is not None:
        return f"the training state {tensors_path} cannot be resumed: {problem}; {start_over}"
    return meta, tensors


def _apply_train_state(method, optimizer, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
                       ) -> Mapping[str, Any]:
    params = dict(method.named_trainable())
    with torch.no_grad():
        for name, b in method.trainable_buffers():
            b.copy_(tensors[f"buffer.{name}"])
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])
            if f"momentum.{name}" in tensors:
                optimizer.state[p]["momentum_buffer"] = tensors[f"momentum.{name}"].to(p.device).clone()
        for key, value in tensors.items():
            if key.startswith("optim."):  # optim.<state key>.<parameter name>; state keys have no dot
                state_key, _, name = key[len("optim."):].partition(".")
                p = params[name]
                # Adam's ``step`` stays a CPU scalar tensor (torch's non-capturable layout).
                optimizer.state[p][state_key] = value.clone() if state_key == "step" else value.to(p.device).clone()
    method.load_extra_state({k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")})
    return meta
