"""What the benchmark scripts share for reporting repeated timings (imported by the scripts beside it)."""

from __future__ import annotations

import statistics

NOISY = 1.5  # max/min of one variant's repeats above this: the machine was busy, the ratio is not a measurement


def spread(xs: list[float]) -> str:
    """``median (min-max)`` of repeated timings, 3 decimals."""
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def noisy(*series: list[float]) -> bool:
    """Whether any series' slowest repeat exceeds ``NOISY`` times its fastest."""
    return any(max(xs) > NOISY * min(xs) for xs in series)
