"""Trace store: round trips per storage dtype, reservoir budget and uniformity, reservoirs split over ranks
merging to the single one, atomicity, file count, the
manifest (missing, truncated, resized, unlisted or corrupt files named at open or at read),
and the errors for stores that are missing, foreign, incomplete or of a newer schema."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from flux2ttr.traces.store import (
    FORMAT,
    SCALAR_FIELDS,
    SCHEMA_VERSION,
    TraceStore,
    TraceStoreError,
    TraceTuple,
    TraceWriter,
    merge_cut,
    prefix_cut,
    remove_stale_temps,
)


def make_tuple(gen: torch.Generator, *, h=2, n=24, nq=5, d=8, prompt=0, step=0, seed=0, scale=1.0) -> TraceTuple:
    q = torch.randn(h, n, d, generator=gen) * scale
    k = torch.randn(h, n, d, generator=gen) * scale
    v = torch.randn(h, n, d, generator=gen) * scale
    q_idx = torch.randperm(n, generator=gen)[:nq]
    out = torch.softmax(q[:, q_idx] @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
    return TraceTuple(q_sub=q[:, q_idx], q_idx=q_idx, k=k, v=v, teacher_sub=out, sigma=0.1 * (step + 1),
                      cfg=4.0, n_cond=8, h=4, w=4, prompt=prompt, step=step, seed=seed)


def write_store(path: Path, tuples: list[tuple[str, TraceTuple]], *, dtype="float32", budget=1 << 30, seed=0,
                **kw) -> TraceWriter:
    with TraceWriter(path, attrs={"teacher": {"name": "unit"}, "capture": {"queries": 5}},
                     budget_bytes=budget, storage_dtype=dtype, seed=seed, **kw) as w:
        for layer, t in tuples:
            w.offer(layer, t)
    return w


def read_all(store: TraceStore) -> dict[tuple[str, int, int, int], dict[str, torch.Tensor]]:
    """Every stored tuple keyed by (layer, prompt, step, seed)."""
    out = {}
    for layer in store.layers:
        for n, count in store.groups(layer):
            batch = store.read(layer, n, list(range(count)))
            for i in range(count):
                row = {k: v[i] for k, v in batch.items()}
                out[(layer, int(row["prompt"]), int(row["step"]), int(row["seed"]))] = row
    return out


def originals(tuples):
    return {(layer, t.prompt, t.step, t.seed): t for layer, t in tuples}


def test_float32_round_trip_is_exact(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tuples = [("single_blocks.0", make_tuple(gen, prompt=p, step=s)) for p in range(3) for s in range(2)]
    tuples += [("single_blocks.1", make_tuple(gen, n=40, prompt=p, step=0, seed=7)) for p in range(2)]
    write_store(tmp_path / "s.zarr", tuples)
    store = TraceStore.open(tmp_path / "s.zarr")
    assert store.layers == ["single_blocks.0", "single_blocks.1"]
    assert store.groups("single_blocks.0") == [(24, 6)]
    assert store.groups("single_blocks.1") == [(40, 2)]
    got, ref = read_all(store), originals(tuples)
    assert got.keys() == ref.keys()
    for key, t in ref.items():
        row = got[key]
        for name in ("q_sub", "k", "v", "teacher_sub"):
            assert row[name].dtype == torch.float32
            assert torch.equal(row[name], getattr(t, name).float()), name
        assert torch.equal(row["q_idx"], t.q_idx.long())
        assert row["sigma"].item() == pytest.approx(t.sigma, rel=1e-7)
        assert (row["cfg"].item(), row["n_cond"].item(), row["h"].item(), row["w"].item()) == (4.0, 8, 4, 4)
    assert store.attrs["format"] == FORMAT and store.attrs["schema"] == SCHEMA_VERSION
    assert store.attrs["teacher"] == {"name": "unit"} and store.attrs["capture"] == {"queries": 5}
    assert store.attrs["reservoir"]["offered"] == 8 and store.attrs["reservoir"]["kept"] == 8
    assert store.attrs["reservoir"]["kept_per_layer"] == {"single_blocks.0": 6, "single_blocks.1": 2}


def test_read_order_and_prompt_indices(tmp_path):
    gen = torch.Generator().manual_seed(1)
    tuples = [("single_blocks.2", make_tuple(gen, prompt=p, step=s)) for p in (3, 0, 2) for s in range(2)]
    write_store(tmp_path / "s.zarr", tuples)
    store = TraceStore.open(tmp_path / "s.zarr")
    prompts = store.prompt_indices("single_blocks.2")[24]
    assert sorted(prompts.tolist()) == [0, 0, 2, 2, 3, 3]
    batch = store.read("single_blocks.2", 24, [4, 1, 4])
    assert batch["prompt"].tolist() == [prompts[4], prompts[1], prompts[4]]
    assert torch.equal(batch["k"][0], batch["k"][2])
    assert batch["k"].shape == (3, 2, 24, 8) and batch["q_sub"].shape == (3, 2, 5, 8)
    assert store.shapes("single_blocks.2", 24)["q_idx"] == (5,)
    with pytest.raises(KeyError, match="no layer"):
        store.groups("single_blocks.9")
    with pytest.raises(IndexError):
        store.read("single_blocks.2", 24, [6])


def test_float16_round_trip_within_rounding(tmp_path):
    gen = torch.Generator().manual_seed(2)
    tuples = [("single_blocks.0", make_tuple(gen, prompt=p, scale=3.0)) for p in range(3)]
    write_store(tmp_path / "s.zarr", tuples, dtype="float16")
    store = TraceStore.open(tmp_path / "s.zarr")
    assert store.attrs["storage_dtype"] == "float16"
    for key, t in originals(tuples).items():
        row = read_all(store)[key]
        for name in ("q_sub", "k", "v", "teacher_sub"):
            x = getattr(t, name).float()
            # fp16 round-to-nearest: relative error <= 2**-11 for normal numbers
            assert torch.all((row[name] - x).abs() <= x.abs() * 2.0**-11 + 2.0**-24), name
            assert torch.equal(row[name], x.half().float())


def test_float16_overflow_is_a_clear_error(tmp_path):
    gen = torch.Generator().manual_seed(2)
    t = make_tuple(gen)
    t.v = t.v * 1e6
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        write_store(tmp_path / "s.zarr", [("single_blocks.0", t)], dtype="float16")
    assert not (tmp_path / "s.zarr").exists()


def test_bfloat16_bit_pattern_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(3)
    t = make_tuple(gen, scale=100.0)
    write_store(tmp_path / "s.zarr", [("single_blocks.0", t)], dtype="bfloat16")
    store = TraceStore.open(tmp_path / "s.zarr")
    assert store.attrs["storage_dtype"] == "bfloat16"
    assert store.attrs["encoding"] == "bfloat16-bits-as-uint16"
    raw = store._root["single_blocks.0/n24/k"]
    assert raw.dtype == np.uint16
    expected_bits = t.k.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(np.asarray(raw[0]), expected_bits)
    row = store.read("single_blocks.0", 24, [0])
    for name in ("q_sub", "k", "v", "teacher_sub"):
        assert torch.equal(row[name][0], getattr(t, name).to(torch.bfloat16).float())


def test_budget_never_exceeded_and_counts_recorded(tmp_path):
    gen = torch.Generator().manual_seed(4)
    probe = TraceWriter(tmp_path / "probe.zarr", attrs={}, budget_bytes=1, storage_dtype="float16", seed=0)
    size = probe.tuple_nbytes(make_tuple(gen))
    probe.abort()
    budget = int(size * 7.5)
    with TraceWriter(tmp_path / "s.zarr", attrs={}, budget_bytes=budget, storage_dtype="float16", seed=5) as w:
        for i in range(60):
            w.offer(f"single_blocks.{i % 3}", make_tuple(gen, prompt=i))
            assert w.kept_bytes <= budget
    store = TraceStore.open(tmp_path / "s.zarr")
    res = store.attrs["reservoir"]
    assert res["offered"] == 60 and res["kept"] == 7 == store.count()
    assert res["kept_bytes"] == 7 * size <= budget
    assert sum(res["offered_per_layer"].values()) == 60
    assert sum(res["kept_per_layer"].values()) == 7
    # the data on disk (compressed) is within the budget too, up to the small JSON metadata files
    data_bytes = sum(f.stat().st_size for f in (tmp_path / "s.zarr").rglob("*") if f.is_file()
                     and f.name != "zarr.json")
    assert data_bytes <= budget


def test_tuple_larger_than_budget_is_a_clear_error(tmp_path):
    gen = torch.Generator().manual_seed(4)
    with pytest.raises(ValueError, match="raise capture.budget_mib"):
        write_store(tmp_path / "s.zarr", [("single_blocks.0", make_tuple(gen))], budget=100)


def _reservoir_kept(offers: list[tuple[int, int]], budget: int, seed: int, tmp_path: Path) -> set[int]:
    """Run the writer's reservoir over ``(id, n_tokens)`` offers of tiny tuples; ids that were kept."""
    gen = torch.Generator().manual_seed(0)
    templates = {n: make_tuple(gen, h=1, n=n, nq=1, d=1) for n in {n for _, n in offers}}
    w = TraceWriter(tmp_path / "r.zarr", attrs={}, budget_bytes=budget, storage_dtype="float32", seed=seed)
    try:
        for i, n in offers:
            t = templates[n]
            t.prompt = i
            w.offer("single_blocks.0", t)
            assert w.kept_bytes <= budget
        return {int(item.scalars[5]) for _, _, item in w._heap}
    finally:
        w.abort()


