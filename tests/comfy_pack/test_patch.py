"""Flux2TTRController inside the real ComfyUI: UNETLoader -> Flux2TTRController -> KSampler through
``execution.PromptExecutor`` on the tiny FLUX.2 teacher, with small HKR student artifacts
(random init, some layers marked ready)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from flux2ttr.comfy import patch as comfy_patch
from flux2ttr.contract import comfy_key, layer_sort_key
from flux2ttr.routing.controller import ControllerConfig, TTRController, load_controller, sample_mask, save_controller
from flux2ttr.students.artifacts import file_sha256, load_students, save_students
from flux2ttr.students.hkr import HKRConfig, HKRLayer
from flux2ttr.students.window import WindowLayer
from helpers.comfy import TEST_CAPTURE_NODE, TEST_COND_NODE

LATENT_PX = 128          # EmptyFlux2LatentImage 128 px -> an 8 x 8 token grid
GRID = LATENT_PX // 16
STEPS = 2
GUIDANCE = 4.0
FLUX2_TXT = 512          # ComfyUI left-pads FLUX.2 conditioning to 512 tokens


def _save(path, layers: dict, ready: dict, cfg: HKRConfig, num_heads: int) -> None:
    metrics = {k: {"val_cos_sim": 0.5} for k in layers}
    save_students(path, layers, cfg, num_heads=num_heads, ready=ready, metrics=metrics,
                  train_config={"test": True}, teacher={"name": "tiny"})


@pytest.fixture(scope="module")
def setup(comfy, tiny_teacher):
    """Registers the tiny teacher and writes the test artifacts into models/approximate_attention."""
    name = comfy.add_model_file("diffusion_models", tiny_teacher.path)
    folder = comfy.base / "models" / "approximate_attention"
    heads, layer_keys = tiny_teacher.num_heads, tiny_teacher.layer_keys
    singles = [k for k in layer_keys if k.startswith("single_blocks.")]
    torch.manual_seed(0)
    cfg = HKRConfig(feature_dim=16, landmark_min=4)
    layers = {k: HKRLayer(cfg, num_heads=heads) for k in layer_keys}
    with torch.no_grad():  # make the students visibly different from identity fusion
        for layer in layers.values():
            layer.alpha_logit.fill_(1.0)
    ready_some = {k: k in (singles[0], singles[-1], "double_blocks.0") for k in layers}
    _save(folder / "students_some.safetensors", layers, ready_some, cfg, heads)
    _save(folder / "students_none.safetensors", layers, {k: False for k in layers}, cfg, heads)
    _save(folder / "students_heads.safetensors", layers_for(cfg, heads + 1, singles), {k: True for k in singles},
          cfg, heads + 1)
    cfg64 = HKRConfig(head_dim=64, feature_dim=16)
    _save(folder / "students_hd64.safetensors", layers_for(cfg64, heads, singles), {k: True for k in singles},
          cfg64, heads)
    extra = {**{k: layers[k] for k in singles}, "single_blocks.99": HKRLayer(cfg, num_heads=heads)}
    _save(folder / "students_extra.safetensors", extra, {k: True for k in extra}, cfg, heads)
    (folder / "not_an_artifact.safetensors").write_bytes(b"garbage")
    # controllers: one trained for students_some, one for another student file, one for other layers
    order = sorted(layers, key=layer_sort_key)
    torch.manual_seed(3)
    ctrl = TTRController(ControllerConfig(), order)
    with torch.no_grad():  # a policy that clearly prefers the student on some ready layers, full on others
        ctrl.head[-1].bias.copy_(torch.tensor([-1.5 if i % 2 == 0 else 1.5 for i in range(len(order))]))
    some_sha = file_sha256(folder / "students_some.safetensors")
    save_controller(folder / "controller.safetensors", ctrl, student_sha256=some_sha)
    save_controller(folder / "controller_other_students.safetensors", ctrl,
                    student_sha256=file_sha256(folder / "students_none.safetensors"))
    save_controller(folder / "controller_other_layers.safetensors", TTRController(ControllerConfig(), singles),
                    student_sha256=some_sha)
    base = comfy.run(workflow(name))
    assert base.success, base.error()
    return {"unet": name, "folder": folder, "layers": layer_keys, "ready": {k for k, r in ready_some.items() if r},
            "base": base.captured["latent"][0]["samples"]}


def layers_for(cfg: HKRConfig, heads: int, keys) -> dict:
    return {k: HKRLayer(cfg, num_heads=heads) for k in keys}


def workflow(unet: str, student: str | None = None, *, controller: str = "none", quality_speed: float = 1.0,
             policy_mode: str = "threshold", seed: int = 0, cfg: float = 1.0, neg_tokens: int = 8,
             sampler: str = "euler") -> dict:
    """UNETLoader -> [Flux2TTRController] -> KSampler -> capture, as an API-format prompt."""
    p = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": {"class_type": TEST_COND_NODE, "inputs": {"tokens": 8, "dim": 64, "seed": 1, "guidance": GUIDANCE}},
        "3": {"class_type": TEST_COND_NODE, "inputs": {"tokens": neg_tokens, "dim": 64, "seed": 2,
                                                      "guidance": GUIDANCE}},
        "4": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": LATENT_PX, "height": LATENT_PX,
                                                                "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 7, "steps": STEPS, "cfg": cfg, "sampler_name": sampler, "scheduler": "simple",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": TEST_CAPTURE_NODE, "inputs": {"key": "latent", "value": ["5", 0]}},
    }
    if student is not None:
        p["7"] = {"class_type": "Flux2TTRController", "inputs": {
            "model": ["1", 0], "student_artifact": student, "controller_artifact": controller,
            "quality_speed": quality_speed, "policy_mode": policy_mode, "seed": seed}}
        p["5"]["inputs"]["model"] = ["7", 0]
    return p


@contextlib.contextmanager
def record_attention():
    """Record every FLUX.2 attention call ComfyUI makes (what it passed and what came back),
    by wrapping ``comfy.ldm.flux.math.optimized_attention`` around our override."""
    import comfy.ldm.flux.math as fmath

    calls: list[dict] = []
    original = fmath.optimized_attention

    def recorder(q, k, v, heads, *args, **kwargs):
        out = original(q, k, v, heads, *args, **kwargs)
        topts = kwargs.get("transformer_options", {})
        calls.append({"key": comfy_key(topts["block_type"], topts["block_index"]),
                      "sigma": float(topts["sigmas"].flatten()[0]), "img_slice": topts.get("img_slice"),
                      "q": q.clone(), "k": k.clone(), "v": v.clone(), "out": out.clone()})
        return out

    fmath.optimized_attention = recorder
    try:
        yield calls
    finally:
        fmath.optimized_attention = original


def softmax64(q, k, v) -> torch.Tensor:
    """Reference softmax attention in float64, ``[B, H, N, D]`` -> ``[B, N, H*D]`` (ComfyUI's layout)."""
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    o = torch.softmax(s, dim=-1) @ v.double()
    b, h, n, d = o.shape
    return o.transpose(1, 2).reshape(b, n, h * d)


def latent(res) -> torch.Tensor:
    assert res.success, res.error()
    return res.captured["latent"][0]["samples"]


def test_no_ready_layer_is_bit_identical(comfy, setup):
    base = setup["base"]
    patched = latent(comfy.run(workflow(setup["unet"], "students_none.safetensors", quality_speed=1.0)))
    assert torch.equal(base, patched)
    holder = comfy_patch.last_runs()[-1]
    assert all(route == "native" for (_, _, route) in holder.routed_calls)
    assert len(holder.log_lines) == STEPS and all("students=[]" in line for line in holder.log_lines)


def test_ready_layers_run_students_others_native(comfy, setup):
    art = load_students(setup["folder"] / "students_some.safetensors")
    base = setup["base"]
    with record_attention() as calls:
        res = comfy.run(workflow(setup["unet"], "students_some.safetensors", quality_speed=1.0))
    patched = latent(res)
    assert not torch.allclose(base, patched)
    ready = setup["ready"]
    assert {c["key"] for c in calls} == set(setup["layers"])
    assert len(calls) == STEPS * len(setup["layers"])
    for c in calls:
        q, k, v = c["q"], c["k"], c["v"]
        if c["key"] in ready:
            n_cond = c["img_slice"][0] if c["img_slice"] else FLUX2_TXT
            assert n_cond == FLUX2_TXT
            with torch.inference_mode():
                want = art.layers[c["key"]](q, k, v, n_cond, c["sigma"], GUIDANCE, height=GRID, width=GRID)
            b, h, n, d = want.shape
            torch.testing.assert_close(c["out"], want.transpose(1, 2).reshape(b, n, h * d), rtol=0, atol=1e-6)
            assert (c["out"] - softmax64(q, k, v)).abs().max() > 1e-3  # really not the teacher
        else:
            torch.testing.assert_close(c["out"].double(), softmax64(q, k, v), rtol=1e-4, atol=1e-4)
    holder = comfy_patch.last_runs()[-1]
    for line in holder.log_lines:
        assert "threshold=0.5000" in line and "sigma=" in line
    assert sorted(holder.masks) == list(range(STEPS))


def test_quality_speed_below_cut_routes_nothing(comfy, setup):
    base = setup["base"]
    low = latent(comfy.run(workflow(setup["unet"], "students_some.safetensors", quality_speed=0.2)))
    assert torch.equal(base, low)


def test_one_mask_per_step_for_separate_cond_and_uncond_calls(comfy, setup):
    # a 600-token negative is not padded to 512, so cond and uncond cannot share a batch: two calls per
    # layer and step, with different text lengths (n_cond from img_slice / the context length)
    with record_attention() as calls:
        res = comfy.run(workflow(setup["unet"], "students_some.safetensors", cfg=3.0, neg_tokens=600))
    latent(res)
    holder = comfy_patch.last_runs()[-1]
    assert len(calls) == 2 * STEPS * len(setup["layers"])
    assert len(holder.masks) == STEPS and len(holder.log_lines) == STEPS
    for (step, key, route), count in holder.routed_calls.items():
        assert count == 2
        assert (route == "student") == (key in holder.masks[step])
    assert {c["q"].shape[2] for c in calls} == {FLUX2_TXT + GRID * GRID, 600 + GRID * GRID}


def test_original_model_untouched(comfy, setup):
    import nodes

    model = nodes.UNETLoader().load_unet(setup["unet"], "default")[0]
    options_before = repr(model.model_options)
    wrappers_before = repr(model.wrappers)
    patched = comfy_patch.controller_node(model, setup["folder"] / "students_some.safetensors", None,
                                          quality_speed=1.0, policy_mode="threshold", seed=0)
    assert patched is not model
    assert repr(model.model_options) == options_before and repr(model.wrappers) == wrappers_before
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})
    topts = patched.model_options["transformer_options"]
    assert topts["optimized_attention_override"] is comfy_patch.attention_override
    assert comfy_patch.HOLDER_KEY in topts
    # same graph: the unpatched branch of a workflow is unaffected by the patched one
    p = workflow(setup["unet"], "students_some.safetensors")
    p["8"] = {"class_type": "KSampler", "inputs": dict(p["5"]["inputs"], model=["1", 0])}
    p["9"] = {"class_type": TEST_CAPTURE_NODE, "inputs": {"key": "plain", "value": ["8", 0]}}
    res = comfy.run(p)
    base = setup["base"]
    assert res.success, res.error()
    assert torch.equal(res.captured["plain"][0]["samples"], base)
    assert not torch.equal(res.captured["latent"][0]["samples"], base)


