"""The evaluation protocols as functions that return result records (JSONL).

- ``base2novel``: few-shot sample of all classes, keep the base half, train, evaluate the last epoch on the base
  test set and, with the same adapter and the novel class names, on the novel test set (CoCoOp protocol).
- ``fewshot``: K shots of every class, evaluate on the full test set.
- ``cross_dataset``: train on a source (ImageNet in the papers), evaluate on each target with its own class names
  and template.
- ``domain_generalization``: the ImageNet model on ImageNet-V2/-Sketch/-A/-R (A and R over their 200 classes).

A grid is a list of cells (protocol × dataset × method × seed × shots). Each cell has a run directory keyed by
protocol/dataset/method/config-hash/seed; a cell whose ``records.json`` exists is skipped, an interrupted cell
resumes from its last finished epoch, and records are appended to ``records.jsonl`` under a file lock, repairing a
torn last line first, so a crash never leaves a half-written record.

:func:`run_one` is the whole life of a cell (claim, skip if done, run, done marker, append once); the local grid
(:func:`run_grid`) and cluster jobs (:mod:`promptclip.cluster`, one submitit job per cell) both run it, so a grid can
be resumed from any machine that sees the output directory. A cell being run by another process holds an exclusive
lock on ``<run dir>/.claim`` and is skipped as busy. Under ``torchrun`` every rank runs the cell data-parallel and
only rank 0 reads markers and writes files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .checkpoint import atomic_write_text, load_adapter
from .config import to_dict
from .errors import ConfigError, DataError
from .evaluate import EvalResult, evaluate
from .features import FeatureCache, frozen_features
from .jsonl import cut_torn_tail, write_json_lines
from .methods.base import EvalContext
from .presets import Preset, apply_overrides, default_preset, load_preset
from .train import ADAPTER_STEM, TrainConfig, fit, train_identity

PROTOCOLS = ("base2novel", "fewshot", "cross_dataset", "domain_generalization")
CROSS_DATASET_TARGETS = ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
                         "sun397", "dtd", "eurosat", "ucf101")
DG_TARGETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
RECORDS_FILE = "records.jsonl"


@dataclass
class Backbone:
    """The frozen backbone shared by every cell of a grid, and how it is identified in records and adapters."""

    model: Any
    name: str
    fingerprint: str
    random_weights: bool = False


@dataclass
class Cell:
    protocol: str
    dataset: str
    preset: Preset
    seed: int
    shots: int
    targets: tuple[str, ...] = ()
    #: An adapter file evaluated instead of training (``run --adapter``, e.g. an imported reference checkpoint).
    adapter: str | None = None
    #: Why the method does not apply to this protocol (its ``protocols``); such a cell is never run, and its record
    #: says "not applicable" with this reason.
    not_applicable: str | None = None

    @property
    def method(self) -> str:
        return self.preset.method

    @property
    def label(self) -> str:
        return method_label(self.preset) + (" [adapter]" if self.adapter else "")

    def config_hash(self, backbone: Backbone) -> str:
        identity = {
            "protocol": self.protocol, "dataset": self.dataset, "shots": self.shots, "targets": list(self.targets),
            "method": self.preset.method, "method_config": self.preset.method_config,
            "train": train_identity(self.preset.train) if self.preset.train and not self.adapter else None,
            "eval": to_dict(self.preset.eval),
            "backbone": backbone.name, "fingerprint": backbone.fingerprint,
        }
        if self.adapter:
            identity["adapter"] = hashlib.sha256(Path(self.adapter).read_bytes()).hexdigest()
        teacher = self.preset.method_config.get("teacher")
        if teacher:  # a method that distils a teacher (PromptMethod.uses_teacher): its content, not only its path
            from .checkpoint import teacher_digest

            identity["teacher"] = teacher_digest(teacher)
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]

    def run_dir(self, out: Path, backbone: Backbone) -> Path:
        label = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.label)
        return (out / "runs" / self.protocol / self.dataset / label / self.config_hash(backbone)
                / f"seed{self.seed}_shots{self.shots}")


@dataclass
class RunOptions:
    root: str | None = None
    device: str = "cpu"
    progress: bool = True
    #: Autocast precision for evaluation (None: the preset's training precision, or auto).
    precision: str | None = None
    #: Per-sample extras for the data loader (e.g. MuGCP captions), given the records of a split.
    extras: Callable[[list], dict[str, Any]] | None = None
    log: Callable[[str], None] = print
    on_epoch: Callable[[dict[str, Any]], None] | None = None
    #: Where training metrics go besides ``<run dir>/metrics.jsonl``: ``tensorboard``, ``wandb`` (promptclip.tracking).
    trackers: tuple[str, ...] = ()
    #: Frozen image features of evaluation images (methods with ``frozen_image_features``); None: off.
    feature_cache: FeatureCache | None = field(default_factory=FeatureCache.default)


@dataclass
class GridResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    ran: int = 0
    skipped: int = 0
    #: Cells being run by another process right now (their records come from that process).
    busy: int = 0


def method_label(preset: Preset) -> str:
    mode = preset.method_config.get("mode")
    return f"{preset.method} ({mode})" if mode else preset.method


def make_cells(protocol: str, datasets: list[str], methods: list[str], seeds: list[int], shots: list[int],
               presets: dict[str, str] | None = None, overrides: list[str] | None = None,
               targets: list[str] | None = None, adapters: dict[str, str] | None = None,
               teacher: str | None = None) -> list[Cell]:
    """The grid: every dataset × method × shots × seed, each method with its official preset for the protocol
    (or ``presets[method]``), plus ``overrides``. ``adapters[method]``: an adapter path evaluated instead of
    training that method (``{dataset}``, ``{seed}`` and ``{shots}`` in it are filled in per cell). ``teacher``: the
    teacher adapter of the methods that distil one (``PromptMethod.uses_teacher``; ``{dataset}``, ``{seed}`` and
    ``{shots}`` are filled in per cell), set as their ``method_config.teacher``."""
    if protocol not in PROTOCOLS:
        from .config import suggest

        raise ConfigError(f"unknown protocol {protocol!r}{suggest(protocol, PROTOCOLS)}; choose one of "
                          f"{', '.join(PROTOCOLS)}")
    if protocol in ("base2novel", "cross_dataset", "domain_generalization") and not shots:
        shots = [16]
    if protocol == "domain_generalization":
        default_targets = DG_TARGETS
    elif protocol == "cross_dataset":
        default_targets = CROSS_DATASET_TARGETS
    else:
        default_targets = ()
    for what, values in (("methods", methods), ("datasets", datasets), ("seeds", seeds), ("shots", shots),
                         ("targets", targets or [])):
        twice = sorted({str(v) for v in values if list(values).count(v) > 1})
        if twice:
            raise ConfigError(f"{what} {' '.join(map(str, values))}: {', '.join(twice)} given more than once (each "
                              "cell of the grid runs once; list every value once)")
    for name in [*datasets, *(targets or [])]:
        check_dataset_name(name)
    cells = []
    for dataset in datasets:
        for method in methods:
            reason = not_applicable(method, protocol)
            if reason is not None:
                for k in shots:
                    for seed in seeds:
                        cells.append(Cell(protocol, dataset, Preset(name=method, method=method), seed, k,
                                          not_applicable=reason))
                continue
            for k in shots:
                name = (presets or {}).get(method) or default_preset(protocol, method, dataset, k)
                preset = load_preset(name)
                # A grid mixes methods with and without training (zero-shot): train.* overrides apply where
                # there is training.
                applicable = [o for o in overrides or [] if preset.train is not None or not o.startswith("train.")]
                preset = apply_overrides(preset, applicable)
                if preset.method != method:
                    raise ConfigError(f"preset {name!r} is for method {preset.method!r}, not {method!r}")
                for seed in seeds:
                    chosen = tuple(t for t in (targets or default_targets) if t != dataset)
                    adapter = _cell_adapter((adapters or {}).get(method), method, dataset, seed, k)
                    cells.append(Cell(protocol, dataset, _with_teacher(preset, teacher, dataset, seed, k), seed, k,
                                      chosen, adapter))
    if teacher is not None and not any(_uses_teacher(m) for m in methods):
        raise ConfigError(f"--teacher {teacher}: none of the methods of the grid ({', '.join(methods)}) distils a "
                          "teacher")
    unknown = sorted(set(adapters or {}) - set(methods))
    if unknown:
        raise ConfigError(f"--adapter for {', '.join(unknown)}, which is not among the methods of the grid "
                          f"({', '.join(methods)})")
    return cells


def _uses_teacher(method: str) -> bool:
    from .methods import get_method_class

    return bool(get_method_class(method).uses_teacher)


def _fill_in(template: str, option: str, dataset: str, seed: int, shots: int) -> str:
    try:
        return template.format(dataset=dataset, seed=seed, shots=shots)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"{option} {template!r}: only {{dataset}}, {{seed}} and {{shots}} can be filled in "
                          f"({type(err).__name__}: {err})") from None


def _with_teacher(preset: Preset, template: str | None, dataset: str, seed: int, shots: int) -> Preset:
    """``preset`` with ``method_config.teacher`` set to the cell's teacher adapter (an absolute path, checked to be
    an adapter before any weights load), for methods that distil a teacher."""
    if template is None or not _uses_teacher(preset.method):
        return preset
    import dataclasses

    from .checkpoint import read_adapter, teacher_adapter_path

    path = teacher_adapter_path(_fill_in(template, "--teacher", dataset, seed, shots)).resolve()
    read_adapter(path)
    return dataclasses.replace(preset, method_config={**preset.method_config, "teacher": str(path)})


def not_applicable(method: str, protocol: str) -> str | None:
    """Why ``method`` does not apply to ``protocol`` (its class's ``protocols``), or None where it does."""
    from .methods import get_method_class

    cls = get_method_class(method)
    if cls.protocols is None or protocol in cls.protocols:
        return None
    why = f": {cls.not_applicable_reason}" if cls.not_applicable_reason else ""
    return f"{method} does not apply to {protocol} (it applies to {', '.join(cls.protocols)}){why}"


def _cell_adapter(template: str | None, method: str, dataset: str, seed: int, shots: int) -> str | None:
    """The adapter file of one cell (checked before any weights load), or None to train."""
    if template is None:
        return None
    from .checkpoint import read_adapter

    path = Path(_fill_in(template, "--adapter", dataset, seed, shots))
    if path.is_dir():
        path = path / f"{ADAPTER_STEM}.safetensors"
    saved = read_adapter(path)[0]["method"]
    if saved != method:
        raise ConfigError(f"adapter {path} holds method {saved!r}, not {method!r}")
    return str(path.with_suffix(".safetensors"))


def check_dataset_name(name: str) -> None:
    """Fail before any work on a dataset name that is neither known nor an existing custom dataset path."""
    from .data import get_spec

    if name.startswith(("folder:", "csv:")):
        path = Path(name.split(":", 1)[1]).expanduser()
        if not path.exists():
            raise DataError(f"custom dataset {name!r}: {path} does not exist")
        return
    if Path(name).expanduser().exists() and ("/" in name or name.endswith(".csv")):
        return
    get_spec(name)


# -- records ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def append_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Append whole lines under an exclusive lock; a torn last line left by a crash is cut off first."""
    with _locked(path) as handle:
        cut_torn_tail(handle)
        write_json_lines(handle, records)


def append_records_once(path: Path, records: list[dict[str, Any]]) -> bool:
    """Append ``records`` unless their run id is already in the file; the check and the append happen under one
    lock, so two processes finishing the same cell never both append. Returns whether anything was written."""
    if not records:
        return False
    with _locked(path) as handle:
        handle.seek(0)
        run_id = records[0]["run_id"]
        for line in handle.read().splitlines():
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
                if json.loads(line)["run_id"] == run_id:
                    return False
    append_records(path, records)
    return True


def recorded_run_ids(path: Path) -> set[str]:
    ids = set()
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                ids.add(json.loads(line)["run_id"])
    return ids


# -- running -------------------------------------------------------------------------------------------------------


def run_grid(cells: list[Cell], backbone: Backbone, out: str | Path, options: RunOptions | None = None
             ) -> GridResult:
    """Run every cell not yet finished; returns all records of the grid (old and new)."""
    options = options or RunOptions()
    out = Path(out)
    check_grid_data(cells, options.root, backbone)
    for reason in dict.fromkeys(cell.not_applicable for cell in cells if cell.not_applicable):
        options.log(f"not applicable, not run: {reason}")
    result = GridResult()
    for i, cell in enumerate(cells, 1):
        if cell.not_applicable:
            records = [_not_applicable_record(cell, backbone)]
            if distributed.is_main():
                append_records_once(out / RECORDS_FILE, records)
            result.skipped += 1
            result.records.extend(records)
            continue
        records, status = run_one(cell, backbone, out, options, tag=f"[{i}/{len(cells)}] {describe(cell)}")
        if status == "ran":
            result.ran += 1
        elif status == "skipped":
            result.skipped += 1
        else:
            result.busy += 1
        result.records.extend(records)
    return result


def check_grid_data(cells: list[Cell], root: str | None, backbone: Backbone | None = None) -> None:
    """Before any cell runs (so before anything is written): every dataset and target of the grid loads and has the
    images the protocol reads, and (with ``backbone``) no class name is too long for any prompt of its text
    encoder. Each dataset is loaded once here; a cell loads its own again."""
    from .data import load_splits
    from .data.classnames import check_classnames

    context = backbone.model.text.context_length if backbone is not None else None
    loaded: dict[str, Any] = {}
    for cell in cells:
        if cell.not_applicable:
            continue
        for name in (cell.dataset, *cell.targets):
            if name not in loaded:
                splits = loaded[name] = load_splits(name, root)
                if context is not None:
                    check_classnames(splits.classnames, f"dataset {splits.name}", DataError, context)
                splits.nonempty("test")
        source = loaded[cell.dataset]
        if cell.preset.train is not None and cell.adapter is None:
            source.nonempty("train")
        if cell.protocol == "base2novel" and source.num_classes < 2:
            raise DataError(f"dataset {source.name} has {source.num_classes} class; base2novel splits the classes "
                            "into a base and a novel half and needs at least 2")


def describe(cell: Cell) -> str:
    return f"{cell.protocol} {cell.dataset} {cell.label} seed {cell.seed} shots {cell.shots}"


def run_one(cell: Cell, backbone: Backbone, out: str | Path, options: RunOptions, tag: str | None = None
            ) -> tuple[list[dict[str, Any]], str]:
    """Run one cell of a grid unless it is finished; returns its records and ``"ran"``, ``"skipped"`` (finished
    before) or ``"busy"`` (another process holds its claim; no records).

    A finished cell has ``<run dir>/records.json`` (the done marker, written atomically after the run); its records
    are then appended to ``<out>/records.jsonl`` unless already there, so a crash between the two steps is repaired
    by the next run. Rank 0 decides and writes; other ranks follow its decisions.
    """
    out = Path(out)
    tag = tag or describe(cell)
    run_dir = cell.run_dir(out, backbone)
    done = run_dir / "records.json"
    main = distributed.is_main()
    new_dirs = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # made by the claim, deepest first
    with _claim(run_dir) if main else contextlib.nullcontext(True) as claimed:
        finished = read_done_records(done) if main and claimed and done.exists() else None
        claimed, finished = distributed.broadcast_object((claimed, finished))
        if not claimed:
            options.log(f"{tag}: being run by another process ({run_dir / CLAIM_FILE} is locked), skipped")
            return [], "busy"
        if finished is not None:
            if main:
                append_records_once(out / RECORDS_FILE, finished)
            options.log(f"{tag}: done, skipped")
            return finished, "skipped"
        options.log(f"{tag}: running in {run_dir}")
        try:
            records = run_cell(cell, backbone, run_dir, options)
        except BaseException:
            if main:
                _remove_if_nothing_kept(run_dir, new_dirs)
            raise
        if main:
            atomic_write_text(done, json.dumps(records, indent=2) + "\n")
            append_records_once(out / RECORDS_FILE, records)
        return records, "ran"


CLAIM_FILE = ".claim"
#: What a cell writes before anything worth keeping (a training step, a saved epoch, records).
_BOOKKEEPING = {CLAIM_FILE, "config.json"}


def _remove_if_nothing_kept(run_dir: Path, new_dirs: list[Path]) -> None:
    """After a cell failed: if its folder holds only bookkeeping, remove it and the folders its claim created
    (``new_dirs``, deepest first; one another process has written to since is not empty and stays)."""
    try:
        entries = {p.name for p in run_dir.iterdir()}
    except OSError:
        return
    if not entries <= _BOOKKEEPING:
        return
    for name in entries:
        with contextlib.suppress(OSError):
            (run_dir / name).unlink()
    for folder in new_dirs:
        try:
            folder.rmdir()
        except OSError:
            return


def read_done_records(path: Path) -> list[dict[str, Any]]:
    """The records of a finished cell's done marker (written atomically, so only a hand edit can break it)."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise DataError(f"{path} (the records of a finished run) is not valid JSON ({err}); delete it to run the "
                        "cell again") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "run_id" in r for r in records):
        raise DataError(f"{path} (the records of a finished run) is not a list of records; delete it to run the cell "
                        "again")
    return records


@contextlib.contextmanager
def _claim(run_dir: Path) -> Iterator[bool]:
    """An exclusive, non-blocking lock on ``run_dir/.claim`` for the duration of the block (False: held elsewhere).
    The OS drops it when the process dies, so a killed run never leaves a stale claim."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / CLAIM_FILE, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cell_is_busy(run_dir: Path) -> bool:
    """Whether another process holds the claim of ``run_dir`` right now."""
    if not (run_dir / CLAIM_FILE).exists():
        return False
    with _claim(run_dir) as claimed:
        return not claimed


def training_splits(method: str, dataset: str, root: str | None, shots: int, seed: int, subsample: str):
    """``(splits, labeled)``: the data ``method`` trains on (its ``PromptMethod.train_data``), given the shots and
    class subsample a labelled run would use. ``unlabeled_all_classes``: every training image of every class (no
    K-shot draw, which would use the labels); the items then carry no label (``labeled`` False)."""
    from .data import protocol_splits
    from .methods import get_method_class

    if get_method_class(method).train_data == "unlabeled_all_classes":
        return protocol_splits(dataset, root, num_shots=0, seed=seed, subsample="all"), False
    return protocol_splits(dataset, root, num_shots=shots, seed=seed, subsample=subsample), True


def run_cell(cell: Cell, backbone: Backbone, run_dir: Path, options: RunOptions) -> list[dict[str, Any]]:
    from .data import protocol_splits

    started = time.perf_counter()
    subsample = "base" if cell.protocol == "base2novel" else "all"
    train_splits = protocol_splits(cell.dataset, options.root, num_shots=cell.shots, seed=cell.seed,
                                   subsample=subsample)
    fit_splits, labeled = training_splits(cell.method, cell.dataset, options.root, cell.shots, cell.seed, subsample)
    if cell.adapter is not None:
        method = load_trained(cell.adapter, backbone, train_splits.classnames, train_splits.template)
    else:
        method = _build_method(cell, backbone, fit_splits)  # a bad class name or config fails before any write
    run_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        atomic_write_text(run_dir / "config.json", json.dumps(_resolved_config(cell, backbone), indent=2) + "\n")
    if cell.preset.train is not None and cell.adapter is None:
        data = _dataset(fit_splits.train, backbone, train=True, seed=cell.seed, options=options, labels=labeled,
                        views=method.train_views)
        # the splits a fit on features reads (un-augmented train, val, test; encoded only if the method reads them)
        eval_data = {"train": _dataset(train_splits.train, backbone, train=False, seed=cell.seed, options=options),
                     "val": _dataset(train_splits.val, backbone, train=False, seed=cell.seed, options=options),
                     "test": _dataset(train_splits.test, backbone, train=False, seed=cell.seed, options=options)}
        fit(method, data, cell.preset.train, out_dir=run_dir, device=options.device, progress=options.progress,
            backbone_name=backbone.name, backbone_fingerprint=backbone.fingerprint, on_epoch=options.on_epoch,
            trackers=options.trackers, run_name=describe(cell), eval_data=eval_data,
            feature_cache=options.feature_cache, log=options.log)
    if list(method.classnames) != list(train_splits.classnames):  # trained on more classes than it is evaluated on
        method.set_classnames(train_splits.classnames, train_splits.template)
    evaluations: list[tuple[str, str, EvalResult]] = []
    name = train_splits.name
    if cell.protocol == "base2novel":
        method.set_eval_context(EvalContext("base", source=True, protocol=cell.protocol))
        evaluations.append((name, "base", _evaluate(method, train_splits, backbone, cell, options)))
        novel = protocol_splits(cell.dataset, options.root, num_shots=cell.shots, seed=cell.seed, subsample="new")
        method.set_classnames(novel.classnames, novel.template)
        method.set_eval_context(EvalContext("new", source=True, protocol=cell.protocol))
        evaluations.append((name, "novel", _evaluate(method, novel, backbone, cell, options)))
    else:
        method.set_eval_context(EvalContext("all", source=True, protocol=cell.protocol))
        evaluations.append((name, "all", _evaluate(method, train_splits, backbone, cell, options)))
        for target in cell.targets:
            from .data import load_splits

            splits = load_splits(target, options.root)
            method.set_classnames(splits.classnames, splits.template)
            method.set_eval_context(EvalContext("all", source=False, protocol=cell.protocol))
            evaluations.append((splits.name, "all", _evaluate(method, splits, backbone, cell, options)))
    seconds = round(time.perf_counter() - started, 2)
    return [_record(cell, backbone, run_dir, name, eval_name, split, result, seconds)
            for eval_name, split, result in evaluations]


def _build_method(cell: Cell, backbone: Backbone, splits):
    from .methods import create_method

    return create_method(cell.preset.method, backbone.model, splits.classnames, cell.preset.method_config,
                         template=splits.template)


def _dataset(records, backbone: Backbone, train: bool, seed: int, options: RunOptions, views: int = 1,
             labels: bool = True):
    """An image dataset of ``records``; ``views``: augmented views per training image (the method's
    ``train_views``; evaluation always has one); ``labels=False``: items without ``label`` (unlabelled training)."""
    from .clip.transforms import EvalTransform, TrainTransform
    from .data import ImageDataset

    size, config = backbone.model.visual.input_resolution, backbone.model.config
    normalise = dict(mean=config.image_mean, std=config.image_std)  # the pixel statistics of the weights' training
    transform = TrainTransform(size, **normalise) if train else EvalTransform(size, **normalise)
    extras = options.extras(records) if options.extras is not None else None
    return ImageDataset(records, transform, seed=seed, extras=extras, views=views if train else 1, labels=labels)


def _evaluate(method, splits, backbone: Backbone, cell: Cell, options: RunOptions) -> EvalResult:
    data = _dataset(splits.test, backbone, train=False, seed=cell.seed, options=options)
    precision = options.precision or (cell.preset.train.precision if cell.preset.train else "auto")
    return evaluate_dataset(method, data, backbone, options, cell.preset.eval.batch_size, cell.seed, precision,
                            f"eval {splits.name}")


def evaluate_dataset(method, data, backbone: Backbone, options: RunOptions, batch_size: int, seed: int,
                     precision: str, desc: str = "eval") -> EvalResult:
    """Evaluate ``method`` on an image dataset: data-parallel under torchrun, with the frozen image features of
    ``options.feature_cache`` for methods that declare ``frozen_image_features``."""
    from .data import make_loader

    if distributed.current() is not None:
        return _evaluate_sharded(method, data, backbone, batch_size, seed, options, precision, desc)
    data = _with_cached_features(method, data, range(len(data)), backbone, options, batch_size, precision, desc)
    loader = make_loader(data, batch_size=batch_size, shuffle=False, seed=seed)
    return evaluate(method, loader, device=options.device, precision=precision, progress=options.progress,
                    desc=desc)


def _with_cached_features(method, data, indices, backbone: Backbone, options: RunOptions, batch_size: int,
                          precision: str, desc: str):
    """``data`` with ``image_features`` from the cache in place of images (items ``indices``), where that applies."""
    if options.feature_cache is None or not method.frozen_image_features:
        return data
    cached = frozen_features(method.clip, data, options.feature_cache, backbone.fingerprint, batch_size=batch_size,
                             device=options.device, precision=precision, indices=indices, progress=options.progress,
                             desc=f"encode {desc.removeprefix('eval ')}")
    if cached is None:
        options.log(f"{desc}: image features not cached (the dataset's transform is not a dataclass)")
        return data
    data, stats = cached
    options.log(f"{desc}: image features {stats} ({options.feature_cache.root})")
    return data


def _evaluate_sharded(method, data, backbone: Backbone, batch_size: int, seed: int, options: RunOptions,
                      precision: str, desc: str) -> EvalResult:
    """Data-parallel evaluation: whole batches of the single-process order round-robin over the ranks (so every
    batch holds the same images as in one process), predictions gathered on every rank."""
    from torch.utils.data import Subset

    from .data import make_loader
    from .evaluate import classification_metrics, predict_logits

    ctx = distributed.current()
    mine = distributed.batch_shard(len(data), batch_size, ctx.rank, ctx.world_size)
    data = _with_cached_features(method, data, mine, backbone, options, batch_size, precision, desc)
    loader = make_loader(Subset(data, mine), batch_size=batch_size, shuffle=False, seed=seed)
    logits, labels = predict_logits(method, loader, device=options.device, precision=precision,
                                    progress=options.progress and ctx.is_main, desc=desc)
    local = (mine, logits.argmax(dim=1).tolist(), labels.tolist() if labels is not None else [])
    rows = sorted(row for part in distributed.all_gather_objects(local) for row in zip(*part, strict=True))
    predictions = torch.tensor([r[1] for r in rows], dtype=torch.long)
    targets = torch.tensor([r[2] for r in rows], dtype=torch.long)
    return classification_metrics(predictions, targets, list(method.classnames))


def _record(cell: Cell, backbone: Backbone, run_dir: Path, dataset: str, eval_dataset: str, split: str,
            result: EvalResult, seconds: float) -> dict[str, Any]:
    from .methods import get_method_class

    config_hash = cell.config_hash(backbone)
    train_data = get_method_class(cell.method).train_data
    run_id = f"{cell.protocol}/{cell.dataset}/{cell.preset.method}/{config_hash}/seed{cell.seed}/shots{cell.shots}"
    return {
        "run_id": run_id,
        "protocol": cell.protocol, "method": cell.preset.method, "method_label": cell.label,
        "dataset": dataset, "eval_dataset": eval_dataset, "split": split, "seed": cell.seed, "shots": cell.shots,
        "accuracy": round(result.accuracy, 4), "macro_f1": round(result.macro_f1, 4),
        "num_samples": result.num_samples, "backbone": backbone.name, "random_weights": backbone.random_weights,
        "config_hash": config_hash, "run_dir": str(run_dir), "seconds": seconds,
        "precision": cell.preset.train.precision if cell.preset.train else "auto",
        "adapter": cell.adapter,
        # What the method trained on (PromptMethod.train_data); base2novel rows whose training saw the novel
        # classes' (unlabelled) images are not comparable with labelled ones, and the report marks them.
        "train_data": train_data,
        "unlabeled_novel_images": cell.protocol == "base2novel" and train_data == "unlabeled_all_classes",
        **({"teacher": cell.preset.method_config["teacher"]} if cell.preset.method_config.get("teacher") else {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _not_applicable_record(cell: Cell, backbone: Backbone) -> dict[str, Any]:
    """The record of a cell that is not run because the method does not apply to the protocol."""
    return {
        "run_id": (f"{cell.protocol}/{cell.dataset}/{cell.preset.method}/not-applicable/seed{cell.seed}/"
                   f"shots{cell.shots}"),
        "protocol": cell.protocol, "method": cell.preset.method, "method_label": cell.label,
        "dataset": cell.dataset, "eval_dataset": cell.dataset, "split": "all", "seed": cell.seed,
        "shots": cell.shots, "status": "not_applicable", "reason": cell.not_applicable, "accuracy": None,
        "backbone": backbone.name, "random_weights": backbone.random_weights,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _resolved_config(cell: Cell, backbone: Backbone) -> dict[str, Any]:
    return {"protocol": cell.protocol, "dataset": cell.dataset, "seed": cell.seed, "shots": cell.shots,
            "targets": list(cell.targets), "preset": cell.preset.to_dict(),
            "backbone": {"name": backbone.name, "fingerprint": backbone.fingerprint,
                         "random_weights": backbone.random_weights}}


def default_shots(protocol: str) -> list[int]:
    return [1, 2, 4, 8, 16] if protocol == "fewshot" else [16]


def run_protocol(protocol: str, datasets: list[str], methods: list[str], backbone: Backbone, out: str | Path,
                 seeds: list[int] = (1, 2, 3), shots: list[int] | None = None, presets: dict[str, str] | None = None,
                 overrides: list[str] | None = None, targets: list[str] | None = None,
                 options: RunOptions | None = None, teacher: str | None = None) -> GridResult:
    """Build the grid of ``protocol`` and run it (finished cells are skipped); ``teacher`` as :func:`make_cells`."""
    if shots is None:
        shots = default_shots(protocol)
    cells = make_cells(protocol, list(datasets), list(methods), list(seeds), list(shots), presets, overrides,
                       targets, teacher=teacher)
    return run_grid(cells, backbone, out, options)


def load_trained(adapter: str | Path, backbone: Backbone, classnames: list[str] | None = None,
                 template: str | None = None):
    """A trained method from a run directory or adapter path, optionally on other class names."""
    path = Path(adapter)
    if path.is_dir():
        path = path / f"{ADAPTER_STEM}.safetensors"
    return load_adapter(path, backbone.model, backbone_fingerprint=backbone.fingerprint, classnames=classnames,
                        template=template)


__all__ = ["PROTOCOLS", "Backbone", "Cell", "RunOptions", "GridResult", "TrainConfig", "make_cells", "run_grid",
           "run_one", "run_cell", "run_protocol", "training_splits", "evaluate_dataset", "append_records",
           "append_records_once",
           "load_trained"]
