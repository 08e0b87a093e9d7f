"""Offline numbers hold online: per-layer cosine between student and native attention measured inside
the real ComfyUI while it samples the pipeline's teacher, next to the artifact's validation figure; and
what a user sees: the final latent of the routed run (``quality_speed`` 1, every ready layer on its
student) against the native run's, as a share of its norm.

Run from a project folder where the pipeline has produced ``teachers/tiny`` and
``artifacts/flux2_ttr.safetensors`` (``dvc repro distill``):

    python benchmarks/comfy_online_cosine.py [--root .] [--prompts 4]

Sampling uses ComfyUI's KSampler (euler, simple) with the sampler section's steps, size and guidance
and the teacher's own prompt encoder for the capture prompts; the patch runs in measurement mode
(``measure=True``), so sampling stays native while every student layer is evaluated on the same q, k, v.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the shared test helpers (helpers.comfy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."), help="project folder holding the pipeline outputs")
    ap.add_argument("--prompts", type=int, default=4, help="capture prompts to sample")
    args = ap.parse_args()
    root = args.root.resolve()

    import torch

    from helpers import comfy as comfy_harness

    comfy = comfy_harness.start_comfy(Path(tempfile.mkdtemp(prefix="comfy_cosine_")))
    from flux2ttr.config import load_section
    from flux2ttr.distill.trainer import DistillConfig
    from flux2ttr.teachers.sampler import SamplerConfig
    from flux2ttr.teachers.teacher import SINGLE_FILE_NAME, TeacherConfig, load_tiny_teacher
    from flux2ttr.traces.capture import CaptureConfig

    params = root / "params.yaml"
    tcfg = load_section(TeacherConfig, "teacher", params)
    scfg = load_section(SamplerConfig, "sampler", params)
    ccfg = load_section(CaptureConfig, "capture", params)
    dcfg = load_section(DistillConfig, "distill", params)
    folder = root / tcfg.out_dir
    name = comfy.add_model_file("diffusion_models", folder / SINGLE_FILE_NAME)

    import nodes

    from flux2ttr.comfy import patch as comfy_patch
    from flux2ttr.students.artifacts import load_students

    art = load_students(root / dcfg.artifact)
    teacher = load_tiny_teacher(tcfg, folder)
    prompts = json.loads((root / ccfg.prompts).read_text())[: args.prompts]
    model = nodes.UNETLoader().load_unet(name, "default")[0]
    patched = comfy_patch.controller_node(model, art.path, None, quality_speed=1.0, policy_mode="threshold", seed=0,
                                          measure=True)
    online: dict[str, list[float]] = {}
    for i, prompt in enumerate(prompts):
        cond = [[teacher.encode_prompts([prompt]), {"guidance": scfg.guidance}]]
        lat = {"samples": torch.zeros(1, 128, scfg.height // 16, scfg.width // 16)}
        nodes.common_ksampler(patched, scfg.seed + i, scfg.steps, 1.0, "euler", "simple", cond, cond, lat)
        for key, (value, _) in comfy_patch.online_vs_offline(comfy_patch.last_runs()[-1], art.metrics).items():
            online.setdefault(key, []).append(value)
    routed = comfy_patch.controller_node(model, art.path, None, quality_speed=1.0, policy_mode="threshold", seed=0)
    drift = []
    for i, prompt in enumerate(prompts):
        cond = [[teacher.encode_prompts([prompt]), {"guidance": scfg.guidance}]]
        lat = {"samples": torch.zeros(1, 128, scfg.height // 16, scfg.width // 16)}
        native = nodes.common_ksampler(model, scfg.seed + i, scfg.steps, 1.0, "euler", "simple", cond, cond, lat)
        student = nodes.common_ksampler(routed, scfg.seed + i, scfg.steps, 1.0, "euler", "simple", cond, cond, lat)
        a, b = native[0]["samples"].double(), student[0]["samples"].double()
        drift.append(float((b - a).norm() / a.norm()))
    print(f"{len(prompts)} prompts x {scfg.steps} steps, {scfg.width}x{scfg.height} px, guidance {scfg.guidance}")
    print(f"final latent, routed (quality_speed 1, {sum(art.ready.values())} ready layers) vs native: "
          f"{100 * sum(drift) / len(drift):.2f}% of its norm on average (per prompt: "
          f"{', '.join(f'{100 * d:.2f}%' for d in drift)})")
    print(f"| layer | ready | offline {comfy_patch.OFFLINE_COSINE_METRIC} | online cosine (ComfyUI) | online - offline |")
    print("| --- | --- | --- | --- | --- |")
    for key, values in online.items():
        on = sum(values) / len(values)
        off = art.metrics.get(key, {}).get(comfy_patch.OFFLINE_COSINE_METRIC)
        off_s, diff = ("-", "-") if off is None else (f"{off:.4f}", f"{on - off:+.4f}")
        print(f"| {key} | {art.ready.get(key, False)} | {off_s} | {on:.4f} | {diff} |")


if __name__ == "__main__":
    main()
