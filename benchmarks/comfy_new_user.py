"""The new-user path, end to end: `flux2ttr comfy-install` into a copy of the ComfyUI you name, then the
pack's tiny example workflow as shipped, run through ComfyUI's own executor, with and without the patch.

What it does:
  1. copies the ComfyUI tree (--comfyui, default $COMFYUI_PATH) into a temp folder and runs
     `flux2ttr comfy-install COPY --artifacts ROOT/artifacts --teacher ROOT/teachers/tiny --no-pip`
     (this Python already has flux2ttr, so the pip step is skipped);
  2. starts that copy headless on CPU, loads the installed pack from COPY/custom_nodes/flux2ttr and opens
     its example_workflows/flux2ttr_tiny_cpu.json as the frontend would (UNETLoader -> Flux2TTRController ->
     KSampler, Flux2TTRTinyTextEncode, Flux2TTRTinyDecode -> SaveImage): nothing is stood in or dropped;
  3. queues it (patched) and the same graph with the controller bypassed (native), each on an executor of
     its own (its own node cache, as a user's ComfyUI keeps between queues): the first queue of each is a
     warm-up (model and artifact loading, first-call costs; printed, never used as a speed figure), then
     --repeats queues of each, alternating native and patched, with a new KSampler seed per repeat so
     sampling, decode and save run again while the cached loaders do not;
  4. prints the routed layers per step, the saved image, and the median and min-max time per queued prompt,
     and patched/native (< 1 means the patch is faster), with a warning when the repeats
     of one variant differ by more than 1.5x (a busy machine: no ratio can be read then).

Run from a project folder where `dvc repro` has produced teachers/tiny and artifacts/:

    python benchmarks/comfy_new_user.py --comfyui /path/to/ComfyUI [--root .] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from timing import NOISY, noisy, spread  # benchmarks/timing.py (the scripts' folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the shared ComfyUI harness (helpers.comfy)
WORKFLOW = "flux2ttr_tiny_cpu.json"


class _Server:
    """What PromptExecutor needs of ComfyUI's server (no client)."""

    client_id = None
    last_node_id = None

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_PATH") or None,
                    help="the ComfyUI tree to copy and run (the folder holding main.py); default: $COMFYUI_PATH")
    ap.add_argument("--root", type=Path, default=Path("."),
                    help="project folder holding the pipeline outputs teachers/tiny and artifacts/ (default: .)")
    ap.add_argument("--px", type=int, default=None,
                    help="image width and height in pixels, a multiple of 16 (default: the workflow's, 256)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the workflow's, 6)")
    ap.add_argument("--quality-speed", type=float, default=None,
                    help="Flux2TTRController quality_speed, 0 = native .. 1 = fastest (default: the workflow's, 0.5)")
    ap.add_argument("--policy", choices=["threshold", "stochastic"], default=None,
                    help="Flux2TTRController policy_mode (default: the workflow's, threshold)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed queues of each variant before timing (default: 1; at least 1)")
    ap.add_argument("--repeats", type=int, default=5, help="timed queues of each variant (default: 5)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--keep", action="store_true", help="keep the temp ComfyUI copy (its output/ holds the images)")
    args = ap.parse_args(argv)
    if args.comfyui is None:
        ap.error("no ComfyUI tree: pass --comfyui PATH or set COMFYUI_PATH")
    if args.warmup < 1 or args.repeats < 1:
        ap.error("--warmup and --repeats must be at least 1")
    if args.px is not None and (args.px < 16 or args.px % 16):
        ap.error("--px must be a positive multiple of 16")
    return args


