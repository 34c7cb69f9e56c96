"""Result tables, CSV files and plots, built only from the protocol runner's JSONL records (never from logs).

Conventions (also written into every report):

- Accuracies are percentages; a table cell is the mean over seeds ± the **sample** standard deviation (``ddof = 1``,
  ``n − 1`` denominator). The papers do not say which they use. With a single seed the std is undefined: shown as
  ``–`` in markdown, empty in CSV, ``nan`` in the Python objects.
- Base-to-novel: per dataset, HM = 2·B·N/(B + N) of the mean B and mean N over seeds. The "Average" row averages B and
  N over its datasets first and takes the HM of those two averages — not the mean of the per-dataset HMs. Only seeds
  with both a base and a novel record count (others are listed in the notes).
- Average rows (over datasets, or over transfer targets) carry a std only when every averaged cell has the same seeds:
  it is then the std over seeds of the per-seed averages.
- Cross-dataset and domain generalisation: the source dataset is reported separately; "Avg (targets)" averages the
  evaluated datasets other than the source.

Public API: :func:`read_records`, :func:`base2novel_table`, :func:`fewshot_table`, :func:`cross_dataset_table`,
:func:`dg_table`, :func:`write_report`, plus the small helpers :func:`harmonic_mean`, :func:`mean_std`,
:func:`dataset_sort_key` and :func:`method_sort_key`.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

from .errors import PromptClipError
from .published import (
    DG_TARGETS,
    STANDARD_DATASETS,
    PublishedValue,
    canonical_dataset,
    published,
    published_all,
)

__all__ = [
    "PROTOCOLS",
    "STD_CONVENTION",
    "RANDOM_WEIGHTS_BANNER",
    "RecordWarning",
    "Stat",
    "B2NRow",
    "B2NAverage",
    "B2NTable",
    "FewShotRow",
    "FewShotAverage",
    "FewShotTable",
    "TransferCell",
    "TransferAverage",
    "TransferTable",
    "read_records",
    "harmonic_mean",
    "mean_std",
    "dataset_sort_key",
    "method_sort_key",
    "base2novel_table",
    "fewshot_table",
    "cross_dataset_table",
    "dg_table",
    "write_report",
]

PROTOCOLS: tuple[str, ...] = ("base2novel", "fewshot", "cross_dataset", "domain_generalization")
SPLITS: tuple[str, ...] = ("base", "novel", "all")
STD_CONVENTION = (
    "± is the sample standard deviation over seeds (ddof = 1, n − 1 denominator; the papers do not say which "
    "convention they use); with a single seed it is undefined and shown as –."
)
RANDOM_WEIGHTS_BANNER = "random weights — accuracy meaningless"
PLOT_INSTALL_HINT = 'pip install "promptclip[plot]"'

#: Variant / extra datasets, listed after the 11 standard ones.
VARIANT_DATASETS: tuple[str, ...] = DG_TARGETS + ("eurosat-sample",)
#: Methods in table order; others follow alphabetically.
METHOD_ORDER: tuple[str, ...] = (
    "zeroshot", "coop", "cocoop", "kgcoop", "vpt", "ivlp", "maple", "promptsrc", "dcp", "mugcp",
)
AVG_TARGETS = "Avg (targets)"
AVERAGE = "Average"
_SAMPLE_NOTE = (
    "eurosat-sample is the bundled 500-image EuroSAT sample (30 test images per class): its published comparison is "
    "the full EuroSAT number and is not a like-for-like comparison."
)

# Fields every record must carry, with the accepted types. ``eval_dataset`` falls back to ``dataset``.
_REQUIRED: dict[str, tuple[type, ...]] = {
    "protocol": (str,),
    "method": (str,),
    "dataset": (str,),
    "split": (str,),
    "seed": (int,),
    "shots": (int,),
    "accuracy": (int, float),
}


class RecordWarning(UserWarning):
    """A problem in the records that the report works around (truncated line, duplicate, incomplete seed)."""


# --------------------------------------------------------------------------------------------------------------------
# Reading records


def _expand(path_or_paths: str | PathLike | Iterable[str | PathLike]) -> list[Path]:
    if isinstance(path_or_paths, (str, PathLike)):
        items = [path_or_paths]
    else:
        items = list(path_or_paths)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.rglob("*.jsonl"))
            if not found:
                raise PromptClipError(f"no *.jsonl record files under {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise PromptClipError(f"record file {p} does not exist")
    return files


def _validate(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise PromptClipError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise PromptClipError(f"{where}: record lacks the field(s) {', '.join(missing)}")
    for key, types in _REQUIRED.items():
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise PromptClipError(f"{where}: field {key!r} has the wrong type ({value!r})")
    if record["protocol"] not in PROTOCOLS:
        raise PromptClipError(f"{where}: unknown protocol {record['protocol']!r} (expected one of {PROTOCOLS})")
    if record["split"] not in SPLITS:
        raise PromptClipError(f"{where}: unknown split {record['split']!r} (expected one of {SPLITS})")


def _label(record: dict) -> str:
    return str(record.get("method_label") or record["method"])


def _identity(record: dict) -> tuple:
    return (
        record["protocol"], _label(record), record["dataset"], record.get("eval_dataset") or record["dataset"],
        record["split"], record["shots"], record["seed"], record.get("config_hash", ""),
    )


def read_records(path_or_paths: str | PathLike | Iterable[str | PathLike]) -> list[dict]:
    """Records from one or more JSONL files (a directory means every ``*.jsonl`` under it, sorted).

    - Blank lines are ignored.
    - A last line that is not valid JSON (a write cut short by a crash) is skipped with a :class:`RecordWarning`.
    - Any other malformed line, or a record without the required fields, raises :class:`PromptClipError` naming the
      file and line number.
    - Records with the same (protocol, method_label, dataset, eval_dataset, split, shots, seed, config_hash) are
      duplicates: the last one read wins (files in the given order) and a :class:`RecordWarning` says so.
    """
    by_identity: dict[tuple, tuple[dict, str]] = {}
    for path in _expand(path_or_paths):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PromptClipError(f"cannot read record file {path}: {e}") from e
        lines = text.split("\n")
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            where = f"{path}:{i + 1}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if i == last:
                    warnings.warn(f"{where}: skipping a truncated last line (an interrupted write?): {e.msg}",
                                  RecordWarning, stacklevel=2)
                    continue
                raise PromptClipError(f"{where}: malformed record line (not valid JSON: {e.msg})") from e
            _validate(record, where)
            key = _identity(record)
            if key in by_identity:
                warnings.warn(f"{where}: duplicate of the record at {by_identity[key][1]} (same protocol, method, "
                              "dataset, eval_dataset, split, shots, seed and config_hash); keeping the later one",
                              RecordWarning, stacklevel=2)
                del by_identity[key]  # re-insert so the order follows the kept record
            by_identity[key] = (record, where)
    return [record for record, _ in by_identity.values()]


# --------------------------------------------------------------------------------------------------------------------
# Small pure helpers


@dataclass(frozen=True)
class Stat:
    """Mean and sample std (ddof = 1; nan with fewer than 2 values) of ``n`` values."""

    mean: float
    std: float
    n: int


def mean_std(values: Sequence[float]) -> Stat:
    """Mean and sample standard deviation (``ddof = 1``); the std is nan for a single value."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std of no values")
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return Stat(statistics.fmean(values), std, len(values))


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2·B·N / (B + N) (0 when both are 0)."""
    return 2.0 * base * novel / (base + novel) if base + novel else 0.0


def dataset_sort_key(name: str) -> tuple:
    """The 11 standard datasets in the papers' order, then the variants (ImageNet shifts, eurosat-sample), then
    others alphabetically."""
    canon = canonical_dataset(name)
    if canon in STANDARD_DATASETS:
        return (0, STANDARD_DATASETS.index(canon), name)
    if canon in VARIANT_DATASETS:
        return (1, VARIANT_DATASETS.index(canon), name)
    return (2, 0, name.lower(), name)


def method_sort_key(method: str, label: str = "") -> tuple:
    """Methods in :data:`METHOD_ORDER`, then others alphabetically; labels alphabetically within a method."""
    m = method.lower()
    rank = METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, m, label)


def _is_nan(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


# --------------------------------------------------------------------------------------------------------------------
# Normalised records


class _Rec(NamedTuple):
    protocol: str
    method: str
    label: str
    dataset: str
    eval_dataset: str
    split: str
    seed: int
    shots: int
    accuracy: float
    macro_f1: float | None
    backbone: str
    random_weights: bool


def _prepare(records: Iterable[dict], protocol: str, notes: list[str]) -> list[_Rec]:
    """The records of one protocol, with display labels, and one record per (cell, seed).

    When the protocol's records use more than one backbone, labels get a ``[backbone]`` suffix so different backbones
    never share a row. When a (label, dataset, eval_dataset, split, shots, seed) occurs more than once (e.g. two
    config hashes), the later record is used and a note + warning say so.
    """
    chosen = [r for r in records if r.get("protocol") == protocol]
    backbones = {str(r.get("backbone", "")) for r in chosen}
    out: dict[tuple, _Rec] = {}
    for r in chosen:
        label = _label(r)
        if len(backbones) > 1:
            label = f"{label} [{r.get('backbone', '?')}]"
        f1 = r.get("macro_f1")
        rec = _Rec(
            protocol, str(r["method"]), label, str(r["dataset"]), str(r.get("eval_dataset") or r["dataset"]),
            str(r["split"]), int(r["seed"]), int(r["shots"]), float(r["accuracy"]),
            float(f1) if isinstance(f1, (int, float)) and not isinstance(f1, bool) else None,
            str(r.get("backbone", "")), bool(r.get("random_weights", False)),
        )
        key = (rec.label, rec.dataset, rec.eval_dataset, rec.split, rec.shots, rec.seed)
        if key in out:
            msg = (f"{protocol}: {rec.label} on {rec.dataset}→{rec.eval_dataset} ({rec.split}, K={rec.shots}) has "
                   f"several records for seed {rec.seed} (different config_hash?); using the last one")
            notes.append(msg)
            warnings.warn(msg, RecordWarning, stacklevel=3)
        out[key] = rec
    return list(out.values())


def _seed_average(per_cell: Sequence[dict[int, float]], means: Sequence[float]) -> Stat:
    """Average over cells of their means; the std is over seeds of per-seed averages when all cells share seeds."""
    mean = statistics.fmean(means)
    seed_sets = {frozenset(d) for d in per_cell}
    if len(seed_sets) == 1:
        seeds = sorted(next(iter(seed_sets)))
        per_seed = [statistics.fmean(d[s] for d in per_cell) for s in seeds]
        std = statistics.stdev(per_seed) if len(per_seed) > 1 else math.nan
        return Stat(mean, std, len(seeds))
    return Stat(mean, math.nan, 0)


def _seed_counts_text(counts: Iterable[int]) -> str:
    counts = sorted(set(counts))
    if not counts:
        return "0"
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


# --------------------------------------------------------------------------------------------------------------------
# Base-to-novel


@dataclass(frozen=True)
class B2NRow:
    dataset: str
    method: str
    label: str
    shots: int
    seeds: tuple[int, ...]
    base: Stat
    novel: Stat
    hm: float  # HM of base.mean and novel.mean
    hm_std: float  # sample std of the per-seed HMs (informational)
    random_weights: bool

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class B2NAverage:
    method: str
    label: str
    shots: int
    datasets: tuple[str, ...]
    base: Stat  # mean of the per-dataset mean B
    novel: Stat  # mean of the per-dataset mean N
    hm: float  # HM of base.mean and novel.mean (not the mean of per-dataset HMs)
    seed_counts: tuple[int, ...]  # seeds per dataset, in ``datasets`` order
    random_weights: bool


@dataclass(frozen=True)
class B2NTable:
    rows: list[B2NRow]
    averages: list[B2NAverage]
    notes: list[str] = field(default_factory=list)


def base2novel_table(records: Iterable[dict]) -> B2NTable:
    """Per dataset × method (× shots): mean ± std of B and N over the seeds that have both, HM of the means; one
    Average row per method (× shots) over its datasets (mean B, mean N, HM of those means)."""
    notes: list[str] = []
    recs = [r for r in _prepare(records, "base2novel", notes) if r.split in ("base", "novel")]
    cells: dict[tuple, dict[str, dict[int, _Rec]]] = {}
    for r in recs:
        cell = cells.setdefault((r.dataset, r.label, r.shots), {"base": {}, "novel": {}})
        cell[r.split][r.seed] = r
    rows: list[B2NRow] = []
    per_seed: dict[tuple, tuple[dict[int, float], dict[int, float]]] = {}
    for (dataset, label, shots), cell in cells.items():
        seeds = sorted(set(cell["base"]) & set(cell["novel"]))
        lonely = sorted(set(cell["base"]) ^ set(cell["novel"]))
        if lonely:
            msg = (f"base2novel: {label} on {dataset} (K={shots}): seed(s) {', '.join(map(str, lonely))} have only "
                   "a base or only a novel record and are left out")
            notes.append(msg)
            warnings.warn(msg, RecordWarning, stacklevel=2)
        if not seeds:
            continue
        b = {s: cell["base"][s].accuracy for s in seeds}
        n = {s: cell["novel"][s].accuracy for s in seeds}
        base, novel = mean_std(list(b.values())), mean_std(list(n.values()))
        hms = [harmonic_mean(b[s], n[s]) for s in seeds]
        first = cell["base"][seeds[0]]
        random_weights = any(cell[sp][s].random_weights for sp in ("base", "novel") for s in seeds)
        rows.append(B2NRow(dataset, first.method, label, shots, tuple(seeds), base, novel,
                           harmonic_mean(base.mean, novel.mean), mean_std(hms).std, random_weights))
        per_seed[(dataset, label, shots)] = (b, n)
    rows.sort(key=lambda r: (dataset_sort_key(r.dataset), method_sort_key(r.method, r.label), r.shots))

    groups: dict[tuple, list[B2NRow]] = {}
    for row in rows:
        groups.setdefault((row.label, row.shots), []).append(row)
    averages: list[B2NAverage] = []
    for (label, shots), group in groups.items():
        keys = [(r.dataset, label, shots) for r in group]
        base = _seed_average([per_seed[k][0] for k in keys], [r.base.mean for r in group])
        novel = _seed_average([per_seed[k][1] for k in keys], [r.novel.mean for r in group])
        averages.append(B2NAverage(group[0].method, label, shots, tuple(r.dataset for r in group), base, novel,
                                   harmonic_mean(base.mean, novel.mean), tuple(r.n_seeds for r in group),
                                   any(r.random_weights for r in group)))
    averages.sort(key=lambda a: (method_sort_key(a.method, a.label), a.shots))
    return B2NTable(rows, averages, notes)


# --------------------------------------------------------------------------------------------------------------------
# Few-shot


@dataclass(frozen=True)
class FewShotRow:
    dataset: str
    method: str
    label: str
    shots: int
    seeds: tuple[int, ...]
    accuracy: Stat
    macro_f1: Stat | None  # None when some record lacks macro_f1
    random_weights: bool

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class FewShotAverage:
    method: str
    label: str
    shots: int
    datasets: tuple[str, ...]
    accuracy: Stat  # mean over datasets of the per-dataset means
    seed_counts: tuple[int, ...]
    random_weights: bool


@dataclass(frozen=True)
class FewShotTable:
    rows: list[FewShotRow]
    averages: list[FewShotAverage]
    notes: list[str] = field(default_factory=list)

    @property
    def shots(self) -> list[int]:
        return sorted({r.shots for r in self.rows})


def _f1_stat(recs: Sequence[_Rec]) -> Stat | None:
    if any(r.macro_f1 is None for r in recs):
        return None
    return mean_std([r.macro_f1 for r in recs])


def fewshot_table(records: Iterable[dict]) -> FewShotTable:
    """Per dataset × method × K: mean ± std of accuracy over seeds; per method × K: the mean over datasets."""
    notes: list[str] = []
    recs = _prepare(records, "fewshot", notes)
    cells: dict[tuple, dict[int, _Rec]] = {}
    for r in recs:
        cells.setdefault((r.eval_dataset, r.label, r.shots), {})[r.seed] = r
    rows = []
    for (dataset, label, shots), by_seed in cells.items():
        seeds = sorted(by_seed)
        chosen = [by_seed[s] for s in seeds]
        rows.append(FewShotRow(dataset, chosen[0].method, label, shots, tuple(seeds),
                               mean_std([r.accuracy for r in chosen]), _f1_stat(chosen),
                               any(r.random_weights for r in chosen)))
    rows.sort(key=lambda r: (dataset_sort_key(r.dataset), method_sort_key(r.method, r.label), r.shots))
    groups: dict[tuple, list[FewShotRow]] = {}
    for row in rows:
        groups.setdefault((row.label, row.shots), []).append(row)
    averages = []
    for (label, shots), group in groups.items():
        per_cell = [{s: cells[(r.dataset, label, shots)][s].accuracy for s in r.seeds} for r in group]
        averages.append(FewShotAverage(group[0].method, label, shots, tuple(r.dataset for r in group),
                                       _seed_average(per_cell, [r.accuracy.mean for r in group]),
                                       tuple(r.n_seeds for r in group), any(r.random_weights for r in group)))
    averages.sort(key=lambda a: (method_sort_key(a.method, a.label), a.shots))
    return FewShotTable(rows, averages, notes)


# --------------------------------------------------------------------------------------------------------------------
# Cross-dataset transfer and domain generalisation


@dataclass(frozen=True)
class TransferCell:
    source: str
    eval_dataset: str
    method: str
    label: str
    shots: int
    seeds: tuple[int, ...]
    accuracy: Stat
    macro_f1: Stat | None
    random_weights: bool

    @property
    def is_source(self) -> bool:
        return canonical_dataset(self.eval_dataset) == canonical_dataset(self.source)

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class TransferAverage:
    source: str
    method: str
    label: str
    shots: int
    targets: tuple[str, ...]  # the averaged eval datasets (source excluded)
    accuracy: Stat
    seed_counts: tuple[int, ...]
    random_weights: bool


@dataclass(frozen=True)
class TransferTable:
    protocol: str
    cells: list[TransferCell]
    averages: list[TransferAverage]
    notes: list[str] = field(default_factory=list)

    def cell(self, label: str, eval_dataset: str, source: str | None = None, shots: int | None = None
             ) -> TransferCell | None:
        for c in self.cells:
            if c.label == label and c.eval_dataset == eval_dataset and (source is None or c.source == source) and (
                    shots is None or c.shots == shots):
                return c
        return None


def _transfer_table(records: Iterable[dict], protocol: str) -> TransferTable:
    notes: list[str] = []
    recs = _prepare(records, protocol, notes)
    groups: dict[tuple, dict[int, _Rec]] = {}
    for r in recs:
        groups.setdefault((r.dataset, r.eval_dataset, r.label, r.shots), {})[r.seed] = r
    cells = []
    for (source, eval_dataset, label, shots), by_seed in groups.items():
        seeds = sorted(by_seed)
        chosen = [by_seed[s] for s in seeds]
        cells.append(TransferCell(source, eval_dataset, chosen[0].method, label, shots, tuple(seeds),
                                  mean_std([r.accuracy for r in chosen]), _f1_stat(chosen),
                                  any(r.random_weights for r in chosen)))
    cells.sort(key=lambda c: (dataset_sort_key(c.source), method_sort_key(c.method, c.label), c.shots,
                              not c.is_source, dataset_sort_key(c.eval_dataset)))
    rowgroups: dict[tuple, list[TransferCell]] = {}
    for c in cells:
        if not c.is_source:
            rowgroups.setdefault((c.source, c.label, c.shots), []).append(c)
    averages = []
    for (source, label, shots), targets in rowgroups.items():
        per_cell = [{s: groups[(source, c.eval_dataset, label, shots)][s].accuracy for s in c.seeds} for c in targets]
        averages.append(TransferAverage(source, targets[0].method, label, shots,
                                        tuple(c.eval_dataset for c in targets),
                                        _seed_average(per_cell, [c.accuracy.mean for c in targets]),
                                        tuple(c.n_seeds for c in targets), any(c.random_weights for c in targets)))
    return TransferTable(protocol, cells, averages, notes)


def cross_dataset_table(records: Iterable[dict]) -> TransferTable:
    """Cross-dataset transfer: per source × method × target mean ± std; "Avg (targets)" excludes the source."""
    return _transfer_table(records, "cross_dataset")


def dg_table(records: Iterable[dict]) -> TransferTable:
    """Domain generalisation: the source (ImageNet) separately, and the average of the target domains."""
    return _transfer_table(records, "domain_generalization")


# --------------------------------------------------------------------------------------------------------------------
# Formatting


def _n_datasets(n: int) -> str:
    return f"{n} dataset" + ("" if n == 1 else "s")


def _num(x: float | None) -> str:
    return "–" if _is_nan(x) else f"{x:.2f}"


def _pm(stat: Stat | None) -> str:
    if stat is None:
        return "–"
    return f"{stat.mean:.2f}" if _is_nan(stat.std) else f"{stat.mean:.2f} ± {stat.std:.2f}"


def _csv_num(x: float | None) -> str:
    return "" if _is_nan(x) else f"{x:.4f}"


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    def esc(cell: str) -> str:
        return str(cell).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return lines


class _PublishedLog:
    """Collects the published values a report shows, to list their sources once."""

    def __init__(self) -> None:
        self.used: dict[tuple, list[PublishedValue]] = {}

    def b2n(self, method: str, dataset: str) -> tuple[list[PublishedValue], str] | None:
        """(B, N, HM) published values and a note, or None."""
        lookup = "eurosat" if canonical_dataset(dataset) == "eurosat-sample" else dataset
        values = [published("base2novel", method, lookup, m) for m in ("base", "novel", "hm")]
        if any(v is None for v in values):
            return None
        note = " (full EuroSAT; this row is the 500-image sample, not comparable)" if lookup != dataset else ""
        self._remember("base2novel", method, values[0].dataset)
        return values, note

    def single(self, protocol: str, method: str, dataset: str) -> PublishedValue | None:
        value = published(protocol, method, dataset, "accuracy")
        if value is not None:
            self._remember(protocol, method, value.dataset)
        return value

    def _remember(self, protocol: str, method: str, dataset: str) -> None:
        key = (protocol, method, dataset)
        if key not in self.used:
            metrics = ("base", "novel", "hm") if protocol == "base2novel" else ("accuracy",)
            self.used[key] = [v for m in metrics for v in published_all(protocol, method, dataset, m)]

    def lines(self) -> list[str]:
        if not self.used:
            return []
        out = ["## Published numbers shown", "",
               "ViT-B/16 numbers from the papers and repositories. [confirmed] numbers were checked against the "
               "named public source; [paper, recalled] numbers were recalled from the paper tables and are not "
               "verified — orientation only, not acceptance bars.", ""]
        # Primary values: one line per protocol · method · status · source, listing the datasets.
        grouped: dict[tuple, list[str]] = {}
        alternates: list[tuple[str, str, str, list[PublishedValue]]] = []
        for (protocol, method, dataset), values in sorted(
                self.used.items(), key=lambda kv: (PROTOCOLS.index(kv[0][0]), method_sort_key(kv[0][1]),
                                                   dataset_sort_key(kv[0][2]))):
            by_row: dict[tuple, list[PublishedValue]] = {}
            for v in values:
                by_row.setdefault((v.variant, v.source, v.primary), []).append(v)
            for (_variant, source, primary), vs in by_row.items():
                if primary:
                    notes = sorted({v.note for v in vs if v.note and v.note != "source dataset"})
                    key = (protocol, method, vs[0].status, source, "; ".join(notes))
                    grouped.setdefault(key, []).append(dataset)
                else:
                    alternates.append((protocol, method, dataset, vs))
        for (protocol, method, status, source, note), datasets in grouped.items():
            out.append(f"- {protocol} · {method} · {', '.join(datasets)}: [{status}] {source}"
                       + (f" ({note})" if note else ""))
        for protocol, method, dataset, vs in alternates:
            nums = " / ".join(f"{v.value:.2f}" for v in vs)
            notes = "; ".join(sorted({v.note for v in vs if v.note}))
            out.append(f"- other published row, not used above — {protocol} · {method} · {dataset}: {nums} "
                       f"[{vs[0].status}] {vs[0].source}, {vs[0].variant}" + (f" ({notes})" if notes else ""))
        out.append("")
        return out


def _b2n_published_text(log: _PublishedLog, method: str, dataset: str) -> str:
    found = log.b2n(method, dataset)
    if found is None:
        return "–"
    values, note = found
    status = ", ".join(sorted({v.status for v in values}))
    return " / ".join(f"{v.value:.2f}" for v in values) + f" [{status}]" + note


def _b2n_markdown(table: B2NTable, log: _PublishedLog) -> list[str]:
    out = ["## Base-to-novel generalisation", ""]
    rows = [
        (r.dataset, r.label, str(r.shots), str(r.n_seeds), _pm(r.base), _pm(r.novel), _num(r.hm),
         _b2n_published_text(log, r.method, r.dataset))
        for r in table.rows
    ]
    out += _md_table(("Dataset", "Method", "K", "Seeds", "Base", "Novel", "HM", "Published B / N / HM"), rows)
    out += ["", "### Average over datasets", ""]
    avg_rows = []
    for a in table.averages:
        pub = _b2n_published_text(log, a.method, "average")
        standard = tuple(sorted(a.datasets, key=dataset_sort_key)) == STANDARD_DATASETS
        if pub != "–" and not standard:
            pub += f" (published: the 11 datasets; this average covers {len(a.datasets)})"
        avg_rows.append((f"{AVERAGE} ({_n_datasets(len(a.datasets))})", a.label, str(a.shots),
                         _seed_counts_text(a.seed_counts), _pm(a.base), _pm(a.novel), f"**{_num(a.hm)}**", pub))
    out += _md_table(("Row", "Method", "K", "Seeds", "Base", "Novel", "HM", "Published B / N / HM"), avg_rows)
    out += [""]
    for a in table.averages:
        if tuple(sorted(a.datasets, key=dataset_sort_key)) != STANDARD_DATASETS:
            out.append(f"- {a.label} (K={a.shots}) average covers: {', '.join(a.datasets)}.")
    out += [
        "- HM = 2·B·N/(B+N) of the mean B and mean N over seeds. The Average row averages B and N over its datasets "
        "first and takes the HM of those two averages (not the mean of the per-dataset HMs).",
        f"- {STD_CONVENTION} Average-row std: over seeds of the per-seed averages, only when all its datasets have "
        "the same seeds. Only seeds with both a base and a novel record are used.",
        "",
    ]
    return out


def _fewshot_markdown(table: FewShotTable) -> list[str]:
    shots = table.shots
    out = ["## Few-shot classification", ""]
    grid: dict[tuple, dict[int, FewShotRow]] = {}
    for r in table.rows:
        grid.setdefault((r.dataset, r.method, r.label), {})[r.shots] = r
    rows = []
    for (dataset, _method, label), by_k in grid.items():
        cells = [_pm(by_k[k].accuracy) if k in by_k else "–" for k in shots]
        rows.append((dataset, label, _seed_counts_text(r.n_seeds for r in by_k.values()), *cells))
    out += _md_table(("Dataset", "Method", "Seeds", *(f"K={k}" for k in shots)), rows)
    out += ["", "### Average over datasets", ""]
    avg: dict[tuple, dict[int, FewShotAverage]] = {}
    for a in table.averages:
        avg.setdefault((a.method, a.label), {})[a.shots] = a
    avg_rows = []
    for (_method, label), by_k in avg.items():
        cells = [_pm(by_k[k].accuracy) if k in by_k else "–" for k in shots]
        n_datasets = sorted({len(a.datasets) for a in by_k.values()})
        counts = [c for a in by_k.values() for c in a.seed_counts]
        avg_rows.append((label, _seed_counts_text(n_datasets), _seed_counts_text(counts), *cells))
    out += _md_table(("Method", "Datasets", "Seeds", *(f"K={k}" for k in shots)), avg_rows)
    out += ["", f"- Accuracy (%). {STD_CONVENTION} Average: mean over datasets of the per-dataset means.", ""]
    return out


def _transfer_markdown(table: TransferTable, log: _PublishedLog, title: str) -> list[str]:
    out = [f"## {title}", ""]
    sources = sorted({c.source for c in table.cells}, key=dataset_sort_key)
    for source in sources:
        cells = [c for c in table.cells if c.source == source]
        targets = sorted({c.eval_dataset for c in cells if not c.is_source}, key=dataset_sort_key)
        source_names = sorted({c.eval_dataset for c in cells if c.is_source}, key=dataset_sort_key)
        columns = [*source_names, *targets]
        header = ("Method", "K", "Seeds", *(f"{d} (source)" for d in source_names), *targets, AVG_TARGETS)
        rows = []
        keys = sorted({(c.method, c.label, c.shots) for c in cells},
                      key=lambda k: (method_sort_key(k[0], k[1]), k[2]))
        for method, label, shots in keys:
            mine = {c.eval_dataset: c for c in cells if c.label == label and c.shots == shots}
            average = next((a for a in table.averages
                            if a.source == source and a.label == label and a.shots == shots), None)
            row_cells = [_pm(mine[d].accuracy) if d in mine else "–" for d in columns]
            rows.append((label, str(shots), _seed_counts_text(c.n_seeds for c in mine.values()), *row_cells,
                         _pm(average.accuracy) if average else "–"))
            if canonical_dataset(source) != "imagenet":
                continue  # published transfer numbers are for ImageNet as the source
            pubs = [log.single(table.protocol, method, d) for d in columns]
            pub_avg = log.single(table.protocol, method, "average")
            present = [p for p in [*pubs, pub_avg] if p is not None]
            if not present:
                continue
            statuses = [p.status for p in present]
            common = max(set(statuses), key=statuses.count)

            def fmt(p: PublishedValue | None, common=common) -> str:
                if p is None:
                    return "–"
                return f"{p.value:.2f}" + ("" if p.status == common else f" ({p.status})")

            avg_text = fmt(pub_avg)
            if pub_avg is not None and average is not None and tuple(
                    canonical_dataset(t) for t in average.targets) != _published_targets(table.protocol):
                avg_text += " (published targets differ)"
            rows.append((f"{label} — published [{common}]", "", "", *(fmt(p) for p in pubs), avg_text))
        if len(sources) > 1:
            out += [f"Source: {source}", ""]
        out += _md_table(header, rows)
        out += [""]
    out += [f"- Accuracy (%). {STD_CONVENTION} {AVG_TARGETS}: mean of the per-target means, the source excluded; "
            "its std is over seeds of the per-seed averages, only when all targets have the same seeds.", ""]
    return out


def _published_targets(protocol: str) -> tuple[str, ...]:
    return STANDARD_DATASETS[1:] if protocol == "cross_dataset" else DG_TARGETS


# --------------------------------------------------------------------------------------------------------------------
# CSV


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _seeds_text(seeds: Iterable[int]) -> str:
    return ";".join(str(s) for s in seeds)


B2N_CSV_HEADER = (
    "dataset", "method", "label", "shots", "n_seeds", "seeds", "n_datasets", "datasets", "base_mean", "base_std",
    "novel_mean", "novel_std", "hm", "hm_std", "published_base", "published_novel", "published_hm",
    "published_status", "random_weights",
)


def _b2n_csv(table: B2NTable, path: Path) -> Path:
    rows = []
    for r in table.rows:
        pub = [published("base2novel", r.method, r.dataset, m) for m in ("base", "novel", "hm")]
        rows.append((r.dataset, r.method, r.label, r.shots, r.n_seeds, _seeds_text(r.seeds), 1, r.dataset,
                     _csv_num(r.base.mean), _csv_num(r.base.std), _csv_num(r.novel.mean), _csv_num(r.novel.std),
                     _csv_num(r.hm), _csv_num(r.hm_std), *_pub_cells(pub), r.random_weights))
    for a in table.averages:
        pub = [published("base2novel", a.method, "average", m) for m in ("base", "novel", "hm")]
        rows.append((AVERAGE, a.method, a.label, a.shots, _seed_counts_text(a.seed_counts), "", len(a.datasets),
                     ";".join(a.datasets), _csv_num(a.base.mean), _csv_num(a.base.std), _csv_num(a.novel.mean),
                     _csv_num(a.novel.std), _csv_num(a.hm), "", *_pub_cells(pub), a.random_weights))
    return _write_csv(path, B2N_CSV_HEADER, rows)


def _pub_cells(values: Sequence[PublishedValue | None]) -> list[str]:
    if any(v is None for v in values):
        return [""] * (len(values) + 1)
    return [f"{v.value:.2f}" for v in values] + [", ".join(sorted({v.status for v in values}))]


FEWSHOT_CSV_HEADER = (
    "dataset", "method", "label", "shots", "n_seeds", "seeds", "n_datasets", "datasets", "accuracy_mean",
    "accuracy_std", "macro_f1_mean", "macro_f1_std", "random_weights",
)


def _fewshot_csv(table: FewShotTable, path: Path) -> Path:
    rows = []
    for r in table.rows:
        f1 = r.macro_f1
        rows.append((r.dataset, r.method, r.label, r.shots, r.n_seeds, _seeds_text(r.seeds), 1, r.dataset,
                     _csv_num(r.accuracy.mean), _csv_num(r.accuracy.std), _csv_num(f1.mean if f1 else None),
                     _csv_num(f1.std if f1 else None), r.random_weights))
    for a in table.averages:
        rows.append((AVERAGE, a.method, a.label, a.shots, _seed_counts_text(a.seed_counts), "", len(a.datasets),
                     ";".join(a.datasets), _csv_num(a.accuracy.mean), _csv_num(a.accuracy.std), "", "",
                     a.random_weights))
    return _write_csv(path, FEWSHOT_CSV_HEADER, rows)


TRANSFER_CSV_HEADER = (
    "source", "eval_dataset", "role", "method", "label", "shots", "n_seeds", "seeds", "n_datasets", "datasets",
    "accuracy_mean", "accuracy_std", "macro_f1_mean", "macro_f1_std", "published_accuracy", "published_status",
    "random_weights",
)


def _transfer_csv(table: TransferTable, path: Path) -> Path:
    def pub(source: str, method: str, dataset: str) -> list[str]:
        if canonical_dataset(source) != "imagenet":
            return ["", ""]
        p = published(table.protocol, method, dataset, "accuracy")
        return ["", ""] if p is None else [f"{p.value:.2f}", p.status]

    rows = []
    for c in table.cells:
        f1 = c.macro_f1
        rows.append((c.source, c.eval_dataset, "source" if c.is_source else "target", c.method, c.label, c.shots,
                     c.n_seeds, _seeds_text(c.seeds), 1, c.eval_dataset, _csv_num(c.accuracy.mean),
                     _csv_num(c.accuracy.std), _csv_num(f1.mean if f1 else None), _csv_num(f1.std if f1 else None),
                     *pub(c.source, c.method, c.eval_dataset), c.random_weights))
    for a in table.averages:
        rows.append((a.source, AVG_TARGETS, "average", a.method, a.label, a.shots, _seed_counts_text(a.seed_counts),
                     "", len(a.targets), ";".join(a.targets), _csv_num(a.accuracy.mean), _csv_num(a.accuracy.std),
                     "", "", *pub(a.source, a.method, "average"), a.random_weights))
    return _write_csv(path, TRANSFER_CSV_HEADER, rows)


# --------------------------------------------------------------------------------------------------------------------
# Plots (matplotlib is optional: the ``plot`` extra)


def _matplotlib():
    """(Figure, FigureCanvasAgg), imported lazily. Uses the Agg canvas directly: no pyplot, no global backend."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PromptClipError(
            f"plots need matplotlib, which is not installed: {PLOT_INSTALL_HINT} (or turn plots off: "
            "write_report(..., plots=False) / --no-plots)"
        ) from e
    return Figure, FigureCanvasAgg


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _save(fig, canvas_cls, path: Path, random_weights: bool) -> Path:
    if random_weights:
        fig.text(0.5, 0.005, f"WARNING: {RANDOM_WEIGHTS_BANNER}", ha="center", va="bottom", color="red",
                 fontsize=9, fontweight="bold")
    canvas_cls(fig)
    fig.savefig(path, format="png", dpi=100)
    return path


