"""Training curves for the report: the ``metrics.jsonl`` of every trained run the records point to, grouped by
protocol, dataset and method (one plot per group, one line per shots × seed)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from ..tracking import METRICS_FILE, read_metrics
from .order import dataset_sort_key, method_sort_key


@dataclass
class CurveSeries:
    """One run: its shots and seed, per-step and per-epoch metrics lines."""

    shots: int
    seed: int
    steps: list[dict[str, Any]]
    epochs: list[dict[str, Any]]

    @property
    def label(self) -> str:
        return f"K={self.shots} seed {self.seed}"


@dataclass
class CurveGroup:
    protocol: str
    dataset: str
    method: str
    label: str
    random_weights: bool = False
    series: list[CurveSeries] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"{self.protocol} · {self.dataset} · {self.label}"


def find_run_dir(recorded: str, records_dir: Path | None) -> Path | None:
    """The run directory of a record: as recorded, or (moved or relative output) the same ``runs/...`` path under
    ``records_dir``, the folder of the records file."""
    path = Path(recorded)
    if (path / METRICS_FILE).exists():
        return path
    if records_dir is not None and "runs" in path.parts:
        moved = records_dir.joinpath(*path.parts[path.parts.index("runs"):])
        if (moved / METRICS_FILE).exists():
            return moved
    return None


def training_curves(records: Iterable[dict[str, Any]], records_dir: str | PathLike | None = None
                    ) -> list[CurveGroup]:
    """Groups of runs that have training metrics, in the report's dataset and method order (runs without metrics,
    like zero-shot ones, are left out)."""
    root = Path(records_dir) if records_dir is not None else None
    groups: dict[tuple[str, str, str], CurveGroup] = {}
    seen: set[str] = set()
    for record in records:
        recorded = record.get("run_dir")
        if not isinstance(recorded, str) or recorded in seen:
            continue
        seen.add(recorded)
        run_dir = find_run_dir(recorded, root)
        if run_dir is None:
            continue
        steps, epochs = read_metrics(run_dir / METRICS_FILE)
        if not steps and not epochs:
            continue
        label = record.get("method_label") or record["method"]
        key = (record["protocol"], record["dataset"], label)
        group = groups.setdefault(key, CurveGroup(record["protocol"], record["dataset"], record["method"], label))
        group.random_weights = group.random_weights or bool(record.get("random_weights"))
        group.series.append(CurveSeries(record["shots"], record["seed"], steps, epochs))
    for group in groups.values():
        group.series.sort(key=lambda s: (s.shots, s.seed))
    return sorted(groups.values(), key=lambda g: (g.protocol, dataset_sort_key(g.dataset),
                                                  method_sort_key(g.method, g.label)))
