"""Trace loader: prompt-level validation split, deterministic and resumable batch plan, layer coverage,
prefetched reads equal to direct reads, a damaged shard named by the reader. ``make_store`` builds the
small synthetic stores that test_distill.py uses too (teacher_sub = exact softmax attention of q_sub
against k, v)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flux2ttr.traces.loader import BatchPlanner, PrefetchLoader, TupleCache, read_batch, split_by_prompt
from flux2ttr.traces.store import TraceStore, TraceStoreError, TraceWriter
from helpers.traces import TEACHER, make_store, make_tuple


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("loader") / "s.zarr", layers=("single_blocks.0", "single_blocks.1",
                                                                          "single_blocks.2"),
                      prompts=6, steps=3, extra_groups={"single_blocks.1": (2, 4)})


def test_split_is_by_prompt_and_deterministic(store_path):
    store = TraceStore.open(store_path)
    split = split_by_prompt(store, 0.34, seed=3)
    assert len(split.val_prompts) == math.ceil(0.34 * 6) == 3
    assert sorted(split.val_prompts + split.train_prompts) == list(range(6))
    for layer in store.layers:
        for part, allowed in ((split.train, set(split.train_prompts)), (split.val, set(split.val_prompts))):
            for n, rows in part[layer]:
                prompts = store.scalars(layer, n)["prompt"][rows]
                assert set(prompts.tolist()) <= allowed
        # every row lands in exactly one part
        for n, count in store.groups(layer):
            got = sorted(np.concatenate([r for m, r in split.train[layer] + split.val[layer] if m == n]).tolist())
            assert got == list(range(count))
    again = split_by_prompt(store, 0.34, seed=3)
    assert again.val_prompts == split.val_prompts
    assert {tuple(split_by_prompt(store, 0.34, seed=s).val_prompts) for s in range(8)} != {tuple(split.val_prompts)}


def test_split_needs_two_prompts(tmp_path):
    store = TraceStore.open(make_store(tmp_path / "one.zarr", layers=("single_blocks.0",), prompts=1, steps=2))
    with pytest.raises(ValueError, match="at least 2"):
        split_by_prompt(store, 0.5, seed=0)


def _groups(split, store):
    return {k: split.train[k] for k in store.layers}


def test_planner_covers_layers_and_tuples(store_path):
    store = TraceStore.open(store_path)
    split = split_by_prompt(store, 0.34, seed=0)
    planner = BatchPlanner(_groups(split, store), batch_size=2, min_layers=1, max_layers=2, seed=5)
    seen = {k: [] for k in store.layers}
    picks = []
    for step in range(30):
        reqs = planner.next_step()
        assert 1 <= len(reqs) <= 2
        assert [r.layer for r in reqs] == sorted([r.layer for r in reqs], key=store.layers.index)
        picks.append(len(reqs))
        for r in reqs:
            assert 1 <= len(r.rows) <= 2
            n_rows = dict((n, rows) for n, rows in split.train[r.layer])[r.n_tokens]
            assert set(r.rows) <= set(n_rows.tolist())
            seen[r.layer].append((r.n_tokens, r.rows))
    assert set(picks) == {1, 2}  # the subset size really varies
    counts = [len(v) for v in seen.values()]
    assert max(counts) - min(counts) <= 2  # balanced coverage
    # one epoch of a layer visits each training tuple exactly once
    layer = "single_blocks.1"
    epoch = planner.epoch_batches(layer, 0)
    flat = sorted((n, int(r)) for n, rows in epoch for r in rows)
    want = sorted((n, int(r)) for n, rows in split.train[layer] for r in rows)
    assert flat == want
    e0 = [tuple(r.tolist()) for _, r in planner.epoch_batches(layer, 0)]
    e1 = [tuple(r.tolist()) for _, r in planner.epoch_batches(layer, 1)]
    assert e0 != e1  # reshuffled every epoch


def test_every_layer_covered_within_bound(store_path):
    store = TraceStore.open(store_path)
    split = split_by_prompt(store, 0.34, seed=0)
    for seed in range(5):
        planner = BatchPlanner(_groups(split, store), batch_size=3, min_layers=1, max_layers=1, seed=seed)
        first = {r.layer for _ in range(3) for r in planner.next_step()}
        assert first == set(store.layers)


def test_planner_state_resume_is_exact(store_path):
    store = TraceStore.open(store_path)
    groups = _groups(split_by_prompt(store, 0.34, seed=0), store)
    a = BatchPlanner(groups, batch_size=2, min_layers=1, max_layers=3, seed=1)
    full = [a.next_step() for _ in range(25)]
    b = BatchPlanner(groups, batch_size=2, min_layers=1, max_layers=3, seed=1)
    first = [b.next_step() for _ in range(11)]
    state = b.state_dict()
    c = BatchPlanner(groups, batch_size=2, min_layers=1, max_layers=3, seed=1)
    c.load_state_dict(state)
    rest = [c.next_step() for _ in range(14)]
    assert first + rest == full


def test_prefetch_loader_matches_direct_reads(store_path):
    store = TraceStore.open(store_path)
    groups = _groups(split_by_prompt(store, 0.34, seed=0), store)
    ref = BatchPlanner(groups, batch_size=2, min_layers=1, max_layers=3, seed=2)
    want = [ref.next_step() for _ in range(12)]
    planner = BatchPlanner(groups, batch_size=2, min_layers=1, max_layers=3, seed=2)
    with PrefetchLoader(store_path, planner, stop_step=12, prefetch_steps=3, reader_threads=2) as loader:
        got = list(loader)
    assert [sb.step for sb in got] == list(range(12))
    for sb, reqs in zip(got, want):
        assert list(sb.batches) == [r.layer for r in reqs]
        for r in reqs:
            direct = store.read(r.layer, r.n_tokens, list(r.rows))
            for name, t in direct.items():
                assert torch.equal(sb.batches[r.layer][name], t), name
    assert got[-1].plan_state == ref.state_dict()
    assert loader.tuples_read == sum(len(r.rows) for reqs in want for r in reqs)


def test_prefetch_loader_stops_early_and_surfaces_errors(store_path, tmp_path):
    store = TraceStore.open(store_path)
    groups = _groups(split_by_prompt(store, 0.34, seed=0), store)
    planner = BatchPlanner(groups, batch_size=2, min_layers=1, max_layers=1, seed=0)
    with PrefetchLoader(store, planner, stop_step=1000, prefetch_steps=2) as loader:
        for sb in loader:
            if sb.step == 3:
                break  # close() must not hang with the producer blocked on a full queue
    bad = {"single_blocks.0": [(999, np.arange(3))]}  # a token count the store does not have
    planner = BatchPlanner(bad, batch_size=2, min_layers=1, max_layers=1, seed=0)
    with PrefetchLoader(store, planner, stop_step=5) as loader:
        with pytest.raises(KeyError, match="999"):
            list(loader)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_read_batch_equals_store_read(tmp_path, dtype):
    gen = torch.Generator().manual_seed(4)
    path = tmp_path / f"{dtype}.zarr"
    with TraceWriter(path, attrs={"teacher": TEACHER}, budget_bytes=1 << 30, storage_dtype=dtype, seed=0,
                     shard_bytes=3 * 2 * 20 * 16 * 2) as w:  # about 3 tuples per shard: runs cross shards
        for p in range(12):
            w.offer("single_blocks.0", make_tuple(gen, heads=2, n_cond=4, hgrid=4, wgrid=4, nq=6, d=16, prompt=p,
                                                  step=0, seed=0, qk_scale=1.0))
    store = TraceStore.open(path)
    for rows in ([5], [0, 1, 2, 3, 4, 5, 6], [11, 2, 3, 2, 7, 8], list(range(12))[::-1]):
        fast = read_batch(store, "single_blocks.0", 20, rows)
        ref = store.read("single_blocks.0", 20, rows)
        assert fast.keys() == ref.keys()
        for name in ref:
            assert fast[name].dtype == ref[name].dtype and torch.equal(fast[name], ref[name]), (rows, name)
    with pytest.raises(IndexError):
        read_batch(store, "single_blocks.0", 20, [12])


def test_tuple_cache_serves_identical_batches_within_budget(store_path):
    store = TraceStore.open(store_path)
    groups = _groups(split_by_prompt(store, 0.34, seed=0), store)

    def run(cache):
        planner = BatchPlanner(groups, batch_size=2, min_layers=1, max_layers=3, seed=9)
        with PrefetchLoader(store, planner, stop_step=40, prefetch_steps=3, reader_threads=2, cache=cache) as ld:
            return list(ld)

    plain = run(None)
    big = TupleCache(1 << 30)
    cached = run(big)
    for a, b in zip(plain, cached):
        assert a.batches.keys() == b.batches.keys()
        for layer in a.batches:
            for name, t in a.batches[layer].items():
                assert torch.equal(t, b.batches[layer][name]) and t.dtype == b.batches[layer][name].dtype
    n_train = sum(len(r) for g in groups.values() for _, r in g)
    assert len(big._rows) == n_train  # every training tuple read from zarr once ...
    # ... and served from memory afterwards (two reader threads may both miss a row at an epoch edge)
    assert n_train <= big.misses < n_train + 8 and big.hits > 2 * big.misses
    one_row = next(iter(big._rows.values()))
    row_bytes = sum(t.numel() * t.element_size() for t in one_row.values())
    small = TupleCache(5 * row_bytes + row_bytes // 2)
    run(small)
    assert len(small._rows) == 5 and small.nbytes <= small.max_bytes


def test_prefetched_reads_of_a_corrupt_shard_fail_naming_it(tmp_path):
    """A damaged shard (same size, other bytes) surfaces in the consuming thread as a TraceStoreError naming
    the file; the reader threads hash each shard once, whichever of them touches it first."""
    gen = torch.Generator().manual_seed(5)
    path = tmp_path / "s.zarr"
    with TraceWriter(path, attrs={"teacher": TEACHER}, budget_bytes=1 << 30, storage_dtype="float32", seed=0,
                     shard_bytes=3 * 2 * 20 * 16 * 4) as w:
        for p in range(12):
            w.offer("single_blocks.0", make_tuple(gen, heads=2, n_cond=4, hgrid=4, wgrid=4, nq=6, d=16, prompt=p,
                                                  step=0, seed=0, qk_scale=1.0))
    shard = path / "single_blocks.0" / "n20" / "v" / "c" / "2" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-40] ^= 0xFF  # inside the shard index: same size
    shard.write_bytes(bytes(data))
    store = TraceStore.open(path)
    planner = BatchPlanner({"single_blocks.0": [(20, np.arange(12))]}, batch_size=3, min_layers=1, max_layers=1,
                           seed=0)
    with PrefetchLoader(store, planner, stop_step=8, reader_threads=3) as loader:
        with pytest.raises(TraceStoreError, match=r"file single_blocks\.0/n20/v/c/2/0/0/0 of array "
                                                  r"single_blocks\.0/n20/v is corrupt.*dvc repro capture"):
            list(loader)
    ok = read_batch(TraceStore.open(path), "single_blocks.0", 20, [0, 1, 2, 3, 4, 5])  # shards 0 and 1: fine
    assert ok["v"].shape == (6, 2, 20, 16)
