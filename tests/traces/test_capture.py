"""Capture stage on the tiny teacher: stored tuples are the teacher's softmax attention of the stored
q_sub, k, v (fp64 reference), layer/step selection, budget, batch-size independence, atomicity, the
params-driven stage, keyed reservoir priorities, head subsets (capture.tuple_heads: the all-heads tuples cut to
the recorded heads, the smaller bytes in the budget) and the stage under torchrun (2 gloo ranks: the store one
process writes, byte for byte, with and without head subsets; a rank that fails leaves no store)."""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from flux2ttr.config import ConfigError
from flux2ttr.teachers.prompts import PromptFileError
from flux2ttr.teachers.sampler import SamplerConfig, flux2_sigmas
from flux2ttr.traces.capture import (
    CaptureConfig,
    capture,
    head_subset,
    query_positions,
    split_batches,
    tuple_priority,
)
from flux2ttr.traces.store import SCALAR_FIELDS, TraceStore, TraceStoreError
from helpers.outputs import check_metrics_file, details_of
from helpers.torchrun import one_thread, torchrun, tree_bytes
from stages.capture import run_stage

PROMPTS = ["a red fox in snow", "a neon night market", "a bowl of ramen"]
N_COND = 512
GRID = 4  # 64 px -> 4x4 latent tokens
N = N_COND + GRID * GRID


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from flux2ttr.teachers.teacher import TeacherConfig, write_tiny_teacher

    folder = tmp_path_factory.mktemp("teacher") / "tiny"
    write_tiny_teacher(TeacherConfig(kind="tiny", num_single=2, out_dir=str(folder)))
    return folder


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    from flux2ttr.teachers.teacher import TeacherConfig, load_tiny_teacher

    return load_tiny_teacher(TeacherConfig(kind="tiny", num_single=2, out_dir=str(teacher_dir)))


def sampler_cfg(steps: int = 2) -> SamplerConfig:
    return SamplerConfig(steps=steps, guidance=3.5, height=16 * GRID, width=16 * GRID, seed=100)


def fp64_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> np.ndarray:
    """``softmax(q k^T / sqrt(D)) v`` in float64 numpy; ``q [H, Nq, D]``, ``k, v [H, N, D]``."""
    q, k, v = (x.numpy().astype(np.float64) for x in (q, k, v))
    logits = np.einsum("hqd,hnd->hqn", q, k) / math.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hqn,hnd->hqd", p, v)


def test_tuples_are_the_teachers_softmax_attention(teacher, tmp_path):
    cfg = CaptureConfig(store=str(tmp_path / "c.zarr"), queries=12, storage_dtype="float32", budget_mib=64,
                        batch_size=2, seed=5)
    scfg = sampler_cfg()
    stats = capture(teacher, PROMPTS, cfg, scfg, progress=False)
    store = TraceStore.open(tmp_path / "c.zarr")
    assert store.layers == ["single_blocks.0", "single_blocks.1"]
    assert stats["offered"] == stats["kept"] == 3 * 2 * 2 == store.count()
    assert store.attrs["teacher"] == teacher.identity
    assert store.attrs["capture"]["layers"] == ["single_blocks.0", "single_blocks.1"]
    assert store.attrs["sampler"]["steps"] == 2
    sigmas = flux2_sigmas(2, GRID * GRID)
    worst = 0.0
    seen = set()
    for layer in store.layers:
        assert store.groups(layer) == [(N, 6)]
        batch = store.read(layer, N, list(range(6)))
        for i in range(6):
            prompt, step, seed = int(batch["prompt"][i]), int(batch["step"][i]), int(batch["seed"][i])
            seen.add((layer, prompt, step))
            assert seed == scfg.seed + prompt
            assert int(batch["n_cond"][i]) == N_COND and (int(batch["h"][i]), int(batch["w"][i])) == (GRID, GRID)
            assert batch["sigma"][i].item() == pytest.approx(float(sigmas[step]), rel=1e-6)
            assert batch["cfg"][i].item() == 3.5
            q_idx = batch["q_idx"][i]
            assert q_idx.tolist() == query_positions(N, 12, 5, prompt, seed, step, layer).tolist()
            assert len(set(q_idx.tolist())) == 12 and 0 <= int(q_idx.min()) and int(q_idx.max()) < N
            ref = fp64_attention(batch["q_sub"][i], batch["k"][i], batch["v"][i])
            got = batch["teacher_sub"][i].numpy()
            scale = np.abs(ref).max()
            worst = max(worst, float(np.abs(got - ref).max() / scale))
            # the attention is not trivial: it differs clearly from the mean of v (uniform attention)
            assert np.abs(ref - batch["v"][i].numpy().mean(1, keepdims=True)).max() > 0.05 * scale
    assert worst < 1e-5, worst
    assert len(seen) == 12
    # query draws differ between tuples (random per tuple)
    a = store.read("single_blocks.0", N, [0, 1])["q_idx"]
    assert not torch.equal(a[0], a[1])