def test_reservoir_selection_is_uniform_for_equal_sizes(tmp_path):
    n_items, trials = 40, 300
    gen = torch.Generator().manual_seed(0)
    probe = TraceWriter(tmp_path / "p.zarr", attrs={}, budget_bytes=1, storage_dtype="float32", seed=0)
    size = probe.tuple_nbytes(make_tuple(gen, h=1, n=8, nq=1, d=1))
    probe.abort()
    keep = 10
    counts = np.zeros(n_items)
    for trial in range(trials):
        kept = _reservoir_kept([(i, 8) for i in range(n_items)], keep * size + size // 2, 1000 + trial, tmp_path)
        assert len(kept) == keep  # exactly floor(budget / size)
        counts[list(kept)] += 1
    expected = trials * keep / n_items
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 39 degrees of freedom (times the finite-population factor < 1): P(chi2 > 72) < 1e-3
    assert chi2 < 72.0, (chi2, counts)
    # and first/last offered tuples are not favoured (order independence)
    assert abs(counts[:20].mean() - counts[20:].mean()) < 0.15 * expected


def test_reservoir_equals_prefix_rule_offline(tmp_path):
    """The streaming result equals the prefix rule applied offline to the same priorities."""
    sizes_n = [8, 16, 8, 32, 8, 16, 8, 8, 32, 16] * 4
    gen = torch.Generator().manual_seed(0)
    probe = TraceWriter(tmp_path / "p.zarr", attrs={}, budget_bytes=1, storage_dtype="float32", seed=0)
    nbytes = {n: probe.tuple_nbytes(make_tuple(gen, h=1, n=n, nq=1, d=1)) for n in set(sizes_n)}
    probe.abort()
    budget = 9 * nbytes[16]
    for seed in range(5):
        kept = _reservoir_kept(list(enumerate(sizes_n)), budget, seed, tmp_path)
        pri = np.random.default_rng(seed).random(len(sizes_n))
        total, expect = 0, set()
        for i in np.argsort(pri):
            if total + nbytes[sizes_n[i]] > budget:
                break
            total += nbytes[sizes_n[i]]
            expect.add(int(i))
        assert kept == expect


def test_reservoir_bias_with_mixed_sizes_is_bounded(tmp_path):
    """Large and small tuples: inclusion rates agree within the documented s_max/budget bias (plus noise)."""
    gen = torch.Generator().manual_seed(0)
    probe = TraceWriter(tmp_path / "p.zarr", attrs={}, budget_bytes=1, storage_dtype="float32", seed=0)
    small = probe.tuple_nbytes(make_tuple(gen, h=1, n=8, nq=1, d=1))
    large = probe.tuple_nbytes(make_tuple(gen, h=1, n=32, nq=1, d=1))
    probe.abort()
    offers = [(i, 32 if i % 4 == 0 else 8) for i in range(60)]
    total = sum(large if n == 32 else small for _, n in offers)
    budget = total // 3
    trials = 200
    hits = {8: 0, 32: 0}
    for trial in range(trials):
        for i in _reservoir_kept(offers, budget, 5000 + trial, tmp_path):
            hits[offers[i][1]] += 1
    rate_small = hits[8] / (45 * trials)
    rate_large = hits[32] / (15 * trials)
    p = budget / total
    assert rate_small == pytest.approx(p, abs=0.04)
    assert rate_large <= rate_small
    assert rate_small - rate_large <= p * large / budget + 0.05


def test_prefix_cut_stops_at_the_first_misfit():
    entries = [(0.5, 3), (0.1, 4), (0.3, 2), (0.9, 1), (0.7, 5)]
    # by priority: 0.1 (4), 0.3 (6), 0.5 (9), 0.7 (14 > 10): cut at 0.7, though 0.9 (1 byte) would fit
    assert prefix_cut(entries, 10) == 0.7
    assert prefix_cut(entries, 100) == math.inf and prefix_cut(entries, 100, below=0.6) == 0.6
    assert prefix_cut(entries, 10, below=0.4) == 0.4  # only 0.1 and 0.3 walked: both fit
    assert prefix_cut(entries, 3) == 0.1 and prefix_cut([], 1) == math.inf


def test_split_reservoirs_merge_to_the_single_one(tmp_path):
    """Tuples dealt to 2-4 reservoirs (as to torchrun ranks) with keyed priorities, synced now and then
    (merge_cut + cap, what TraceWriter.sync does), merge to exactly the tuples one reservoir offered all of
    them keeps: mixed sizes (where a rank's own misfit decides the cut), any split, any sync period; after
    each sync all reservoirs together hold at most the budget."""
    gen = torch.Generator().manual_seed(0)
    templates = {n: make_tuple(gen, h=1, n=n, nq=1, d=1) for n in (8, 16, 32)}
    probe = TraceWriter(tmp_path / "p.zarr", attrs={}, budget_bytes=1, storage_dtype="float32", seed=0)
    nbytes = {n: probe.tuple_nbytes(t) for n, t in templates.items()}
    probe.abort()

    def offer(w: TraceWriter, i: int, n: int, priority: float) -> None:
        t = templates[n]
        t.prompt = i
        w.offer("single_blocks.0", t, priority=priority)

    def ids(w: TraceWriter, below: float = math.inf) -> set[int]:
        return {int(item.scalars[5]) for _, _, item in w._heap if item.priority < below}

    cases = 0
    for trial in range(24):
        rng = np.random.default_rng(trial)
        sizes = rng.choice([8, 16, 32], 48).tolist()
        pri = rng.random(48).tolist()
        budget = int(sum(nbytes[n] for n in sizes) / rng.uniform(1.5, 6.0))
        single = TraceWriter(tmp_path / "one.zarr", attrs={}, budget_bytes=budget, storage_dtype="float32", seed=0)
        k, every = int(rng.integers(2, 5)), int(rng.integers(1, 60))
        ranks = [TraceWriter(tmp_path / f"r{r}.zarr", attrs={}, budget_bytes=budget, storage_dtype="float32",
                             seed=0) for r in range(k)]
        try:
            for i in rng.permutation(48).tolist():  # the single reservoir sees another order: no matter
                offer(single, i, sizes[i], pri[i])
            owner = rng.choice(k, 48, p=rng.dirichlet([0.4] * k))  # skewed splits too: one rank holds most
            for i in range(48):
                offer(ranks[owner[i]], i, sizes[i], pri[i])
                if (i + 1) % every == 0:
                    cut = merge_cut([w.reservoir_state() for w in ranks], budget)
                    for w in ranks:
                        w.cap(cut)
                    assert sum(w.kept_bytes for w in ranks) <= budget
            cut = merge_cut([w.reservoir_state() for w in ranks], budget)
            merged = set().union(*(ids(w, cut) for w in ranks))
            assert merged == ids(single) and len(merged) > 0, trial
            cases += sum(len(ids(w)) for w in ranks) > len(merged)  # the merge had something to drop
        finally:
            single.abort()
            for w in ranks:
                w.abort()
    assert cases >= 5


def test_merge_stops_at_a_misfit_only_its_own_rank_saw(tmp_path):
    """Rank A holds the global prefix (two small tuples) and the first misfit (a large one), which it drops;
    rank B holds a small tuple just above it that would still fit the budget. One reservoir keeps only the
    prefix, so the merge must stop at A's threshold, not walk on to B's tuple."""
    gen = torch.Generator().manual_seed(0)
    small, large = make_tuple(gen, h=1, n=8, nq=1, d=1), make_tuple(gen, h=1, n=32, nq=1, d=1)
    probe = TraceWriter(tmp_path / "p.zarr", attrs={}, budget_bytes=1, storage_dtype="float32", seed=0)
    s_bytes, l_bytes = probe.tuple_nbytes(small), probe.tuple_nbytes(large)
    probe.abort()
    budget = 3 * s_bytes
    assert 2 * s_bytes + l_bytes > budget
    a, b = (TraceWriter(tmp_path / f"{r}.zarr", attrs={}, budget_bytes=budget, storage_dtype="float32", seed=0)
            for r in "ab")
    try:
        for t, pri in ((small, 0.1), (small, 0.2), (large, 0.3)):
            a.offer("single_blocks.0", t, priority=pri)
        b.offer("single_blocks.0", small, priority=0.35)
        state_a = a.reservoir_state()
        assert sorted(state_a["kept"]) == [[0.1, s_bytes], [0.2, s_bytes]] and state_a["tau"] == 0.3
        assert b.reservoir_state() == {"kept": [[0.35, s_bytes]], "tau": None}
        assert merge_cut([a.reservoir_state(), b.reservoir_state()], budget) == 0.3
    finally:
        a.abort()
        b.abort()


def test_offer_refuses_a_priority_outside_the_unit_interval(tmp_path):
    gen = torch.Generator().manual_seed(0)
    w = TraceWriter(tmp_path / "s.zarr", attrs={}, budget_bytes=1 << 20, storage_dtype="float32", seed=0)
    try:
        with pytest.raises(ValueError, match=r"priority must be in \[0, 1\)"):
            w.offer("single_blocks.0", make_tuple(gen), priority=1.0)
        assert w.offered == 0
    finally:
        w.abort()


def test_exception_leaves_nothing_and_rerun_works(tmp_path):
    gen = torch.Generator().manual_seed(6)
    target = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError, match="boom"):
        with TraceWriter(target, attrs={}, budget_bytes=1 << 30, storage_dtype="float16", seed=0) as w:
            w.offer("single_blocks.0", make_tuple(gen))
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    # a killed writer leaves a hidden partial folder: it is not a store, and the next writer cleans it up
    w = TraceWriter(target, attrs={}, budget_bytes=1 << 30, storage_dtype="float16", seed=0)
    w.offer("single_blocks.0", make_tuple(gen))
    partial = w._tmp
    with pytest.raises(TraceStoreError, match="incomplete"):
        TraceStore.open(partial)
    w2 = TraceWriter(target, attrs={}, budget_bytes=1 << 30, storage_dtype="float16", seed=0)
    assert not partial.exists()  # removed as stale (same pid here stands in for a dead writer)
    w2.offer("single_blocks.0", make_tuple(gen))
    w2.close()
    assert TraceStore.open(target).count() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]