def _fewshot_axes(ax, series: dict[str, list[tuple[int, float, float]]], title: str) -> None:
    all_k: set[int] = set()
    for label, points in series.items():
        points = sorted(points)
        ks = [p[0] for p in points]
        all_k.update(ks)
        means = [p[1] for p in points]
        errs = [p[2] for p in points]  # nan (one seed) draws no error bar
        has_err = any(not _is_nan(e) for e in errs)
        ax.errorbar(ks, means, yerr=errs if has_err else None, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ticks = sorted(all_k)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(k) for k in ticks])
    ax.minorticks_off()
    ax.set_xlabel("shots per class K (log2 scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def _fewshot_plots(table: FewShotTable, out_dir: Path, figure_cls, canvas_cls) -> list[Path]:
    paths = []
    series: dict[str, list] = {}
    counts = {len(a.datasets) for a in table.averages}
    for a in table.averages:
        name = a.label + (f" ({_n_datasets(len(a.datasets))})"
                          if len(counts) > 1 else "")
        series.setdefault(name, []).append((a.shots, a.accuracy.mean, a.accuracy.std))
    fig = figure_cls(figsize=(6.4, 4.4))
    over = f"{counts.pop()} dataset(s)" if len(counts) == 1 else "datasets (count in the legend)"
    _fewshot_axes(fig.add_subplot(1, 1, 1), series, f"Few-shot accuracy, average over {over}")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    paths.append(_save(fig, canvas_cls, out_dir / "fewshot_average.png",
                       any(a.random_weights for a in table.averages)))
    for dataset in sorted({r.dataset for r in table.rows}, key=dataset_sort_key):
        series = {}
        rows = [r for r in table.rows if r.dataset == dataset]
        for r in rows:
            series.setdefault(r.label, []).append((r.shots, r.accuracy.mean, r.accuracy.std))
        fig = figure_cls(figsize=(6.4, 4.4))
        _fewshot_axes(fig.add_subplot(1, 1, 1), series, f"Few-shot accuracy: {dataset} (mean ± std over seeds)")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        paths.append(_save(fig, canvas_cls, out_dir / f"fewshot_{_safe_name(dataset)}.png",
                           any(r.random_weights for r in rows)))
    return paths


def _bars(ax, groups: list[tuple[str, float, float, float, float, float]], title: str, values: bool = False) -> None:
    """Grouped Base / Novel / HM bars; each group = (label, base, base_std, novel, novel_std, hm)."""
    width = 0.26
    xs = list(range(len(groups)))
    specs = (("Base", 1, 2, "#4C72B0"), ("Novel", 3, 4, "#DD8452"), ("HM", 5, None, "#55A868"))
    for j, (name, vi, si, color) in enumerate(specs):
        heights = [g[vi] for g in groups]
        errs = [math.nan if si is None else g[si] for g in groups]  # nan (one seed) draws no error bar
        has_err = any(not _is_nan(e) for e in errs)
        bars = ax.bar([x + (j - 1) * width for x in xs], heights, width, yerr=errs if has_err else None,
                      capsize=2, label=name, color=color)
        if values:
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([g[0] for g in groups], rotation=20 if len(groups) > 3 else 0, ha="right"
                       if len(groups) > 3 else "center", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", ncol=3, frameon=False)


def _b2n_plots(table: B2NTable, out_dir: Path, figure_cls, canvas_cls) -> list[Path]:
    paths = []
    several_k = len({a.shots for a in table.averages}) > 1
    counts = {len(a.datasets) for a in table.averages}
    groups = [(a.label + (f" K={a.shots}" if several_k else "") + (f"\n({_n_datasets(len(a.datasets))})"
                                                                     if len(counts) > 1 else ""),
               a.base.mean, a.base.std, a.novel.mean, a.novel.std, a.hm) for a in table.averages]
    fig = figure_cls(figsize=(max(6.4, 1.3 * len(groups) + 2), 4.4))
    over = f"{counts.pop()} dataset(s)" if len(counts) == 1 else "each method's datasets"
    _bars(fig.add_subplot(1, 1, 1), groups, f"Base-to-novel, average over {over} (HM of the averages)", values=True)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    paths.append(_save(fig, canvas_cls, out_dir / "base2novel_average.png",
                       any(a.random_weights for a in table.averages)))

    datasets = sorted({r.dataset for r in table.rows}, key=dataset_sort_key)
    ncols = min(3, len(datasets))
    nrows = math.ceil(len(datasets) / ncols)
    fig = figure_cls(figsize=(4.6 * ncols, 3.6 * nrows + 0.3))
    for i, dataset in enumerate(datasets):
        rows = [r for r in table.rows if r.dataset == dataset]
        groups = [(r.label + (f" K={r.shots}" if len({x.shots for x in rows}) > 1 else ""), r.base.mean, r.base.std,
                   r.novel.mean, r.novel.std, r.hm) for r in rows]
        _bars(fig.add_subplot(nrows, ncols, i + 1), groups, dataset)
    fig.suptitle("Base-to-novel per dataset (mean ± std over seeds; HM of the means)")
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    paths.append(_save(fig, canvas_cls, out_dir / "base2novel_per_dataset.png",
                       any(r.random_weights for r in table.rows)))
    return paths


# --------------------------------------------------------------------------------------------------------------------
# The report


def write_report(records: Iterable[dict], out_dir: str | PathLike, plots: bool = True) -> list[Path]:
    """Write ``report.md``, one CSV per protocol present and (``plots=True``) PNG plots into ``out_dir``.

    Returns the written paths: ``report.md`` first, then the CSVs (``base2novel.csv``, ``fewshot.csv``,
    ``cross_dataset.csv``, ``domain_generalization.csv``), then the PNGs (``base2novel_average.png``,
    ``base2novel_per_dataset.png``, ``fewshot_average.png``, ``fewshot_<dataset>.png``). With ``plots=True`` and
    matplotlib missing, raises :class:`PromptClipError` before writing anything.
    """
    records = list(records)
    if not records:
        raise PromptClipError("no records to report")
    for i, r in enumerate(records):
        _validate(r, f"record {i}")
    figure_cls = canvas_cls = None
    if plots:
        figure_cls, canvas_cls = _matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    protocols = [p for p in PROTOCOLS if any(r["protocol"] == p for r in records)]
    n_random = sum(1 for r in records if r.get("random_weights") is True)
    md = ["# promptclip results report", ""]
    if n_random:
        md += [f"> **WARNING: {RANDOM_WEIGHTS_BANNER}.** {n_random} of {len(records)} records were produced "
               "with random backbone weights (`random_weights: true`): their accuracies say nothing about the "
               "methods.", ""]
    backbones = sorted({str(r.get("backbone", "?")) for r in records})
    md += [f"Built from {len(records)} records (protocols: {', '.join(protocols)}; backbone(s): "
           f"{', '.join(backbones)}). Accuracies in %, mean over seeds ± sample std (ddof = 1).", ""]
    other = [b for b in backbones if re.sub(r"[^a-z0-9]", "", b.lower()) != "vitb16"]
    if other:
        md += [f"> Note: published numbers are for ViT-B/16; these records also use {', '.join(other)}, so the "
               "published columns are not a like-for-like comparison for those rows.", ""]
    if any(canonical_dataset(str(r.get(k, ""))) == "eurosat-sample" for r in records
           for k in ("dataset", "eval_dataset")):
        md += [f"> Note: {_SAMPLE_NOTE}", ""]

    log = _PublishedLog()
    csvs: list[Path] = []
    pngs: list[Path] = []
    notes: list[str] = []
    if "base2novel" in protocols:
        table = base2novel_table(records)
        md += _b2n_markdown(table, log)
        csvs.append(_b2n_csv(table, out / "base2novel.csv"))
        notes += table.notes
        if plots and table.rows:
            pngs += _b2n_plots(table, out, figure_cls, canvas_cls)
    if "fewshot" in protocols:
        fs = fewshot_table(records)
        md += _fewshot_markdown(fs)
        csvs.append(_fewshot_csv(fs, out / "fewshot.csv"))
        notes += fs.notes
        if plots and fs.rows:
            pngs += _fewshot_plots(fs, out, figure_cls, canvas_cls)
    for protocol, title, fn in (("cross_dataset", "Cross-dataset transfer", cross_dataset_table),
                                ("domain_generalization", "Domain generalisation", dg_table)):
        if protocol in protocols:
            tt = fn(records)
            md += _transfer_markdown(tt, log, title)
            csvs.append(_transfer_csv(tt, out / f"{protocol}.csv"))
            notes += tt.notes
    if notes:
        md += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    md += log.lines()
    md += ["---", "", f"Std convention: {STD_CONVENTION}", ""]
    report = out / "report.md"
    report.write_text("\n".join(md), encoding="utf-8")
    return [report, *csvs, *pngs]