def test_layer_and_step_selection_and_budget(teacher, tmp_path):
    cfg = CaptureConfig(store=str(tmp_path / "c.zarr"), queries=8, layers=["single_blocks.1"], steps=[1],
                        storage_dtype="float16", budget_mib=64, batch_size=3)
    stats = capture(teacher, PROMPTS, cfg, sampler_cfg(), progress=False)
    store = TraceStore.open(tmp_path / "c.zarr")
    assert store.layers == ["single_blocks.1"] and store.count() == 3 == stats["offered"]
    assert store.scalars("single_blocks.1", N)["step"].tolist() == [1, 1, 1]
    assert sorted(store.prompt_indices("single_blocks.1")[N].tolist()) == [0, 1, 2]

    # budget of 2.5 tuples: 2 kept of all 3 prompts x 2 layers x 2 steps offered, never above the budget
    heads, d = teacher.num_heads, teacher.head_dim
    per_tuple = 2 * heads * N * d * 2 + 2 * heads * 8 * d * 2 + 8 * 4 + 8 * len(SCALAR_FIELDS)  # + the float64 scalars row
    budget_mib = 2.5 * per_tuple / 2**20
    cfg = CaptureConfig(store=str(tmp_path / "b.zarr"), queries=8, storage_dtype="float16",
                        budget_mib=budget_mib, batch_size=3, rollouts=2)
    stats = capture(teacher, PROMPTS, cfg, sampler_cfg(steps=1), progress=False)
    store = TraceStore.open(tmp_path / "b.zarr")
    res = store.attrs["reservoir"]
    assert res["offered"] == 2 * 3 * 2 * 1 == stats["offered"]
    assert res["kept"] == 2 == store.count()
    assert res["kept_bytes"] == 2 * per_tuple <= budget_mib * 2**20
    seeds = {int(s) for lay in store.layers for s in store.scalars(lay, N)["seed"]}
    assert seeds <= {100 + r * 3 + i for r in range(2) for i in range(3)}


def count_builds(monkeypatch) -> dict[str, int]:
    """Count the tuples capture builds (each draws its query positions once): ``counter["n"]``."""
    import flux2ttr.traces.capture as capture_mod

    built = {"n": 0}
    real_positions = capture_mod.query_positions

    def counting_positions(*a, **k):
        built["n"] += 1
        return real_positions(*a, **k)

    monkeypatch.setattr(capture_mod, "query_positions", counting_positions)
    return built