def test_close_replaces_an_older_store(tmp_path):
    gen = torch.Generator().manual_seed(7)
    target = tmp_path / "s.zarr"
    write_store(target, [("single_blocks.0", make_tuple(gen, prompt=p)) for p in range(3)])
    write_store(target, [("single_blocks.1", make_tuple(gen, prompt=9))])
    store = TraceStore.open(target)
    assert store.layers == ["single_blocks.1"] and store.count() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]


def test_remove_stale_temps_spares_live_writers(tmp_path):
    target = tmp_path / "s.zarr"
    dead = tmp_path / ".s.zarr.tmp-999999999-abcd"  # no such pid
    live = tmp_path / ".s.zarr.tmp-1-abcd"  # pid 1 is alive
    other = tmp_path / ".other.zarr.tmp-999999999-abcd"
    for p in (dead, live, other):
        p.mkdir()
    assert remove_stale_temps(target) == [dead]
    assert live.exists() and other.exists()


def test_file_count_stays_small(tmp_path):
    gen = torch.Generator().manual_seed(8)
    tuples = [(f"single_blocks.{i}", make_tuple(gen, n=n, prompt=p, step=s))
              for i in range(3) for n in (24, 40) for p in range(10) for s in range(10)]
    write_store(tmp_path / "s.zarr", tuples, dtype="float16", shard_bytes=16 * 2 * 40 * 8 * 2)
    store = TraceStore.open(tmp_path / "s.zarr")
    assert store.count() == 600
    # per (layer, N) group: 6 array metadata + 1 group metadata + q_idx + scalars + 4 arrays x ceil(100/16) shards
    groups = 3 * 2
    assert store.file_count() <= 1 + 3 + groups * (7 + 2 + 4 * 7)
    assert store.file_count() < 250  # vs. 600 tuples x 4 arrays = 2400 chunk files unsharded


