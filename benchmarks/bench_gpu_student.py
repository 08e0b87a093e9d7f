"""GPU benchmark of the fused HKR student forward against SDPA, in one process (issue 6).

    python benchmarks/bench_gpu_student.py                    # the issue's table (needs CUDA + Triton)
    python benchmarks/bench_gpu_student.py --sweep            # also time kernel launch-shape variants
    python benchmarks/bench_gpu_student.py --sides 64 --heads 4   # smaller

For each image size (``side x side`` latent tokens after patching: 1024 px -> 64 x 64 = 4,096 image
tokens) it draws fresh random ``q, k, v [1, H, n_cond + side^2, D]`` in bf16 and prints: tokens, SDPA ms
(PyTorch ``scaled_dot_product_attention``, FlashAttention-class), student ms (``HKRLayer.forward`` in
inference mode, which dispatches to :mod:`flux2ttr.students.fast_path`), ratio SDPA / student (the speed-up), and
the relative error ``||out - ref|| / ||ref||`` against the fp32 eager student on the same (upcast)
inputs. The student config is ``params.yaml`` section ``hkr``; its conditioner and alpha are
perturbed from their identity initialisation (seeded) so every term of the blend is exercised.
Times are medians of CUDA-event-timed runs (``triton.testing.do_bench``). Not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import gpu_ms, gpu_spread  # benchmarks/timing.py (the scripts' folder is on sys.path)

from flux2ttr.config import load_section
from flux2ttr.students import fast_path
from flux2ttr.students.hkr import HKRConfig, HKRLayer
from flux2ttr.students.landmarks import landmark_indices

SIDES = (64, 128, 256)  # 1024², 2048², 4096² images: 16x VAE downsampling then 2x2 patches -> side = px / 16


def perturb(layer: HKRLayer, seed: int) -> HKRLayer:
    """Move the conditioner and alpha off their identity init (seeded), so the blend is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in (layer.cond.net[2].weight, layer.cond.net[2].bias):
            t.copy_(torch.randn(t.shape, generator=g) * 0.05)
        layer.alpha_logit.fill_(0.5)
    return layer


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.float()
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref).norm() / ref.norm())


def median_ms(fn, warmup_ms: int, rep_ms: int) -> float:
    return gpu_ms(fn, warmup_ms, rep_ms)[0]