@pytest.mark.parametrize("artifact, message", [
    ("students_heads.safetensors", "num_heads mismatch"),
    ("students_hd64.safetensors", "head_dim mismatch"),
    ("students_extra.safetensors", "single_blocks.99"),
    ("not_an_artifact.safetensors", "not a readable safetensors file"),
    ("missing.safetensors", "not found in models/approximate_attention"),
])
def test_artifact_mismatch_errors(comfy, setup, artifact, message):
    res = comfy.run(workflow(setup["unet"], artifact))
    assert not res.success
    text = res.error() or repr(res.status_messages)
    assert message in text


@pytest.mark.parametrize("inputs, message", [({"quality_speed": 1.5}, "quality_speed"),
                                             ({"policy_mode": "greedy"}, "policy_mode")])
def test_bad_inputs(comfy, setup, inputs, message):
    import nodes

    model = nodes.UNETLoader().load_unet(setup["unet"], "default")[0]
    kwargs = {"quality_speed": 0.5, "policy_mode": "threshold", "seed": 0, **inputs}
    with pytest.raises(ValueError, match=message):
        comfy_patch.controller_node(model, setup["folder"] / "students_some.safetensors", None, **kwargs)


def test_measure_mode_records_cosine_and_keeps_native(comfy, setup):
    import nodes

    model = nodes.UNETLoader().load_unet(setup["unet"], "default")[0]
    art = load_students(setup["folder"] / "students_some.safetensors")
    patched = comfy_patch.controller_node(model, art.path, None, quality_speed=1.0, policy_mode="threshold",
                                          seed=0, measure=True)
    cond = [[torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(1)), {"guidance": GUIDANCE}]]
    lat = {"samples": torch.zeros(1, 128, GRID, GRID)}
    with record_attention() as calls:
        out = nodes.common_ksampler(patched, 7, STEPS, 1.0, "euler", "simple", cond, cond, lat)[0]["samples"]
    holder = comfy_patch.last_runs()[-1]
    base = nodes.common_ksampler(model, 7, STEPS, 1.0, "euler", "simple", cond, cond, lat)[0]["samples"]
    assert torch.equal(out, base)  # measuring never changes the result
    table = comfy_patch.cosine_table(holder)
    assert set(table) == set(setup["layers"])
    for key in table:  # recompute the mean cosine from the recorded calls
        want = []
        for c in (c for c in calls if c["key"] == key):
            with torch.inference_mode():
                s = art.layers[key](c["q"], c["k"], c["v"], FLUX2_TXT, c["sigma"], GUIDANCE, height=GRID, width=GRID)
            b, h, n, d = s.shape
            nat = c["out"].reshape(b, n, h, d).transpose(1, 2)
            want.append(torch.nn.functional.cosine_similarity(s.double(), nat.double(), dim=-1).mean().item())
        assert table[key] == pytest.approx(sum(want) / len(want), abs=1e-6)
    paired = comfy_patch.online_vs_offline(holder, art.metrics)
    assert paired == {key: (table[key], 0.5) for key in table}