def test_missing_foreign_partial_and_newer_schema_errors(tmp_path):
    with pytest.raises(TraceStoreError, match="no trace store here.*flux2ttr capture"):
        TraceStore.open(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(TraceStoreError, match="not a zarr v3 store"):
        TraceStore.open(tmp_path / "plain")
    import zarr

    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w").attrs.update({"format": "something-else"})
    with pytest.raises(TraceStoreError, match=r"foreign\.zarr: not a flux2ttr trace store"):
        TraceStore.open(tmp_path / "foreign.zarr")

    gen = torch.Generator().manual_seed(9)
    write_store(tmp_path / "new.zarr", [("single_blocks.0", make_tuple(gen))])
    meta = tmp_path / "new.zarr" / "zarr.json"
    head = json.loads(meta.read_text())
    head["attributes"]["schema"] = SCHEMA_VERSION + 1
    meta.write_text(json.dumps(head))
    with pytest.raises(TraceStoreError, match=r"new\.zarr: trace store schema 2 is newer.*upgrade flux2ttr"):
        TraceStore.open(tmp_path / "new.zarr")


def test_writer_validates_inputs(tmp_path):
    gen = torch.Generator().manual_seed(10)
    with pytest.raises(ValueError, match="storage dtype"):
        TraceWriter(tmp_path / "a.zarr", attrs={}, budget_bytes=10, storage_dtype="int8", seed=0)
    with pytest.raises(ValueError, match="reserved"):
        TraceWriter(tmp_path / "a.zarr", attrs={"schema": 5}, budget_bytes=10, storage_dtype="float16", seed=0)
    with TraceWriter(tmp_path / "a.zarr", attrs={}, budget_bytes=1 << 20, storage_dtype="float16", seed=0) as w:
        w.offer("single_blocks.0", make_tuple(gen, nq=5))
        with pytest.raises(ValueError, match="differ from the first"):
            w.offer("single_blocks.0", make_tuple(gen, nq=6))
        bad = make_tuple(gen)
        bad.q_idx = bad.q_idx[:2]
        with pytest.raises(ValueError, match="do not match"):
            w.offer("single_blocks.0", bad)
        with pytest.raises(ValueError, match="not a layer key"):
            w.offer("blocks.0", make_tuple(gen))


# ------------------------------------------------------------------------------------------ integrity


def _damage_store(path: Path) -> Path:
    """A two-layer store whose k arrays span several shard files (so one can be damaged alone)."""
    gen = torch.Generator().manual_seed(11)
    tuples = [(f"single_blocks.{i}", make_tuple(gen, prompt=p, step=s)) for i in range(2) for p in range(4)
              for s in range(3)]
    write_store(path, tuples, shard_bytes=4 * 2 * 24 * 8 * 4)  # 4 tuples of k per shard: 3 shards per array
    return path


K_SHARD = "single_blocks.1/n24/k/c/1/0/0/0"  # rows 4..7 of single_blocks.1's keys


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    import hashlib

    path = _damage_store(tmp_path / "s.zarr")
    store = TraceStore.open(path)
    man = store.attrs["manifest"]
    assert man["hash"] == "sha256" and store.manifest is man
    on_disk = sorted(f.relative_to(path).as_posix() for f in path.rglob("*") if f.is_file())
    assert sorted(man["files"]) == [r for r in on_disk if r != "zarr.json"]  # all but the file holding it
    for rel, (size, digest) in man["files"].items():
        data = (path / rel).read_bytes()
        assert size == len(data) and digest == hashlib.sha256(data).hexdigest(), rel
    assert man["arrays"]["single_blocks.1/n24/k"] == {"shape": [12, 2, 24, 8], "dtype": "float32",
                                                      "rows_per_file": 4}
    assert man["arrays"]["single_blocks.0/n24/scalars"]["shape"] == [12, len(SCALAR_FIELDS)]
    assert {f"single_blocks.1/n24/k/c/{i}/0/0/0" for i in range(3)} <= set(man["files"])
    # reserved: a caller cannot smuggle its own manifest in
    with pytest.raises(ValueError, match="reserved"):
        TraceWriter(tmp_path / "x.zarr", attrs={"manifest": {}}, budget_bytes=10, storage_dtype="float16", seed=0)


@pytest.mark.filterwarnings("ignore:Object at .DS_Store is not recognized")  # zarr's own note on the stray file
def test_good_store_opens_verifies_and_reads_identically(tmp_path):
    gen = torch.Generator().manual_seed(12)
    tuples = [(f"single_blocks.{i}", make_tuple(gen, prompt=p, step=s)) for i in range(2) for p in range(4)
              for s in range(3)]
    write_store(tmp_path / "s.zarr", tuples, shard_bytes=4 * 2 * 24 * 8 * 4)
    store = TraceStore.open(tmp_path / "s.zarr")
    before = read_all(store)
    for key, t in originals(tuples).items():
        for name in ("q_sub", "k", "v", "teacher_sub"):
            assert torch.equal(before[key][name], getattr(t, name).float())
    report = store.verify()
    assert report["manifest"] is True and report["files"] == len(store.manifest["files"])
    assert report["bytes"] == store.nbytes_on_disk() - (tmp_path / "s.zarr" / "zarr.json").stat().st_size
    after = read_all(TraceStore.open(tmp_path / "s.zarr"))
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k][n], before[k][n]) for k in before for n in before[k])
    # stray hidden files (editor or NFS droppings) are not part of the store and are ignored
    (tmp_path / "s.zarr" / "single_blocks.0" / ".DS_Store").write_bytes(b"x")
    assert TraceStore.open(tmp_path / "s.zarr").count() == 24


