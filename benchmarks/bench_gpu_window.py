"""GPU benchmark of the fused window student (flux2ttr.students.window_fast) against SDPA, in one process.

    python benchmarks/bench_gpu_window.py                  # the table (needs CUDA + Triton)
    python benchmarks/bench_gpu_window.py --precompile     # first compile every kernel variant in parallel
    python benchmarks/bench_gpu_window.py --sweep          # also time launch-shape variants of one config

For each image size (``side x side`` latent tokens: 1024 px -> 64 x 64) and student setting (tile, radius,
feature_dim, landmarks, text-query mode) it draws fresh random bf16 ``q, k, v [1, H, n_cond + side^2, D]``
(rows RMS-normalised, as after QK-norm) and prints: SDPA ms (``scaled_dot_product_attention``, the flash
kernel), student ms (``WindowLayer.forward`` in inference mode, which dispatches to the fused kernels),
speed-up, and the relative error ``||out - ref|| / ||ref||`` against an fp32 eager evaluation of the
formula (exact softmax on S_i plus the kernel term over exactly the other keys, one normaliser; masks
from the definition), chunked over queries; above ``--ref-all-max`` tokens on a fixed random sample of
image query rows plus every text row. ``gamma`` per head spans ``--log-gamma`` so the kernel term carries
from a few percent to about half of the output. Times: medians of CUDA-event-timed runs
(``triton.testing.do_bench``). Not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing as mp
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import gpu_ms, gpu_spread  # benchmarks/timing.py (the scripts' folder is on sys.path)

from flux2ttr.config import load_section
from flux2ttr.students import window_fast
from flux2ttr.students.hkr import HKRConfig
from flux2ttr.students.window import WindowLayer

SIDES = (64, 128, 256)  # 1024², 2048², 4096² images
CONFIGS = {  # name -> HKRConfig overrides (mode window, head_dim 128); k1: single-token key tiles
    "t8x16 k1 r2 f64": dict(window_tile=[8, 16], window_key_tile=[1, 1], window_radius=2, feature_dim=64),
    "t8x16 k1 r4 f64": dict(window_tile=[8, 16], window_key_tile=[1, 1], window_radius=4, feature_dim=64),
    "t8x16 k1 r8 f64": dict(window_tile=[8, 16], window_key_tile=[1, 1], window_radius=8, feature_dim=64),
    "t8x16 k1 r4 f128": dict(window_tile=[8, 16], window_key_tile=[1, 1], window_radius=4, feature_dim=128),
    "t4x4 k1 r4 f64": dict(window_tile=[4, 4], window_key_tile=[1, 1], window_radius=4, feature_dim=64),
    "t8x16 whole r8 f64": dict(window_tile=[8, 16], window_key_tile=[8, 16], window_radius=8, feature_dim=64),
    "t8x16 k1 r4 f64 lm+tl": dict(window_tile=[8, 16], window_key_tile=[1, 1], window_radius=4, feature_dim=64,
                                  window_landmarks=True, text_query_keys="text_and_landmarks"),
}
SWEEP = {  # KernelConfig overrides timed with --sweep (on the first config)
    "default": {},
    "stages2": {"stages": 2},
    "bn128 s2": {"block_n": 128, "stages": 2},
    "unfused sums": {"fuse_sums": False},
    "feat s2": {"feature_stages": 2},
    "feat bn64 w4": {"feature_block_n": 64, "feature_warps": 4},
    "text rows in the kernel": {"text_sdpa": False},
}


PARAMS = "params.yaml"  # the config name of params.yaml's hkr section (read from the working directory)


def make_layer(name: str, heads: int, log_gamma: tuple[float, float], seed: int = 0) -> WindowLayer:
    if name == PARAMS:
        cfg = dataclasses.replace(load_section(HKRConfig, "hkr", Path(PARAMS)), mode="window", head_dim=128)
    else:
        cfg = HKRConfig(mode="window", head_dim=128, **CONFIGS[name])
    torch.manual_seed(seed)
    layer = WindowLayer(cfg, num_heads=heads).eval()
    with torch.no_grad():
        layer.log_gamma.copy_(torch.linspace(log_gamma[0], log_gamma[1], layer.log_gamma.numel()))
    return layer.cuda()


def make_qkv(heads: int, n: int, seed: int, dtype=torch.bfloat16) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(3):
        x = torch.randn(1, heads, n, 128, generator=g, device="cuda")
        out.append((x * torch.rsqrt(x.square().mean(-1, keepdim=True))).to(dtype))  # unit RMS rows
    return out


# ------------------------------------------------------------------------------ fp32 reference


def exact_rows_mask(rows: torch.Tensor, n_cond: int, height: int, width: int, cfg: HKRConfig,
                    landmarks: torch.Tensor) -> torch.Tensor:
    """``[len(rows), N]`` bool: the exact set of each query row, from the definition (the key tiles that
    cover the query's tile grown by the radius)."""
    th, tw = (int(x) for x in cfg.window_tile)
    kh, kw = (int(x) for x in cfg.window_key_tile)
    radius = int(cfg.window_radius)
    n = n_cond + height * width
    dev = rows.device
    keys = torch.arange(n, device=dev)

    def fdiv(a, b):
        return torch.div(a, b, rounding_mode="floor")

    ki = (keys - n_cond).clamp(min=0)
    k_tr, k_tc = fdiv(fdiv(ki, width), kh), fdiv(ki % width, kw)
    qi = (rows - n_cond).clamp(min=0)
    q_tr, q_tc = fdiv(fdiv(qi, width), th), fdiv(qi % width, tw)
    lo_r, hi_r = fdiv(q_tr * th - radius, kh), fdiv((q_tr + 1) * th - 1 + radius, kh)
    lo_c, hi_c = fdiv(q_tc * tw - radius, kw), fdiv((q_tc + 1) * tw - 1 + radius, kw)
    win = ((k_tr[None] >= lo_r[:, None]) & (k_tr[None] <= hi_r[:, None]) & (k_tc[None] >= lo_c[:, None])
           & (k_tc[None] <= hi_c[:, None]) & (keys >= n_cond)[None])
    text_key = (keys < n_cond)[None]
    lm = torch.zeros(n, dtype=torch.bool, device=dev)
    lm[landmarks.to(dev)] = True
    img_row = win | text_key | lm[None]
    text_row = torch.ones_like(img_row) if cfg.text_query_keys == "all" else (text_key | lm[None]).expand_as(img_row)
    return torch.where((rows < n_cond)[:, None], text_row, img_row)


@torch.no_grad()
def reference(layer: WindowLayer, q, k, v, n_cond: int, height: int, width: int, rows: torch.Tensor,
              chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 eager formula at query ``rows``: ``[B, H, len(rows), D]``, and the exact part alone (softmax on
    S_i) for the kernel term's share. Complement sums are taken directly over the keys outside S_i (no
    cancellation in the reference)."""
    cfg = layer.config
    lm = layer.landmarks(n_cond, height, width)
    phi_k = layer.phi_q if layer.phi_k is None else layer.phi_k
    kf, vf = k.float(), v.float()
    pk = phi_k(kf)
    gamma = layer.gamma().view(1, -1, 1, 1)
    outs, exact = [], []
    for s in range(0, rows.numel(), chunk):
        r = rows[s:s + chunk]
        qc = q[:, :, r].float()
        mask = exact_rows_mask(r, n_cond, height, width, cfg, lm)
        sc = (qc @ kf.transpose(-1, -2)) / math.sqrt(qc.shape[-1])
        sc = sc.masked_fill(~mask, float("-inf"))
        w = torch.exp(sc - sc.amax(-1, keepdim=True))
        del sc
        kern = (layer.phi_q(qc) @ pk.transpose(-1, -2)).masked_fill_(mask, 0.0)
        num = w @ vf + gamma * (kern @ vf)
        den = w.sum(-1, keepdim=True) + gamma * kern.sum(-1, keepdim=True) + cfg.denom_eps
        outs.append(num / den)
        exact.append((w @ vf) / w.sum(-1, keepdim=True))
        del w, kern
    return torch.cat(outs, dim=2), torch.cat(exact, dim=2)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.float()
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref).norm() / ref.norm())


def median_ms(fn, warmup_ms: int, rep_ms: int) -> float:
    return gpu_ms(fn, warmup_ms, rep_ms)[0]


def kernel_ms(fn, iters: int = 5) -> dict[str, float]:
    """Mean GPU time per call of each kernel ``fn`` launches (torch.profiler), short names."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = getattr(ev, "cuda_time_total", 0.0)
        if t <= 0:
            continue
        name = ev.key
        for short in ("_window_feature_pass", "_window_main"):
            if short in name:
                name = short.strip("_").replace("window_", "")
        if len(name) > 24:
            name = "other"
        out[name] = out.get(name, 0.0) + t / iters / 1000.0
    return out


# ------------------------------------------------------------------------------ precompile


def _warm(job: tuple[str, str, dict]) -> str:
    """Compile one kernel variant (worker process): a tiny call with the same specialisation."""
    name, dtype, kernel = job
    torch.cuda.init()
    layer = make_layer(name, 2, (-8.0, -6.0))
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    q, k, v = make_qkv(2, 128 + 32 * 32, 0, dt)
    kc = dataclasses.replace(window_fast.KERNEL, **kernel)
    t = time.time()
    with torch.inference_mode():
        window_fast.fast_forward(layer, q, k, v, 128, 0.5, 3.5, height=32, width=32, kernel=kc)
    torch.cuda.synchronize()
    return f"{name} {dtype} {kernel or ''}: {time.time() - t:.1f}s"


def precompile(jobs: list[tuple[str, str, dict]], procs: int) -> None:
    t = time.time()
    with mp.get_context("spawn").Pool(min(procs, len(jobs))) as pool:
        for line in pool.imap_unordered(_warm, jobs):
            print("  compiled", line, flush=True)
    print(f"precompiled {len(jobs)} variants in {time.time() - t:.1f}s", flush=True)


def bench_side(args: argparse.Namespace, side: int) -> list[tuple]:
    """SDPA, then every student config (and the --sweep variants) at one image size; the table rows."""
    n_img = side * side
    n = args.n_cond + n_img
    q, k, v = make_qkv(args.heads, n, seed=side)
    with torch.inference_mode():
        sdpa_t = gpu_ms(lambda: F.scaled_dot_product_attention(q, k, v), args.warmup_ms, max(args.rep_ms, 300))
    sdpa = sdpa_t[0]
    g = torch.Generator(device="cuda").manual_seed(1)
    if n <= args.ref_all_max:
        rows = torch.arange(n, device="cuda")
    else:
        img = args.n_cond + torch.randperm(n_img, generator=g, device="cuda")[: args.ref_sample]
        rows = torch.cat([torch.arange(args.n_cond, device="cuda"), img.sort().values])
    out_rows = []
    for name in args.configs:
        layer = make_layer(name, args.heads, tuple(args.log_gamma))
        window_fast.LAST_LAUNCH.clear()
        with torch.inference_mode():
            out = layer(q, k, v, args.n_cond, 0.5, 3.5, height=side, width=side)
            assert "main" in window_fast.LAST_LAUNCH, window_fast.fast_path_reason(layer, q, k, v)
            ms_t = gpu_ms(lambda: layer(q, k, v, args.n_cond, 0.5, 3.5, height=side, width=side),
                          args.warmup_ms, args.rep_ms)
            ms = ms_t[0]
        ref, exact = reference(layer, q, k, v, args.n_cond, side, side, rows)
        err = rel_err(out[:, :, rows], ref)
        share = rel_err(exact, ref)  # how far the kernel term moves the output from exact-only softmax
        main_k = window_fast.LAST_LAUNCH["main"]
        feat_k = window_fast.LAST_LAUNCH["features"]
        regs = f"{getattr(main_k, 'n_regs', '?')}/{getattr(main_k, 'n_spills', '?')}"
        fregs = f"{getattr(feat_k, 'n_regs', '?')}/{getattr(feat_k, 'n_spills', '?')}"
        out_rows.append((name, side, n, sdpa_t, ms_t, sdpa / ms, err, share, regs, fregs))
        print(f"  {name:20s} {side * 16}² {ms:8.3f} ms  x{sdpa / ms:6.2f}  rel {err:.2e}", flush=True)
        if args.profile:
            with torch.inference_mode():
                ks = kernel_ms(lambda: layer(q, k, v, args.n_cond, 0.5, 3.5, height=side, width=side))
            print("      kernels (ms): " + ", ".join(f"{kname} {t:.3f}" for kname, t in sorted(ks.items())), flush=True)
    if args.sweep and side in args.sweep_sides:
        name = args.configs[0]
        layer = make_layer(name, args.heads, tuple(args.log_gamma))
        for label, kw in SWEEP.items():
            kc = dataclasses.replace(window_fast.KERNEL, **kw)

            def call(kc=kc):
                return window_fast.fast_forward(layer, q, k, v, args.n_cond, 0.5, 3.5, height=side, width=side,
                                                kernel=kc)

            with torch.inference_mode():
                try:
                    err = rel_err(call()[:, :, rows[: args.n_cond + 1024]],
                                  reference(layer, q, k, v, args.n_cond, side, side, rows[: args.n_cond + 1024])[0])
                    ms = median_ms(call, args.warmup_ms, args.rep_ms)
                except Exception as exc:  # a variant that does not build on this device
                    print(f"  sweep {label}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
            print(f"  sweep {name} {side * 16}² {label:14s} {ms:8.3f} ms  x{sdpa / ms:6.2f}  rel {err:.2e}", flush=True)
    return out_rows


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--n-cond", type=int, default=512)
    ap.add_argument("--sides", type=int, nargs="+", default=list(SIDES))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS),
                    help=f"student settings to time: {', '.join(CONFIGS)}, or {PARAMS!r} (its hkr section)")
    ap.add_argument("--log-gamma", type=float, nargs=2, default=(-12.0, -8.5), help="per-head log gamma range")
    ap.add_argument("--ref-all-max", type=int, default=20000, help="reference on every query up to this many tokens")
    ap.add_argument("--ref-sample", type=int, default=4096, help="image query rows in the reference above that")
    ap.add_argument("--warmup-ms", type=int, default=300,
                    help="warm-up per timing (the first calls also start SDPA's side stream)")
    ap.add_argument("--rep-ms", type=int, default=150)
    ap.add_argument("--precompile", action="store_true", help="compile all variants in parallel processes first")
    ap.add_argument("--only-precompile", action="store_true", help="stop after --precompile")
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--sweep", action="store_true", help="time KernelConfig variants of the first config")
    ap.add_argument("--sweep-sides", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--profile", action="store_true", help="per-kernel GPU times (torch.profiler)")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is fp32
    dev = torch.cuda.get_device_name()
    import triton

    print(f"device {dev}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    if args.precompile:
        # the bf16 variants, and the fp16 ones tests/students/test_window_gpu.py runs
        jobs = [(c, "bf16", {}) for c in args.configs] + [(c, "fp16", {}) for c in ("t8x16 k1 r8 f64", "t4x4 k1 r4 f64")]
        if args.sweep:
            jobs += [(args.configs[0], "bf16", kw) for kw in SWEEP.values() if kw]
        precompile(jobs, args.procs)
        if args.only_precompile:
            return

    rows_out: list[tuple] = []
    for side in args.sides:
        rows_out += bench_side(args, side)
        torch.cuda.empty_cache()

    print()
    print(f"{'config':>22s} {'image':>6s} {'tokens':>7s} {'SDPA ms (p10-p90)':>24s} {'student ms (p10-p90)':>24s} "
          f"{'speed-up':>9s} {'rel err':>9s} {'kern share':>10s} {'main r/s':>9s} {'feat r/s':>9s}")
    for name, side, n, s_t, m_t, sp, err, share, regs, fregs in rows_out:
        print(f"{name:>22s} {side * 16:>5d}² {n:>7d} {gpu_spread(s_t):>24s} {gpu_spread(m_t):>24s} {sp:>8.2f}x "
              f"{err:>9.2e} {share:>10.2e} {regs:>9s} {fregs:>9s}")
    print("speed-up = SDPA median / student median (> 1: the student is faster); medians of CUDA-event-timed calls "
          "after a warm-up, p10-p90 their spread")
    print("kern share: ||exact-only softmax - ref|| / ||ref||; r/s: registers / spilled registers per thread")
    goals = {64: 1.2, 128: 4.0, 256: 15.0}
    print("\ngoals: >= 1.2x / 4x / 15x SDPA at 1024² / 2048² / 4096², rel err <= 1e-2")
    for name in args.configs:
        res = [(side, sp, err) for nm, side, _, _, _, sp, err, _, _, _ in rows_out if nm == name]
        ok = all(sp >= goals.get(side, 0) and err <= 1e-2 for side, sp, err in res)
        print(f"  {name:20s} {'met' if ok else 'NOT met'}: " + ", ".join(f"{s * 16}² {sp:.2f}x" for s, sp, _ in res))


if __name__ == "__main__":
    main()