def test_planned_cut_writes_the_unplanned_store_and_spills_only_what_it_keeps(teacher, tmp_path, monkeypatch):
    """A budget of 2.5 tuples of the 12 offered: with the planned cut (the default) exactly the 2 kept tuples are
    built (query positions drawn, slices taken) and spilled, without it all that fit before the budget filled
    (and were then evicted); the two stores are one, byte for byte."""
    import flux2ttr.traces.capture as capture_mod

    built = count_builds(monkeypatch)

    heads, d = teacher.num_heads, teacher.head_dim
    per_tuple = 2 * heads * N * d * 2 + 2 * heads * 8 * d * 2 + 8 * 4 + 8 * len(SCALAR_FIELDS)
    kw = dict(store="c.zarr", metrics="", queries=8, storage_dtype="float16", budget_mib=2.5 * per_tuple / 2**20,
              batch_size=3, rollouts=2)
    real, stats, builds = capture_mod.planned_priorities, {}, {}
    for name, planner in (("planned", real), ("unplanned", lambda *a, **k: [])):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        monkeypatch.setattr(capture_mod, "planned_priorities", planner)
        built["n"] = 0
        stats[name] = capture(teacher, PROMPTS, CaptureConfig(**kw), sampler_cfg(steps=1), progress=False)
        builds[name] = built["n"]
    assert stats["planned"]["offered"] == stats["unplanned"]["offered"] == 12
    assert builds["planned"] == 2 and builds["unplanned"] == stats["unplanned"]["spilled"]
    assert stats["planned"]["kept"] == stats["unplanned"]["kept"] == 2 == stats["planned"]["spilled"]
    assert stats["unplanned"]["spilled"] > 2
    a, b = tree_bytes(tmp_path / "planned" / "c.zarr"), tree_bytes(tmp_path / "unplanned" / "c.zarr")
    assert sorted(a) == sorted(b) and [f for f in a if a[f] != b[f]] == []
    # the plan lists every offered tuple's priority: 3 prompts x 2 rollouts x 2 layers x 1 step
    plan = real(CaptureConfig(**kw), len(PROMPTS), sampler_cfg(steps=1), ["single_blocks.0", "single_blocks.1"], [0])
    assert sorted(plan) == sorted(tuple_priority(0, i, 100 + r * 3 + i, 0, f"single_blocks.{j}")
                                  for r in range(2) for i in range(3) for j in range(2))


def test_planned_cut_refuses_a_plan_the_capture_breaks(tmp_path):
    """The writer's checks of the plan's premises: a tuple under the planned lower bound stops at once; fewer
    tuples offered than planned publish nothing."""
    from flux2ttr.traces.store import TraceTuple, TraceWriter

    def tuple_of(n: int) -> TraceTuple:
        z = np.zeros((1, n, 4), np.float32)
        return TraceTuple(q_sub=z[:, :2], q_idx=np.arange(2), k=z, v=z, teacher_sub=z[:, :2], sigma=0.5, cfg=1.0,
                          n_cond=0, h=1, w=n, prompt=0, step=0, seed=0)

    with TraceWriter(tmp_path / "a.zarr", attrs={}, budget_bytes=2**20, storage_dtype="float32", seed=0) as w:
        big = w.nbytes_of(1, 8, 2, 4, headed=False)
        w.plan([0.1, 0.2], big)
        with pytest.raises(ValueError, match="smaller than the plan's lower bound"):
            w.offer("single_blocks.0", tuple_of(4), priority=0.1)
        w.abort()
    w = TraceWriter(tmp_path / "b.zarr", attrs={}, budget_bytes=2**20, storage_dtype="float32", seed=0)
    w.plan([0.1, 0.2], big)
    w.offer("single_blocks.0", tuple_of(8), priority=0.1)
    with pytest.raises(TraceStoreError, match="2 tuples were planned but only 1 offered"):
        w.close()
    assert not (tmp_path / "b.zarr").exists() and list(tmp_path.iterdir()) == []


def test_all_layers_include_the_double_blocks(teacher, tmp_path):
    """layers: all captures the double blocks too: joint attention, text first, the same tuple contract."""
    cfg = CaptureConfig(store=str(tmp_path / "c.zarr"), queries=12, layers="all", steps=[0], storage_dtype="float32",
                        budget_mib=64, batch_size=3)
    capture(teacher, PROMPTS, cfg, sampler_cfg(), progress=False)
    store = TraceStore.open(tmp_path / "c.zarr")
    assert store.layers == teacher.layer_keys and store.layers[0] == "double_blocks.0"
    batch = store.read("double_blocks.0", N, list(range(3)))
    for i in range(3):
        assert int(batch["n_cond"][i]) == N_COND
        ref = fp64_attention(batch["q_sub"][i], batch["k"][i], batch["v"][i])
        assert np.abs(batch["teacher_sub"][i].numpy() - ref).max() < 1e-5 * np.abs(ref).max()
    # a double block's attention differs from the single blocks' (it is another layer, not a copy)
    single = store.read("single_blocks.0", N, [0])
    assert not torch.allclose(single["k"][0], batch["k"][0])