def _skip_user_folders(src: Path):  # noqa: ANN202 - a shutil.copytree ignore callable
    """Copy the code, not the user's models, custom nodes, outputs or settings (top level only)."""
    top = {"custom_nodes", "models", "output", "input", "user", "temp"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__"}
        return skip | (top & set(names) if Path(folder) == src else set())

    return ignore


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    src = args.comfyui.expanduser().resolve()
    root = args.root.resolve()
    os.environ["COMFYUI_PATH"] = str(src)  # the harness checks the tree is a ComfyUI
    from helpers import comfy as comfy_harness

    comfy_harness.comfyui_path()
    work = Path(tempfile.mkdtemp(prefix="flux2ttr_new_user_"))
    comfy_dir = work / "ComfyUI"
    shutil.copytree(src, comfy_dir, symlinks=True, ignore=_skip_user_folders(src))
    print(f"ComfyUI copy: {comfy_dir} (from {src})")
    install = subprocess.run([sys.executable, "-m", "flux2ttr.cli", "comfy-install", str(comfy_dir),
                              "--artifacts", str(root / "artifacts"), "--teacher", str(root / "teachers" / "tiny"),
                              "--no-pip"], capture_output=True, text=True)
    print(install.stdout.strip())
    if install.returncode != 0:
        sys.exit(f"comfy-install failed:\n{install.stderr}")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["COMFYUI_PATH"] = str(comfy_dir)
    comfy = comfy_harness.start_comfy(comfy_dir)  # base directory = the copy: its models/ is what install filled
    pack = comfy_dir / "custom_nodes" / "flux2ttr"
    if not comfy_harness.load_pack(comfy, pack):
        sys.exit(f"the installed pack at {pack} failed to load (see the log above)")
    import comfy.utils as comfy_utils

    from flux2ttr.comfy import patch as comfy_patch

    comfy_utils.set_progress_bar_enabled(False)  # no per-step bars between the results
    ui = json.loads((pack / "example_workflows" / WORKFLOW).read_text())
    prompt = comfy_harness.ui_to_api(comfy, ui)
    by_type = {n["class_type"]: nid for nid, n in prompt.items()}
    ks, ctrl, latent = by_type["KSampler"], by_type["Flux2TTRController"], by_type["EmptyFlux2LatentImage"]
    if args.px:
        prompt[latent]["inputs"].update(width=args.px, height=args.px)
    if args.steps:
        prompt[ks]["inputs"]["steps"] = args.steps
    if args.quality_speed is not None:
        prompt[ctrl]["inputs"]["quality_speed"] = args.quality_speed
    if args.policy:
        prompt[ctrl]["inputs"]["policy_mode"] = args.policy
    native = json.loads(json.dumps(prompt))
    native[ks]["inputs"]["model"] = prompt[ctrl]["inputs"]["model"]
    del native[ctrl]
    for p, prefix in ((native, "native"), (prompt, "patched")):
        for node in p.values():
            if node["class_type"] == "SaveImage":
                node["inputs"]["filename_prefix"] = f"flux2ttr_new_user_{prefix}"
    outputs = [nid for nid, n in prompt.items() if n["class_type"] in ("SaveImage", "PreviewImage")]
    px = prompt[latent]["inputs"]["width"]
    steps = prompt[ks]["inputs"]["steps"]
    c = prompt[ctrl]["inputs"]

    execution = comfy.modules["execution"]
    # one executor (and so one node cache) per variant, as two users' ComfyUIs would have: each keeps its
    # loaded model and controller between its queues
    executors = {id(p): execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
                 for p in (native, prompt)}

    def queue(p: dict, seed: int) -> float:
        p[ks]["inputs"]["seed"] = seed
        executor = executors[id(p)]
        t0 = time.perf_counter()
        executor.execute(p, str(uuid.uuid4()), {}, outputs)
        dt = time.perf_counter() - t0
        if not executor.success:
            errors = [d for e, d in executor.status_messages if e == "execution_error"]
            sys.exit(f"the workflow failed: {errors}")
        return dt

    cold = {"native": queue(native, 0), "patched": queue(prompt, 0)}
    for i in range(1, args.warmup):
        queue(native, i)
        queue(prompt, i)
    times: dict[str, list[float]] = {"native": [], "patched": []}
    for r in range(args.repeats):
        seed = 1000 + r
        times["native"].append(queue(native, seed))
        times["patched"].append(queue(prompt, seed))
    holder = comfy_patch.last_runs()[-1]

    print(f"\nworkflow {WORKFLOW}: {px}x{px} px, {steps} steps, policy {c['policy_mode']}, "
          f"quality_speed {c['quality_speed']}, students {c['student_artifact']}, controller "
          f"{c['controller_artifact']}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    per_step: dict[int, set[str]] = {}
    for (step, key, route), n in holder.routed_calls.items():
        if route == "student" and n:
            per_step.setdefault(step, set()).add(key)
    for step in range(steps):
        print(f"  step {step}: students on {', '.join(sorted(per_step.get(step, set()))) or '-'}")
    images = sorted((comfy_dir / "output").glob("flux2ttr_new_user_patched*.png"))
    if images:
        import numpy as np
        from PIL import Image

        arr = np.asarray(Image.open(images[-1]).convert("L"), dtype=np.float32)
        print(f"  last image: {images[-1]} ({arr.shape[1]}x{arr.shape[0]}, grey mean {arr.mean():.1f}, "
              f"std {arr.std():.1f} of 255)")

    nat, pat = times["native"], times["patched"]
    pair = [p / n for p, n in zip(pat, nat)]
    print(f"\ncold first queue (loads the model and artifacts; not a speed figure): native {cold['native']:.2f} s, "
          f"patched {cold['patched']:.2f} s")
    print(f"\ntime per queued prompt after {args.warmup} warm-up queue(s), {args.repeats} repeats, "
          "median (min-max):")
    print("| variant | seconds |\n| --- | --- |")
    print(f"| native | {spread(nat)} |\n| patched | {spread(pat)} |")
    print(f"| patched/native time (< 1 = patch faster) | {statistics.median(pat) / statistics.median(nat):.2f} "
          f"(per-repeat {min(pair):.2f}-{max(pair):.2f}) |")
    if noisy(nat, pat):
        print(f"\nwarning: repeats of one variant differ by more than {NOISY}x (max/min): the machine was busy and "
              "the ratio above is not a measurement; rerun on an idle machine or with more --repeats")
    if args.keep:
        print(f"\nkept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