def test_deleted_shard_is_refused_at_open_naming_it(tmp_path):
    path = _damage_store(tmp_path / "s.zarr")
    (path / K_SHARD).unlink()  # zarr alone would read those four tuples' keys as zeros
    with pytest.raises(TraceStoreError) as e:
        TraceStore.open(path)
    msg = str(e.value)
    assert f"{path}: damaged trace store, file {K_SHARD} is missing" in msg
    assert "recapture it (`dvc repro capture`" in msg


def test_truncated_shard_is_refused_at_open_naming_it(tmp_path):
    path = _damage_store(tmp_path / "s.zarr")
    data = (path / K_SHARD).read_bytes()
    (path / K_SHARD).write_bytes(data[:-100])
    with pytest.raises(TraceStoreError, match=re.escape(
            f"file {K_SHARD} is {len(data) - 100} bytes, the manifest says {len(data)} (truncated)")) as e:
        TraceStore.open(path)
    assert "dvc repro capture" in str(e.value)
    (path / K_SHARD).write_bytes(data + b"\0")
    with pytest.raises(TraceStoreError, match=re.escape(f"{K_SHARD} is {len(data) + 1} bytes")):
        TraceStore.open(path)


def test_unlisted_file_and_corrupt_metadata_are_refused_at_open(tmp_path):
    path = _damage_store(tmp_path / "s.zarr")
    stray = path / "single_blocks.1" / "n24" / "k" / "c" / "9" / "0" / "0" / "0"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"chunk from another store")
    with pytest.raises(TraceStoreError, match=r"file single_blocks\.1/n24/k/c/9/0/0/0 is not in the manifest"):
        TraceStore.open(path)
    stray.unlink()
    meta = path / "single_blocks.0" / "n24" / "zarr.json"
    text = meta.read_text()
    meta.write_text(text.replace('"count": 12', '"count": 13'))  # same size, other bytes
    with pytest.raises(TraceStoreError, match=r"single_blocks\.0/n24/zarr\.json \(metadata\) is corrupt"):
        TraceStore.open(path)