def test_example_workflow_runs_with_a_test_text_encoder(comfy, setup):
    """The shipped example workflow, converted as the frontend would, with the text encoder, VAE and
    SaveImage swapped for test nodes: UNETLoader -> Flux2TTRController -> KSampler on the tiny teacher."""
    import json

    from helpers.comfy import PACK_DIR, ui_to_api

    ui = json.loads((PACK_DIR / "example_workflows" / "flux2ttr_controller.json").read_text())
    types = {n["type"] for n in ui["nodes"]}
    assert {"UNETLoader", "Flux2TTRController", "KSampler"} <= types
    assert types <= set(comfy.nodes.NODE_CLASS_MAPPINGS)  # every node exists in this ComfyUI + pack
    prompt = ui_to_api(comfy, ui)
    by_type = {n["class_type"]: nid for nid, n in prompt.items()}
    ctrl, ks = prompt[by_type["Flux2TTRController"]], prompt[by_type["KSampler"]]
    assert ctrl["inputs"]["model"] == [by_type["UNETLoader"], 0] and ks["inputs"]["model"] == [by_type["Flux2TTRController"], 0]
    assert ctrl["inputs"]["policy_mode"] in comfy_patch.POLICY_MODES and 0 <= ctrl["inputs"]["quality_speed"] <= 1
    # stand-ins for what cannot run here (no text encoder, no VAE), sizes for a CPU test
    for t in ("CLIPLoader", "VAELoader", "VAEDecode", "SaveImage"):
        del prompt[by_type[t]]
    prompt[by_type["CLIPTextEncode"]] = {"class_type": TEST_COND_NODE,
                                         "inputs": {"tokens": 8, "dim": 64, "seed": 1, "guidance": 0.0}}
    prompt[by_type["UNETLoader"]]["inputs"]["unet_name"] = setup["unet"]
    prompt[by_type["EmptyFlux2LatentImage"]]["inputs"].update(width=LATENT_PX, height=LATENT_PX)
    ks["inputs"]["steps"] = STEPS
    ctrl["inputs"].update(student_artifact="students_some.safetensors", controller_artifact="none", quality_speed=1.0)
    prompt["99"] = {"class_type": TEST_CAPTURE_NODE, "inputs": {"key": "latent", "value": [by_type["KSampler"], 0]}}
    res = comfy.run(prompt)
    assert latent(res).shape == (1, 128, GRID, GRID)
    holder = comfy_patch.last_runs()[-1]
    assert holder.call.guidance == pytest.approx(4.0)  # FluxGuidance's widget value reached the model
    assert any(route == "student" for (_, _, route) in holder.routed_calls)


def expected_masks(setup, holder, mode: str, quality_speed: float, seed: int) -> dict[int, frozenset]:
    """The student-routed layers per step, recomputed from the controller file and the run's sigmas."""
    ctrl, order = load_controller(setup["folder"] / "controller.safetensors")
    eligible = [k for k in order if k in setup["ready"]]
    cols = [order.index(k) for k in eligible]
    out = {}
    for step in range(STEPS):
        sigma = holder.schedule[step]
        with torch.no_grad():
            logits = ctrl(torch.tensor([sigma]), torch.tensor([GUIDANCE]), torch.tensor([float(GRID)]),
                          torch.tensor([float(GRID)]))[0, cols]
        if mode == "threshold":
            full = (torch.sigmoid(logits) >= quality_speed).tolist()
        else:
            gen = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
            full = sample_mask(logits, generator=gen, quality_speed=quality_speed).tolist()
        out[step] = frozenset(k for k, f in zip(eligible, full) if not f)
    return out


def test_controller_threshold_mode(comfy, setup):
    res = comfy.run(workflow(setup["unet"], "students_some.safetensors", controller="controller.safetensors",
                             policy_mode="threshold", quality_speed=0.5, seed=1))
    first = latent(res)
    holder = comfy_patch.last_runs()[-1]
    assert holder.masks == expected_masks(setup, holder, "threshold", 0.5, 1)
    routed = set().union(*holder.masks.values())
    assert routed and routed < setup["ready"]  # the controller splits the ready layers (logit < 0 -> student)
    assert all("threshold=0.5000" in line and "threshold" in line for line in holder.log_lines)
    # deterministic: another seed gives the same masks and latent
    again = latent(comfy.run(workflow(setup["unet"], "students_some.safetensors", controller="controller.safetensors",
                                      policy_mode="threshold", quality_speed=0.5, seed=99)))
    assert comfy_patch.last_runs()[-1].masks == holder.masks and torch.equal(first, again)
    # quality_speed 0: always full attention -> the unpatched latent, bit for bit
    q0 = latent(comfy.run(workflow(setup["unet"], "students_some.safetensors", controller="controller.safetensors",
                                   policy_mode="threshold", quality_speed=0.0)))
    assert torch.equal(q0, setup["base"])


def test_controller_stochastic_mode(comfy, setup):
    masks = {}
    for seed in (1, 2, 3, 1):
        res = comfy.run(workflow(setup["unet"], "students_some.safetensors", controller="controller.safetensors",
                                 policy_mode="stochastic", quality_speed=0.5, seed=seed))
        latent(res)
        holder = comfy_patch.last_runs()[-1]
        assert holder.masks == expected_masks(setup, holder, "stochastic", 0.5, seed)
        assert len(holder.log_lines) == STEPS
        masks.setdefault(seed, []).append(holder.masks)
    assert masks[1][0] == masks[1][1]                    # same seed, same masks
    assert len({tuple(sorted((s, tuple(sorted(m))) for s, m in ms[0].items())) for ms in masks.values()}) > 1
    # quality_speed 1: never full on eligible layers -> every ready layer runs its student at every step
    latent(comfy.run(workflow(setup["unet"], "students_some.safetensors", controller="controller.safetensors",
                              policy_mode="stochastic", quality_speed=1.0)))
    assert all(m == frozenset(setup["ready"]) for m in comfy_patch.last_runs()[-1].masks.values())