def flops_bytes(cfg: HKRConfig, h: int, n: int, n_land: int, d: int, elt: int) -> tuple[float, float]:
    """Useful FLOPs of the student (MLPs both sides, KV, apply, landmark QK and PV) and the fewest bytes."""
    hid, f = cfg.hidden_dim, cfg.feature_dim
    mlp = 2 * (d * hid + hid * hid + hid * f)
    per_tok = 2 * mlp + 2 * (2 * f * d) + 4 * n_land * d
    return float(per_tok * n * h), float(4 * n * h * d * elt)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--n-cond", type=int, default=512)
    ap.add_argument("--sides", type=int, nargs="+", default=list(SIDES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--warmup-ms", type=int, default=300)
    ap.add_argument("--rep-ms", type=int, default=500)
    ap.add_argument("--sweep", action="store_true", help="time KernelConfig variants too")
    ap.add_argument("--profile", action="store_true", help="print per-kernel GPU times (torch.profiler)")
    ap.add_argument("--cpu-profile", action="store_true", help="cProfile the host side of the student call")
    ap.add_argument("--kernel", type=str, default="", help="KernelConfig overrides as JSON, e.g. '{\"fused\": true}'")
    ap.add_argument("--adaptive", action="store_true", help="also run with adaptive_alpha")
    ap.add_argument("--json", type=Path, default=None, help="write all numbers here")
    ap.add_argument("--check", action="store_true", help="only run GPU correctness cases (batch 2, strided "
                    "layouts, per-row sigma/cfg, odd landmark counts, adaptive, shared_qk, fp16) and exit")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_student needs a CUDA device (the fused kernels are the thing measured)")
    dev = torch.device("cuda")
    cfg = load_section(HKRConfig, "hkr", args.params) if args.params.is_file() else HKRConfig()
    if cfg.mode == "window":  # the window student has its own benchmark; time params.yaml's setting there
        import bench_gpu_window  # benchmarks/bench_gpu_window.py (the scripts' folder is on sys.path)

        print(f"{args.params}: hkr.mode is window -> benchmarks/bench_gpu_window.py --configs {bench_gpu_window.PARAMS}")
        bench_gpu_window.main(["--configs", bench_gpu_window.PARAMS, "--heads", str(args.heads),
                               "--n-cond", str(args.n_cond), "--sides", *map(str, args.sides),
                               "--warmup-ms", str(args.warmup_ms), "--rep-ms", str(args.rep_ms)])
        return
    if args.kernel:
        fast_path.KERNEL = dataclasses.replace(fast_path.KERNEL, **json.loads(args.kernel))
        print("kernel config:", fast_path.KERNEL)
    d = cfg.head_dim
    props = torch.cuda.get_device_properties(dev)
    import triton

    print(f"device={props.name} SMs={props.multi_processor_count} torch={torch.__version__} triton={triton.__version__}")
    print(f"B=1 H={args.heads} D={d} {args.dtype}; student F={cfg.feature_dim} hidden={cfg.hidden_dim} "
          f"landmarks: n_cond + clamp({cfg.landmark_fraction}*img, {cfg.landmark_min}, {cfg.landmark_max}) "
          f"adaptive_alpha={cfg.adaptive_alpha}")
    if args.check:
        check_cases(cfg, args, dev)
        return
    variants = [("params", cfg)]
    if args.adaptive:
        variants.append(("adaptive", dataclasses.replace(cfg, adaptive_alpha=True)))
    rows = []
    for name, c in variants:
        torch.manual_seed(args.seed)
        layer = perturb(HKRLayer(c, num_heads=args.heads), args.seed).to(dev).eval()
        for side in args.sides:
            n = args.n_cond + side * side
            g = torch.Generator(device=dev).manual_seed(args.seed + side)
            dt = torch.bfloat16 if args.dtype == "bf16" else torch.float16
            q, k, v = (torch.randn(1, args.heads, n, d, generator=g, device=dev).to(dt) for _ in range(3))
            sigma = torch.tensor([0.7], device=dev)
            with torch.inference_mode():
                reason = fast_path.fast_path_reason(layer, q, k, v)
                if reason is not None:
                    raise SystemExit(f"fast path not taken: {reason}")
                run = lambda: layer(q, k, v, args.n_cond, sigma, 3.5, height=side, width=side)  # noqa: E731
                out = run()
                torch.cuda.synchronize()
                # Reference: the eager fp32 student on the same values (fast path off for it).
                c.fast_path = False
                ref = layer(q.float(), k.float(), v.float(), args.n_cond, sigma, 3.5, height=side, width=side)
                c.fast_path = True
                err = rel_err(out, ref)
                del ref
                sdpa_t = gpu_ms(lambda: F.scaled_dot_product_attention(q, k, v), args.warmup_ms, args.rep_ms)
                st_t = gpu_ms(run, args.warmup_ms, args.rep_ms)
                t_sdpa, t_st = sdpa_t[0], st_t[0]
                n_land = landmark_indices(args.n_cond, side, side, c).numel()
                fl, by = flops_bytes(c, args.heads, n, n_land, d, 2)
                row = dict(variant=name, tokens=n, image=side * side, landmarks=n_land, sdpa_ms=t_sdpa,
                           student_ms=t_st, sdpa_p10_p90=sdpa_t[1:], student_p10_p90=st_t[1:],
                           speedup=t_sdpa / t_st, rel_err=err, student_gflop=fl / 1e9,
                           student_tflops=fl / t_st / 1e9, min_bytes_mb=by / 1e6)
                row["host_us"] = host_us(run)
                if args.cpu_profile:
                    cpu_profile(run)
                if args.profile:
                    row["kernels_us"] = profile(run)
                if args.sweep and name == "params":
                    row["sweep"] = sweep(layer, q, k, v, args, side, sigma)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del out  # q, k, v are rebound next iteration; the closures above read them
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print()
    print(f"{'variant':>9} {'tokens':>7} {'landm':>6} {'SDPA ms (p10-p90)':>24} {'student ms (p10-p90)':>24} "
          f"{'speed-up':>9} {'rel err':>9} {'TFLOP/s':>8} {'host us':>8}")
    for r in rows:
        sdpa_s = gpu_spread((r["sdpa_ms"], *r["sdpa_p10_p90"]))
        st_s = gpu_spread((r["student_ms"], *r["student_p10_p90"]))
        print(f"{r['variant']:>9} {r['tokens']:>7} {r['landmarks']:>6} {sdpa_s:>24} {st_s:>24} "
              f"{r['speedup']:>8.2f}x {r['rel_err']:>9.2e} {r['student_tflops']:>8.1f} {r['host_us']:>8.1f}")
    print("speed-up = SDPA median / student median (> 1: the student is faster); medians of CUDA-event-timed calls "
          "after a warm-up, p10-p90 their spread")


def check_cases(cfg: HKRConfig, args, dev: torch.device) -> None:
    """Fused path vs the fp32 eager student on cases the timing table does not cover; prints rel err."""
    cases = [
        ("B=2, [B,N,H,D] views, per-row sigma/cfg", {}, 2, 48, True, torch.bfloat16),
        ("L % 128 != 0 (landmark_max 200)", {"landmark_max": 200}, 1, 64, False, torch.bfloat16),
        ("adaptive alpha, B=2", {"adaptive_alpha": True}, 2, 64, False, torch.bfloat16),
        ("shared_qk, fp16", {"shared_qk": True}, 1, 64, False, torch.float16),
        ("16k+ tokens: gathered landmarks, MLP first", {}, 1, 128, True, torch.bfloat16),
        ("feature_dim 128 (hidden 256, chunked MLP)", {"feature_dim": 128}, 1, 64, False, torch.bfloat16),
    ]
    h, d = args.heads, cfg.head_dim
    for name, kw, b, side, strided, dt in cases:
        c = dataclasses.replace(cfg, **kw)
        torch.manual_seed(args.seed)
        layer = perturb(HKRLayer(c, num_heads=h), args.seed).to(dev).eval()
        n = args.n_cond + side * side
        g = torch.Generator(device=dev).manual_seed(args.seed + 7)
        if strided:
            q, k, v = (torch.randn(b, n, h, d, generator=g, device=dev).to(dt).transpose(1, 2) for _ in range(3))
        else:
            q, k, v = (torch.randn(b, h, n, d, generator=g, device=dev).to(dt) for _ in range(3))
        sig = torch.linspace(0.2, 0.9, b, device=dev)
        cf = torch.linspace(1.0, 4.0, b, device=dev)
        with torch.inference_mode():
            reason = fast_path.fast_path_reason(layer, q, k, v)
            out = layer(q, k, v, args.n_cond, sig, cf, height=side, width=side)
            c.fast_path = False
            ref = layer(q.float(), k.float(), v.float(), args.n_cond, sig, cf, height=side, width=side)
            c.fast_path = True
        print(f"  check {name:<45} fast={reason is None} rel_err={rel_err(out, ref):.2e}", flush=True)


def host_us(fn, calls: int = 50) -> float:
    """Host time of one call (microseconds): ``calls`` back-to-back calls without synchronising (the
    launch queue absorbs them), i.e. the rate at which Python can issue the layer."""
    import time

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return round((t1 - t0) / calls * 1e6, 1)


def cpu_profile(fn, calls: int = 200) -> None:
    import cProfile
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(18)


def profile(fn, calls: int = 20) -> dict[str, float]:
    """Mean GPU time per call of each kernel (microseconds), from torch.profiler over ``calls`` calls."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    fn()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in p.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if t:
            out[e.key[:60]] = round(t / calls, 1)
    print("  kernels (us/call):", json.dumps(out), flush=True)
    return out


def sweep(layer, q, k, v, args, side, sigma) -> list[dict]:
    """Time launch-shape variants of the fused path (same inputs); checks each against the default."""
    base = fast_path.KERNEL
    grid = []
    for kw in [{}, {"mlp_first_min_tokens": 0}, {"mlp_first_min_tokens": 1 << 40}, {"fused": False}]:
        grid.append(dataclasses.replace(base, **kw))
    ref = fast_path.fast_forward(layer, q, k, v, args.n_cond, sigma, 3.5, height=side, width=side).float()
    res = []
    for kc in grid:
        fast_path.LAST_LAUNCH.clear()
        try:
            f = lambda: fast_path.fast_forward(layer, q, k, v, args.n_cond, sigma, 3.5, height=side,  # noqa: E731
                                              width=side, kernel=kc)
            o = f()
            e = rel_err(o, ref)
            t = median_ms(f, 50, 200)
        except Exception as exc:  # a shape the compiler rejects (e.g. out of shared memory) is reported, not fatal
            t, e = float("nan"), repr(exc)[:120]
        d = {k: getattr(kc, k) for k in ("block_n", "programs_per_sm", "key_warps", "key_stages", "block_m",
                                          "block_l", "query_warps", "query_stages", "fast_math",
                                          "gather_min_tokens", "fused", "exp16", "mlp_first_min_tokens")}
        d["regs_spills"] = {n: (getattr(ck, "n_regs", None), getattr(ck, "n_spills", None))
                            for n, ck in fast_path.LAST_LAUNCH.items()}
        d.update(ms=t, diff_vs_default=e, host_us=host_us(f) if t == t else None)
        print("  sweep", json.dumps(d), flush=True)
        res.append(d)
    return res


if __name__ == "__main__":
    main()
