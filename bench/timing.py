"""The timing rule the bench scripts share: the median of repeated calls after one warm-up call."""

from __future__ import annotations

import statistics
import time


def median_time(fn, repeats: int) -> float:
    """Median wall time in seconds of ``repeats`` calls of ``fn``, after one warm-up call (not timed)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