@pytest.mark.parametrize("controller, message", [
    ("controller_other_students.safetensors", "trained with student artifact sha256"),
    ("controller_other_layers.safetensors", "was trained for layers"),
    ("students_some.safetensors", "is this the student artifact?"),
])
def test_controller_mismatch_errors(comfy, setup, controller, message):
    res = comfy.run(workflow(setup["unet"], "students_some.safetensors", controller=controller))
    assert not res.success
    assert message in res.error() and "Flux2TTRController" in res.error()


def test_students_run_in_the_callers_dtype_and_step_lookup():
    """Pure helpers (no ComfyUI): the student cast to the model's dtype, the step from sigma."""
    cfg = HKRConfig(feature_dim=8, landmark_min=2)
    torch.manual_seed(0)
    layer = HKRLayer(cfg, num_heads=2)
    holder = comfy_patch.build_holder({"single_blocks.0": layer}, {"single_blocks.0", "single_blocks.1"},
                                      comfy_patch.no_controller_policy(frozenset({"single_blocks.0"}), 1.0))
    assert holder.ready == frozenset({"single_blocks.0"})  # a ready key without a student can never route
    cast = holder.student("single_blocks.0", torch.device("cpu"), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in cast.parameters())
    assert all(p.dtype == torch.float32 for p in layer.parameters())  # the artifact's copy is untouched
    assert holder.student("single_blocks.0", torch.device("cpu"), torch.bfloat16) is cast  # once per run
    q, k, v = (torch.randn(1, 2, 4 + 9, 128).bfloat16() for _ in range(3))
    with torch.inference_mode():
        out = cast(q, k, v, 4, 0.5, 4.0, height=3, width=3)
    assert out.dtype == torch.bfloat16
    assert not any(p.is_inference() or p.requires_grad for p in cast.parameters())
    again = holder.fresh()  # a new sampling run of the same patched MODEL shares the copies
    assert again.student("single_blocks.0", torch.device("cpu"), torch.bfloat16) is cast
    assert holder.copies.made == 1
    holder.schedule = [1.0, 0.8, 0.5, 0.0]
    assert [holder.step_of(s) for s in (1.0, 0.9, 0.8, 0.79, 0.5, 0.2)] == [0, 0, 1, 1, 2, 2]


def test_copies_made_in_inference_mode_are_normal_tensors():
    """The GPU bug on CPU: ComfyUI casts the students inside torch.inference_mode(); copies made there
    were inference tensors and the fast path's weight cache raised on them."""
    from flux2ttr.students import fast_path

    with torch.inference_mode():  # the node loads the artifact here too
        layer = HKRLayer(HKRConfig(feature_dim=8, landmark_min=2), num_heads=2)
    holder = comfy_patch.build_holder({"single_blocks.0": layer}, {"single_blocks.0"},
                                      comfy_patch.no_controller_policy(frozenset({"single_blocks.0"}), 1.0))
    with torch.inference_mode():
        cast = holder.student("single_blocks.0", torch.device("cpu"), torch.bfloat16)
        prep = fast_path.prepared(cast, torch.bfloat16, torch.device("cpu"))  # raised before the fix
    assert not any(p.is_inference() for p in cast.parameters())
    assert fast_path.prepared(cast, torch.bfloat16, torch.device("cpu")) is prep
    # a same-device, same-dtype master made in inference mode is copied too (it would stay an inference tensor)
    with torch.inference_mode():
        same = holder.student("single_blocks.0", torch.device("cpu"), torch.float32)
    assert same is not layer and not any(p.is_inference() for p in same.parameters())
    torch.testing.assert_close(same.phi_q.net[0].weight, layer.phi_q.net[0].weight, rtol=0, atol=0)


class _Explosive:
    """Stands in for ``transformer_options["sigmas"]``: any host read of it fails the test."""

    def __float__(self) -> float:
        raise AssertionError("attention_override read sigmas on the host")

    def __getattr__(self, name: str):
        raise AssertionError(f"attention_override used sigmas.{name}")


def _holder_for(layer: HKRLayer, key: str = "single_blocks.0") -> comfy_patch.RoutingHolder:
    holder = comfy_patch.build_holder({key: layer}, {key}, comfy_patch.no_controller_policy(frozenset({key}), 1.0))
    holder.schedule = [1.0, 0.5, 0.0]
    return holder


def _call(holder, q, k, v, topts: dict, block_index: int = 0, block_type: str = "single"):
    native_calls = []

    def native(q, k, v, heads, **kwargs):
        native_calls.append(q.shape)
        return softmax64(q, k, v).to(q.dtype)

    topts = {comfy_patch.HOLDER_KEY: holder, "block_type": block_type, "block_index": block_index, **topts}
    out = comfy_patch.attention_override(native, q, k, v, q.shape[1], skip_reshape=True, mask=None,
                                         transformer_options=topts)
    return out, native_calls


def test_sigma_read_once_per_denoiser_call_not_per_attention_call():
    """The DIFFUSION_MODEL wrapper reads sigma (and guidance) to the host; attention calls never touch
    transformer_options["sigmas"] (a host read of a CUDA tensor waits on the GPU every call)."""
    torch.manual_seed(0)
    layer = HKRLayer(HKRConfig(feature_dim=8, landmark_min=2), num_heads=2)
    holder = _holder_for(layer)
    x = torch.zeros(1, 128, 3, 3)
    context = torch.zeros(1, 4, 64)
    seen = {}

    def executor(*args, **kwargs):
        seen["call"] = holder.call
        return "out"

    topts = {comfy_patch.HOLDER_KEY: holder, "sigmas": torch.tensor([0.75]), "sample_sigmas": torch.tensor([1.0, 0.5, 0.0])}
    assert comfy_patch.diffusion_model_wrapper(executor, x, torch.tensor([0.75]), context, None,
                                               torch.tensor([3.5]), None, None, topts) == "out"
    call = seen["call"]
    assert (call.sigma, call.guidance, call.n_txt, call.height, call.width) == (0.75, 3.5, 4, 3, 3)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 4 + 9, 128, generator=g) for _ in range(3))
    out, native_calls = _call(holder, q, k, v, {"sigmas": _Explosive(), "img_slice": [4, 9]})
    assert native_calls == []
    with torch.inference_mode():
        want = layer(q, k, v, 4, 0.75, 3.5, height=3, width=3)
    torch.testing.assert_close(out, want.transpose(1, 2).reshape(1, 13, 256), rtol=0, atol=0)
    assert holder.routed_calls == {(0, "single_blocks.0", "student"): 1}
    assert comfy_patch._host_floats(None, 2, torch.tensor([0.5, 0.25]), torch.tensor(1.5)) == [None, 2.0, 0.5, 1.5]


