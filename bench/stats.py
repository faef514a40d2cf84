"""Small statistics on lists of samples (no numpy: the numbers are few)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def percentile(samples: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100) with linear interpolation between closest ranks."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(samples: Sequence[float]) -> float:
    if not samples:
        raise ValueError("no samples")
    return statistics.median(samples)


def summary(samples: Sequence[float], percentiles: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    """count, median, min, max and the given percentiles (keys ``p50``, ``p95``...)."""
    result: dict[str, float] = {
        "count": len(samples),
        "median": median(samples),
        "min": min(samples),
        "max": max(samples),
    }
    for p in percentiles:
        result[f"p{p:g}"] = percentile(samples, p)
    return result
