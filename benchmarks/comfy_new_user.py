"""The new-user path, end to end: `flux2ttr comfy-install` into a copy of ComfyUI, then the shipped
example workflow (UNETLoader -> Flux2TTRController -> KSampler) run through ComfyUI's own executor on
the tiny teacher with the pipeline's own artifacts; prints the routed layers per step and the sampling
time with and without the patch.

Run from a project folder where `dvc repro` has produced ``teachers/tiny`` and ``artifacts/``:

    COMFYUI_PATH=../shared/ComfyUI python benchmarks/comfy_new_user.py [--root .] [--px 256] [--steps 6]

No text encoder exists here, so the harness's test conditioning node stands in for CLIPTextEncode and
the VAE/SaveImage nodes are dropped (what cannot run on this machine); everything else is the workflow.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the shared test helpers (helpers.comfy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."), help="project folder holding the pipeline outputs")
    ap.add_argument("--px", type=int, default=256, help="image size in pixels (latent grid = px / 16)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--quality-speed", type=float, default=0.5)
    ap.add_argument("--policy", default="threshold", choices=["threshold", "stochastic"])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    root = args.root.resolve()

    from helpers import comfy as comfy_harness

    src = comfy_harness.comfyui_path()
    work = Path(tempfile.mkdtemp(prefix="flux2ttr_new_user_"))
    comfy_dir = work / "ComfyUI"
    shutil.copytree(src, comfy_dir, symlinks=True)
    print(f"ComfyUI copy: {comfy_dir} (from {src})")
    install = subprocess.run([sys.executable, "-m", "flux2ttr.cli", "comfy-install", str(comfy_dir),
                              "--artifacts", str(root / "artifacts"), "--no-pip"],  # this process already has flux2ttr
                             capture_output=True, text=True, check=True)
    print(install.stdout.strip())

    os.environ["COMFYUI_PATH"] = str(comfy_dir)
    comfy = comfy_harness.start_comfy(comfy_dir)
    assert comfy_harness.load_pack(comfy, comfy_dir / "custom_nodes" / "flux2ttr"), "pack failed to load"
    unet = comfy.add_model_file("diffusion_models", root / "teachers" / "tiny" / "flux2_tiny.safetensors")

    from flux2ttr.comfy import patch as comfy_patch

    ui = json.loads((comfy_dir / "custom_nodes" / "flux2ttr" / "example_workflows" /
                     "flux2ttr_controller.json").read_text())
    prompt = comfy_harness.ui_to_api(comfy, ui)
    by_type = {n["class_type"]: nid for nid, n in prompt.items()}
    for t in ("CLIPLoader", "VAELoader", "VAEDecode", "SaveImage"):
        del prompt[by_type[t]]
    prompt[by_type["CLIPTextEncode"]] = {"class_type": comfy_harness.TEST_COND_NODE,
                                         "inputs": {"tokens": 8, "dim": 64, "seed": 1, "guidance": 0.0}}
    prompt[by_type["UNETLoader"]]["inputs"]["unet_name"] = unet
    prompt[by_type["EmptyFlux2LatentImage"]]["inputs"].update(width=args.px, height=args.px)
    prompt[by_type["KSampler"]]["inputs"]["steps"] = args.steps
    prompt[by_type["Flux2TTRController"]]["inputs"].update(
        student_artifact="flux2_ttr.safetensors", controller_artifact="flux2_ttr_controller.safetensors",
        quality_speed=args.quality_speed, policy_mode=args.policy)
    prompt["99"] = {"class_type": comfy_harness.TEST_CAPTURE_NODE,
                    "inputs": {"key": "latent", "value": [by_type["KSampler"], 0]}}
    native = json.loads(json.dumps(prompt))
    native[by_type["KSampler"]]["inputs"]["model"] = [by_type["UNETLoader"], 0]
    del native[by_type["Flux2TTRController"]]

    times: dict[str, list[float]] = {"native": [], "patched": []}
    for _ in range(args.repeats):
        for name, p in (("native", native), ("patched", prompt)):
            t0 = time.perf_counter()
            res = comfy.run(p)
            times[name].append(time.perf_counter() - t0)
            assert res.success, res.status_messages
    holder = comfy_patch.last_runs()[-1]
    per_step: dict[int, set[str]] = {}
    for step, key, route in holder.routed_calls:
        if route == "student":
            per_step.setdefault(step, set()).add(key)
    print(f"\n{args.px}px, {args.steps} steps, policy {args.policy}, quality_speed {args.quality_speed}")
    for step in range(args.steps):
        print(f"  step {step}: students on {sorted(per_step.get(step, set())) or '-'}")
    nat, pat = min(times["native"]), min(times["patched"])
    print(f"\n| workflow | best of {args.repeats} (s) |\n| --- | --- |\n| native | {nat:.2f} |\n"
          f"| patched | {pat:.2f} |\n| ratio | {pat / nat:.2f}x |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
