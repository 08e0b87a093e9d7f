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


def gpu_ms(fn, warmup_ms: int, rep_ms: int) -> tuple[float, float, float]:
    """``(median, p10, p90)`` ms of CUDA-event-timed calls of ``fn`` after ``warmup_ms`` of warm-up calls
    (``triton.testing.do_bench``, which also clears the L2 cache between calls)."""
    import triton.testing

    med, lo, hi = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.1, 0.9])
    return float(med), float(lo), float(hi)


def gpu_spread(t: tuple[float, float, float]) -> str:
    """``median (p10-p90)`` of :func:`gpu_ms`, 3 decimals."""
    return f"{t[0]:.3f} ({t[1]:.3f}-{t[2]:.3f})"
