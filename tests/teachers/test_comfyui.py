"""The ``comfyui`` teacher on the tiny teacher's files, run by the real ComfyUI (``$COMFYUI_PATH``).

The tiny FLUX.2 file is loaded by ComfyUI's loader; its codec file stands in for the text encoder and the
VAE (what the pack's tiny text-encode and decode nodes run). Then the trace store it captures equals the
``tiny`` kind's tensor by tensor to float32 rounding; tuples with reference latents are the raw ComfyUI
attention call moved to ``[text, refs, grid]``; true CFG samples as ComfyUI's CFG and stores both halves;
student rollouts go through the node's patch and equal the diffusers router's; and missing or unusable
files are clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from flux2ttr.config import ConfigError
from flux2ttr.contract import reference_token_order
from flux2ttr.teachers.sampler import SamplerConfig, flux2_sigmas, initial_noise, sample
from flux2ttr.teachers.teacher import TeacherConfig, TeacherError, load_teacher, load_tiny_teacher
from flux2ttr.traces.capture import CaptureConfig, capture, query_positions
from flux2ttr.traces.store import ARRAY_FIELDS, TraceStore

PROMPTS = ["a red fox in the snow", "ein Leuchtturm am Meer", "a bowl of ramen"]
GRID = 4                     # 64 px: a 4x4 latent grid, 16 image tokens
N_TXT = 512
ROUNDING_REL = 2e-5          # float32 rounding over two sampler steps of a 5-block model (measured ~1e-6)


def scfg(steps: int = 2, **kw) -> SamplerConfig:
    return SamplerConfig(steps=steps, guidance=3.5, height=16 * GRID, width=16 * GRID, seed=100, **kw)


def comfy_cfg(tiny_teacher, comfy, tmp_path=None) -> TeacherConfig:
    codec = tiny_teacher.folder / "tiny_codec.safetensors"
    return TeacherConfig(kind="comfyui", out_dir=str(tmp_path or tiny_teacher.folder / "comfyui"),
                         transformer=str(tiny_teacher.path), text_encoder=str(codec), vae=str(codec),
                         comfyui_path=str(comfy.root))


@pytest.fixture(scope="module")
def teachers(comfy, tiny_teacher):
    """``(tiny kind, comfyui kind)`` on the same files (ComfyUI imported by the session fixture first)."""
    tiny = load_tiny_teacher(tiny_teacher.config, tiny_teacher.folder)
    return tiny, load_teacher(comfy_cfg(tiny_teacher, comfy))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def capture_cfg(tmp_path, name: str, **kw) -> CaptureConfig:
    base = dict(store=str(tmp_path / f"{name}.zarr"), metrics="", queries=24, layers="all", storage_dtype="float32",
                budget_mib=256, batch_size=2, seed=3)
    base.update(kw)
    return CaptureConfig(**base)


def read_all(store: TraceStore, layer: str, n: int) -> dict[str, torch.Tensor]:
    count = dict(store.groups(layer))[n]
    return store.read(layer, n, list(range(count)))


def test_teacher_shape_and_identity(teachers, tiny_teacher):
    tiny, ct = teachers
    assert (ct.num_heads, ct.head_dim, ct.in_channels, ct.context_dim) == (tiny.num_heads, 128, 128, tiny.context_dim)
    assert ct.layer_keys == tiny.layer_keys == tiny_teacher.layer_keys
    assert ct.identity["kind"] == "comfyui" and ct.identity["comfyui"]["version"] != "unknown"
    files = ct.identity["files"]
    assert files["transformer"]["sha256"] == tiny.identity["sha256"]  # the very file the tiny kind loads
    assert ct.identity["sha256"] not in (tiny.identity["sha256"], files["text_encoder"]["sha256"])  # over all three
    # the prompt encoder and the decoder are the tiny teacher's
    torch.testing.assert_close(ct.encode_prompts(PROMPTS), tiny.encode_prompts(PROMPTS), rtol=0, atol=0)
    lat = torch.randn(2, GRID * GRID, 128, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ct.decode(lat, GRID, GRID), tiny.decode(lat, GRID, GRID), rtol=0, atol=1e-7)


def test_schedule_is_flux2_schedulers(comfy):
    """The project's sigmas are ComfyUI's Flux2Scheduler's (what a FLUX.2 workflow samples with)."""
    import comfy_extras.nodes_flux as nodes_flux

    for steps, tokens in ((4, 64), (28, 4096), (50, 16384)):
        ours = flux2_sigmas(steps, tokens).float()
        theirs = nodes_flux.get_schedule(steps, tokens)
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=1e-7)


