"""Text shared by the markdown, CSV and plot outputs: number formats, labels, the std convention."""

from __future__ import annotations

from collections.abc import Iterable

from .stats import Stat, is_nan

STD_CONVENTION = (
    "± is the sample standard deviation over seeds (ddof = 1, n − 1 denominator; the papers do not say which "
    "convention they use); with a single seed it is undefined and shown as –."
)
RANDOM_WEIGHTS_BANNER = "random weights — accuracy meaningless"
AVG_TARGETS = "Avg (targets)"
AVERAGE = "Average"


def n_datasets(n: int) -> str:
    return f"{n} dataset" + ("" if n == 1 else "s")


def num(x: float | None) -> str:
    return "–" if is_nan(x) else f"{x:.2f}"


def pm(stat: Stat | None) -> str:
    if stat is None:
        return "–"
    return f"{stat.mean:.2f}" if is_nan(stat.std) else f"{stat.mean:.2f} ± {stat.std:.2f}"


def csv_num(x: float | None) -> str:
    return "" if is_nan(x) else f"{x:.4f}"


def seed_counts_text(counts: Iterable[int]) -> str:
    counts = sorted(set(counts))
    if not counts:
        return "0"
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
