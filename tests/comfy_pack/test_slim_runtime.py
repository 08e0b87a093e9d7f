"""The ComfyUI runtime needs only the core dependencies (torch, safetensors, numpy).

Each check runs in a fresh Python process (this file run as a script) whose first act is to put a
``sys.meta_path`` finder in front that makes the pipeline's packages unimportable, as if ComfyUI's
Python had only ``pip install flux2ttr`` (no extras):

- ``comfyui``: ComfyUI starts headless on CPU, loads the pack through its own ``nodes.load_custom_node``,
  and runs UNETLoader -> Flux2TTRController (student + controller artifacts) -> KSampler through its
  executor; the patched MODEL carries our attention override and students ran.
- ``core``: without ComfyUI, also blocking what ComfyUI itself brings (pyyaml, tqdm, Pillow): every
  module the node reaches imports and both artifacts load.
- ``cli``: the ``flux2ttr`` console script without click prints one line naming the extra.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
TESTS = HERE.parents[1]
REPO = HERE.parents[2]

# Pipeline-only packages (import names) that ComfyUI 0.33.0 itself never imports: blocked in every check.
# The optional quality/judge extras are blocked too: the node must not reach them either.
BLOCKED = ("dvc", "zarr", "comet_ml", "diffusers", "click", "matplotlib",
           "lpips", "google.genai", "dreamsim", "pyiqa", "hpsv2")
# In the pipeline extra but also required by ComfyUI (its requirements.txt): blocked where ComfyUI is absent.
COMFYUI_PROVIDED = ("yaml", "tqdm", "PIL")
# Every flux2ttr module the node pack reaches (comfy_nodes -> flux2ttr.comfy.* and their lazy imports).
CORE_MODULES = (
    "flux2ttr.comfy.patch", "flux2ttr.comfy.utility_nodes", "flux2ttr.comfy.install",
    "flux2ttr.students.artifacts", "flux2ttr.students.hkr", "flux2ttr.students.fast_path",
    "flux2ttr.students.landmarks", "flux2ttr.routing.controller", "flux2ttr.checkpoint", "flux2ttr.config",
    "flux2ttr.contract", "flux2ttr.seeds", "flux2ttr.atomic", "flux2ttr.comfy.tiny_nodes", "flux2ttr.teachers.teacher",
    "flux2ttr.students.window", "flux2ttr.students.window_fast", "flux2ttr.students.build", "flux2ttr.versioned_file",
    "flux2ttr.teachers.trained", "flux2ttr.teachers.caption_encoder", "flux2ttr.teachers.latent_map",
)
CHILD_TIMEOUT_S = 240
CLI_MESSAGE = ('flux2ttr: the command line needs the pipeline extra (click is not installed): '
               'pip install "flux2ttr[pipeline]"')


class _Blocker(importlib.abc.MetaPathFinder):
    """Makes ``names`` (and their submodules) fail to import, recording who tried."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.attempts: list[str] = []

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201 - importlib protocol
        if any(fullname == n or fullname.startswith(n + ".") for n in self.names):
            self.attempts.append(fullname)
            raise ModuleNotFoundError(f"No module named '{fullname}' (blocked: not a core dependency)", name=fullname)
        return None


def _loaded(names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in sys.modules if any(m == n or m.startswith(n + ".") for n in names))


# --------------------------------------------------------------------------------------------------
# the child process