def test_bad_layer_and_step_selection(teacher, tmp_path):
    cfg = CaptureConfig(store=str(tmp_path / "c.zarr"), layers=["single_blocks.7"])
    with pytest.raises(ConfigError, match=r"capture.layers: \['single_blocks.7'\] are not layers"):
        capture(teacher, PROMPTS, cfg, sampler_cfg(), progress=False)
    cfg = CaptureConfig(store=str(tmp_path / "c.zarr"), steps=[0, 2])
    with pytest.raises(ConfigError, match=r"capture.steps \[0, 2\].*\[0, 2\)"):
        capture(teacher, PROMPTS, cfg, sampler_cfg(), progress=False)
    with pytest.raises(ConfigError, match="storage_dtype"):
        CaptureConfig(storage_dtype="int8")
    with pytest.raises(ConfigError, match="all_single"):
        CaptureConfig(layers="everything")
    with pytest.raises(ConfigError, match="capture.write_threads must be >= 1, got 0"):
        CaptureConfig(write_threads=0)
    with pytest.raises(ConfigError, match="capture.compression must be one of"):
        CaptureConfig(compression="gzip")
    assert not (tmp_path / "c.zarr").exists()


def test_batch_size_does_not_change_the_capture(teacher, tmp_path):
    stores = []
    for bs in (1, 3):
        cfg = CaptureConfig(store=str(tmp_path / f"b{bs}.zarr"), queries=8, layers=["single_blocks.0"], steps=[0],
                            storage_dtype="float32", budget_mib=64, batch_size=bs)
        capture(teacher, PROMPTS, cfg, sampler_cfg(steps=1), progress=False)
        stores.append(TraceStore.open(tmp_path / f"b{bs}.zarr").read("single_blocks.0", N, [0, 1, 2]))
    a, b = stores
    for name in ("q_idx", "prompt", "seed", "step"):
        assert torch.equal(a[name], b[name])
    for name in ("q_sub", "k", "v", "teacher_sub"):
        # batched and single matmuls round differently in fp32; the data is the same up to that
        assert (a[name] - b[name]).abs().max() <= 1e-3 * a[name].abs().max(), name


