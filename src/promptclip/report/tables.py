"""The four protocol tables (base-to-novel, few-shot, cross-dataset, domain generalisation) as plain dataclasses.

The aggregation rules are those of the package docstring (:mod:`promptclip.report`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..published import canonical_dataset
from .order import dataset_sort_key, method_sort_key
from .records import Rec, RecordWarning, prepare
from .stats import Stat, harmonic_mean, mean_std, seed_average

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
    recs = [r for r in prepare(records, "base2novel", notes) if r.split in ("base", "novel")]
    cells: dict[tuple, dict[str, dict[int, Rec]]] = {}
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
        base = seed_average([per_seed[k][0] for k in keys], [r.base.mean for r in group])
        novel = seed_average([per_seed[k][1] for k in keys], [r.novel.mean for r in group])
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


def _f1_stat(recs: Sequence[Rec]) -> Stat | None:
    if any(r.macro_f1 is None for r in recs):
        return None
    return mean_std([r.macro_f1 for r in recs])


def fewshot_table(records: Iterable[dict]) -> FewShotTable:
    """Per dataset × method × K: mean ± std of accuracy over seeds; per method × K: the mean over datasets."""
    notes: list[str] = []
    recs = prepare(records, "fewshot", notes)
    cells: dict[tuple, dict[int, Rec]] = {}
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
                                       seed_average(per_cell, [r.accuracy.mean for r in group]),
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
    recs = prepare(records, protocol, notes)
    groups: dict[tuple, dict[int, Rec]] = {}
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
                                        seed_average(per_cell, [c.accuracy.mean for c in targets]),
                                        tuple(c.n_seeds for c in targets), any(c.random_weights for c in targets)))
    return TransferTable(protocol, cells, averages, notes)


def cross_dataset_table(records: Iterable[dict]) -> TransferTable:
    """Cross-dataset transfer: per source × method × target mean ± std; "Avg (targets)" excludes the source."""
    return _transfer_table(records, "cross_dataset")


def dg_table(records: Iterable[dict]) -> TransferTable:
    """Domain generalisation: the source (ImageNet) separately, and the average of the target domains."""
    return _transfer_table(records, "domain_generalization")