def _child_comfyui(args: dict, blocker: _Blocker) -> dict:
    sys.path.insert(0, str(TESTS))
    from helpers import comfy as harness

    original = harness.install_placeholders

    def placeholders() -> list[str]:
        # The harness imports diffusers first (it probes optional packages); here diffusers is blocked and
        # never probes, so an empty module answers that one import and is taken away again.
        sys.modules["diffusers"] = types.ModuleType("diffusers")
        try:
            return original()
        finally:
            del sys.modules["diffusers"]

    harness.install_placeholders = placeholders
    t0 = time.perf_counter()
    comfy = harness.start_comfy(Path(args["base"]))
    t_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = harness.load_pack(comfy)
    t_load = time.perf_counter() - t0
    mappings = comfy.nodes.NODE_CLASS_MAPPINGS
    out = {"loaded": loaded, "nodes": sorted(n for n in ("Flux2TTRController", "RandomSeedBatch", "Combinations",
                                                         "ClockedSweepValues", "LoadPromptListFromJSON")
                                             if n in mappings)}
    if not loaded:
        return out
    unet = comfy.add_model_file("diffusion_models", Path(args["teacher"]))
    student = comfy.add_model_file("approximate_attention", Path(args["student"]))
    controller = comfy.add_model_file("approximate_attention", Path(args["controller"]))
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": {"class_type": harness.TEST_COND_NODE, "inputs": {"tokens": 8, "dim": 64, "seed": 1, "guidance": 4.0}},
        "3": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "4": {"class_type": "Flux2TTRController", "inputs": {
            "model": ["1", 0], "student_artifact": student, "controller_artifact": controller,
            "quality_speed": 1.0, "policy_mode": "threshold", "seed": 0}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 7, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0], "denoise": 1.0}},
        "6": {"class_type": harness.TEST_CAPTURE_NODE, "inputs": {"key": "latent", "value": ["5", 0]}},
        "7": {"class_type": harness.TEST_CAPTURE_NODE, "inputs": {"key": "model", "value": ["4", 0]}},
    }
    t0 = time.perf_counter()
    res = comfy.run(prompt)
    t_run = time.perf_counter() - t0
    out.update(success=res.success, error=res.error(), t_start=t_start, t_load=t_load, t_run=t_run)
    if not res.success:
        return out
    from flux2ttr.comfy import patch as comfy_patch

    topts = res.captured["model"][0].model_options["transformer_options"]
    holder = comfy_patch.last_runs()[-1]
    out.update(
        override_is_ours=topts.get("optimized_attention_override") is comfy_patch.attention_override,
        holder_in_options=isinstance(topts.get(comfy_patch.HOLDER_KEY), comfy_patch.RoutingHolder),
        student_calls=sum(n for (_, _, route), n in holder.routed_calls.items() if route == "student"),
        latent_finite=bool(res.captured["latent"][0]["samples"].isfinite().all()),
    )
    return out


def _child_core(args: dict, blocker: _Blocker) -> dict:
    import importlib

    for name in CORE_MODULES:
        importlib.import_module(name)
    from flux2ttr.routing.controller import load_controller
    from flux2ttr.students.artifacts import load_students

    art = load_students(args["student"])
    ctrl, order = load_controller(args["controller"])
    return {"layers": sorted(art.layers), "controller": type(ctrl).__name__, "order": order}


def _child(mode: str, args: dict) -> None:
    blocked = BLOCKED + (COMFYUI_PROVIDED if mode == "core" else ())
    blocker = _Blocker(blocked)
    sys.meta_path.insert(0, blocker)
    if mode == "cli":  # what the console script does: import, then call main()
        from flux2ttr.cli import main

        sys.exit(main())
    out = _child_comfyui(args, blocker) if mode == "comfyui" else _child_core(args, blocker)
    out["blocked_loaded"] = _loaded(blocked)
    out["blocked_attempts"] = sorted(set(blocker.attempts))
    out["flux2ttr_loaded"] = sorted(m for m in sys.modules if m.startswith("flux2ttr"))
    print("RESULT " + json.dumps(out, default=str), flush=True)


# --------------------------------------------------------------------------------------------------
# the tests (parent side)


def _run_child(mode: str, args: dict) -> tuple[subprocess.CompletedProcess, dict | None, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE), mode, json.dumps(args)], capture_output=True, text=True,
                          env=env, timeout=CHILD_TIMEOUT_S, cwd=REPO)
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return proc, (json.loads(lines[-1][len("RESULT "):]) if lines else None), wall


@pytest.fixture(scope="module")
def artifacts(tiny_teacher, tmp_path_factory) -> dict[str, str]:
    """Small student and controller artifacts for the tiny teacher (students on every single block)."""
    import torch

    from flux2ttr.contract import layer_sort_key
    from flux2ttr.routing.controller import ControllerConfig, TTRController, save_controller
    from flux2ttr.students.artifacts import file_sha256, save_students
    from flux2ttr.students.hkr import HKRConfig, HKRLayer

    d = tmp_path_factory.mktemp("slim_artifacts")
    keys = sorted(tiny_teacher.layer_keys, key=layer_sort_key)
    torch.manual_seed(0)
    cfg = HKRConfig(feature_dim=16, landmark_min=4)
    layers = {k: HKRLayer(cfg, num_heads=tiny_teacher.num_heads) for k in keys}
    ready = {k: k.startswith("single_blocks.") for k in keys}
    student = d / "students.safetensors"
    save_students(student, layers, cfg, num_heads=tiny_teacher.num_heads, ready=ready,
                  metrics={k: {"val_cos_sim": 0.5} for k in keys}, train_config={"test": True},
                  teacher={"name": "tiny"})
    ctrl = TTRController(ControllerConfig(), keys)
    with torch.no_grad():  # a policy that prefers the student everywhere
        ctrl.head[-1].bias.fill_(-3.0)
    controller = d / "controller.safetensors"
    save_controller(controller, ctrl, student_sha256=file_sha256(student))
    return {"teacher": str(tiny_teacher.path), "student": str(student), "controller": str(controller),
            "base": str(tmp_path_factory.mktemp("slim_comfyui"))}


