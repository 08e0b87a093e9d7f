"""Sampling time inside the real ComfyUI with and without the Flux2TTRController patch (CPU by default).

The tiny teacher of params.yaml loaded by ComfyUI's UNETLoader; students of params.yaml's hkr section
(mode as configured, or --mode; random init: the timing does not depend on the weights), every single
block ready, no controller and quality_speed 1, so every ready layer runs its student at every step.
Sampling is ComfyUI's own KSampler path (nodes.common_ksampler, euler, simple, cfg 1) on a fixed
conditioning.

Per size: --warmup untimed samplings of each variant first (the first call pays one-off costs: allocator
growth, kernel selection, the students' device copies; a first-run ratio is not a speed figure), then
--repeats timed samplings of each, alternating native and patched. Printed: median and min-max seconds
per sampling run, and patched/native (< 1 means the patch is faster) from the medians, with the min-max of
the per-repeat ratios; a warning names the sizes where the repeats of one variant differ by more than 1.5x
(a busy machine: no ratio can be read there).

    python benchmarks/bench_comfy.py --comfyui /path/to/ComfyUI [--px 256 512 1024] [--steps 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from timing import NOISY, noisy, spread  # benchmarks/timing.py (the scripts' folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the shared ComfyUI harness (helpers.comfy)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_PATH") or None,
                    help="the ComfyUI tree to run (the folder holding main.py); default: $COMFYUI_PATH. Nothing is "
                         "written into it: models and outputs go to a temp folder")
    ap.add_argument("--px", type=int, nargs="+", default=[256, 512, 1024],
                    help="image sizes in pixels, multiples of 16 (latent grid = px/16 squared; default: 256 512 1024)")
    ap.add_argument("--steps", type=int, default=4, help="sampling steps per run (default: 4)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each variant per size (default: 1)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each variant per size (default: 5)")
    ap.add_argument("--mode", choices=["hkr", "window"], default=None,
                    help="student mode (default: params.yaml hkr.mode)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--gpu", action="store_true", help="run ComfyUI on the GPU (no --cpu flag)")
    args = ap.parse_args(argv)
    if args.comfyui is None:
        ap.error("no ComfyUI tree: pass --comfyui PATH or set COMFYUI_PATH")
    if args.warmup < 1 or args.repeats < 1 or args.steps < 1:
        ap.error("--warmup, --repeats and --steps must be at least 1")
    if any(px < 16 or px % 16 for px in args.px):
        ap.error("--px values must be positive multiples of 16")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["COMFYUI_PATH"] = str(args.comfyui.expanduser().resolve())
    import torch

    from helpers import comfy as comfy_harness

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_comfy_"))
    comfy = comfy_harness.start_comfy(tmp / "comfy", gpu=args.gpu)
    teacher = comfy_harness.tiny_teacher_file(tmp)
    name = comfy.add_model_file("diffusion_models", teacher.path)

    import comfy.utils as comfy_utils
    import nodes

    from flux2ttr.comfy import patch as comfy_patch
    from flux2ttr.config import load_section
    from flux2ttr.students.artifacts import save_students
    from flux2ttr.students.build import build_student
    from flux2ttr.students.hkr import HKRConfig

    comfy_utils.set_progress_bar_enabled(False)
    hkr = load_section(HKRConfig, "hkr", REPO / "params.yaml")
    if args.mode:
        hkr = dataclasses.replace(hkr, mode=args.mode)
    singles = [k for k in teacher.layer_keys if k.startswith("single_blocks.")]
    torch.manual_seed(0)
    students = tmp / "students.safetensors"
    save_students(students, {k: build_student(hkr, num_heads=teacher.num_heads) for k in singles}, hkr,
                  num_heads=teacher.num_heads, ready={k: True for k in singles}, metrics={}, train_config={},
                  teacher={"kind": "tiny"})
    model = nodes.UNETLoader().load_unet(name, "default")[0]
    patched = comfy_patch.controller_node(model, students, None, quality_speed=1.0, policy_mode="threshold", seed=0)
    cond = [[torch.randn(1, 8, teacher.config.joint_attention_dim, generator=torch.Generator().manual_seed(0)),
             {"guidance": 4.0}]]

    def sample(m, px: int) -> float:
        lat = {"samples": torch.zeros(1, 128, px // 16, px // 16)}
        t0 = time.perf_counter()
        with torch.inference_mode():  # as ComfyUI's executor runs every node
            nodes.common_ksampler(m, 0, args.steps, 1.0, "euler", "simple", cond, cond, lat, disable_noise=False)
        return time.perf_counter() - t0

    device = "cuda" if args.gpu else "cpu"
    print(f"ComfyUI {args.comfyui} on {device}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.steps} steps; {len(singles)} of {len(teacher.layer_keys)} layers routed (every step), "
          f"student mode {hkr.mode}, feature_dim {hkr.feature_dim}; {args.warmup} warm-up + {args.repeats} timed runs "
          "of each variant per size, alternating")
    print("seconds per sampling run, median (min-max); patched/native time: < 1 means the patch is faster\n")
    print("| px | tokens (text + image) | native s | patched s | patched/native (per-repeat min-max) |")
    print("| --- | --- | --- | --- | --- |")
    busy = []
    for px in args.px:
        for _ in range(args.warmup):
            sample(model, px)
            sample(patched, px)
        nat, pat = [], []
        for _ in range(args.repeats):
            nat.append(sample(model, px))
            pat.append(sample(patched, px))
        ratios = [p / n for p, n in zip(pat, nat)]
        ratio = statistics.median(pat) / statistics.median(nat)
        print(f"| {px} | 512 + {(px // 16) ** 2} | {spread(nat)} | {spread(pat)} | {ratio:.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}) |", flush=True)
        if noisy(nat, pat):
            busy.append(px)
    if busy:
        print(f"\nwarning: at {', '.join(map(str, busy))} px the repeats of one variant differ by more than {NOISY}x "
              "(max/min): the machine was busy and those ratios are not measurements; rerun on an idle machine or "
              "with more --repeats")
    runs = comfy_patch.last_runs()
    if runs and not any(r == "student" for (_, _, r) in runs[-1].routed_calls):
        print("warning: the last patched run routed no layer to a student")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
