"""The ComfyUI routing on CUDA: the real ComfyUI started without ``--cpu``, the tiny FLUX.2 teacher in bf16,
students on every layer, the fused Triton student (``flux2ttr.students.fast_path``) taken and checked
against the eager fp32 student of the artifact.

Run on a GPU machine on its own (ComfyUI is imported once per process and these tests need it on the
GPU; see ``conftest._comfy_on_gpu``)::

    COMFYUI_PATH=/path/to/ComfyUI python -m pytest -m gpu tests/comfy_pack/test_gpu.py
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import uuid
import warnings

import pytest
import torch
import torch.nn.functional as F

from flux2ttr.comfy import patch as comfy_patch
from flux2ttr.contract import comfy_key
from flux2ttr.students import fast_path
from flux2ttr.students.artifacts import load_students, save_students
from flux2ttr.students.hkr import HKRConfig
from helpers.comfy import PACK_DIR, TEST_CAPTURE_NODE, TEST_COND_NODE, RunResult, _Server, ui_to_api
from helpers.students import eager, make_layer, rel

pytestmark = [pytest.mark.gpu, pytest.mark.comfyui]

GUIDANCE = 4.0           # the example workflow's FluxGuidance
FLUX2_TXT = 512          # ComfyUI left-pads FLUX.2 conditioning to 512 tokens
STUDENTS = "gpu_students.safetensors"
# bf16 tolerance of one routed call, fused bf16 student vs the eager fp32 student of the artifact (relative
# L2 error; bf16 weights, inputs and output: ~5e-3 expected, the kernel alone ~1.7e-3)
CALL_RTOL = 2e-2


@pytest.fixture(scope="module")
def gpu(comfy, tiny_teacher):
    """The tiny teacher registered and a student artifact (params.yaml's default HKR shape: F 64, hidden
    128; random weights with conditioner and blend off their identity init) with every layer ready."""
    if not comfy.gpu:
        pytest.skip("ComfyUI was started with --cpu in this process (CPU ComfyUI tests were selected too): "
                    "run `pytest -m gpu` on its own")
    name = comfy.add_model_file("diffusion_models", tiny_teacher.path)
    folder = comfy.base / "models" / "approximate_attention"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = HKRConfig()
    layers = {k: make_layer(cfg, seed=i, heads=tiny_teacher.num_heads) for i, k in enumerate(tiny_teacher.layer_keys)}
    save_students(folder / STUDENTS, layers, cfg, num_heads=tiny_teacher.num_heads, ready={k: True for k in layers},
                  metrics={k: {"val_cos_sim": 0.5} for k in layers}, train_config={"test": True},
                  teacher={"name": "tiny"})
    art = load_students(folder / STUDENTS)
    # the reference: the artifact's students in fp32 on the GPU, run eagerly
    ref = {k: m.to("cuda") for k, m in art.layers.items()}
    return {"unet": name, "layers": list(tiny_teacher.layer_keys), "ref": ref}


def example_prompt(comfy, gpu: dict, *, steps: int | None = None) -> tuple[dict, dict]:
    """The shipped example workflow as the frontend converts it, with test stand-ins for the text encoder,
    VAE and SaveImage (as tests/comfy_pack/test_patch.py does on CPU), the tiny teacher and the GPU
    students (no controller, quality_speed 1: every ready layer routed). Returns (prompt, node ids)."""
    ui = json.loads((PACK_DIR / "example_workflows" / "flux2ttr_controller.json").read_text())
    prompt = ui_to_api(comfy, ui)
    by_type = {n["class_type"]: nid for nid, n in prompt.items()}
    for t in ("CLIPLoader", "VAELoader", "VAEDecode", "SaveImage"):
        del prompt[by_type[t]]
    prompt[by_type["CLIPTextEncode"]] = {"class_type": TEST_COND_NODE,
                                         "inputs": {"tokens": 8, "dim": 64, "seed": 1, "guidance": 0.0}}
    prompt[by_type["UNETLoader"]]["inputs"]["unet_name"] = gpu["unet"]
    prompt[by_type["Flux2TTRController"]]["inputs"].update(student_artifact=STUDENTS, controller_artifact="none",
                                                          quality_speed=1.0)
    if steps is not None:
        prompt[by_type["KSampler"]]["inputs"]["steps"] = steps
    prompt["99"] = {"class_type": TEST_CAPTURE_NODE, "inputs": {"key": "latent", "value": [by_type["KSampler"], 0]}}
    return prompt, by_type


def sampler_prompt(gpu: dict, *, px: int, steps: int, cfg: float, seed: int = 7, routed: bool = True) -> dict:
    """UNETLoader -> [Flux2TTRController] -> KSampler (cfg, euler) -> capture; cond and uncond both 8 tokens
    (padded to 512: ComfyUI batches them into one call when cfg > 1)."""
    p = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": gpu["unet"], "weight_dtype": "default"}},
        "2": {"class_type": TEST_COND_NODE, "inputs": {"tokens": 8, "dim": 64, "seed": 1, "guidance": GUIDANCE}},
        "3": {"class_type": TEST_COND_NODE, "inputs": {"tokens": 8, "dim": 64, "seed": 2, "guidance": GUIDANCE}},
        "4": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": px, "height": px, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["7", 0] if routed else ["1", 0], "seed": seed, "steps": steps, "cfg": cfg,
            "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": TEST_CAPTURE_NODE, "inputs": {"key": "latent", "value": ["5", 0]}},
    }
    if routed:
        p["7"] = {"class_type": "Flux2TTRController", "inputs": {
            "model": ["1", 0], "student_artifact": STUDENTS, "controller_artifact": "none", "quality_speed": 1.0,
            "policy_mode": "threshold", "seed": 0}}
    return p


def latent(res: RunResult) -> torch.Tensor:
    assert res.success, res.error()
    return res.captured["latent"][0]["samples"].float()


@contextlib.contextmanager
def record_attention():
    """Every FLUX.2 attention call (inputs and output), by wrapping ``comfy.ldm.flux.math.optimized_attention``."""
    import comfy.ldm.flux.math as fmath

    calls: list[dict] = []
    original = fmath.optimized_attention

    def recorder(q, k, v, heads, *args, **kwargs):
        out = original(q, k, v, heads, *args, **kwargs)
        topts = kwargs.get("transformer_options", {})
        img_slice = topts.get("img_slice")
        calls.append({"key": comfy_key(topts["block_type"], topts["block_index"]),
                      "sigma": float(topts["sigmas"].flatten()[0]), "n_cond": img_slice[0] if img_slice else None,
                      "q": q.clone(), "k": k.clone(), "v": v.clone(), "out": out.clone()})
        return out

    fmath.optimized_attention = recorder
    try:
        yield calls
    finally:
        fmath.optimized_attention = original


@pytest.fixture
def fused_calls(monkeypatch):
    """How each call of the fused forward ended: True when the kernels ran (None = fell back to eager)."""
    done: list[bool] = []
    original = fast_path.fast_forward

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        done.append(out is not None)
        return out

    monkeypatch.setattr(fast_path, "fast_forward", counting)
    return done


def check_calls_against_eager(gpu: dict, calls: list[dict], grid: int, batch: int) -> float:
    """Every routed call's output (bf16, fused) against the eager fp32 student of the artifact on the same
    q, k, v; returns the largest relative error. Also checks that the student is far from the teacher."""
    worst = 0.0
    for c in calls:
        q, k, v = c["q"], c["k"], c["v"]
        assert q.is_cuda and q.dtype == torch.bfloat16 and q.shape[0] == batch
        n_cond = c["n_cond"] if c["n_cond"] is not None else FLUX2_TXT
        assert n_cond == FLUX2_TXT and q.shape[2] == FLUX2_TXT + grid * grid
        want = eager(gpu["ref"][c["key"]], q, k, v, n_cond, c["sigma"], GUIDANCE, height=grid, width=grid)
        b, h, n, d = want.shape
        got = c["out"].float().reshape(b, n, h, d).transpose(1, 2)
        err = rel(got, want)
        assert err < CALL_RTOL, f"{c['key']} sigma {c['sigma']:.3f}: relative error {err:.2e}"
        teacher = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        assert rel(teacher, want) > 5 * CALL_RTOL  # the routed output really is the student's
        for row in range(1, b):  # rows are separate samples (cond / uncond), each right on its own
            assert rel(got[row], want[row]) < CALL_RTOL
        worst = max(worst, err)
    return worst


def test_example_workflow_fused_bf16_matches_eager_student(comfy, gpu, fused_calls, monkeypatch):
    """The shipped example workflow on CUDA: bf16 model, every attention call routed to the fused student,
    each call within bf16 tolerance of the eager fp32 student; the sampled latent close to the same run
    with the eager student (FLUX2TTR_FAST_PATH=0) and far from the unpatched model's."""
    prompt, by_type = example_prompt(comfy, gpu)
    steps = prompt[by_type["KSampler"]]["inputs"]["steps"]
    px = prompt[by_type["EmptyFlux2LatentImage"]]["inputs"]["width"]
    grid = px // 16
    with record_attention() as calls:
        fused = latent(comfy.run(prompt))
    holder = comfy_patch.last_runs()[-1]
    assert len(calls) == steps * len(gpu["layers"])
    assert set(holder.routed_calls) == {(s, key, "student") for s in range(steps) for key in gpu["layers"]}
    assert fused_calls == [True] * len(calls)  # the fused kernels ran every routed call
    assert not holder.fallbacks
    worst = check_calls_against_eager(gpu, calls, grid, batch=1)
    del calls

    monkeypatch.setenv(fast_path.ENV_SWITCH, "0")
    n_fused = len(fused_calls)
    eager_latent = latent(comfy.run(prompt))
    assert len(fused_calls) == n_fused  # the switch kept the fused path off
    monkeypatch.delenv(fast_path.ENV_SWITCH)
    plain = dict(prompt)
    plain[by_type["KSampler"]] = {**prompt[by_type["KSampler"]], "inputs": {
        **prompt[by_type["KSampler"]]["inputs"], "model": [by_type["UNETLoader"], 0]}}
    native = latent(comfy.run(plain))
    err_eager, err_native = rel(fused, eager_latent), rel(native, eager_latent)
    print(f"\nexample workflow {px}px {steps} steps: worst call rel err {worst:.2e}; latent fused vs eager "
          f"{err_eager:.2e}, native vs eager {err_native:.2e}")
    assert err_eager < 5e-2 and err_eager < 0.2 * err_native