@pytest.mark.slow
def test_pack_loads_and_patches_without_pipeline_packages(tiny_teacher, artifacts):
    proc, out, wall = _run_child("comfyui", artifacts)
    assert proc.returncode == 0 and out is not None, f"child failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    print(f"slim ComfyUI child: {wall:.1f} s wall (start {out.get('t_start', 0):.1f} s, pack "
          f"{out.get('t_load', 0):.2f} s, run {out.get('t_run', 0):.2f} s)")
    assert out["loaded"], f"nodes.load_custom_node failed on comfy_nodes/:\n{proc.stderr[-4000:]}"
    assert out["nodes"] == ["ClockedSweepValues", "Combinations", "Flux2TTRController", "LoadPromptListFromJSON",
                            "RandomSeedBatch"]
    assert out["success"], out["error"]
    assert out["override_is_ours"] and out["holder_in_options"]
    assert out["student_calls"] > 0, "no attention call was routed to a student"
    assert out["latent_finite"]
    assert out["blocked_loaded"] == []
    for name in ("flux2ttr.comfy.patch", "flux2ttr.students.artifacts", "flux2ttr.routing.controller"):
        assert name in out["flux2ttr_loaded"]
    assert wall < 90, f"slim runtime check took {wall:.0f} s"


@pytest.mark.slow
def test_core_modules_import_without_any_pipeline_package(tiny_teacher, artifacts):
    proc, out, _ = _run_child("core", artifacts)
    assert proc.returncode == 0 and out is not None, f"child failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert out["blocked_loaded"] == []
    # torch itself probes tqdm (torch.hub, optional); no flux2ttr module may try any blocked package
    assert set(out["blocked_attempts"]) <= {"tqdm"}, out["blocked_attempts"]
    assert out["layers"] and out["controller"] == "TTRController"


def test_cli_without_click_prints_one_line():
    proc, _, _ = _run_child("cli", {})
    assert proc.returncode == 1
    assert proc.stderr.strip() == CLI_MESSAGE and "Traceback" not in proc.stderr


def test_missing_pipeline_package_names_the_extra():
    import click

    from flux2ttr.cli import pipeline_needed

    with pytest.raises(click.ClickException, match=r'zarr is not installed.*pip install "flux2ttr\[pipeline\]"'):
        with pipeline_needed():
            raise ModuleNotFoundError("No module named 'zarr.codecs'", name="zarr.codecs")
    with pytest.raises(ModuleNotFoundError, match="lpips"):  # other extras keep their own messages
        with pipeline_needed():
            raise ModuleNotFoundError("No module named 'lpips'", name="lpips")


def test_core_dependencies_are_torch_safetensors_numpy():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {Requirement(r).name.lower() for r in project["dependencies"]}
    assert core - {"triton"} == {"torch", "safetensors", "numpy"}, core
    extras = project["optional-dependencies"]
    pipeline = {Requirement(r).name.lower().replace("_", "-") for r in extras["pipeline"]}
    assert {"zarr", "dvc", "click", "comet-ml", "diffusers", "pyyaml", "tqdm", "matplotlib", "pillow"} <= pipeline
    test_extras = set()
    for r in map(Requirement, extras["test"]):
        if r.name == "flux2ttr":
            test_extras |= r.extras
    assert "pipeline" in test_extras, extras["test"]
    assert project["scripts"]["flux2ttr"] == "flux2ttr.cli:main"
    readme = (REPO / "README.md").read_text()
    run_cmd = readme.split("<!-- run-command -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    test_cmd = readme.split("<!-- test-command -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert '".[pipeline]"' in run_cmd and '".[test]"' in test_cmd
    assert len(test_cmd.strip().splitlines()) == 1


if __name__ == "__main__":
    _child(sys.argv[1], json.loads(sys.argv[2]))