def test_tuple_heads_store_the_named_heads_of_the_full_tuples(teacher, tmp_path):
    """capture.tuple_heads 1 of the tiny teacher's 2 heads: every tuple is the all-heads capture's tuple (same
    seeds, same query positions) cut to the head its ``heads`` field names, drawn by head_subset."""
    kw = dict(queries=8, storage_dtype="float32", budget_mib=64, batch_size=3)
    capture(teacher, PROMPTS, CaptureConfig(store=str(tmp_path / "all.zarr"), **kw), sampler_cfg(), progress=False)
    stats = capture(teacher, PROMPTS, CaptureConfig(store=str(tmp_path / "sub.zarr"), tuple_heads=1, **kw),
                    sampler_cfg(), progress=False)
    full, sub = TraceStore.open(tmp_path / "all.zarr"), TraceStore.open(tmp_path / "sub.zarr")
    assert sub.attrs["capture"]["tuple_heads"] == 1 and sub.attrs["capture"]["num_heads"] == 2 == sub.teacher_heads()
    assert "tuple_heads" not in full.attrs["capture"] and full.teacher_heads() == 2
    assert sub.layers == full.layers and sub.count() == full.count() == 12 == stats["kept"]
    seen = set()
    for layer in sub.layers:
        assert sub.has_heads(layer, N) and not full.has_heads(layer, N)
        assert sub.shapes(layer, N)["k"] == (1, N, teacher.head_dim) and sub.shapes(layer, N)["heads"] == (1,)
        a, b = full.read(layer, N, list(range(6))), sub.read(layer, N, list(range(6)))
        assert "heads" not in a and b["heads"].shape == (6, 1)
        for name in ("q_idx", *SCALAR_FIELDS):
            assert torch.equal(a[name], b[name]), name
        for i in range(6):
            h = int(b["heads"][i, 0])
            want = head_subset(2, 1, 0, int(b["prompt"][i]), int(b["seed"][i]), int(b["step"][i]), layer)
            assert want.tolist() == [h]
            seen.add(h)
            for name in ("q_sub", "k", "v", "teacher_sub"):
                assert torch.equal(b[name][i], a[name][i][h:h + 1]), (layer, i, name)
    assert seen == {0, 1}  # a draw per tuple, not one head for the store
    # the budget counts the smaller tuples: 1 head + its index, about half the bytes, twice the tuples kept
    heads, d = teacher.num_heads, teacher.head_dim
    fixed = 8 * 4 + 8 * len(SCALAR_FIELDS)  # q_idx int32, the float64 scalars row
    per_full = 2 * heads * N * d * 2 + 2 * heads * 8 * d * 2 + fixed  # fp16
    per_sub = 2 * 1 * N * d * 2 + 2 * 1 * 8 * d * 2 + fixed + 4  # + heads int32
    budget_mib = 2.5 * per_full / 2**20
    kept = {}
    for th in (0, 1):
        cfg = CaptureConfig(store=str(tmp_path / f"b{th}.zarr"), queries=8, storage_dtype="float16",
                            budget_mib=budget_mib, batch_size=3, tuple_heads=th)
        capture(teacher, PROMPTS, cfg, sampler_cfg(steps=1), progress=False)
        kept[th] = TraceStore.open(tmp_path / f"b{th}.zarr").attrs["reservoir"]
    assert kept[0]["kept"] == 2 and kept[0]["kept_bytes"] == 2 * per_full
    assert kept[1]["kept"] == int(budget_mib * 2**20 // per_sub) == 4 and kept[1]["kept_bytes"] == 4 * per_sub
    with pytest.raises(ConfigError, match="tuple_heads = 3, but the teacher has 2 heads"):
        capture(teacher, PROMPTS, CaptureConfig(store=str(tmp_path / "x.zarr"), tuple_heads=3), sampler_cfg(),
                progress=False)
    with pytest.raises(ConfigError, match="tuple_heads"):
        CaptureConfig(tuple_heads=-1)


def test_tuple_heads_of_all_heads_writes_the_default_store(teacher, tmp_path, monkeypatch):
    """tuple_heads 0 (the default) and tuple_heads = the teacher's heads write one store, byte for byte: the
    setting leaves no trace where it keeps every head."""
    kw = dict(store="c.zarr", metrics="", queries=8, layers=["single_blocks.0"], storage_dtype="float16",
              budget_mib=64, batch_size=3)
    for name, th in (("zero", 0), ("all", 2)):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        capture(teacher, PROMPTS, CaptureConfig(tuple_heads=th, **kw), sampler_cfg(steps=1), progress=False)
    zero, every = tree_bytes(tmp_path / "zero" / "c.zarr"), tree_bytes(tmp_path / "all" / "c.zarr")
    assert sorted(zero) == sorted(every) and [f for f in zero if zero[f] != every[f]] == []
    assert not any("heads" in f for f in zero)


def test_interrupted_capture_leaves_no_store(teacher, tmp_path, monkeypatch):
    import flux2ttr.teachers.sampler as sampler_mod

    real = sampler_mod.sample
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # like Ctrl-C in the middle of the capture
        return real(*args, **kwargs)

    monkeypatch.setattr(sampler_mod, "sample", failing)
    cfg = CaptureConfig(store=str(tmp_path / "traces" / "c.zarr"), queries=4, layers=["single_blocks.0"],
                        batch_size=1)
    with pytest.raises(KeyboardInterrupt):
        capture(teacher, PROMPTS, cfg, sampler_cfg(steps=1), progress=False)
    assert list((tmp_path / "traces").iterdir()) == []
    monkeypatch.setattr(sampler_mod, "sample", real)
    capture(teacher, PROMPTS, cfg, sampler_cfg(steps=1), progress=False)
    assert TraceStore.open(tmp_path / "traces" / "c.zarr").count() == 3


def test_run_stage_from_params(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("data").mkdir()
    Path("data/p.json").write_text(json.dumps(PROMPTS[:2]))
    params = {
        "teacher": {"kind": "tiny", "num_single": 2, "out_dir": str(teacher_dir)},
        "sampler": {"steps": 1, "height": 64, "width": 64},
        "capture": {"prompts": "data/p.json", "store": "traces/c.zarr", "metrics": "metrics/capture.json",
                    "queries": 4, "budget_mib": 32},
    }
    Path("params.yaml").write_text(yaml.safe_dump(params))
    run_stage(Path("params.yaml"))
    store = TraceStore.open("traces/c.zarr")
    assert store.count() == 2 * 2
    metrics = check_metrics_file("metrics/capture.json")
    details = details_of("metrics/capture.json")
    assert metrics["kept"] == details["kept"] == details["offered"] == 4 and details["files"] == store.file_count()
    assert metrics["disk_mib"] == round(details["disk_mib"], 1) and metrics["seconds"] > 0
    assert store.attrs["prompts"]["count"] == 2 and store.attrs["prompts"]["file"] == "data/p.json"

    Path("data/p.json").write_text(json.dumps(["fine", 7]))
    with pytest.raises(PromptFileError, match=r"data/p.json: entry 1"):
        run_stage(Path("params.yaml"))
    params["capture"]["typo_key"] = 1
    Path("params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="typo_key"):
        run_stage(Path("params.yaml"))


def test_tuple_priorities_are_keyed_uniform_draws():
    a = tuple_priority(0, 1, 100, 2, "single_blocks.3")
    assert a == tuple_priority(0, 1, 100, 2, "single_blocks.3") and 0.0 <= a < 1.0
    # any part of the identity changes the draw, and the query draw of the same tuple is another stream
    others = {tuple_priority(*args) for args in [(1, 1, 100, 2, "single_blocks.3"), (0, 2, 100, 2, "single_blocks.3"),
                                                  (0, 1, 101, 2, "single_blocks.3"), (0, 1, 100, 3, "single_blocks.3"),
                                                  (0, 1, 100, 2, "single_blocks.4"), (0, 1, 100, 2, "double_blocks.3")]}
    assert len(others) == 6 and a not in others
    draws = np.array([tuple_priority(0, p, 7, s, f"single_blocks.{i}") for p in range(20) for s in range(5)
                      for i in range(4)])
    assert abs(draws.mean() - 0.5) < 0.05 and draws.min() >= 0.0 and draws.max() < 1.0


def test_split_batches_deals_the_single_process_batches_round_robin():
    assert split_batches(5, 2, 1) == [[(0, 0)], [(1, 0)], [(2, 0)]]
    assert split_batches(5, 2, 2) == [[(0, 0), (1, 1)], [(2, 0)]]
    assert split_batches(3, 4, 3) == [[(0, 0)]]
    rounds = split_batches(23, 3, 4)
    assert [j for r in rounds for j, _ in r] == list(range(8)) and all(k == j % 4 for r in rounds for j, k in r)


KILLED_RANK = textwrap.dedent("""
    import os
    import signal
    import sys
    from pathlib import Path

    import flux2ttr.teachers.sampler as sampler_mod
    from stages.capture import run_stage

    real, calls = sampler_mod.sample, []

    def sample(*args, **kwargs):
        calls.append(1)
        if os.environ["RANK"] == "0" and len(calls) == 2:  # batch 2, after a round's spill and sync
            os.kill(os.getpid(), signal.SIGKILL)  # a crash: no cleanup of any kind
        return real(*args, **kwargs)

    sampler_mod.sample = sample
    run_stage(Path(sys.argv[1]))
""")


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_single_process_store(teacher_dir, tmp_path, monkeypatch):
    """The README command with 2 gloo ranks writes, byte for byte, the store one process writes: the same
    tuples (the reservoir keeps 11 of 30, so the sync and the merge decide), the same shards and manifest.
    Before that, a run whose rank 0 is killed mid-capture leaves no store at the target, only rank 0's
    hidden partial temp, which the good run removes."""
    monkeypatch.chdir(tmp_path)
    Path("p.json").write_text(json.dumps(["a red fox", "a neon market", "a bowl of ramen", "a blue car",
                                          "a lighthouse"]))
    Path("params.yaml").write_text(yaml.safe_dump({
        "teacher": {"kind": "tiny", "num_single": 2, "out_dir": str(teacher_dir)},
        "sampler": {"steps": 2, "height": 64, "width": 64},
        "capture": {"prompts": "p.json", "store": "traces/c.zarr", "metrics": "metrics/capture.json",
                    "queries": 8, "layers": "all", "budget_mib": 6, "batch_size": 2},
    }))
    with one_thread():
        run_stage(Path("params.yaml"))
    shutil.move("traces/c.zarr", "ref.zarr")
    ref = TraceStore.open("ref.zarr")
    res = ref.attrs["reservoir"]
    assert (res["offered"], res["kept"]) == (30, 11) and res["kept_bytes"] <= 6 * 2**20

    Path("killed.py").write_text(KILLED_RANK)
    proc = torchrun(["killed.py", "params.yaml"], cwd=tmp_path)
    assert proc.returncode != 0 and "(SIGKILL)" in proc.stderr, proc.stderr[-3000:]
    left = list(Path("traces").iterdir())
    assert len(left) == 1 and left[0].name.startswith(".c.zarr.tmp-"), left  # nothing at the target
    assert any(left[0].glob(".spill-0/*.bin"))  # rank 0 had spilled tuples when it died
    with pytest.raises(TraceStoreError, match="incomplete"):
        TraceStore.open(left[0])

    proc = torchrun(["-m", "stages.capture", "params.yaml"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [p.name for p in Path("traces").iterdir()] == ["c.zarr"]  # the failed run's temp is gone too
    assert proc.stdout.count("captured 11 of 30 tuples") == 1 and "by 2 ranks" in proc.stdout
    got, want = tree_bytes(Path("traces/c.zarr")), tree_bytes(Path("ref.zarr"))
    assert sorted(got) == sorted(want)
    assert [f for f in want if got[f] != want[f]] == []
    store = TraceStore.open("traces/c.zarr")
    assert store.verify()["files"] == len(store.manifest["files"]) == len(want) - 1  # all but the root zarr.json
    details = details_of("metrics/capture.json")
    assert details["world_size"] == 2 and [r["rollouts"] for r in details["ranks"]] == [3, 2]
    assert details["kept"] == 11 and details["offered"] == 30


@pytest.mark.slow
@pytest.mark.parametrize("shard_mib", [16.0, 0.05], ids=["repacked", "shard_ready"])
def test_torchrun_two_ranks_write_the_single_process_head_subset_store(teacher_dir, tmp_path, monkeypatch, shard_mib):
    """capture.tuple_heads under torchrun: the head draws are keyed by the tuple, not the rank, so 2 gloo ranks
    write the single-process store byte for byte, with a budget that makes the reservoir choose; with shards of
    0.05 MiB each tuple fills a shard, so every rank spills shard-ready files that the layer's writer renames."""
    monkeypatch.chdir(tmp_path)
    Path("p.json").write_text(json.dumps(["a red fox", "a neon market", "a bowl of ramen", "a blue car"]))
    Path("params.yaml").write_text(yaml.safe_dump({
        "teacher": {"kind": "tiny", "num_single": 2, "out_dir": str(teacher_dir)},
        "sampler": {"steps": 2, "height": 64, "width": 64},
        "capture": {"prompts": "p.json", "store": "traces/c.zarr", "metrics": "", "queries": 8,
                    "budget_mib": 2, "batch_size": 1, "tuple_heads": 1, "shard_mib": shard_mib},
    }))
    with one_thread():
        run_stage(Path("params.yaml"))
    shutil.move("traces/c.zarr", "ref.zarr")
    ref = TraceStore.open("ref.zarr")
    res = ref.attrs["reservoir"]
    assert res["offered"] == 16 and 0 < res["kept"] < 16 and ref.shapes("single_blocks.0", N)["heads"] == (1,)
    proc = torchrun(["-m", "stages.capture", "params.yaml"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got, want = tree_bytes(Path("traces/c.zarr")), tree_bytes(Path("ref.zarr"))
    assert sorted(got) == sorted(want) and [f for f in want if got[f] != want[f]] == []