def test_cfg_batched_cond_uncond(comfy, gpu, fused_calls):
    """CFG > 1: cond and uncond arrive in one call (B = 2); one mask per step; both rows fused and right."""
    steps, px = 4, 512
    with record_attention() as calls:
        latent(comfy.run(sampler_prompt(gpu, px=px, steps=steps, cfg=3.0)))
    holder = comfy_patch.last_runs()[-1]
    assert len(calls) == steps * len(gpu["layers"]) and {c["q"].shape[0] for c in calls} == {2}
    assert len(holder.masks) == steps and holder.sampler_cfg == 3.0 and holder.call.guidance == GUIDANCE
    assert all(route == "student" and n == 1 for (_, _, route), n in holder.routed_calls.items())
    assert fused_calls == [True] * len(calls)
    worst = check_calls_against_eager(gpu, calls, px // 16, batch=2)
    assert all(not torch.equal(c["q"][0], c["q"][1]) for c in calls)  # the rows really are cond and uncond
    print(f"\ncfg 3 batched (B=2) {px}px: worst call rel err {worst:.2e}")


def test_reference_latent_fused_bf16(comfy, gpu, fused_calls):
    """ReferenceLatent on CUDA: the main sampler's calls carry text + grid + the reference's tokens, every one
    takes the fused student, and each equals the eager fp32 student on the student's layout (references as
    conditioning), put back in ComfyUI's order, within bf16 tolerance."""
    steps, px, ref_w, ref_h = 2, 512, 256, 384
    grid, n_ref = px // 16, (ref_w // 16) * (ref_h // 16)
    p = sampler_prompt(gpu, px=px, steps=steps, cfg=1.0)
    p["10"] = {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": ref_w, "height": ref_h, "batch_size": 1}}
    p["11"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": 3, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["10", 0], "denoise": 1.0}}
    p["12"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["2", 0], "latent": ["11", 0]}}
    p["5"]["inputs"]["positive"] = ["12", 0]
    with record_attention() as calls:
        latent(comfy.run(p))
    routed = [c for c in calls if c["q"].shape[2] == FLUX2_TXT + grid * grid + n_ref]
    assert len(routed) == steps * len(gpu["layers"])
    holder = comfy_patch.last_runs()[-1]
    assert not holder.fallbacks and fused_calls == [True] * len(routed)  # the reference's sampler is unpatched
    worst = 0.0
    for c in routed:
        q, k, v = (comfy_patch.reference_layout(t.float(), FLUX2_TXT, grid * grid) for t in (c["q"], c["k"], c["v"]))
        want = comfy_patch.comfy_layout(eager(gpu["ref"][c["key"]], q, k, v, FLUX2_TXT + n_ref, c["sigma"], GUIDANCE,
                                              height=grid, width=grid), FLUX2_TXT, grid * grid)
        b, h, n, d = want.shape
        err = rel(c["out"].float().reshape(b, n, h, d).transpose(1, 2), want)
        assert err < CALL_RTOL, f"{c['key']}: relative error {err:.2e}"
        worst = max(worst, err)
    print(f"\nReferenceLatent {px}px + {n_ref} reference tokens: worst call rel err {worst:.2e}")


def test_two_runs_share_the_copies_no_vram_growth_no_sync_per_call(comfy, gpu, fused_calls, monkeypatch):
    """Two runs through one PromptExecutor (its cache holds the patched MODEL; only KSampler runs again):
    the students' GPU copies are made once, allocated VRAM does not grow from run 1 to run 2, and in
    run 2 no routed attention call synchronises with the host (CUDA sync debug mode 'error')."""
    execution = comfy.modules["execution"]
    executor = execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    # sync debug modes: outside our override (1 = warn in run 2, to count the syncs), inside it (2 = error)
    state = {"outside": 0, "inside": 0, "copies": [], "calls": 0}
    original = comfy_patch.attention_override

    def strict_override(func, *args, **kwargs):
        copies = kwargs["transformer_options"][comfy_patch.HOLDER_KEY].copies
        if not any(c is copies for c in state["copies"]):
            state["copies"].append(copies)

        def native(*a, **kw):  # ComfyUI's own attention is not ours to judge
            torch.cuda.set_sync_debug_mode(state["outside"])
            try:
                return func(*a, **kw)
            finally:
                torch.cuda.set_sync_debug_mode(state["inside"])

        torch.cuda.set_sync_debug_mode(state["inside"])
        try:
            out = original(native, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(state["outside"])
        state["calls"] += 1
        return out

    monkeypatch.setattr(comfy_patch, "attention_override", strict_override)  # patch_model installs this one
    steps, px = 4, 512

    def run(seed: int) -> tuple[torch.Tensor, int]:
        comfy.captured.clear()
        torch.cuda.set_sync_debug_mode(state["outside"])
        try:
            executor.execute(sampler_prompt(gpu, px=px, steps=steps, cfg=1.0, seed=seed), str(uuid.uuid4()), {},
                             ["6"])
        finally:
            torch.cuda.set_sync_debug_mode(0)
        out = latent(RunResult(executor.success, executor.status_messages, dict(comfy.captured), []))
        gc.collect()
        torch.cuda.synchronize()
        return out, torch.cuda.memory_allocated()

    first, after1 = run(7)
    holder1 = comfy_patch.last_runs()[-1]
    state.update(outside=1, inside=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second, after2 = run(8)
    holder2 = comfy_patch.last_runs()[-1]
    assert holder2 is not holder1 and holder1.copies is None and holder2.copies is None  # runs let go of them
    assert len(state["copies"]) == 1  # both runs used the one StudentCopies of the cached patched MODEL
    copies = state["copies"][0]
    assert copies.made == len(gpu["layers"]) == len(copies)  # once per layer, device and dtype: not per run
    assert all(p.is_cuda and p.dtype == torch.bfloat16 and not p.is_inference()
               for m in copies.modules() for p in m.parameters())
    assert state["calls"] == 2 * steps * len(gpu["layers"]) == len(fused_calls) and all(fused_calls)
    assert not torch.equal(first, second)  # the seed changed, so the sampling really ran again
    ours = [w for w in caught if "synchroniz" in str(w.message).lower()
            and w.filename.replace("\\", "/").endswith("flux2ttr/comfy/patch.py")]
    per_call = [w for w in ours if any(w.lineno in _lines(f) for f in (
        comfy_patch._host_floats, comfy_patch.diffusion_model_wrapper, comfy_patch.checked_denoiser_call))]
    # inside a run the finiteness flags are read once, after it (checked_run -> _first_nonfinite)
    per_run = [w for w in ours if any(w.lineno in _lines(f) for f in (
        comfy_patch.outer_sample_wrapper, comfy_patch.checked_run, comfy_patch._first_nonfinite))]
    print(f"\ntwo runs {px}px {steps} steps: allocated after run 1 {after1} B, after run 2 {after2} B "
          f"(growth {after2 - after1} B; the copies hold {copies.nbytes()} B); host syncs in flux2ttr's patch "
          f"during run 2: {len(per_call)} in the DIFFUSION_MODEL wrapper ({steps} denoiser calls, one per "
          f"step), {len(per_run)} in OUTER_SAMPLE (the schedule and the finiteness flags), {len(ours)} in all; "
          f"syncs seen in the whole run {len(caught)}")
    assert after2 - after1 < copies.nbytes() // 4  # per-run copies would grow it by at least their size
    assert len(per_call) <= steps  # per step: one read of sigma and guidance together
    assert len(per_run) <= 2 and len(ours) == len(per_call) + len(per_run)  # schedule and flags once a run


def _lines(fn) -> range:  # noqa: ANN001
    src, start = inspect.getsourcelines(fn)
    return range(start, start + len(src))
