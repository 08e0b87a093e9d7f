"""Distill stage on tiny synthetic stores (teacher_sub = exact softmax attention): outputs, exact resume,
readiness hysteresis across a resume, the prompt-level validation split, bad and damaged stores, NaN tuples
(dropped one by one, reported once), the
validation metrics against an fp64 reference, the DistillTrainer object driven step by step, and the
torchrun (gloo, 2 processes) path."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from flux2ttr.distill.trainer import (
    DistillConfig,
    DistillError,
    DistillTrainer,
    _build_layer,
    expected_teacher_identity,
    load_val_batches,
    pareto_frontier,
    student_forward,
    train,
    validation_metrics,
)
from flux2ttr.students.artifacts import load_students
from flux2ttr.students.hkr import HKRConfig, HKRLayer
from flux2ttr.students.window import WindowLayer
from flux2ttr.traces.loader import BatchPlanner, PrefetchLoader, split_by_prompt
from flux2ttr.traces.store import TraceStore, TraceWriter
from helpers.outputs import check_metrics_file, check_png, details_of
from helpers.traces import TEACHER, make_store, make_tuple
from stages.distill import run_stage

HKR = HKRConfig(mode="hkr", head_dim=16, feature_dim=8, landmark_min=2, landmark_max=4, cond_hidden=8)
WINDOW = HKRConfig(mode="window", head_dim=16, feature_dim=8, window_tile=[2, 2], window_radius=1, cond_hidden=8)
LAYERS = ("single_blocks.0", "single_blocks.1", "single_blocks.2")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("distill") / "s.zarr", layers=LAYERS, prompts=5, steps=4)


def config(tmp: Path, store: Path, **kw) -> DistillConfig:
    base = dict(store=str(store), artifact=str(tmp / "a.safetensors"), metrics=str(tmp / "m.json"),
                plots_dir=str(tmp / "plots"), checkpoint_dir=str(tmp / "ck"), steps=12, batch_size=2,
                val_every=6, checkpoint_every=6, min_updates=3, readiness_threshold=0.2, progress=False,
                torch_threads=1, max_swap_layers=2)
    base.update(kw)
    return DistillConfig(**base)


def artifact_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_outputs_metrics_plots_and_artifact(tmp_path, store, capsys):
    cfg = config(tmp_path, store, steps=30, val_every=10, min_updates=5, readiness_threshold=0.08)
    res = train(cfg, HKR, expected_teacher=TEACHER)
    out = capsys.readouterr().out
    # the DVC metrics: a few numbers; every layer's figures and the run summary are in the details file
    small = check_metrics_file(cfg.metrics)
    metrics = details_of(cfg.metrics)
    assert set(small) == {"ready", "cos_dist", "seconds"}
    assert small["ready"] == metrics["summary"]["ready_layers"] == res.summary["ready_layers"]
    assert small["cos_dist"] == {"max": max(m["val_cos_dist"] for m in metrics["layers"].values())}
    assert metrics["summary"] == res.summary
    assert set(metrics["layers"]) == set(LAYERS)
    for key, m in metrics["layers"].items():
        assert m["val_cos_sim"] == pytest.approx(1 - m["val_cos_dist"])
        assert m["ready"] == (m["val_cos_dist"] < 0.08 and m["updates"] >= 5)
        assert 0 < m["alpha"] < HKR.alpha_max and 0 < m["alpha_sigmoid"] < 1
        assert f"{key}" in out and ("READY" in out or "not ready" in out)
        assert m["updates"] > 0 and m["tuples_trained"] >= m["updates"]
    s = metrics["summary"]
    assert s["ready_layers"] == sum(m["ready"] for m in metrics["layers"].values())
    assert s["pareto_frontier"] == pytest.approx(pareto_frontier(metrics["layers"]))
    dists = [m["val_cos_dist"] for m in metrics["layers"].values()]
    assert s["val_cos_dist"]["min"] == pytest.approx(min(dists)) and s["val_cos_dist"]["max"] == pytest.approx(max(dists))
    assert f"{s['ready_layers']}/3 layers ready" in out
    # the plot tables: long format, one row per (validation step, layer), the metric last
    for name in ("val_cos_dist", "val_cos_dist_ema", "val_nmse", "val_p95_err"):
        lines = Path(cfg.plots_dir, f"{name}.csv").read_text().splitlines()
        assert lines[0] == f"step,layer,{name}"
        rows = [row.split(",") for row in lines[1:]]
        assert [(int(s), k) for s, k, _ in rows] == [(s, k) for s in (10, 20, 30) for k in LAYERS]
        last = {k: float(v) for s, k, v in rows if s == "30"}
        assert last == pytest.approx({k: metrics["layers"][k][name] for k in LAYERS}, rel=1e-5)
    check_png(Path(cfg.plots_dir, "validation.png"))
    # the artifact: readiness and metrics in its header, weights equal to the trained students
    art = load_students(cfg.artifact, expect_layers=list(LAYERS), teacher=TEACHER)
    assert art.ready == {k: metrics["layers"][k]["ready"] for k in LAYERS}
    assert art.metrics["single_blocks.1"]["val_nmse"] == pytest.approx(metrics["layers"]["single_blocks.1"]["val_nmse"])
    for key in LAYERS:
        for name, t in res.students[key].state_dict().items():
            assert torch.equal(art.layers[key].state_dict()[name], t)


def test_training_learns_structured_attention(tmp_path):
    # queries share a direction per head: attention follows the keys' projection on it (learnable)
    store = make_store(tmp_path / "focus.zarr", layers=("single_blocks.0",), prompts=5, steps=4, focus=2.0)
    cfg = config(tmp_path, store, steps=120, val_every=40, checkpoint_every=120, lr=2e-3)
    res = train(cfg, HKR, expected_teacher=TEACHER)
    s = TraceStore.open(store)
    split = split_by_prompt(s, cfg.val_fraction, cfg.seed)
    init = _build_layer("single_blocks.0", cfg, HKR, num_heads=2).student
    before = validation_metrics(init, load_val_batches(s, split, "single_blocks.0", cfg))["val_cos_dist"]
    after = res.layer_metrics["single_blocks.0"]["val_cos_dist"]
    assert before > 0.2 and after < 0.5 * before


def test_window_mode_learns_the_complement_and_round_trips(tmp_path):
    """Attention that is global, not local (queries share a direction per head): the window's exact part
    sees little of it, so what the student gains comes from the kernel term learning the rest."""
    store = make_store(tmp_path / "focus.zarr", layers=("single_blocks.0",), prompts=5, steps=4, focus=2.0,
                       hgrid=12, wgrid=12)  # the 2x2-tile, radius-1 window sees at most 6x6 of the 12x12 grid
    cfg = config(tmp_path, store, steps=120, val_every=40, checkpoint_every=120, lr=2e-3)
    res = train(cfg, WINDOW, expected_teacher=TEACHER)
    s = TraceStore.open(store)
    batches = load_val_batches(s, split_by_prompt(s, cfg.val_fraction, cfg.seed), "single_blocks.0", cfg)
    init = _build_layer("single_blocks.0", cfg, WINDOW, num_heads=2).student
    before = validation_metrics(init, batches)["val_cos_dist"]
    after = res.layer_metrics["single_blocks.0"]["val_cos_dist"]
    assert after < 0.7 * before
    assert "gamma_mean" in res.layer_metrics["single_blocks.0"]
    art = load_students(cfg.artifact)
    assert art.header["mode"] == "window" and isinstance(art.layers["single_blocks.0"], WindowLayer)
    again = validation_metrics(art.layers["single_blocks.0"], batches)
    assert again["val_cos_dist"] == pytest.approx(after, rel=1e-9)


def test_resume_is_bit_identical(tmp_path, store):
    n = 6
    one = tmp_path / "one"
    r1 = train(config(one, store, steps=2 * n, checkpoint_every=n, min_swap_layers=1, max_swap_layers=3),
               HKR, expected_teacher=TEACHER)
    two = tmp_path / "two"
    cfg_a = config(two, store, steps=n, checkpoint_every=n, min_swap_layers=1, max_swap_layers=3)
    ra = train(cfg_a, HKR, expected_teacher=TEACHER)
    assert ra.resumed_from == 0
    mid = artifact_tensors(cfg_a.artifact)
    rb = train(dataclasses.replace(cfg_a, steps=2 * n), HKR, expected_teacher=TEACHER)
    assert rb.resumed_from == n and rb.steps_run == n
    a, b = artifact_tensors(one / "a.safetensors"), artifact_tensors(two / "a.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(mid[k], b[k]) for k in b)  # the second half really trained
    assert r1.layer_metrics["single_blocks.0"]["updates"] == rb.layer_metrics["single_blocks.0"]["updates"]
    for key in LAYERS:
        assert r1.layer_metrics[key]["log_var_cosine"] == rb.layer_metrics[key]["log_var_cosine"]
    # stop_after: an interrupted run (same total steps) resumes to the same weights as well
    three = tmp_path / "three"
    cfg_c = config(three, store, steps=2 * n, checkpoint_every=n, min_swap_layers=1, max_swap_layers=3)
    train(cfg_c, HKR, expected_teacher=TEACHER, stop_after=n)
    train(cfg_c, HKR, expected_teacher=TEACHER)
    c = artifact_tensors(three / "a.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
    # a checkpoint of another setup is not resumed
    rd = train(dataclasses.replace(cfg_a, steps=2 * n, lr=cfg_a.lr * 2), HKR, expected_teacher=TEACHER)
    assert rd.resumed_from == 0


def test_readiness_hysteresis_across_resume(tmp_path, store):
    cfg = config(tmp_path, store, steps=12, readiness_threshold=1.0, min_updates=1)
    res = train(cfg, HKR, expected_teacher=TEACHER)
    assert all(res.ready.values())
    d = {k: res.layer_metrics[k]["val_cos_dist"] for k in LAYERS}
    # resume without further steps: same weights, same distance d; threshold T = d / 1.1, so
    # T < d <= 1.2 T and a layer that was ready stays ready
    key = min(d, key=d.get)
    t_keep = d[key] / 1.1
    r2 = train(dataclasses.replace(cfg, readiness_threshold=t_keep), HKR, expected_teacher=TEACHER)
    assert r2.resumed_from == 12 and r2.steps_run == 0
    assert r2.layer_metrics[key]["val_cos_dist"] == pytest.approx(d[key], rel=1e-12)
    assert r2.ready[key]  # kept by hysteresis
    # the same threshold on a fresh run: not ready (d >= threshold and never was ready)
    fresh = train(dataclasses.replace(cfg, readiness_threshold=t_keep, resume=False,
                                      checkpoint_dir=str(tmp_path / "fresh")), HKR, expected_teacher=TEACHER)
    assert not fresh.ready[key]
    # above 1.2 x threshold: readiness is lost on resume
    r3 = train(dataclasses.replace(cfg, readiness_threshold=d[key] / 1.3), HKR, expected_teacher=TEACHER)
    assert not r3.ready[key]


def test_validation_split_is_by_prompt(tmp_path, store):
    cfg = config(tmp_path, store, steps=6, val_fraction=0.4, val_max_tuples=100)
    res = train(cfg, HKR, expected_teacher=TEACHER)
    s = TraceStore.open(store)
    split = split_by_prompt(s, 0.4, cfg.seed)
    assert res.summary["val_prompts"] == len(split.val_prompts) == 2
    for key in LAYERS:  # every tuple of the held-out prompts (4 steps each) is validated
        assert res.layer_metrics[key]["val_tuples"] == 4 * len(split.val_prompts)
    header = json.loads(safe_open(cfg.artifact, framework="pt").metadata()["flux2ttr"])
    assert header["train_config"]["val_prompts"] == split.val_prompts


def test_validation_metrics_match_fp64_reference(store):
    s = TraceStore.open(store)
    torch.manual_seed(0)
    layer = HKRLayer(HKR, num_heads=2)
    batches = [s.read("single_blocks.0", 20, [0, 3, 5]), s.read("single_blocks.0", 20, [7])]
    m = validation_metrics(layer, batches)
    with torch.no_grad():
        outs = [student_forward(layer, b).double().numpy() for b in batches]
    ref = [b["teacher_sub"].double().numpy() for b in batches]
    o = np.concatenate([x.reshape(-1, 16) for x in outs])
    t = np.concatenate([x.reshape(-1, 16) for x in ref])
    cos = (o * t).sum(-1) / (np.linalg.norm(o, axis=-1) * np.linalg.norm(t, axis=-1))
    rel = np.linalg.norm(o - t, axis=-1) / np.linalg.norm(t, axis=-1)
    assert m["val_cos_dist"] == pytest.approx(float(np.mean(1 - cos)), rel=1e-9)
    assert m["val_nmse"] == pytest.approx(float(((o - t) ** 2).sum() / (t ** 2).sum()), rel=1e-9)
    assert m["val_p95_err"] == pytest.approx(float(np.quantile(rel, 0.95)), rel=1e-9)
    assert m["val_tuples"] == 4


def test_student_forward_mixed_geometry_matches_rows(tmp_path):
    gen = torch.Generator().manual_seed(1)
    path = tmp_path / "mixed.zarr"
    with TraceWriter(path, attrs={"teacher": TEACHER}, budget_bytes=1 << 26, storage_dtype="float32", seed=0) as w:
        for i, (hg, wg) in enumerate([(4, 4), (2, 8), (4, 4), (8, 2)]):
            w.offer("single_blocks.0", make_tuple(gen, heads=2, n_cond=4, hgrid=hg, wgrid=wg, nq=6, d=16,
                                                  prompt=i, step=0, seed=0, qk_scale=0.5))
    s = TraceStore.open(path)
    batch = s.read("single_blocks.0", 20, [0, 1, 2, 3])
    torch.manual_seed(2)
    layer = HKRLayer(HKRConfig(head_dim=16, feature_dim=8, landmark_min=3, cond_hidden=8), num_heads=2)
    with torch.no_grad():
        out = student_forward(layer, batch)
        for i in range(4):
            row = layer(batch["q_sub"][i:i + 1], batch["k"][i:i + 1], batch["v"][i:i + 1], int(batch["n_cond"][i]),
                        batch["sigma"][i:i + 1], batch["cfg"][i:i + 1], height=int(batch["h"][i]),
                        width=int(batch["w"][i]), q_idx=batch["q_idx"][i])
            torch.testing.assert_close(out[i:i + 1], row, rtol=1e-6, atol=1e-6)
    assert {(int(h), int(w)) for h, w in zip(batch["h"], batch["w"])} == {(4, 4), (2, 8), (8, 2)}


def test_an_all_nan_batch_skips_its_update_and_counts_tuples(tmp_path):
    path = make_store(tmp_path / "clean.zarr", layers=("single_blocks.0",), prompts=4, steps=4)
    clean = TraceStore.open(path)
    split = split_by_prompt(clean, 0.25, seed=0)
    bad_prompt = split.train_prompts[0]
    # the same store with NaN/inf keys in every tuple of one training prompt
    nan_path = make_store(tmp_path / "nan.zarr", layers=("single_blocks.0",), prompts=4, steps=4,
                          nonfinite={("single_blocks.0", bad_prompt, st): "k" for st in range(4)})
    s = TraceStore.open(nan_path)
    prompts = s.scalars("single_blocks.0", 20)["prompt"]
    bad_rows = set(np.nonzero(prompts == bad_prompt)[0].tolist())
    cfg = config(tmp_path, nan_path, steps=16, batch_size=2, min_swap_layers=1, max_swap_layers=1,
                 val_fraction=0.25)
    split = split_by_prompt(s, 0.25, seed=cfg.seed)
    planner = BatchPlanner(split.train, batch_size=2, min_layers=1, max_layers=1, seed=cfg.seed)
    plan = [r for _ in range(16) for r in planner.next_step()]
    all_bad = sum(1 for r in plan if set(r.rows) <= bad_rows)  # nothing finite left: no update
    assert 0 < all_bad < sum(1 for r in plan if set(r.rows) & bad_rows)  # and some batches were mixed
    res = train(cfg, HKR, expected_teacher=TEACHER)
    m = res.layer_metrics["single_blocks.0"]
    assert m["skipped_nonfinite"] == 4 == res.summary["skipped_nonfinite"]  # tuples, each counted once
    assert m["skipped_updates"] == all_bad == res.summary["skipped_updates"]
    assert m["updates"] == 16 - all_bad
    assert m["tuples_trained"] == sum(len(set(r.rows) - bad_rows) for r in plan)
    assert res.summary["nonfinite_tuples"] == {"single_blocks.0": [[bad_prompt, st, 100 + bad_prompt]
                                                                   for st in range(4)]}
    assert all(torch.isfinite(t).all() for t in res.students["single_blocks.0"].state_dict().values())
    assert math.isfinite(m["val_cos_dist"])


def _drop_rows(batches: dict[str, dict[str, torch.Tensor]], bad: dict[str, set]) -> dict:
    """``batches`` without the rows whose ``(prompt, step)`` is in ``bad[layer]`` (what a store without
    those tuples would have fed, batch by batch)."""
    out = {}
    for layer, b in batches.items():
        keep = torch.tensor([(int(p), int(s)) not in bad.get(layer, set()) for p, s in zip(b["prompt"], b["step"])])
        out[layer] = b if bool(keep.all()) else {k: v[keep] for k, v in b.items()}
    return out


def test_nan_tuples_are_dropped_not_their_batches_and_reported_once(tmp_path, capsys):
    """3 NaN/inf tuples among a layer's 40: the layer trains on every finite tuple (the same updates, to the
    bit, as a run fed the clean store's batches without those rows), and each bad tuple is reported once by
    (layer, prompt, step, seed), though training meets it in several epochs. A NaN tuple among the held-out
    prompts is left out of validation alone."""
    layers = ("single_blocks.0", "single_blocks.1")
    kw = dict(layers=layers, prompts=5, steps=8, focus=1.0)
    clean_path = make_store(tmp_path / "clean.zarr", **kw)
    split = split_by_prompt(TraceStore.open(clean_path), 0.2, seed=0)
    (val_prompt,) = split.val_prompts
    tp = split.train_prompts
    bad = {("single_blocks.1", tp[0], 2): "k", ("single_blocks.1", tp[0], 5): "teacher_sub",
           ("single_blocks.1", tp[2], 7): "q_sub", ("single_blocks.0", val_prompt, 3): "v"}
    bad_path = make_store(tmp_path / "bad.zarr", nonfinite=bad, **kw)
    # both layers every step, 4 tuples a batch: 8 batches an epoch, 20 steps = 2.5 epochs of every layer
    cfg = config(tmp_path / "bad", bad_path, steps=20, batch_size=4, min_swap_layers=2, max_swap_layers=2,
                 val_fraction=0.2, val_every=100, checkpoint_every=100)
    res = train(cfg, HKR, expected_teacher=TEACHER)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if "skipping non-finite tuple" in ln]
    assert len(lines) == 4, err  # once per bad tuple
    for (layer, p, st), field in bad.items():
        want = f"distill: {layer}: skipping non-finite tuple prompt {p} step {st} seed {100 + p} ({field} not finite"
        assert sum(ln.startswith(want) for ln in lines) == 1, (want, lines)
    assert sum(ln.endswith("validation)") for ln in lines) == 1
    # and once more, all together, in the stage's summary on stdout
    p0, p2, pv = tp[0], tp[2], val_prompt
    assert (f"distill: left out 4 non-finite tuple(s) (prompt/step/seed): single_blocks.0 p{pv}/s3/seed{100 + pv}; "
            f"single_blocks.1 p{p0}/s2/seed{100 + p0}, p{p0}/s5/seed{100 + p0}, p{p2}/s7/seed{100 + p2}") in out

    m1 = res.layer_metrics["single_blocks.1"]
    assert m1["skipped_nonfinite"] == 3 and m1["skipped_updates"] == 0
    assert res.layer_metrics["single_blocks.0"]["skipped_nonfinite"] == 1
    assert res.summary["skipped_nonfinite"] == 4
    assert res.summary["nonfinite_tuples"] == {
        "single_blocks.0": [[val_prompt, 3, 100 + val_prompt]],
        "single_blocks.1": sorted([[tp[0], 2, 100 + tp[0]], [tp[0], 5, 100 + tp[0]], [tp[2], 7, 100 + tp[2]]])}
    metrics = details_of(cfg.metrics)
    assert metrics["summary"]["nonfinite_tuples"] == res.summary["nonfinite_tuples"]
    assert metrics["layers"]["single_blocks.1"]["skipped_nonfinite"] == 3
    check_metrics_file(cfg.metrics)  # the lists stay in the details

    # the reference: the clean store's plan and batches, the bad rows dropped by hand
    drop = {"single_blocks.1": {(p, st) for (layer, p, st) in bad if layer == "single_blocks.1"}}
    ref_cfg = config(tmp_path / "ref", clean_path, steps=20, batch_size=4, min_swap_layers=2, max_swap_layers=2,
                     val_fraction=0.2, val_every=100, checkpoint_every=100)
    with DistillTrainer(ref_cfg, HKR, expected_teacher=TEACHER) as ref:
        trained = {k: 0 for k in layers}
        with PrefetchLoader(ref.store, ref.planner, stop_step=20) as loader:
            for sb in loader:
                sb.batches = _drop_rows(sb.batches, drop)
                for k, b in sb.batches.items():
                    trained[k] += int(b["q_sub"].shape[0])
                ref.step(sb)
        want = student_tensors({k: st.student for k, st in ref.states.items()})
        ref_updates = {k: st.updates for k, st in ref.states.items()}
    got = student_tensors(res.students)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # no update lost: as many as the clean store's run, on every finite tuple of each planned batch
    assert {k: res.layer_metrics[k]["updates"] for k in layers} == ref_updates == {k: 20 for k in layers}
    assert {k: res.layer_metrics[k]["tuples_trained"] for k in layers} == trained
    assert trained["single_blocks.1"] < 80 == trained["single_blocks.0"]  # 3 tuples x 2-3 epochs left out

    # validation: the bad held-out tuple alone is left out, the metrics are those of the other 7
    assert res.layer_metrics["single_blocks.0"]["val_tuples"] == 7
    assert res.layer_metrics["single_blocks.1"]["val_tuples"] == 8
    clean = TraceStore.open(clean_path)
    batches = [_drop_rows({"x": b}, {"x": {(val_prompt, 3)}})["x"]
               for b in load_val_batches(clean, split, "single_blocks.0", cfg)]
    assert sum(int(b["q_sub"].shape[0]) for b in batches) == 7
    ref_m = validation_metrics(res.students["single_blocks.0"], batches)
    for name in ("val_cos_dist", "val_nmse", "val_p95_err"):
        assert res.layer_metrics["single_blocks.0"][name] == pytest.approx(ref_m[name], rel=1e-9), name


def test_damaged_store_fails_before_training_naming_the_file(tmp_path, capsys):
    path = make_store(tmp_path / "s.zarr", layers=LAYERS, prompts=5, steps=4)
    shard = "single_blocks.2/n20/k/c/0/0/0/0"
    data = bytearray((path / shard).read_bytes())
    data[100] ^= 0x01  # same size, one bit flipped: only the hash sees it
    (path / shard).write_bytes(bytes(data))
    with pytest.raises(DistillError, match=rf"file {re.escape(shard)} of array single_blocks\.2/n20/k is corrupt.*"
                                           r"dvc repro capture"):
        train(config(tmp_path, path), HKR, expected_teacher=TEACHER)
    (path / shard).unlink()
    with pytest.raises(DistillError, match=rf"damaged trace store, file {re.escape(shard)} is missing"):
        train(config(tmp_path, path), HKR, expected_teacher=TEACHER)
    for p in ("a.safetensors", "m.json"):
        assert not (tmp_path / p).exists()  # nothing was trained or written


def test_bad_stores_fail_before_training(tmp_path, store):
    def run(path, teacher=TEACHER):
        cfg = config(tmp_path, path)
        train(cfg, HKR, expected_teacher=teacher)

    with pytest.raises(DistillError, match="no trace store here"):
        run(tmp_path / "missing.zarr")
    empty = tmp_path / "empty.zarr"
    with TraceWriter(empty, attrs={"teacher": TEACHER}, budget_bytes=1000, storage_dtype="float32", seed=0):
        pass
    with pytest.raises(DistillError, match="holds no tuples"):
        run(empty)
    with pytest.raises(DistillError, match=r"another teacher.*sha256: store 'abc123' vs params 'zzz'"):
        run(store, teacher={"name": "unit-teacher", "sha256": "zzz"})
    newer = tmp_path / "newer.zarr"
    make_store(newer, layers=("single_blocks.0",), prompts=2, steps=1)
    meta = json.loads((newer / "zarr.json").read_text())
    meta["attributes"]["schema"] = 99
    (newer / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(DistillError, match="newer"):
        run(newer)
    one_prompt = make_store(tmp_path / "one.zarr", layers=("single_blocks.0",), prompts=1, steps=3)
    with pytest.raises(DistillError, match="at least 2"):
        run(one_prompt)
    for p in ("a.safetensors", "m.json"):
        assert not (tmp_path / p).exists()  # nothing was trained or written


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="min_swap_layers"):
        DistillConfig(min_swap_layers=3, max_swap_layers=2)
    with pytest.raises(ValueError, match="val_fraction"):
        DistillConfig(val_fraction=1.0)


@pytest.mark.parametrize("kind", ["tiny", "trained"])
def test_expected_teacher_of_the_teacher_stage_folder(tmp_path, monkeypatch, kind):
    """The tiny and the trained kinds: the sha256 of the folder's single file; missing, an error naming it."""
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump({"teacher": {"kind": kind, "out_dir": "teachers/t"}}))
    with pytest.raises(DistillError, match=f"teachers/t/flux2_tiny.safetensors: {kind} teacher not found"):
        expected_teacher_identity("params.yaml")
    Path("teachers/t").mkdir(parents=True)
    Path("teachers/t/flux2_tiny.safetensors").write_bytes(b"weights")
    assert expected_teacher_identity("params.yaml") == {"kind": kind, "sha256": hashlib.sha256(b"weights").hexdigest()}