def _window_exact_reference(q, k, v, exact: torch.Tensor) -> torch.Tensor:
    """fp64 softmax of every query over the keys ``exact [N, N]`` marks (no kernel term), ``[B, H, N, D]``."""
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(s.masked_fill(~exact, float("-inf")), dim=-1) @ v.double()


@pytest.mark.parametrize("refs", [[6], [4, 2]])
def test_reference_tokens_are_exact_keys_of_every_query(refs):
    """ReferenceLatent: ComfyUI appends the reference latents' tokens after the grid. The student gets them
    as conditioning (exact for every query): with the kernel term off and radius 0, an image query's
    output is the softmax over text + every reference token + its own tile, built here from that
    definition on ComfyUI's order; text and reference queries see every key. A count that does not add
    up stays native."""
    torch.manual_seed(0)
    cfg = HKRConfig(mode="window", feature_dim=8, window_tile=[1, 2], window_radius=0, gamma_init=-40.0)
    layer = WindowLayer(cfg, num_heads=2)
    holder = _holder_for(layer)
    n_txt, h, w, n_ref = 4, 3, 4, sum(refs)
    holder.call = comfy_patch.CallInfo(n_txt=n_txt, height=h, width=w, guidance=2.0, sigma=0.75)
    n = n_txt + h * w + n_ref
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, n, 128, generator=g) for _ in range(3))
    topts = {"img_slice": [n_txt, n], "reference_image_num_tokens": refs}
    out, native_calls = _call(holder, q, k, v, topts)
    assert native_calls == [] and holder.routed_calls == {(0, "single_blocks.0", "student"): 1}
    exact = torch.zeros(n, n, dtype=torch.bool)
    grid = n_txt + h * w
    exact[:, :n_txt] = exact[:, grid:] = True  # text and reference keys: every query
    exact[:n_txt] = exact[grid:] = True  # text and reference queries: every key
    for i in range(h * w):  # image query: its own 1 x 2 tile (radius 0)
        r, c = divmod(i, w)
        for j in range(h * w):
            if j // w == r and (j % w) // 2 == c // 2:
                exact[n_txt + i, n_txt + j] = True
    want = _window_exact_reference(q, k, v, exact).float().transpose(1, 2).reshape(1, n, 256)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    # the layout helpers are inverse permutations
    t = torch.arange(n).view(1, 1, n, 1).float()
    perm = comfy_patch.reference_layout(t, n_txt, h * w)
    assert perm.flatten().tolist() == list(range(n_txt)) + list(range(grid, n)) + list(range(n_txt, grid))
    assert torch.equal(comfy_patch.comfy_layout(perm, n_txt, h * w), t)
    # one reference token more than ComfyUI announced: native
    q2, k2, v2 = (torch.randn(1, 2, n + 1, 128, generator=g) for _ in range(3))
    _, native_calls = _call(holder, q2, k2, v2, {"img_slice": [n_txt, n + 1], "reference_image_num_tokens": refs})
    assert len(native_calls) == 1 and holder.fallbacks["token count is not text + latent grid + reference tokens"] == 1


def reference_workflow(unet: str, student: str | None) -> dict:
    """:func:`workflow` with FLUX.2 reference-image editing: ReferenceLatent puts a 2-step native sample of a
    6 x 4 token latent (another size than the 8 x 8 grid) into the positive conditioning."""
    p = workflow(unet, student)
    p["10"] = {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 96, "batch_size": 1}}
    p["11"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": 3, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["10", 0], "denoise": 1.0}}
    p["12"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["2", 0], "latent": ["11", 0]}}
    p["5"]["inputs"]["positive"] = ["12", 0]
    return p


def test_reference_latent_workflow_routes_every_call(comfy, setup, tiny_teacher):
    """A ReferenceLatent workflow through ComfyUI's executor: every attention call carries the 24 reference
    tokens after the grid and goes to its student (no fallback). Students whose exact set is every key
    (a window wider than the grid, kernel term off) reproduce the native latent to fp32 rounding, which
    they only do if the reference tokens go in and come out in the right places."""
    heads, keys = tiny_teacher.num_heads, tiny_teacher.layer_keys
    cfg = HKRConfig(mode="window", feature_dim=8, window_radius=4 * GRID, gamma_init=-40.0)
    torch.manual_seed(0)
    _save(setup["folder"] / "students_exact.safetensors", {k: WindowLayer(cfg, num_heads=heads) for k in keys},
          {k: True for k in keys}, cfg, heads)
    native = latent(comfy.run(reference_workflow(setup["unet"], None)))
    assert not torch.allclose(native, setup["base"], rtol=1e-3, atol=1e-4)  # the reference changes the image
    with record_attention() as calls:
        got = latent(comfy.run(reference_workflow(setup["unet"], "students_exact.safetensors")))
    routed = [c for c in calls if c["q"].shape[2] == FLUX2_TXT + GRID * GRID + 24]
    assert len(routed) == STEPS * len(keys)  # the main sampler's calls: text + grid + reference tokens
    holder = comfy_patch.last_runs()[-1]
    assert not holder.fallbacks
    assert sum(n for (_, _, r), n in holder.routed_calls.items() if r == "student") == STEPS * len(keys)
    torch.testing.assert_close(got, native, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hint_key", comfy_patch.COND_TOKEN_HINTS)
def test_conditioning_token_hints(hint_key):
    """A hint gives the number of leading conditioning tokens: here 2 extra prefix tokens ahead of the
    image that neither img_slice nor the context length count (4 + 2 + 3x3 tokens)."""
    torch.manual_seed(0)
    layer = HKRLayer(HKRConfig(feature_dim=8, landmark_min=2), num_heads=2)
    keys = {"double_blocks.0", "single_blocks.0"}
    holder = comfy_patch.build_holder({k: layer for k in keys}, keys, comfy_patch.no_controller_policy(frozenset(keys), 1.0))
    holder.schedule = [1.0, 0.5, 0.0]
    holder.call = comfy_patch.CallInfo(n_txt=4, height=3, width=3, guidance=2.0, sigma=0.75)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 6 + 9, 128, generator=g) for _ in range(3))
    # no hint: img_slice says 4 text tokens, 4 + 9 != 15 -> native (fail-closed)
    out, native_calls = _call(holder, q, k, v, {"img_slice": [4, 11]})
    assert len(native_calls) == 1 and holder.fallbacks["token count is not text + latent grid + reference tokens"] == 1
    # the hint overrides img_slice (single blocks) and the context length (double blocks)
    with torch.inference_mode():
        want = layer(q, k, v, 6, 0.75, 2.0, height=3, width=3).transpose(1, 2).reshape(1, 15, 256)
        wrong = layer(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], 5, 0.75, 2.0, height=3, width=3)
    for topts, index, btype in (({"img_slice": [4, 11]}, 0, "single"), ({}, 0, "double")):
        out, native_calls = _call(holder, q, k, v, {**topts, hint_key: 6}, index, btype)
        assert native_calls == []
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert (out[:, 1:] - wrong.transpose(1, 2).reshape(1, 14, 256)).abs().max() > 1e-4  # n_cond matters
    # first present key wins; a one-element integer tensor counts; bad values stay native with a reason
    first, *rest = comfy_patch.COND_TOKEN_HINTS
    assert comfy_patch.cond_token_hint({rest[-1]: 3, first: torch.tensor([6])}) == 6
    assert comfy_patch.cond_token_hint({"img_slice": [4, 11]}) is None
    for bad in (-1, 2.5, "6", True, torch.tensor([1.0]), torch.tensor([1, 2])):
        out, native_calls = _call(holder, q, k, v, {"img_slice": [4, 11], hint_key: bad})
        assert len(native_calls) == 1
    assert sum(n for r, n in holder.fallbacks.items() if r.startswith("bad conditioning-token hint") and hint_key in r) == 6


