"""Mean ± sample std, the harmonic mean and averages over cells that share seeds: pure functions on numbers."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


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


def seed_average(per_cell: Sequence[dict[int, float]], means: Sequence[float]) -> Stat:
    """Average over cells of their means; the std is over seeds of per-seed averages when all cells share seeds."""
    mean = statistics.fmean(means)
    seed_sets = {frozenset(d) for d in per_cell}
    if len(seed_sets) == 1:
        seeds = sorted(next(iter(seed_sets)))
        per_seed = [statistics.fmean(d[s] for d in per_cell) for s in seeds]
        std = statistics.stdev(per_seed) if len(per_seed) > 1 else math.nan
        return Stat(mean, std, len(seeds))
    return Stat(mean, math.nan, 0)


def is_nan(x: float | None) -> bool:
    """True for None and nan (an undefined std, a missing value)."""
    return x is None or (isinstance(x, float) and math.isnan(x))