def test_run_stage_checks_the_params_teacher(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    teacher_file = Path("teachers/tiny/flux2_tiny.safetensors")  # only its sha256 matters here
    teacher_file.parent.mkdir(parents=True)
    teacher_file.write_bytes(b"tiny teacher weights v1")
    sha = hashlib.sha256(teacher_file.read_bytes()).hexdigest()
    make_store(Path("traces/capture.zarr"), layers=LAYERS[:2], prompts=3, steps=2,
               teacher={"kind": "tiny", "sha256": sha, "file": "flux2_tiny.safetensors"})
    params = {"teacher": {"kind": "tiny", "out_dir": "teachers/tiny"}, "hkr": dataclasses.asdict(HKR),
              "distill": {"steps": 4, "val_every": 4, "checkpoint_every": 4, "batch_size": 2, "progress": False,
                          "min_updates": 1, "readiness_threshold": 0.5},
              "comet": {"offline": True, "offline_directory": "comet_offline"}}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.delenv("COMET_API_KEY", raising=False)
    run_stage(Path("params.yaml"))
    assert set(check_metrics_file("metrics/distill.json")) == {"ready", "cos_dist", "seconds"}
    m = details_of("metrics/distill.json")
    assert m["summary"]["steps"] == 4 and set(m["layers"]) == set(LAYERS[:2])
    check_png("plots/distill/validation.png")
    # comet offline archive: per-layer metrics, cross-layer quantiles, pareto frontier, the artifact
    (archive,) = Path("comet_offline").glob("*.zip")
    with zipfile.ZipFile(archive) as z:
        text = "".join(z.read(n).decode("utf-8", "replace") for n in z.namelist() if not n.endswith(".safetensors"))
        names = z.namelist()
    for needle in ("single_blocks.1/val_cos_dist", "single_blocks.0/alpha_sigmoid", "single_blocks.0/log_var_huber",
                   "single_blocks.1/log_var_cosine", "val_cos_dist/p75", "pareto_frontier"):
        assert needle in text, needle
    assert any("flux2_ttr.safetensors" in n for n in names) or "flux2_ttr.safetensors" in text
    assert load_students("artifacts/flux2_ttr.safetensors").header["teacher"]["sha256"] == sha
    assert Path("plots/distill/val_cos_dist_ema.csv").is_file()
    # the teacher named by params changes: the store is refused before training
    teacher_file.write_bytes(b"tiny teacher weights v2")
    Path("metrics/distill.json").unlink()
    with pytest.raises(DistillError, match="another teacher than params.yaml names"):
        run_stage(Path("params.yaml"))
    assert not Path("metrics/distill.json").exists()
    teacher_file.unlink()
    with pytest.raises(DistillError, match="tiny teacher not found"):
        run_stage(Path("params.yaml"))


# ------------------------------------------------------------------------------------------ DistillTrainer


def student_tensors(students: dict[str, HKRLayer]) -> dict[str, torch.Tensor]:
    return {f"{key}.{n}": t.detach().clone() for key, s in students.items() for n, t in s.state_dict().items()}


def test_trainer_validate_before_any_step(tmp_path, store):
    cfg = config(tmp_path, store, min_updates=0, readiness_threshold=10.0)
    with DistillTrainer(cfg, HKR, expected_teacher=TEACHER) as trainer:
        assert trainer.try_resume() is False  # no checkpoint yet
        assert trainer.layers == list(LAYERS) and trainer.steps_done == 0
        merged = trainer.validate()
        assert trainer.final_metrics() is merged  # validated at this step: not validated again
        s = TraceStore.open(store)
        split = split_by_prompt(s, cfg.val_fraction, cfg.seed)
        for key in LAYERS:
            # the untrained student is the seeded init: its metrics equal a freshly built layer's
            ref = validation_metrics(_build_layer(key, cfg, HKR, num_heads=2).student,
                                     load_val_batches(s, split, key, cfg))
            m = merged[key]
            assert m["val_cos_dist"] == ref["val_cos_dist"] and m["val_nmse"] == ref["val_nmse"]
            assert m["val_cos_dist_ema"] == ref["val_cos_dist"]  # first validation: ema = value
            assert m["updates"] == 0 and m["tuples_trained"] == 0 and "train_loss" not in m
            assert m["ready"]  # min_updates 0 and a threshold above any distance
        assert [(r["step"], r["layer"]) for r in trainer.history] == [(0, k) for k in LAYERS]
        with pytest.raises(RuntimeError, match="before the first step"):
            with PrefetchLoader(trainer.store, trainer.planner, stop_step=1) as loader:
                for sb in loader:
                    trainer.step(sb)
            trainer.try_resume()


def test_trainer_steps_by_hand_match_train(tmp_path, store):
    n = 5
    ref = train(config(tmp_path / "ref", store, steps=n, val_every=100, checkpoint_every=100), HKR,
                expected_teacher=TEACHER)
    cfg = config(tmp_path / "hand", store, steps=n, val_every=100, checkpoint_every=100)
    with DistillTrainer(cfg, HKR, expected_teacher=TEACHER) as trainer:
        trained = 0
        with PrefetchLoader(trainer.store, trainer.planner, stop_step=n) as loader:
            for sb in loader:
                trained += trainer.step(sb)
        assert trainer.steps_done == n and trainer.tuples_trained == trained > 0
        assert trainer.history == []  # no validation ran: final_metrics validates now
        merged = trainer.final_metrics()
        assert [r["step"] for r in trainer.history] == [n] * len(LAYERS)
        mine = student_tensors({k: st.student for k, st in trainer.states.items()})
    want = student_tensors(ref.students)
    assert mine.keys() == want.keys()
    for k in want:
        assert torch.equal(mine[k], want[k]), k
    for key in LAYERS:
        assert merged[key]["val_cos_dist"] == ref.layer_metrics[key]["val_cos_dist"]
        assert merged[key]["updates"] == ref.layer_metrics[key]["updates"]
    assert trained == ref.summary["tuples_trained_this_run"]


def test_trainer_resume_summary_and_single_use(tmp_path, store):
    n = 6
    full = train(config(tmp_path / "full", store, steps=2 * n, checkpoint_every=n), HKR, expected_teacher=TEACHER)
    cfg = config(tmp_path / "part", store, steps=2 * n, checkpoint_every=n)
    with DistillTrainer(cfg, HKR, expected_teacher=TEACHER) as first:
        r1 = first.train(stop_after=n)  # checkpoint at step n, then interrupted
        with pytest.raises(RuntimeError, match="once per trainer"):
            first.train()
    assert r1.steps_run == n and r1.summary["steps"] == n
    with DistillTrainer(cfg, HKR, expected_teacher=TEACHER) as second:
        assert second.try_resume() is True
        assert second.start == second.steps_done == n
        # history and per-layer counters come back from the checkpoint
        assert [r["step"] for r in second.history] == [n] * len(LAYERS)
        assert {k: st.updates for k, st in second.states.items()} == {k: r1.layer_metrics[k]["updates"] for k in LAYERS}
        res = second.train()
    s = res.summary
    assert (s["steps"], s["resumed_from"], res.steps_run, s["world_size"], s["layers"]) == (2 * n, n, n, 1, 3)
    split = split_by_prompt(TraceStore.open(store), cfg.val_fraction, cfg.seed)
    assert (s["val_prompts"], s["train_prompts"]) == (len(split.val_prompts), len(split.train_prompts))
    # this run's tuples: the counters' growth since the checkpoint; every one came through the reader cache
    grown = sum(res.layer_metrics[k]["tuples_trained"] - r1.layer_metrics[k]["tuples_trained"] for k in LAYERS)
    assert s["tuples_trained_this_run"] == grown > 0
    assert s["reader_cache_hits"] + s["reader_cache_misses"] == grown
    assert s["ready_layers"] == sum(res.ready.values())
    # interrupted + resumed == uninterrupted, to the bit, in weights and metrics
    a, b = student_tensors(full.students), student_tensors(res.students)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res.layer_metrics == full.layer_metrics
    wall = {"stage_seconds", "train_seconds_this_run", "tuples_per_s_trained", "store_verify_seconds"}
    same = {"layers", "ready_layers", "val_cos_sim_mean", "val_cos_dist", "pareto_frontier", "steps",
            "skipped_nonfinite", "skipped_updates", "nonfinite_tuples", "val_prompts", "train_prompts",
            "world_size", "readiness_threshold"}
    assert same | wall | {"resumed_from", "tuples_trained_this_run", "reader_cache_hits", "reader_cache_misses"} == set(s)
    assert {k: s[k] for k in same} == {k: full.summary[k] for k in same}


WORKER = textwrap.dedent("""
    import json, sys
    from flux2ttr.distill.trainer import DistillConfig, train
    from flux2ttr.students.hkr import HKRConfig
    spec = json.loads(open(sys.argv[1]).read())
    train(DistillConfig(**spec["distill"]), HKRConfig(**spec["hkr"]), expected_teacher=spec["teacher"])
""")


def test_cuda_ranks_without_cuda_fail_before_training(tmp_path, store, monkeypatch):
    """distill.device cuda under torchrun takes GPU LOCAL_RANK over NCCL; without CUDA that is one clear
    DistillError before any group or layer is built."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(DistillError, match="torch sees no CUDA GPU"):
        DistillTrainer(config(tmp_path, store, device="cuda"), HKR, expected_teacher=TEACHER)
    assert not (tmp_path / "ck").exists()


@pytest.mark.slow
def test_torchrun_two_ranks_matches_single_process(tmp_path, store):
    # every layer trains every step, so each layer sees the same batches however layers are sharded
    kw = dict(steps=6, val_every=3, checkpoint_every=3, min_swap_layers=3, max_swap_layers=3, torch_threads=1)
    single = train(config(tmp_path / "single", store, **kw), HKR, expected_teacher=TEACHER)
    cfg = config(tmp_path / "ddp", store, **kw)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"distill": dataclasses.asdict(cfg), "hkr": dataclasses.asdict(HKR),
                                "teacher": TEACHER}))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(spec)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in (tmp_path / "ddp" / "ck").iterdir()) == [
        "distill-rank0-of2.safetensors", "distill-rank1-of2.safetensors"]
    a = artifact_tensors(tmp_path / "ddp" / "a.safetensors")
    b = artifact_tensors(tmp_path / "single" / "a.safetensors")
    assert a.keys() == b.keys() and {".".join(k.split(".")[:2]) for k in a} == set(LAYERS)
    for k in b:
        assert torch.equal(a[k], b[k]), k
    m = details_of(tmp_path / "ddp" / "m.json")
    assert m["summary"]["world_size"] == 2 and set(m["layers"]) == set(LAYERS)
    for key in LAYERS:
        assert m["layers"][key]["val_cos_dist"] == pytest.approx(single.layer_metrics[key]["val_cos_dist"], rel=1e-12)
    assert proc.stdout.count("layers ready") == 1  # one summary, from rank 0


def test_head_subset_store_trains_shared_students_and_leaves_unseen_heads_at_init(tmp_path):
    """A store whose tuples hold 2 of a teacher's 4 heads (``heads`` recorded per tuple, never head 3): the
    students have the teacher's 4 heads; a window student's per-head gamma gets gradient only at the heads a
    batch holds, so head 3's stays at its initial value, the seen heads' move; validation runs on the subsets."""
    H, HS, layer = 4, 2, "single_blocks.0"
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    path = tmp_path / "sub.zarr"
    with TraceWriter(path, attrs={"teacher": dict(TEACHER), "capture": {"tuple_heads": HS, "num_heads": H}},
                     budget_bytes=1 << 30, storage_dtype="float32", seed=0) as w:
        for p in range(5):
            for s in range(4):
                t = make_tuple(gen, heads=HS, n_cond=4, hgrid=4, wgrid=4, nq=6, d=16, prompt=p, step=s, seed=100 + p,
                               qk_scale=0.5)
                t.heads = torch.from_numpy(np.sort(rng.choice(3, size=HS, replace=False)))
                w.offer(layer, t)
    store = TraceStore.open(path)
    assert store.teacher_heads() == H and store.has_heads(layer, 20)
    got = store.read(layer, 20, [3, 0])["heads"]
    assert got.shape == (2, HS) and set(got.flatten().tolist()) <= {0, 1, 2}

    cfg = config(tmp_path, path, steps=10, max_swap_layers=1, window_radius_jitter=False)
    init = _build_layer(layer, cfg, WINDOW, num_heads=H)
    batch = store.read(layer, 20, [0, 1, 2])
    out = student_forward(init.student, batch)
    out.square().sum().backward()
    grad = init.student.log_gamma.grad
    assert grad[3] == 0 and bool((grad[:3] != 0).all())

    res = train(cfg, WINDOW, expected_teacher=TEACHER)
    art = load_students(cfg.artifact)
    assert art.header["num_heads"] == H
    trained = art.layers[layer].log_gamma.detach()
    start = _build_layer(layer, cfg, WINDOW, num_heads=H).student.log_gamma.detach()
    assert trained.shape == (H,) and trained[3] == start[3]
    assert bool((trained[:3] != start[:3]).all())
    assert res.layer_metrics[layer]["val_tuples"] > 0 and math.isfinite(res.layer_metrics[layer]["val_cos_dist"])