def test_conditioning_token_hint_through_comfyui(comfy, setup):
    """A hint put into the MODEL's transformer_options reaches the routing: a consistent one (512) routes
    as without it, an inconsistent one sends every call native."""
    import nodes

    model = nodes.UNETLoader().load_unet(setup["unet"], "default")[0]
    cond = [[torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(1)), {"guidance": GUIDANCE}]]
    lat = {"samples": torch.zeros(1, 128, GRID, GRID)}
    outs = {}
    for hint in (None, FLUX2_TXT, FLUX2_TXT - 3):
        patched = comfy_patch.controller_node(model, setup["folder"] / "students_some.safetensors", None,
                                              quality_speed=1.0, policy_mode="threshold", seed=0)
        if hint is not None:
            patched.model_options["transformer_options"]["cond_token_count"] = hint
        outs[hint] = nodes.common_ksampler(patched, 7, STEPS, 1.0, "euler", "simple", cond, cond, lat)[0]["samples"]
        holder = comfy_patch.last_runs()[-1]
        routed = sum(n for (_, _, r), n in holder.routed_calls.items() if r == "student")
        if hint == FLUX2_TXT - 3:
            assert routed == 0 and sum(holder.fallbacks.values()) == STEPS * len(setup["ready"])
        else:
            assert routed == STEPS * len(setup["ready"]) and not holder.fallbacks
    assert torch.equal(outs[None], outs[FLUX2_TXT])
    assert torch.equal(outs[FLUX2_TXT - 3], setup["base"])  # all native: the unpatched latent


def test_node_under_inference_mode_with_the_fast_path_weight_cache(comfy, setup, monkeypatch):
    """The GPU bug, reproduced on CPU through the node as ComfyUI runs it (inside inference mode): the
    fast path is made to run its first step (the weight cache) and then hand over to the eager forward."""
    from flux2ttr.students import fast_path

    prepared = []

    def fast_forward(layer, q, k, v, *args, **kwargs):
        prepared.append(fast_path.prepared(layer, q.dtype, q.device))  # what the kernel launch does first
        return None  # "kernels do not fit": the layer runs its eager forward

    monkeypatch.setattr(fast_path, "fast_path_reason", lambda *a: None)
    monkeypatch.setattr(fast_path, "fast_forward", fast_forward)
    res = comfy.run(workflow(setup["unet"], "students_some.safetensors", quality_speed=1.0))
    got = latent(res)  # failed before: "Inference tensors do not track version counter"
    holder = comfy_patch.last_runs()[-1]
    assert len(prepared) == STEPS * len(setup["ready"])
    assert len({id(p) for p in prepared}) == len(setup["ready"])  # prepared once per layer, then cached
    assert all(not t.is_inference() for p in prepared for t in p.params)
    assert holder.copies is None  # the finished run let go of the copies
    monkeypatch.undo()
    assert torch.equal(got, latent(comfy.run(workflow(setup["unet"], "students_some.safetensors", quality_speed=1.0))))


def test_student_copies_once_per_patched_model_and_freed_with_it(comfy, setup):
    """Two sampling runs of one patched MODEL share its device copies; the finished runs' holders (kept
    by last_runs) do not keep them, so they go with the patched MODEL."""
    import gc
    import weakref

    import nodes

    model = nodes.UNETLoader().load_unet(setup["unet"], "default")[0]
    patched = comfy_patch.controller_node(model, setup["folder"] / "students_some.safetensors", None,
                                          quality_speed=1.0, policy_mode="threshold", seed=0)
    key = sorted(setup["ready"], key=layer_sort_key)[0]

    class Guider:
        model_options = patched.model_options
        cfg = 1.0

    class Executor:  # stands in for CFGGuider.outer_sample: asks the run's holder for a bf16 copy
        class_obj = Guider()

        def __call__(self, *args, **kwargs):
            with torch.inference_mode():
                run = self.class_obj.model_options["transformer_options"][comfy_patch.HOLDER_KEY]
                return run.student(key, torch.device("cpu"), torch.bfloat16)

    sigmas = torch.tensor([1.0, 0.5, 0.0])
    first = comfy_patch.outer_sample_wrapper(Executor(), None, None, None, sigmas)
    second = comfy_patch.outer_sample_wrapper(Executor(), None, None, None, sigmas)
    config = patched.model_options["transformer_options"][comfy_patch.HOLDER_KEY]
    assert first is second and config.copies.made == 1 and len(config.copies) == 1
    assert all(h.copies is None for h in comfy_patch.last_runs()[-2:])
    assert config.copies.nbytes() == sum(p.numel() * 2 for p in first.parameters())
    ref = weakref.ref(first)
    del first, second, config, Executor, Guider, patched
    gc.collect()
    assert ref() is None


# ------------------------------------------------------------------ non-finite students: never sample silently