def test_corrupt_shard_of_the_same_size_fails_at_read_and_verify_naming_it(tmp_path):
    from flux2ttr.traces.loader import read_batch

    path = _damage_store(tmp_path / "s.zarr")
    data = bytearray((path / K_SHARD).read_bytes())
    data[200:210] = b"\xff" * 10  # zstd would decode this to garbage without complaint
    (path / K_SHARD).write_bytes(bytes(data))
    store = TraceStore.open(path)  # sizes agree: the cheap check at open passes
    assert store.read("single_blocks.1", 24, [0, 3, 8])["k"].shape[0] == 3  # other shards read fine
    assert torch.isfinite(store.read("single_blocks.0", 24, [5])["k"]).all()
    want = (rf"{re.escape(str(path))}: file {re.escape(K_SHARD)} of array single_blocks\.1/n24/k is corrupt: its "
            r"sha256 .* differs from the manifest's .*dvc repro capture")
    with pytest.raises(TraceStoreError, match=want):
        store.read("single_blocks.1", 24, [5])
    with pytest.raises(TraceStoreError, match=want):
        read_batch(store, "single_blocks.1", 24, [4, 7])
    with pytest.raises(TraceStoreError, match=want):
        TraceStore.open(path).verify()
    assert TraceStore.open(path).verify(layers=["single_blocks.0"])["manifest"] is True  # not its layer


def test_each_file_is_hashed_once_per_open_store(tmp_path, monkeypatch):
    import flux2ttr.traces.store as store_mod

    path = _damage_store(tmp_path / "s.zarr")
    store = TraceStore.open(path)
    hashed = []
    real = store_mod.file_sha256
    monkeypatch.setattr(store_mod, "file_sha256", lambda p: hashed.append(Path(p).relative_to(path).as_posix())
                        or real(p))
    store.read("single_blocks.1", 24, [5])
    # the shard of row 5 in each big array (q_sub/teacher_sub shard like k) and the one chunk of the small ones
    assert sorted(hashed) == sorted([K_SHARD, "single_blocks.1/n24/q_sub/c/1/0/0/0",
                                     "single_blocks.1/n24/teacher_sub/c/1/0/0/0", "single_blocks.1/n24/v/c/1/0/0/0",
                                     "single_blocks.1/n24/q_idx/c/0/0", "single_blocks.1/n24/scalars/c/0/0"])
    hashed.clear()
    store.read("single_blocks.1", 24, [4, 6, 7])
    store.verify(layers=["single_blocks.1"])
    assert K_SHARD not in hashed and len(hashed) == len(set(hashed))  # read files are not hashed again


def _strip_manifest(path: Path) -> None:
    meta = path / "zarr.json"
    head = json.loads(meta.read_text())
    del head["attributes"]["manifest"]
    meta.write_text(json.dumps(head))


def test_store_without_manifest_opens_with_a_warning_and_wraps_decode_errors(tmp_path):
    from flux2ttr.traces.store import TraceStoreWarning

    path = _damage_store(tmp_path / "s.zarr")
    _strip_manifest(path)  # what a store written before manifests looks like
    with pytest.warns(TraceStoreWarning, match="no manifest.*cannot be detected.*dvc repro capture"):
        store = TraceStore.open(path)
    assert store.manifest is None and store.verify() == {"manifest": False, "files": 0, "bytes": 0, "seconds": 0.0}
    assert store.count() == 24 and store.read("single_blocks.1", 24, [5])["k"].shape == (1, 2, 24, 8)
    data = (path / K_SHARD).read_bytes()
    (path / K_SHARD).write_bytes(data[:-100])  # the shard index at the end is now read from the wrong bytes
    with pytest.warns(TraceStoreWarning):
        store = TraceStore.open(path)
    with pytest.raises(TraceStoreError, match=(
            rf"cannot decode array single_blocks\.1/n24/k from {re.escape(K_SHARD)} \(ValueError: Stored and "
            r"computed checksum do not match.*the store is damaged: recapture it \(`dvc repro capture`")):
        store.read("single_blocks.1", 24, [5])


def test_uncond_column_round_trips_and_old_stores_read_zero(tmp_path):
    """``uncond`` (the unconditional half of a true-CFG call) is a stored scalar; a store written before the
    column existed (eight scalar columns, named in ``scalar_fields``) reads with ``uncond`` 0."""
    gen = torch.Generator().manual_seed(0)
    with TraceWriter(tmp_path / "s.zarr", attrs={}, budget_bytes=1 << 24, storage_dtype="float32", seed=0) as w:
        for i, uncond in enumerate((0, 1, 1)):
            t = make_tuple(gen, prompt=i)
            t.uncond = uncond
            w.offer("single_blocks.0", t)
        bad = make_tuple(gen)
        bad.uncond = 2
        with pytest.raises(ValueError, match="uncond"):
            w.offer("single_blocks.0", bad)
    store = TraceStore.open(tmp_path / "s.zarr")
    assert store.attrs["scalar_fields"] == list(SCALAR_FIELDS) and SCALAR_FIELDS[-1] == "uncond"
    assert store.read("single_blocks.0", 24, [0, 1, 2])["uncond"].tolist() == [0, 1, 1]
    assert store.scalars("single_blocks.0", 24)["uncond"].tolist() == [0, 1, 1]
    table = store.read_array("single_blocks.0", 24, "scalars")
    store.attrs["scalar_fields"] = list(SCALAR_FIELDS[:8])  # what an older store records, with its 8 columns
    cols = store.scalar_columns(np.ascontiguousarray(table[:, :8]))
    assert set(cols) == set(SCALAR_FIELDS) and cols["uncond"].tolist() == [0, 0, 0]
    assert cols["prompt"].tolist() == [0, 1, 2]
    with pytest.raises(TraceStoreError, match="columns"):
        store.scalar_columns(table)  # 9 columns against 8 names: refused, never misread