def test_sampling_equals_tiny_kind(teachers):
    tiny, ct = teachers
    seeds = [7, 8]
    a = sample(tiny, PROMPTS[:2], scfg(3), seeds=seeds)
    b = sample(ct, PROMPTS[:2], scfg(3), seeds=seeds)
    assert b.shape == a.shape == (2, GRID * GRID, 128) and b.dtype == torch.float32 and not b.is_inference()
    assert 0 < rel(b, a) < ROUNDING_REL  # two implementations (ComfyUI's sampler and model), one result
    other = sample(ct, PROMPTS[:2], scfg(3), seeds=[7, 9])
    assert rel(other[1], a[1]) > 0.1 and rel(other[0], a[0]) < ROUNDING_REL  # the comparison can fail


def test_trace_store_equals_tiny_kinds(teachers, tmp_path):
    """The tentpole: a capture through ComfyUI's attention override gives the tiny kind's store."""
    tiny, ct = teachers
    s_tiny = capture(tiny, PROMPTS, capture_cfg(tmp_path, "tiny"), scfg(), progress=False)
    s_comfy = capture(ct, PROMPTS, capture_cfg(tmp_path, "comfy"), scfg(), progress=False)
    assert s_comfy["offered"] == s_tiny["offered"] == s_comfy["kept"] == 3 * 2 * len(tiny.layer_keys)
    a, b = TraceStore.open(tmp_path / "tiny.zarr"), TraceStore.open(tmp_path / "comfy.zarr")
    assert b.attrs["teacher"]["kind"] == "comfyui" and a.attrs["teacher"]["kind"] == "tiny"
    assert a.attrs["capture"] == {**b.attrs["capture"], "store": a.attrs["capture"]["store"]}
    assert b.layers == a.layers == tiny.layer_keys
    worst = {}
    for layer in a.layers:
        assert b.groups(layer) == a.groups(layer) == [(N_TXT + GRID * GRID, 6)]
        x, y = read_all(a, layer, N_TXT + GRID * GRID), read_all(b, layer, N_TXT + GRID * GRID)
        for name in ("q_idx", "n_cond", "h", "w", "prompt", "step", "seed", "uncond"):
            assert torch.equal(x[name], y[name]), (layer, name)
        torch.testing.assert_close(y["sigma"], x["sigma"], rtol=1e-6, atol=0)
        torch.testing.assert_close(y["cfg"], x["cfg"], rtol=0, atol=0)
        for name in ARRAY_FIELDS:
            worst[(layer, name)] = rel(y[name], x[name])
    assert max(worst.values()) < ROUNDING_REL, max(worst.items(), key=lambda kv: kv[1])
    assert max(worst.values()) > 0  # two computations, not one store read twice


