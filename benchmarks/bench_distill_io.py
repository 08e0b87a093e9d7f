"""Distill data path: tuples/s the prefetching reader delivers versus tuples/s the model step trains.

    python benchmarks/bench_distill_io.py                        # params.yaml, traces/capture.zarr
    python benchmarks/bench_distill_io.py --store S --steps 40 --reader-threads 1 2 4

Three numbers (all in tuples/s):
  read      the PrefetchLoader alone (zarr read + zstd decode + float32 conversion), no training; and
            again from a warm in-memory TupleCache (distill.cache_mib), what later epochs see;
  train     train_step on batches already in memory (forward + backward + AdamW), no reading;
  pipeline  both together, as the distill stage runs them (with the cache, cold at the start).
The reader keeps up when read >> train and pipeline ~= train. Uses the ``distill`` and ``hkr`` sections of
``--params`` for batch size, swap-layer range and the student shape. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from timing import spread  # benchmarks/timing.py (the scripts' folder is on sys.path)

from flux2ttr.config import load_section
from flux2ttr.distill.trainer import DistillConfig, _build_layer, train_step
from flux2ttr.students.hkr import HKRConfig
from flux2ttr.traces.loader import BatchPlanner, PrefetchLoader, TupleCache, split_by_prompt
from flux2ttr.traces.store import TraceStore


def planner_for(store: TraceStore, cfg: DistillConfig) -> BatchPlanner:
    split = split_by_prompt(store, cfg.val_fraction, cfg.seed)
    return BatchPlanner({k: split.train[k] for k in store.layers}, batch_size=cfg.batch_size,
                        min_layers=cfg.min_swap_layers, max_layers=cfg.max_swap_layers, seed=cfg.seed)


def bench_read(store: TraceStore, cfg: DistillConfig, steps: int, threads: int, prefetch: int,
               cache: TupleCache | None = None) -> float:
    loader = PrefetchLoader(store, planner_for(store, cfg), stop_step=steps, prefetch_steps=prefetch,
                            reader_threads=threads, cache=cache)
    t0 = time.perf_counter()
    with loader:
        for _ in loader:
            pass
    return loader.tuples_read / (time.perf_counter() - t0)


def bench_train(store: TraceStore, cfg: DistillConfig, hkr: HKRConfig, steps: int) -> float:
    planner = planner_for(store, cfg)
    plan = [planner.next_step() for _ in range(steps)]
    cache = {}
    for reqs in plan:  # read everything first: this number excludes I/O
        for r in reqs:
            cache.setdefault((r.layer, r.n_tokens, r.rows), store.read(r.layer, r.n_tokens, list(r.rows)))
    heads = store.teacher_heads()  # a head-subset store holds fewer per tuple
    states = {k: _build_layer(k, cfg, hkr, heads) for k in store.layers}
    first = plan[0][0]
    train_step(states[first.layer], cache[(first.layer, first.n_tokens, first.rows)], cfg)  # warm-up
    n = 0
    t0 = time.perf_counter()
    for reqs in plan:
        for r in reqs:
            b = cache[(r.layer, r.n_tokens, r.rows)]
            train_step(states[r.layer], b, cfg)
            n += int(b["q_sub"].shape[0])
    return n / (time.perf_counter() - t0)


def bench_pipeline(store: TraceStore, cfg: DistillConfig, hkr: HKRConfig, steps: int, threads: int,
                   prefetch: int) -> float:
    heads = store.teacher_heads()  # a head-subset store holds fewer per tuple
    states = {k: _build_layer(k, cfg, hkr, heads) for k in store.layers}
    cache = TupleCache(cfg.cache_mib * 2**20) if cfg.cache_mib > 0 else None
    loader = PrefetchLoader(store, planner_for(store, cfg), stop_step=steps, prefetch_steps=prefetch,
                            reader_threads=threads, cache=cache)
    n = 0
    t0 = time.perf_counter()
    with loader:
        for sb in loader:
            for key, b in sb.batches.items():
                train_step(states[key], b, cfg)
                n += int(b["q_sub"].shape[0])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--store", type=Path, default=None, help="trace store (default: distill.store)")
    ap.add_argument("--steps", type=int, default=30, help="planned steps per measurement")
    ap.add_argument("--reader-threads", type=int, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=3, help="measurements of each kind, after one untimed warm-up")
    args = ap.parse_args()

    def rates(fn) -> tuple[str, float]:
        fn()  # warm-up: page cache, allocator, first-touch of the model
        xs = [fn() for _ in range(args.repeats)]
        return f"{spread(xs):>26}", statistics.median(xs)

    cfg = load_section(DistillConfig, "distill", args.params)
    hkr = load_section(HKRConfig, "hkr", args.params)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    store = TraceStore.open(args.store or cfg.store)
    print(f"store {store.path}: layers {len(store.layers)}, tuples {store.count()}, batch {cfg.batch_size}, "
          f"layers/step {cfg.min_swap_layers}..{cfg.max_swap_layers}, torch threads {torch.get_num_threads()}; "
          f"tuples/s = median (min-max) of {args.repeats} runs after a warm-up (higher is faster)")
    for threads in args.reader_threads or [cfg.reader_threads]:
        rs, r = rates(lambda: bench_read(store, cfg, args.steps, threads, cfg.prefetch_steps))
        print(f"read      {rs} tuples/s  (zarr, reader_threads={threads}, prefetch_steps={cfg.prefetch_steps})")
    if cfg.cache_mib > 0:
        cache = TupleCache(cfg.cache_mib * 2**20)
        bench_read(store, cfg, args.steps, cfg.reader_threads, cfg.prefetch_steps, cache)  # fills the cache
        rcs, _ = rates(lambda: bench_read(store, cfg, args.steps, cfg.reader_threads, cfg.prefetch_steps, cache))
        print(f"read      {rcs} tuples/s  (warm TupleCache, {cache.nbytes / 2**20:.0f} MiB held)")
    ts, t = rates(lambda: bench_train(store, cfg, hkr, args.steps))
    print(f"train     {ts} tuples/s  (model step only, data in memory)")
    ps, _ = rates(lambda: bench_pipeline(store, cfg, hkr, args.steps, cfg.reader_threads, cfg.prefetch_steps))
    print(f"pipeline  {ps} tuples/s  (reader_threads={cfg.reader_threads}; read/train ratio {r / t:.1f}x)")


if __name__ == "__main__":
    main()
