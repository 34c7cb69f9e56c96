"""One CSV per protocol table: every row and average, with the published numbers beside them."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..published import PublishedValue, canonical_dataset, published
from .formatting import AVERAGE, AVG_TARGETS, csv_num, seed_counts_text
from .tables import B2NTable, FewShotTable, TransferTable


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


def b2n_csv(table: B2NTable, path: Path) -> Path:
    rows = []
    for r in table.rows:
        pub = [published("base2novel", r.method, r.dataset, m) for m in ("base", "novel", "hm")]
        rows.append((r.dataset, r.method, r.label, r.shots, r.n_seeds, _seeds_text(r.seeds), 1, r.dataset,
                     csv_num(r.base.mean), csv_num(r.base.std), csv_num(r.novel.mean), csv_num(r.novel.std),
                     csv_num(r.hm), csv_num(r.hm_std), *_pub_cells(pub), r.random_weights))
    for a in table.averages:
        pub = [published("base2novel", a.method, "average", m) for m in ("base", "novel", "hm")]
        rows.append((AVERAGE, a.method, a.label, a.shots, seed_counts_text(a.seed_counts), "", len(a.datasets),
                     ";".join(a.datasets), csv_num(a.base.mean), csv_num(a.base.std), csv_num(a.novel.mean),
                     csv_num(a.novel.std), csv_num(a.hm), "", *_pub_cells(pub), a.random_weights))
    return _write_csv(path, B2N_CSV_HEADER, rows)


def _pub_cells(values: Sequence[PublishedValue | None]) -> list[str]:
    if any(v is None for v in values):
        return [""] * (len(values) + 1)
    return [f"{v.value:.2f}" for v in values] + [", ".join(sorted({v.status for v in values}))]


FEWSHOT_CSV_HEADER = (
    "dataset", "method", "label", "shots", "n_seeds", "seeds", "n_datasets", "datasets", "accuracy_mean",
    "accuracy_std", "macro_f1_mean", "macro_f1_std", "random_weights",
)


def fewshot_csv(table: FewShotTable, path: Path) -> Path:
    rows = []
    for r in table.rows:
        f1 = r.macro_f1
        rows.append((r.dataset, r.method, r.label, r.shots, r.n_seeds, _seeds_text(r.seeds), 1, r.dataset,
                     csv_num(r.accuracy.mean), csv_num(r.accuracy.std), csv_num(f1.mean if f1 else None),
                     csv_num(f1.std if f1 else None), r.random_weights))
    for a in table.averages:
        rows.append((AVERAGE, a.method, a.label, a.shots, seed_counts_text(a.seed_counts), "", len(a.datasets),
                     ";".join(a.datasets), csv_num(a.accuracy.mean), csv_num(a.accuracy.std), "", "",
                     a.random_weights))
    return _write_csv(path, FEWSHOT_CSV_HEADER, rows)


TRANSFER_CSV_HEADER = (
    "source", "eval_dataset", "role", "method", "label", "shots", "n_seeds", "seeds", "n_datasets", "datasets",
    "accuracy_mean", "accuracy_std", "macro_f1_mean", "macro_f1_std", "published_accuracy", "published_status",
    "random_weights",
)


def transfer_csv(table: TransferTable, path: Path) -> Path:
    def pub(source: str, method: str, dataset: str) -> list[str]:
        if canonical_dataset(source) != "imagenet":
            return ["", ""]
        p = published(table.protocol, method, dataset, "accuracy")
        return ["", ""] if p is None else [f"{p.value:.2f}", p.status]

    rows = []
    for c in table.cells:
        f1 = c.macro_f1
        rows.append((c.source, c.eval_dataset, "source" if c.is_source else "target", c.method, c.label, c.shots,
                     c.n_seeds, _seeds_text(c.seeds), 1, c.eval_dataset, csv_num(c.accuracy.mean),
                     csv_num(c.accuracy.std), csv_num(f1.mean if f1 else None), csv_num(f1.std if f1 else None),
                     *pub(c.source, c.method, c.eval_dataset), c.random_weights))
    for a in table.averages:
        rows.append((a.source, AVG_TARGETS, "average", a.method, a.label, a.shots, seed_counts_text(a.seed_counts),
                     "", len(a.targets), ";".join(a.targets), csv_num(a.accuracy.mean), csv_num(a.accuracy.std),
                     "", "", *pub(a.source, a.method, "average"), a.random_weights))
    return _write_csv(path, TRANSFER_CSV_HEADER, rows)