def _attention_fp64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def test_reference_tuples_are_the_permuted_raw_call(teachers, tmp_path, monkeypatch):
    """With reference latents ComfyUI's call is ``[text, grid, refs]``; the stored tuple is that call in the
    node's order ``[text, refs, grid]`` with ``n_cond = 512 + refs`` and the grid as ``h, w``."""
    from flux2ttr.teachers import comfyui

    tiny, ct = teachers
    layer, step = "single_blocks.1", 1
    raw: dict[tuple[int, int], tuple] = {}
    original = comfyui.CaptureHooks.attention

    def recording(self, func, *args, **kwargs):  # ComfyUI's call as it comes, before the hook reorders it
        topts = kwargs["transformer_options"]
        if (topts.get("block_type"), topts.get("block_index")) == ("single", 1) and self.call.state.step == step:
            out = func(*args, **{**kwargs, "skip_output_reshape": True})
            for r, p in enumerate(self.call.state.prompt_index):
                raw[(p, r)] = (args[0][r].clone(), args[1][r].clone(), args[2][r].clone(), out[r].clone(),
                               list(topts["reference_image_num_tokens"]))
        return original(self, func, *args, **kwargs)

    monkeypatch.setattr(comfyui.CaptureHooks, "attention", recording)
    given: list = []
    sample_of = ct.sample

    def spy(prompts, cfg, **kw):  # what capture hands the teacher
        if kw.get("router") is not None:
            given.append((kw["prompt_indices"], kw["references"]))
        return sample_of(prompts, cfg, **kw)

    monkeypatch.setattr(ct, "sample", spy)
    n_ref = 2
    cfg = capture_cfg(tmp_path, "refs", layers=[layer], steps=[step], reference_latents=n_ref, batch_size=3)
    stats = capture(ct, PROMPTS, cfg, scfg(), progress=False)
    assert stats["ranks"][0]["reference_rollouts"] == len(PROMPTS)  # each prompt's latent sampled once, alone
    store = TraceStore.open(tmp_path / "refs.zarr")
    grid = GRID * GRID
    n = N_TXT + grid + n_ref * grid
    assert store.groups(layer) == [(n, 3)]
    assert store.attrs["references"]["count"] == n_ref
    batch = read_all(store, layer, n)
    perm = reference_token_order(N_TXT, grid, n_ref * grid)
    for i in range(3):
        p = int(batch["prompt"][i])
        q, k, v, out, ref_tokens = raw[(p, p)]
        assert ref_tokens == [grid] * n_ref
        assert int(batch["n_cond"][i]) == N_TXT + n_ref * grid and (int(batch["h"][i]), int(batch["w"][i])) == (GRID,) * 2
        idx = batch["q_idx"][i]
        torch.testing.assert_close(idx.numpy(), query_positions(n, cfg.queries, cfg.seed, p, 100 + p, step, layer),
                                   rtol=0, atol=0)
        # exactly the raw call, permuted (float32 storage: no rounding)
        assert torch.equal(batch["k"][i], k[:, perm]) and torch.equal(batch["v"][i], v[:, perm])
        assert torch.equal(batch["q_sub"][i], q[:, perm][:, idx])
        assert torch.equal(batch["teacher_sub"][i], out[:, perm][:, idx])
        # and still the softmax attention of what is stored (attention commutes with the permutation)
        assert rel(_attention_fp64(batch["q_sub"][i], batch["k"][i], batch["v"][i]), batch["teacher_sub"][i]) < 1e-5
        # the grid stays last, in its latent layout: the stored tail is the raw call's grid block
        assert torch.equal(batch["k"][i][:, -grid:], k[:, N_TXT:N_TXT + grid])
    # prompt i's references: the final latents of prompts i+1, i+2 (mod 3), each sampled alone at its seed
    monkeypatch.undo()
    (indices, refs), = given
    assert indices == [0, 1, 2]
    alone = [sample(ct, [PROMPTS[p]], scfg(), seeds=[100 + p], prompt_indices=[p])[0] for p in range(3)]
    for i in range(3):
        assert [torch.equal(r, alone[(i + j) % 3]) for j, r in enumerate(refs[i], start=1)] == [True, True]

    # distill trains on such a store unchanged (the refs are conditioning tokens the window student sees exactly)
    from flux2ttr.distill.trainer import DistillConfig, train
    from flux2ttr.students.hkr import HKRConfig

    dcfg = DistillConfig(store=str(tmp_path / "refs.zarr"), artifact=str(tmp_path / "a.safetensors"),
                         metrics=str(tmp_path / "m.json"), plots_dir=str(tmp_path / "plots"),
                         checkpoint_dir=str(tmp_path / "ck"), steps=4, batch_size=1, val_every=4, checkpoint_every=4,
                         min_updates=1, val_fraction=0.34, progress=False)
    res = train(dcfg, HKRConfig(window_tile=[2, 2], window_radius=1, feature_dim=16), expected_teacher=None)
    assert res.steps_run == 4 and math.isfinite(res.layer_metrics[layer]["val_cos_sim"])