class _Poisoned:
    """Stands in for a device copy whose output turns non-finite at run time: from ``sigma <= below`` on,
    one value of its output is ``value`` (the rest is the real student's)."""

    def __init__(self, inner, value: float, below: float):
        self.inner, self.value, self.below = inner, value, below

    def __call__(self, q, k, v, n_cond, sigma, cfg, **kwargs):
        out = self.inner(q, k, v, n_cond, sigma, cfg, **kwargs)
        if sigma <= self.below:
            out = out.clone()
            out[0, 0, -1, 0] = self.value
        return out


def _poison(monkeypatch, keys, value: float = float("nan"), below: float = 1.0) -> None:
    """Every run's student of each of ``keys`` goes non-finite from ``sigma <= below`` on."""
    original = comfy_patch.RoutingHolder.student

    def student(self, key, device, dtype):
        module = original(self, key, device, dtype)
        return _Poisoned(module, value, below) if key in keys else module

    monkeypatch.setattr(comfy_patch.RoutingHolder, "student", student)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_catches_every_nan_and_inf(dtype):
    x = torch.full((2, 3, 64, 8), 6.0e4 if dtype == torch.float16 else 1.0e4, dtype=dtype)  # big but finite
    assert comfy_patch.all_finite(x).item() is True
    for values in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
        y = x.clone()
        y.view(-1)[: len(values)] = torch.tensor(values, dtype=dtype)
        assert comfy_patch.all_finite(y).item() is False, values


def _two_layer_forward(holder, seed: int = 3):
    """A denoiser stand-in for ``diffusion_model_wrapper``: one double and one single block attention call
    (4 text tokens, a 3 x 3 grid), returning both outputs; ``calls`` counts the forwards."""
    g = torch.Generator().manual_seed(seed)
    qkv = {key: [torch.randn(1, 2, 4 + 9, 128, generator=g) for _ in range(3)]
           for key in ("double_blocks.0", "single_blocks.0")}
    calls = []

    def native(q, k, v, heads, **kwargs):
        return softmax64(q, k, v).to(q.dtype)

    def executor(x, timestep, context, y, guidance, ref, control, topts):
        calls.append(float(timestep[0]))
        outs = {}
        for key, (q, k, v) in qkv.items():
            btype, index = key.split("_blocks.")
            extra = {"img_slice": [4, 9]} if btype == "single" else {}
            outs[key] = comfy_patch.attention_override(native, q, k, v, 2, skip_reshape=True, mask=None,
                                                       transformer_options={**topts, "block_type": btype,
                                                                            "block_index": int(index), **extra})
        return outs

    def denoise(sigma: float):
        topts = {comfy_patch.HOLDER_KEY: holder, "sigmas": torch.tensor([sigma]),
                 "sample_sigmas": torch.tensor([1.0, 0.5, 0.0])}
        return comfy_patch.diffusion_model_wrapper(executor, torch.zeros(1, 128, 3, 3), torch.tensor([sigma]),
                                                   torch.zeros(1, 4, 64), None, torch.tensor([2.0]), None, None, topts)

    return denoise, qkv, calls


def _want(layer, qkv, sigma):
    q, k, v = qkv
    with torch.inference_mode():
        return layer(q, k, v, 4, sigma, 2.0, height=3, width=3).transpose(1, 2).reshape(1, 13, 256)


def test_student_turning_non_finite_mid_run_reruns_the_call_with_that_layer_native(monkeypatch):
    """single_blocks.0 goes NaN at step 1: that denoiser call is computed again with it native (the result is
    exactly the native attention there), it stays native for the rest of the run, and each of its calls sent
    native is a counted fallback; the other student is untouched. The flags are read once per forward."""
    keys = ("double_blocks.0", "single_blocks.0")
    torch.manual_seed(0)
    layers = {k: HKRLayer(HKRConfig(feature_dim=8, landmark_min=2), num_heads=2) for k in keys}
    holder = comfy_patch.build_holder(layers, set(keys), comfy_patch.no_controller_policy(frozenset(keys), 1.0))
    _poison(monkeypatch, {"single_blocks.0"}, float("nan"), below=0.5)
    reads = []
    first_nonfinite = comfy_patch._first_nonfinite
    monkeypatch.setattr(comfy_patch, "_first_nonfinite", lambda flags: reads.append(len(flags)) or first_nonfinite(flags))
    denoise, qkv, calls = _two_layer_forward(holder)

    out0 = denoise(1.0)  # step 0: both students, finite
    for key in keys:
        torch.testing.assert_close(out0[key], _want(layers[key], qkv[key], 1.0), rtol=0, atol=0)
    assert calls == [1.0] and reads == [2] and holder.reruns == 0 and not holder.fallbacks

    out1 = denoise(0.5)  # step 1: single_blocks.0 non-finite -> computed again with it native
    assert calls == [1.0, 0.5, 0.5] and reads == [2, 2, 1]
    assert torch.equal(out1["single_blocks.0"], softmax64(*qkv["single_blocks.0"]).float())
    torch.testing.assert_close(out1["double_blocks.0"], _want(layers["double_blocks.0"], qkv["double_blocks.0"], 0.5),
                               rtol=0, atol=0)
    assert holder.disabled == {"single_blocks.0": 1} and holder.reruns == 1
    assert holder.fallbacks == {comfy_patch.NONFINITE: 1}
    assert holder.routed_calls == {(0, "double_blocks.0", "student"): 1, (0, "single_blocks.0", "student"): 1,
                                   (1, "double_blocks.0", "student"): 1, (1, "single_blocks.0", "native"): 1}
    assert any("step 1: single_blocks.0 student output is not finite" in line for line in holder.log_lines)

    out2 = denoise(0.5)  # later calls of the run: native from the start, no second forward
    assert calls[3:] == [0.5] and holder.reruns == 1 and holder.fallbacks == {comfy_patch.NONFINITE: 2}
    assert torch.equal(out2["single_blocks.0"], out1["single_blocks.0"])
    assert not holder.fresh().disabled  # the next run starts with every ready layer again


def test_first_non_finite_layer_is_disabled_first(monkeypatch):
    """Both students give inf: the first in call order is disabled, then (computed again) the second."""
    keys = ("double_blocks.0", "single_blocks.0")
    torch.manual_seed(0)
    layers = {k: HKRLayer(HKRConfig(feature_dim=8, landmark_min=2), num_heads=2) for k in keys}
    holder = comfy_patch.build_holder(layers, set(keys), comfy_patch.no_controller_policy(frozenset(keys), 1.0))
    _poison(monkeypatch, set(keys), float("inf"))
    denoise, qkv, calls = _two_layer_forward(holder)
    out = denoise(1.0)
    assert len(calls) == 3 and holder.reruns == 2
    assert list(holder.disabled) == ["double_blocks.0", "single_blocks.0"]
    for key in keys:
        assert torch.equal(out[key], softmax64(*qkv[key]).float())
    assert holder.fallbacks == {comfy_patch.NONFINITE: 2}
    assert all(route == "native" for (_, _, route) in holder.routed_calls)