def test_shards_written_by_several_threads_are_the_bytes_one_thread_writes(tmp_path):
    """write_threads compresses and writes several shard files at once at close: every file, the manifest's
    sha256 included, is byte for byte what one thread writes, and every spilled tuple is gone."""
    gen = torch.Generator().manual_seed(5)
    tuples = [(f"single_blocks.{i}", make_tuple(gen, prompt=p, step=s)) for i in range(2) for p in range(4)
              for s in range(3)]
    shard = 2 * 2 * 24 * 8 * 4  # 2 tuples of k per shard: 6 shards per array, more than the threads
    write_store(tmp_path / "one.zarr", tuples, shard_bytes=shard, write_threads=1)
    write_store(tmp_path / "many.zarr", tuples, shard_bytes=shard, write_threads=3)
    one = sorted(p.relative_to(tmp_path / "one.zarr") for p in (tmp_path / "one.zarr").rglob("*") if p.is_file())
    many = sorted(p.relative_to(tmp_path / "many.zarr") for p in (tmp_path / "many.zarr").rglob("*") if p.is_file())
    assert one == many and len([p for p in one if "/k/c/" in str(p)]) == 12
    for rel in one:
        assert (tmp_path / "one.zarr" / rel).read_bytes() == (tmp_path / "many.zarr" / rel).read_bytes(), rel
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.zarr", "one.zarr"]  # no temp store or spill left
    with pytest.raises(ValueError, match="write_threads"):
        TraceWriter(tmp_path / "x.zarr", attrs={}, budget_bytes=1, storage_dtype="float32", seed=0, write_threads=0)


def test_uncompressed_shards_hold_the_raw_bytes_and_read_as_the_zstd_store(tmp_path):
    """compression none: each k shard file is the stored tuples' float32 bytes followed by zarr's shard index
    (no codec), and the store reads exactly what the zstd store reads."""
    gen = torch.Generator().manual_seed(3)
    tuples = [("single_blocks.0", make_tuple(gen, prompt=p, step=s)) for p in range(3) for s in range(2)]
    write_store(tmp_path / "z.zarr", tuples)
    write_store(tmp_path / "raw.zarr", tuples, compression="none")
    raw, z = TraceStore.open(tmp_path / "raw.zarr"), TraceStore.open(tmp_path / "z.zarr")
    a, b = read_all(raw), read_all(z)
    assert a.keys() == b.keys() == originals(tuples).keys()
    for key in a:
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    (shard,) = (p for p in (tmp_path / "raw.zarr").rglob("*") if p.is_file() and "/k/c/" in str(p))
    k = np.stack([raw.read_array("single_blocks.0", 24, "k", np.array([i]))[0] for i in range(6)])
    data = shard.read_bytes()
    assert data[:k.nbytes] == np.ascontiguousarray(k, dtype=np.float32).tobytes()
    assert len(data) - k.nbytes < 6 * 16 + 64  # the rest: the shard index (offset, length per chunk + checksum)
    with pytest.raises(ValueError, match="compression 'lz4' is not one of"):
        TraceWriter(tmp_path / "x.zarr", attrs={}, budget_bytes=1, storage_dtype="float32", seed=0, compression="lz4")


