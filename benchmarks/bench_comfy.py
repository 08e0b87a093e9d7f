"""Sampling time inside the real ComfyUI with and without the Flux2TTRController patch (CPU by default).

The tiny teacher of params.yaml, students built from params.yaml's ``hkr`` section (random init: the
timing does not depend on the weights), every single block ready, no controller (quality_speed 1 routes
all ready layers). KSampler (euler, simple) through ``nodes.common_ksampler``; median of ``--repeats``.

    python benchmarks/bench_comfy.py [--px 256 512 1024] [--steps 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the shared test helpers (helpers.comfy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--px", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from helpers import comfy as comfy_harness

    tmp = Path(tempfile.mkdtemp(prefix="bench_comfy_"))
    comfy = comfy_harness.start_comfy(tmp / "comfy")
    teacher = comfy_harness.tiny_teacher_file(tmp)
    name = comfy.add_model_file("diffusion_models", teacher.path)

    import nodes

    from flux2ttr.comfy import patch as comfy_patch
    from flux2ttr.config import load_section
    from flux2ttr.students.artifacts import save_students
    from flux2ttr.students.hkr import HKRConfig, HKRLayer

    hkr = load_section(HKRConfig, "hkr", REPO / "params.yaml")
    singles = [k for k in teacher.layer_keys if k.startswith("single_blocks.")]
    torch.manual_seed(0)
    students = tmp / "students.safetensors"
    save_students(students, {k: HKRLayer(hkr, num_heads=teacher.num_heads) for k in singles}, hkr,
                  num_heads=teacher.num_heads, ready={k: True for k in singles}, metrics={}, train_config={},
                  teacher={"kind": "tiny"})
    model = nodes.UNETLoader().load_unet(name, "default")[0]
    patched = comfy_patch.controller_node(model, students, None, quality_speed=1.0, policy_mode="threshold", seed=0)
    cond = [[torch.randn(1, 8, teacher.config.joint_attention_dim, generator=torch.Generator().manual_seed(0)),
             {"guidance": 4.0}]]

    def sample(m, px: int) -> float:
        lat = {"samples": torch.zeros(1, 128, px // 16, px // 16)}
        t0 = time.perf_counter()
        nodes.common_ksampler(m, 0, args.steps, 1.0, "euler", "simple", cond, cond, lat, disable_noise=False)
        return time.perf_counter() - t0

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.steps} steps, "
          f"{len(singles)} of {len(teacher.layer_keys)} layers routed, hkr feature_dim {hkr.feature_dim}")
    print("| px | tokens (text + image) | native s | patched s | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for px in args.px:
        sample(model, px), sample(patched, px)  # warm-up
        nat = statistics.median(sample(model, px) for _ in range(args.repeats))
        pat = statistics.median(sample(patched, px) for _ in range(args.repeats))
        n_img = (px // 16) ** 2
        print(f"| {px} | 512 + {n_img} | {nat:.3f} | {pat:.3f} | {pat / nat:.2f} |")


if __name__ == "__main__":
    main()