def test_non_finite_output_outside_the_denoiser_wrapper_is_checked_at_the_call(monkeypatch):
    torch.manual_seed(0)
    holder = _holder_for(HKRLayer(HKRConfig(feature_dim=8, landmark_min=2), num_heads=2))
    holder.call = comfy_patch.CallInfo(n_txt=4, height=3, width=3, guidance=2.0, sigma=0.75)
    _poison(monkeypatch, {"single_blocks.0"})
    q, k, v = (torch.randn(1, 2, 4 + 9, 128, generator=torch.Generator().manual_seed(4)) for _ in range(3))
    out, native_calls = _call(holder, q, k, v, {"img_slice": [4, 9]})
    assert len(native_calls) == 1 and torch.equal(out, softmax64(q, k, v).float())
    assert holder.disabled == {"single_blocks.0": 0} and holder.fallbacks == {comfy_patch.NONFINITE: 1}


def test_non_finite_students_in_comfyui_sample_the_native_latent(comfy, setup, monkeypatch):
    """Every ready student outputs NaN: through ComfyUI's executor the run succeeds with exactly the
    unpatched latent, and every call sent native is counted and logged."""
    ready = setup["ready"]
    _poison(monkeypatch, ready, float("nan"))
    res = comfy.run(workflow(setup["unet"], "students_some.safetensors", quality_speed=1.0))
    got = latent(res)
    assert torch.isfinite(got).all() and torch.equal(got, setup["base"])
    holder = comfy_patch.last_runs()[-1]
    assert holder.disabled == {k: 0 for k in ready} and holder.reruns == len(ready)
    assert holder.fallbacks == {comfy_patch.NONFINITE: STEPS * len(ready)}
    assert all(route == "native" for (_, _, route) in holder.routed_calls)
    assert sum("student output is not finite" in line for line in holder.log_lines) == len(ready)


def _latent_with_layer_not_ready(comfy, setup, layer: str, name: str) -> torch.Tensor:
    """The final latent of ``students_some`` saved as ``name`` with ``layer`` marked not ready."""
    art = load_students(setup["folder"] / "students_some.safetensors")
    _save(setup["folder"] / name, art.layers, {k: k in setup["ready"] and k != layer for k in art.layers}, art.cfg,
          art.num_heads)
    return latent(comfy.run(workflow(setup["unet"], name, quality_speed=1.0)))


def test_one_non_finite_student_in_comfyui_equals_that_layer_not_ready(comfy, setup, monkeypatch):
    """Only the last ready single block gives inf: the latent is exactly that of an artifact where that
    layer is not ready (the other students still run)."""
    bad = max((k for k in setup["ready"] if k.startswith("single_blocks.")), key=layer_sort_key)
    want = _latent_with_layer_not_ready(comfy, setup, bad, "students_some_without_bad.safetensors")
    _poison(monkeypatch, {bad}, float("inf"))
    got = latent(comfy.run(workflow(setup["unet"], "students_some.safetensors", quality_speed=1.0)))
    assert torch.equal(got, want) and not torch.equal(got, setup["base"])
    holder = comfy_patch.last_runs()[-1]
    assert holder.disabled == {bad: 0} and holder.reruns == 1
    assert holder.fallbacks == {comfy_patch.NONFINITE: STEPS}
    assert sum(n for (_, _, r), n in holder.routed_calls.items() if r == "student") == STEPS * (len(setup["ready"]) - 1)


def test_student_going_non_finite_late_in_comfyui_resamples_the_run_without_it(comfy, setup, monkeypatch):
    """A student that turns NaN only halfway through the run: the flags are read once per run, so the run
    is sampled again from its inputs with that layer native throughout: exactly the latent of an artifact
    where it is not ready; the step it first went non-finite is kept."""
    bad = min((k for k in setup["ready"] if k.startswith("single_blocks.")), key=layer_sort_key)
    want = _latent_with_layer_not_ready(comfy, setup, bad, "students_some_without_late.safetensors")
    schedule = comfy_patch.last_runs()[-1].schedule
    half = STEPS // 2
    _poison(monkeypatch, {bad}, float("nan"), below=schedule[half])
    reads = []
    first_nonfinite = comfy_patch._first_nonfinite
    monkeypatch.setattr(comfy_patch, "_first_nonfinite", lambda flags: reads.append(len(flags)) or first_nonfinite(flags))
    got = latent(comfy.run(workflow(setup["unet"], "students_some.safetensors", quality_speed=1.0)))
    assert torch.equal(got, want)
    holder = comfy_patch.last_runs()[-1]
    n_ready = len(setup["ready"])
    assert holder.disabled == {bad: half} and holder.reruns == 1
    assert reads == [STEPS * n_ready, STEPS * (n_ready - 1)]  # one read per run, of every routed call's flag
    assert holder.fallbacks == {comfy_patch.NONFINITE: STEPS}


def _rewrite_tensor(src, dst, name: str, value: float) -> None:
    """Copy artifact ``src`` to ``dst`` with one value of tensor ``name`` set to ``value`` (header unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    t = tensors[name].clone()
    t.view(-1)[0] = value
    tensors[name] = t
    save_file(tensors, str(dst), metadata=meta)


def test_nan_student_artifact_fails_the_node_naming_layer_and_tensor(comfy, setup):
    folder = setup["folder"]
    _rewrite_tensor(folder / "students_some.safetensors", folder / "students_nan.safetensors",
                    "single_blocks.0.phi_q.net.0.weight", float("nan"))
    res = comfy.run(workflow(setup["unet"], "students_nan.safetensors", quality_speed=1.0))
    assert not res.success and "latent" not in res.captured
    msg = res.error()
    assert "Flux2TTRController: student artifact is unusable" in msg and "students_nan.safetensors" in msg
    assert "layer single_blocks.0: tensor 'single_blocks.0.phi_q.net.0.weight' has 1 of" in msg
    assert "non-finite (NaN 1, inf 0)" in msg and "re-run distill" in msg


def test_nan_controller_artifact_fails_the_node(comfy, setup):
    folder = setup["folder"]
    _rewrite_tensor(folder / "controller.safetensors", folder / "controller_nan.safetensors", "head.4.weight",
                    float("nan"))
    res = comfy.run(workflow(setup["unet"], "students_some.safetensors", controller="controller_nan.safetensors"))
    assert not res.success and "latent" not in res.captured
    msg = res.error()
    assert "Flux2TTRController: controller artifact is unusable" in msg
    assert "controller weight 'head.4.weight' has 1 of" in msg and "retrain it" in msg