@pytest.mark.parametrize("level", [None, 3])
def test_shard_files_are_the_bytes_zarr_writes(tmp_path, level):
    """write_shard_file (the writer's own shard encoder) against zarr writing the same rows into an array of the
    same codecs: every shard file is byte for byte zarr's (a partial last shard and an all-zero chunk among them),
    and zarr reads the data back exactly."""
    import zarr
    from zarr.codecs import ZstdCodec

    from flux2ttr.traces.store import write_shard_file

    rng = np.random.default_rng(0)
    data = rng.standard_normal((5, 2, 6, 4)).astype(np.float16)
    data[1] = 0  # zarr skips such a chunk unless write_empty_chunks is on, as the writer's arrays set it
    rows = 2
    made = {}
    for name in ("zarr", "ours"):
        root = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w")
        made[name] = root.create_array("a", shape=data.shape, dtype=data.dtype, chunks=(1, 2, 6, 4),
                                       shards=(rows, 2, 6, 4), fill_value=0, config={"write_empty_chunks": True},
                                       compressors=None if level is None else ZstdCodec(level=level))
    made["zarr"][:] = data
    arr = made["ours"]
    for start in range(0, len(data), rows):
        path = tmp_path / "ours.zarr" / arr.path / arr.metadata.encode_chunk_key((start // rows, 0, 0, 0))
        write_shard_file(path, [data[j:j + 1] for j in range(start, min(len(data), start + rows))], rows, level)
    files = sorted(p.relative_to(tmp_path / "zarr.zarr") for p in (tmp_path / "zarr.zarr").rglob("*") if p.is_file())
    assert len([f for f in files if "/c/" in str(f)]) == 3
    for rel in files:
        assert (tmp_path / "ours.zarr" / rel).read_bytes() == (tmp_path / "zarr.zarr" / rel).read_bytes(), rel
    assert np.array_equal(zarr.open_array(str(tmp_path / "ours.zarr" / "a"), mode="r")[:], data)


def test_a_failed_spill_write_stops_the_writer_and_publishes_nothing(tmp_path, monkeypatch):
    """Spill files are written by a background thread: a write that fails (a full disk) raises at the next offer
    or at close, and the temporary store is removed, so no store appears."""
    import flux2ttr.traces.store as store_mod

    real, calls = store_mod._write_raw, []

    def failing(path, arrays):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, arrays)

    monkeypatch.setattr(store_mod, "_write_raw", failing)
    gen = torch.Generator().manual_seed(1)
    with pytest.raises(OSError, match="No space left on device"):
        write_store(tmp_path / "s.zarr", [("single_blocks.0", make_tuple(gen, prompt=p)) for p in range(6)])
    assert list(tmp_path.iterdir()) == []
    # failing on the last tuple: raised by close
    calls.clear()
    with pytest.raises(OSError, match="No space left on device"):
        write_store(tmp_path / "s.zarr", [("single_blocks.0", make_tuple(gen, prompt=p)) for p in range(2)])
    assert list(tmp_path.iterdir()) == []


def test_shard_ready_spills_are_renamed_into_the_store_the_repack_writes(tmp_path, monkeypatch):
    """A group whose tuples each fill a shard (every full-size capture) spills each tuple as its final shard files
    (compressed and hashed in the spill thread) and close renames them into place: the store, manifest included,
    is byte for byte the one the repack of raw spills writes, with zstd and without; evicted tuples leave no files."""
    gen = torch.Generator().manual_seed(9)
    tuples = [(f"single_blocks.{i}", make_tuple(gen, prompt=p, step=s)) for i in range(2) for p in range(3)
              for s in range(2)]
    shard = 1000  # < one tuple's k (2 x 24 x 8 float32 = 1,536 bytes): one tuple per shard
    probe = TraceWriter(tmp_path / "probe.zarr", attrs={}, budget_bytes=1, storage_dtype="float32", seed=0)
    budget = 9 * probe.tuple_nbytes(tuples[0][1])  # 9 of 12 kept: some spills are evicted
    probe.abort()
    real_ready = TraceWriter._shard_ready
    for compression in ("zstd", "none"):
        seen = []
        monkeypatch.setattr(TraceWriter, "_shard_ready", lambda self, item: seen.append(real_ready(self, item))
                            or seen[-1])
        write_store(tmp_path / f"ready-{compression}.zarr", tuples, budget=budget, shard_bytes=shard,
                    compression=compression)
        assert seen and all(seen)
        monkeypatch.setattr(TraceWriter, "_shard_ready", lambda self, item: False)
        write_store(tmp_path / f"raw-{compression}.zarr", tuples, budget=budget, shard_bytes=shard,
                    compression=compression)
        a, b = tmp_path / f"ready-{compression}.zarr", tmp_path / f"raw-{compression}.zarr"
        files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
        assert files_a == files_b and len([f for f in files_a if "/k/c/" in str(f)]) == 9
        for rel in files_a:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), (compression, rel)
        store = TraceStore.open(a)
        assert store.count() == 9 and store.verify()["files"] > 0
        got, ref = read_all(store), originals(tuples)
        for key, row in got.items():
            assert torch.equal(row["k"], ref[key].k.float()) and torch.equal(row["q_idx"], ref[key].q_idx.long())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "raw-none.zarr", "raw-zstd.zarr", "ready-none.zarr", "ready-zstd.zarr"]  # no temp store or spill left


def test_refused_before_it_is_built_counts_as_the_offer_would(tmp_path):
    """TraceWriter.refuses: a tuple at or above the cut is counted as offered without being built (capture then
    skips its device work); one below the cut is not counted, and the caller offers it. Offering through it
    writes the store that offering every tuple writes, byte for byte, counts included."""
    gen = torch.Generator().manual_seed(4)
    tuples = [(f"single_blocks.{i % 2}", make_tuple(gen, prompt=i, seed=i)) for i in range(12)]
    priorities = np.random.default_rng(7).random(len(tuples))
    probe = TraceWriter(tmp_path / "probe.zarr", attrs={}, budget_bytes=1, storage_dtype="float32", seed=0)
    nbytes = probe.nbytes_of(2, 24, 5, 8, headed=False)
    probe.abort()
    budget = 3 * nbytes + nbytes // 2
    refused = {}
    for name in ("all", "early"):
        with TraceWriter(tmp_path / f"{name}.zarr", attrs={"capture": {}}, budget_bytes=budget,
                         storage_dtype="float32", seed=0) as w:
            w.plan(list(priorities), nbytes)
            refused[name] = 0
            for (layer, t), p in zip(tuples, priorities):
                assert w.tuple_nbytes(t) == nbytes
                if name == "early" and w.refuses(layer, nbytes, float(p)):
                    refused[name] += 1
                    continue
                w.offer(layer, t, priority=float(p))
            assert w.offered == len(tuples)
    assert refused["early"] == len(tuples) - 3  # only the 3 kept tuples were built
    files = {name: {f.relative_to(tmp_path / f"{name}.zarr"): f.read_bytes()
                    for f in sorted((tmp_path / f"{name}.zarr").rglob("*")) if f.is_file()} for name in ("all", "early")}
    assert files["all"] == files["early"]
    # below the cut nothing is counted; the offer's checks hold for a refused tuple too
    w = TraceWriter(tmp_path / "c.zarr", attrs={}, budget_bytes=budget, storage_dtype="float32", seed=0)
    w.plan(list(priorities), nbytes)
    assert not w.refuses("single_blocks.0", nbytes, 0.0) and w.offered == 0
    with pytest.raises(ValueError, match="smaller than the plan's lower bound"):
        w.refuses("single_blocks.0", nbytes - 1, 0.999)
    with pytest.raises(ValueError, match="larger than the whole budget"):
        w.refuses("single_blocks.0", 10 * budget, 0.999)
    w.abort()
