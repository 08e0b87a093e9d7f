"""Forward time of one HKR student layer against softmax attention (SDPA), for a few token counts.

    python benchmarks/bench_hkr.py                       # CPU, small sizes
    python benchmarks/bench_hkr.py --device cuda --dtype bf16 --tokens 4096 16384 65536

Prints a table: tokens (n_cond + image tokens), SDPA ms, student ms, ratio (student / SDPA).
The student config comes from ``params.yaml`` section ``hkr`` (``--params``), num_heads and batch
from the flags. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import noisy, spread  # benchmarks/timing.py (the scripts' folder is on sys.path)

from flux2ttr.config import load_section
from flux2ttr.students.build import build_student
from flux2ttr.students.hkr import HKRConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int, repeat: int) -> list[float]:
    """Wall times of ``repeat`` calls of ``fn()`` in milliseconds, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--n-cond", type=int, default=512)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096],
                    help="image token counts (square grids, rounded to a square)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls first (allocator, kernel compile)")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls; the table shows median (min-max)")
    ap.add_argument("--mode", choices=("window", "hkr"), default=None, help="student mode (default: params.yaml)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    cfg = load_section(HKRConfig, "hkr", args.params) if args.params.is_file() else HKRConfig()
    if args.mode:
        cfg = dataclasses.replace(cfg, mode=args.mode)
    layer = build_student(cfg, num_heads=args.heads).to(device).eval()
    d = cfg.head_dim
    print(f"device={device} dtype={args.dtype} B={args.batch} H={args.heads} D={d} F={cfg.feature_dim} "
          f"n_cond={args.n_cond} landmarks: frac={cfg.landmark_fraction} min={cfg.landmark_min} "
          f"max={cfg.landmark_max}")
    print(f"mode={cfg.mode}; ms = median (min-max) of {args.repeat} calls after {args.warmup} warm-up calls; "
          "ratio = student/SDPA median time (< 1: the student is faster)")
    print(f"{'tokens':>8} {'image':>7} {'SDPA ms':>24} {'student ms':>24} {'ratio':>7}")
    for n_img in args.tokens:
        side = max(1, int(round(math.sqrt(n_img))))
        h = w = side
        n = args.n_cond + h * w
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(args.batch, args.heads, n, d, generator=g).to(device, dtype) for _ in range(3))
        with torch.inference_mode():
            t_sdpa = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, args.warmup, args.repeat)
            t_hkr = time_ms(lambda: layer(q, k, v, args.n_cond, 0.5, 3.5, height=h, width=w), device,
                            args.warmup, args.repeat)
        ratio = statistics.median(t_hkr) / statistics.median(t_sdpa)
        print(f"{n:>8} {h * w:>7} {spread(t_sdpa):>24} {spread(t_hkr):>24} {ratio:>7.2f}"
              + ("  (noisy: the machine was busy)" if noisy(t_sdpa, t_hkr) else ""))


if __name__ == "__main__":
    main()
