"""Per-tuple overhead of attention capture over plain sampling, on the teacher named in params.yaml.

Runs the same prompt batches with the sampler in four ways, interleaved over ``--repeats`` rounds, and
prints the median wall time of each and the overhead per offered tuple against plain sampling:

* ``plain``: ``sample(..., router=None)``, the unpatched model;
* ``router``: the attention router installed with a no-op observer on the captured layers (the cost of
  routing the attention call through Python and computing the native output for observers);
* ``capture``: :func:`flux2ttr.traces.capture.capture` with the params' budget (reservoir: only some tuples
  are spilled), the store write on close counted separately;
* ``capture-all``: the same with an unbounded budget (every tuple kept: the worst case).

Usage: ``python benchmarks/bench_capture.py [--params params.yaml] [--prompts 4] [--repeats 3]``. The tiny
teacher is written to a temporary folder when ``teacher.out_dir`` does not hold one.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from timing import spread  # benchmarks/timing.py (the scripts' folder is on sys.path)

from flux2ttr.config import load_section
from flux2ttr.teachers.prompts import load_prompts
from flux2ttr.teachers.router import AttentionRouter
from flux2ttr.teachers.sampler import SamplerConfig, sample
from flux2ttr.teachers.teacher import TeacherConfig, TeacherError, load_teacher, write_tiny_teacher
from flux2ttr.traces.capture import CaptureConfig, capture, resolve_layers, resolve_steps


def _batches(prompts: list[str], batch_size: int) -> list[list[int]]:
    idx = list(range(len(prompts)))
    return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]


def _run_plain(teacher, prompts, scfg, batch_size, router=None) -> dict[str, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    for b in _batches(prompts, batch_size):
        sample(teacher, [prompts[i] for i in b], scfg, router=router, seeds=[scfg.seed + i for i in b],
               prompt_indices=b)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU work is asynchronous: count it before stopping the clock
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "write_wall": 0.0,
            "write_cpu": 0.0, "kept": 0, "observer_cpu": 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--prompts", type=int, default=4, help="first N capture prompts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ccfg = load_section(CaptureConfig, "capture", args.params)
    scfg = load_section(SamplerConfig, "sampler", args.params)
    tcfg = load_section(TeacherConfig, "teacher", args.params)
    prompts = load_prompts(ccfg.prompts)[: args.prompts]
    tmp = Path(tempfile.mkdtemp(prefix="bench_capture_"))
    try:
        teacher = load_teacher(tcfg)
    except TeacherError:
        tcfg = replace(tcfg, out_dir=str(tmp / "teacher"))
        write_tiny_teacher(tcfg)
        teacher = load_teacher(tcfg)
    layers = resolve_layers(ccfg, teacher.layer_keys, teacher.single_layer_keys)
    steps = resolve_steps(ccfg, scfg.steps)
    tuples = len(prompts) * len(layers) * len(steps)

    router = AttentionRouter(include_double=any(k.startswith("double_") for k in layers))
    router.add_observer(lambda *a: None, layers)
    item = 4 if ccfg.storage_dtype == "float32" else 2
    n_tokens = teacher.cond_tokens + scfg.latent_height * scfg.latent_width
    nq = min(ccfg.queries, n_tokens)
    tuple_mib = (2 * teacher.num_heads * teacher.head_dim * (n_tokens + nq) * item + 4 * nq + 64) / 2**20

    def _capture(cfg: CaptureConfig) -> dict[str, float]:
        st = capture(teacher, prompts, cfg, scfg, progress=False)
        return {"wall": st["seconds_sampling"], "cpu": st["cpu_seconds_sampling"],
                "write_wall": st["seconds_total"] - st["seconds_sampling"],
                "write_cpu": st["cpu_seconds_total"] - st["cpu_seconds_sampling"], "kept": st["kept"],
                "observer_cpu": st["cpu_seconds_observer"]}

    modes = {
        "plain": lambda: _run_plain(teacher, prompts, scfg, ccfg.batch_size),
        "router": lambda: _run_plain(teacher, prompts, scfg, ccfg.batch_size, router),
        "capture-25%": lambda: _capture(replace(ccfg, store=str(tmp / "a.zarr"), metrics="",
                                                budget_mib=0.25 * tuples * tuple_mib)),
        "capture-all": lambda: _capture(replace(ccfg, store=str(tmp / "b.zarr"), metrics="",
                                                budget_mib=2 * tuples * tuple_mib)),
    }
    _run_plain(teacher, prompts[:1], replace(scfg, steps=1), 1)  # warm-up
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for name, fn in modes.items():
            runs[name].append(fn())

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    base_wall, base_cpu = med("plain", "wall"), med("plain", "cpu")
    print(f"teacher {teacher.identity.get('kind')}, {teacher.num_heads} heads x {teacher.head_dim}, "
          f"{scfg.height}x{scfg.width} px ({scfg.latent_height * scfg.latent_width} image + "
          f"{teacher.cond_tokens} text tokens), {len(prompts)} prompts x {len(steps)} steps x {len(layers)} layers "
          f"= {tuples} tuples offered ({tuple_mib:.2f} MiB each), batch {ccfg.batch_size}, {ccfg.queries} queries, "
          f"{ccfg.storage_dtype}, torch threads {torch.get_num_threads()}, median of {args.repeats}")
    print("wall s = median (min-max) of the rounds; 'cpu over' = extra CPU time against plain sampling "
          "(lower is better)")
    print(f"{'mode':<12} {'wall s':>22} {'cpu s':>8} {'cpu over':>9} {'cpu ms/tuple':>13} {'wall ms/tuple':>14} "
          f"{'observer cpu ms/tuple':>22} {'kept':>5} {'write cpu ms/kept':>18}")
    for name in modes:
        wall, cpu, kept = med(name, "wall"), med(name, "cpu"), int(med(name, "kept"))
        wcpu, ocpu = med(name, "write_cpu"), med(name, "observer_cpu")
        walls = [r["wall"] for r in runs[name]]
        print(f"{name:<12} {spread(walls):>22} {cpu:>8.2f} {100 * (cpu - base_cpu) / base_cpu:>8.1f}% "
              f"{1000 * (cpu - base_cpu) / tuples:>13.2f} {1000 * (wall - base_wall) / tuples:>14.2f} "
              f"{1000 * ocpu / tuples:>22.2f} "
              f"{kept if kept else '':>5} {f'{1000 * wcpu / kept:.2f}' if kept else '':>18}")


if __name__ == "__main__":
    main()