def test_true_cfg_is_comfyuis_and_captures_both_halves(teachers, tmp_path):
    tiny, ct = teachers
    neg, scale = "blurry, low quality", 3.0
    one = scfg(1, cfg=scale, negative_prompt=neg)
    # one Euler step from sigma 1 to 0: x1 = x0 - (v_u + scale (v_c - v_u)), v from the tiny kind's denoiser
    x0 = initial_noise([100], GRID * GRID, 128)
    cond = tiny.encode_prompts([PROMPTS[0], neg])
    with torch.no_grad():
        v = tiny.denoise(x0.expand(2, -1, -1), 1.0, cond, 3.5, GRID, GRID)
    expected = x0 - (v[1] + scale * (v[0] - v[1]))
    got = sample(ct, [PROMPTS[0]], one, seeds=[100])
    assert rel(got, expected) < ROUNDING_REL
    assert rel(sample(ct, [PROMPTS[0]], scfg(1), seeds=[100]), expected) > 0.05  # CFG changed the result
    with pytest.raises(ConfigError, match="true CFG"):
        sample(tiny, [PROMPTS[0]], one, seeds=[100])

    # both halves stored; the cond half keeps the keys of a capture without CFG (same tuples at step 0)
    two = scfg(2, cfg=scale, negative_prompt=neg)
    capture(ct, PROMPTS[:2], capture_cfg(tmp_path, "cfg", layers=["single_blocks.0"]), two, progress=False)
    capture(ct, PROMPTS[:2], capture_cfg(tmp_path, "nocfg", layers=["single_blocks.0"]), scfg(2), progress=False)
    capture(ct, [neg, neg], capture_cfg(tmp_path, "neg", layers=["single_blocks.0"]), scfg(2), progress=False)
    n = N_TXT + GRID * GRID
    cfg_b, plain, negs = (read_all(TraceStore.open(tmp_path / f"{s}.zarr"), "single_blocks.0", n)
                          for s in ("cfg", "nocfg", "neg"))
    assert sorted(zip(cfg_b["prompt"].tolist(), cfg_b["step"].tolist(), cfg_b["uncond"].tolist())) == [
        (p, s, u) for p in range(2) for s in range(2) for u in (0, 1)]
    assert set(plain["uncond"].tolist()) == {0} and float(cfg_b["cfg"][0]) == 3.5  # students see the guidance
    for p in range(2):
        def row(batch, prompt, step, uncond=0):
            hit = [i for i in range(len(batch["prompt"])) if (int(batch["prompt"][i]), int(batch["step"][i]),
                                                               int(batch["uncond"][i])) == (prompt, step, uncond)]
            assert len(hit) == 1
            return hit[0]

        c, u, ref = row(cfg_b, p, 0), row(cfg_b, p, 0, 1), row(plain, p, 0)
        assert torch.equal(cfg_b["q_idx"][c], plain["q_idx"][ref])
        assert rel(cfg_b["k"][c], plain["k"][ref]) < ROUNDING_REL  # step 0: the same noise, the same cond call
        assert not torch.equal(cfg_b["q_idx"][u], cfg_b["q_idx"][c])  # the uncond half has its own draw
        # the uncond rows are the negative prompt's call on the same noise (seed 100 + p)
        assert rel(cfg_b["k"][u], negs["k"][row(negs, p, 0)]) < ROUNDING_REL
        assert rel(cfg_b["k"][row(cfg_b, p, 1)], plain["k"][row(plain, p, 1)]) > 1e-3  # CFG moved step 1


def test_student_rollout_goes_through_the_node_patch(teachers, tmp_path):
    """Routed rollouts of the comfyui teacher run the node's patch and give the diffusers router's result."""
    from flux2ttr.comfy.patch import last_runs
    from flux2ttr.routing.student_rollout import make_router, run_student_rollout
    from flux2ttr.students.artifacts import load_students, save_students
    from flux2ttr.students.hkr import HKRConfig, HKRLayer

    tiny, ct = teachers
    torch.manual_seed(0)
    hcfg = HKRConfig(feature_dim=16, landmark_min=4)
    keys = tiny.single_layer_keys
    layers = {k: HKRLayer(hcfg, num_heads=tiny.num_heads) for k in keys}
    path = tmp_path / "students.safetensors"
    save_students(path, layers, hcfg, num_heads=tiny.num_heads, ready={k: True for k in keys},
                  metrics={k: {"val_cos_sim": 0.5} for k in keys}, train_config={"test": True}, teacher={"name": "t"})
    art = load_students(path)
    cfg = scfg(3)
    masks = torch.ones(3, len(tiny.layer_keys), dtype=torch.bool)
    masks[1, 2] = masks[2, 3] = masks[2, 4] = False  # single_blocks.1 at step 1, .2 and .3 at step 2
    results = []
    for t in (tiny, ct):
        router = make_router(t, art.layers)
        try:
            results.append(run_student_rollout(t, router, [PROMPTS[0]], cfg, masks, t.layer_keys, seeds=[5]))
            full = run_student_rollout(t, router, [PROMPTS[0]], cfg, torch.ones_like(masks), t.layer_keys, seeds=[5])
        finally:
            router.uninstall()
    a, b = results
    assert b.student_calls == a.student_calls == {"single_blocks.1": 1, "single_blocks.2": 1, "single_blocks.3": 1}
    assert rel(b.latents, a.latents) < ROUNDING_REL and rel(b.images, a.images) < ROUNDING_REL
    assert rel(full.latents, b.latents) > 1e-3  # the students changed the image
    run = last_runs()[-1]  # the node's per-run holder of the last (all-full) rollout: native everywhere
    assert run.label == "flux2ttr rollout" and not any(how == "student" for (_, _, how) in run.routed_calls)
    assert last_runs()[-2].masks[2] == frozenset({"single_blocks.2", "single_blocks.3"})


# ------------------------------------------------------------------------------------------ errors
def test_missing_files_name_the_param(tiny_teacher, comfy, tmp_path):
    from flux2ttr.teachers.comfyui import validate_comfyui_paths

    good = comfy_cfg(tiny_teacher, comfy, tmp_path)
    for param, value, words in (("transformer", "", "teacher.transformer is empty"),
                                ("vae", str(tmp_path / "nope.safetensors"), "teacher.vae: "),
                                ("text_encoder", str(tmp_path), "is a folder"),
                                ("comfyui_path", str(tmp_path), "teacher.comfyui_path: ")):
        cfg = TeacherConfig(**{**good.__dict__, param: value})
        with pytest.raises(TeacherError, match=words):
            validate_comfyui_paths(cfg)
        with pytest.raises(TeacherError, match=words):
            load_teacher(cfg)
    assert validate_comfyui_paths(good)["transformer"] == tiny_teacher.path


def test_klein_text_encoder_without_its_tokenizer_folder(tiny_teacher, comfy, tmp_path):
    """Klein's Qwen3 tokenizer is a folder of the ComfyUI tree, trimmed from the shared one: a clear error
    before any weight loads. A dev (Mistral) file must carry its tokenizer; anything else is refused."""
    from safetensors.torch import save_file

    from flux2ttr.teachers.comfyui import QWEN_TOKENIZER_DIR

    assert not (comfy.root / QWEN_TOKENIZER_DIR).exists()  # the shared tree is trimmed
    files = {
        "qwen3_4b": ({"model.layers.0.post_attention_layernorm.weight": torch.zeros(2560),
                      "model.layers.0.self_attn.q_norm.weight": torch.zeros(128)}, "qwen25_tokenizer"),
        "mistral": ({"model.layers.0.post_attention_layernorm.weight": torch.zeros(5120)}, "tekken_model"),
        "clip_l": ({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(4, 4)}, "does not recognise"),
    }
    for name, (tensors, words) in files.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        cfg = TeacherConfig(**{**comfy_cfg(tiny_teacher, comfy, tmp_path).__dict__, "text_encoder": str(path)})
        with pytest.raises(TeacherError, match=words) as err:
            load_teacher(cfg)
        assert "teacher.text_encoder" in str(err.value)
        if name == "qwen3_4b":
            assert "teacher.comfyui_path" in str(err.value) and "QWEN3_4B" in str(err.value)


def test_tiny_kind_refuses_reference_latents(teachers, tmp_path):
    tiny, _ = teachers
    with pytest.raises(ConfigError, match="reference_latents"):
        capture(tiny, PROMPTS, capture_cfg(tmp_path, "x", reference_latents=1), scfg(), progress=False)
    assert not (tmp_path / "x.zarr").exists()

