"""Streaming training batches from a trace store: prompt-level validation split, a deterministic
batch plan, and background prefetch.

* :func:`split_by_prompt` holds out whole prompts (never single tuples): every tuple of a held-out
  prompt, in every layer, goes to validation.
* :class:`BatchPlanner` decides, step by step, which layers train and which tuples each one reads.
  Per layer and epoch the training tuples are shuffled (within each token-count group, since a batch
  must share ``N``) and cut into batches whose order is shuffled again across groups. Every random
  draw comes from a generator seeded by ``(seed, layer, epoch)`` or ``(seed, step)``, so the plan is
  a pure function of its small, JSON-serialisable state (:meth:`BatchPlanner.state_dict`) and a resumed
  run reads exactly the batches an uninterrupted one would.
* :class:`PrefetchLoader` walks the plan ahead of the trainer in a background *thread* and reads the
  batches with a small thread pool, optionally through a :class:`TupleCache` (a store that fits in
  memory is read from zarr only once). Threads, not forked processes: zarr runs its own event loop thread
  and a forked reader can hang; zstd decoding and numpy copies release the GIL, so threads overlap
  reading with the model step.
"""

from __future__ import annotations

import copy
import math
import queue
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from flux2ttr.traces.store import ARRAY_FIELDS, TraceStore, decode

# (n_tokens, row indices in that group)
Groups = list[tuple[int, np.ndarray]]

_SELECT_SALT = 0x5E1EC7  # separates the layer-selection stream from the per-layer shuffle streams


def layer_seed(layer: str) -> int:
    """A stable 32-bit number for a layer key (the same on every rank and every run)."""
    return zlib.crc32(layer.encode())


@dataclass
class Split:
    """Train/validation rows of every layer: ``{layer: [(n_tokens, rows), ...]}`` and the prompt sets."""

    train: dict[str, Groups]
    val: dict[str, Groups]
    train_prompts: list[int]
    val_prompts: list[int]


def split_by_prompt(store: TraceStore, val_fraction: float, seed: int) -> Split:
    """Hold out ``ceil(val_fraction * prompts)`` whole prompts (at least one, and at least one left to
    train on) chosen by a generator seeded with ``seed``; the same prompts are held out for every layer.

    Raises ``ValueError`` when the store has fewer than two distinct prompts (no prompt-level split).
    """
    per_layer = {layer: store.prompt_indices(layer) for layer in store.layers}
    prompts = sorted({int(p) for groups in per_layer.values() for arr in groups.values() for p in arr})
    if len(prompts) < 2:
        raise ValueError(
            f"{store.path}: the store holds {len(prompts)} distinct prompt(s); a validation split by prompt "
            "needs at least 2 (capture more prompts)"
        )
    n_val = min(len(prompts) - 1, max(1, math.ceil(val_fraction * len(prompts))))
    rng = np.random.default_rng([int(seed), len(prompts)])
    val_prompts = sorted(int(p) for p in rng.choice(np.asarray(prompts), size=n_val, replace=False))
    val_set = np.asarray(val_prompts, dtype=np.int64)
    train: dict[str, Groups] = {}
    val: dict[str, Groups] = {}
    for layer, groups in per_layer.items():
        train[layer], val[layer] = [], []
        for n_tokens in sorted(groups):
            p = np.asarray(groups[n_tokens], dtype=np.int64)
            is_val = np.isin(p, val_set)
            rows = np.arange(p.size, dtype=np.int64)
            if (~is_val).any():
                train[layer].append((n_tokens, rows[~is_val]))
            if is_val.any():
                val[layer].append((n_tokens, rows[is_val]))
    return Split(train=train, val=val, train_prompts=[p for p in prompts if p not in set(val_prompts)],
                 val_prompts=val_prompts)


def read_batch(store: TraceStore, layer: str, n_tokens: int, rows: list[int] | np.ndarray) -> dict[str, torch.Tensor]:
    """The tuples ``rows`` of a group as a batch, exactly what :meth:`TraceStore.read` returns
    (``q_sub``/``teacher_sub`` ``[B,H,Nq,D]``, ``k``/``v`` ``[B,H,N,D]`` float32, ``q_idx`` ``[B,Nq]``,
    scalars ``[B]``, ``heads`` ``[B,H]`` in a head-subset group), but read with one slice per contiguous run of rows.

    Why: zarr's orthogonal indexing (``oindex``) over a sharded array decodes far more than the chunks
    asked for (about 10x slower for a few scattered rows of a 16 MiB shard); plain slices touch only the
    chunks of the selected tuples (one tuple per chunk in a trace store).

    Reads go through :meth:`TraceStore.read_array`: each shard file is checked against the store's
    manifest the first time it is read, and a damaged one is a :class:`TraceStoreError` naming it.
    """
    idx = np.asarray(rows, dtype=np.int64).reshape(-1)
    g = store._group(layer, n_tokens)
    count = int(g["scalars"].shape[0])
    if idx.size == 0 or idx.min() < 0 or idx.max() >= count:
        return store.read(layer, n_tokens, idx)  # its error message / empty batch
    uniq, inverse = np.unique(idx, return_inverse=True)
    out: dict[str, torch.Tensor] = {}
    for name in ARRAY_FIELDS:
        data = store.read_array(layer, n_tokens, name, uniq, runs=True)[inverse]
        out[name] = decode(data, store.storage_dtype)
    out["q_idx"] = torch.from_numpy(store.read_array(layer, n_tokens, "q_idx")[idx].astype(np.int64))
    if store.has_heads(layer, n_tokens):
        out["heads"] = torch.from_numpy(store.read_array(layer, n_tokens, "heads")[idx].astype(np.int64))
    table = store.read_array(layer, n_tokens, "scalars")[idx]
    for name, col in store.scalar_columns(table).items():
        out[name] = torch.from_numpy(col.astype(np.float32) if name in ("sigma", "cfg") else col.astype(np.int64))
    return out


@dataclass(frozen=True)
class BatchRequest:
    """Rows ``rows`` of group ``(layer, n_tokens)`` to read as one batch."""

    layer: str
    n_tokens: int
    rows: tuple[int, ...]


class BatchPlanner:
    """Which layers train at each step, and which tuples each reads.

    Each step trains ``k`` layers, ``k`` drawn uniformly from ``[min_layers, max_layers]`` (clamped to
    the layer count). The ``k`` layers are those chosen least often so far, ties broken at random, so
    every layer is covered within ``ceil(L / min_layers)`` steps and all get about the same number of
    updates. Layers come back in the order of ``layers``.
    """

    def __init__(self, groups: dict[str, Groups], *, batch_size: int, min_layers: int, max_layers: int,
                 seed: int) -> None:
        if not groups:
            raise ValueError("no layers to plan batches for")
        empty = sorted(layer for layer, g in groups.items() if sum(len(r) for _, r in g) == 0)
        if empty:
            raise ValueError(f"layer(s) {empty} have no training tuples")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.layers = list(groups)
        self.groups = {layer: [(int(n), np.asarray(r, dtype=np.int64)) for n, r in g] for layer, g in groups.items()}
        self.batch_size = int(batch_size)
        self.max_layers = max(1, min(int(max_layers), len(self.layers)))
        self.min_layers = max(1, min(int(min_layers), self.max_layers))
        self.seed = int(seed)
        self.step = 0
        self.chosen = {layer: 0 for layer in self.layers}
        self.epoch = {layer: 0 for layer in self.layers}
        self.cursor = {layer: 0 for layer in self.layers}
        self._epoch_cache: dict[str, tuple[int, list[tuple[int, np.ndarray]]]] = {}

    # -- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the plan (after the last planned step)."""
        return {"step": self.step, "chosen": dict(self.chosen), "epoch": dict(self.epoch),
                "cursor": dict(self.cursor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("chosen", "epoch", "cursor"):
            have = set(state[name])
            if have != set(self.layers):
                raise ValueError(f"planner state is for layers {sorted(have)}, this plan has {sorted(self.layers)}")
        self.step = int(state["step"])
        self.chosen = {k: int(state["chosen"][k]) for k in self.layers}
        self.epoch = {k: int(state["epoch"][k]) for k in self.layers}
        self.cursor = {k: int(state["cursor"][k]) for k in self.layers}

    # -- planning ------------------------------------------------------------------------------------

    def epoch_batches(self, layer: str, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The shuffled batches ``[(n_tokens, rows)]`` of ``layer`` in ``epoch`` (pure function)."""
        cached = self._epoch_cache.get(layer)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        rng = np.random.default_rng([self.seed, layer_seed(layer), int(epoch)])
        batches = []
        for n_tokens, rows in self.groups[layer]:
            perm = rows[rng.permutation(rows.size)]
            for s in range(0, perm.size, self.batch_size):
                batches.append((n_tokens, perm[s:s + self.batch_size]))
        order = rng.permutation(len(batches))
        out = [batches[i] for i in order]
        self._epoch_cache[layer] = (int(epoch), out)
        return out

    def select_layers(self, step: int) -> list[str]:
        """The layers trained at ``step`` given the counts so far (does not change state)."""
        rng = np.random.default_rng([self.seed, _SELECT_SALT, int(step)])
        k = int(rng.integers(self.min_layers, self.max_layers + 1))
        ties = rng.random(len(self.layers))
        ranked = sorted(range(len(self.layers)), key=lambda i: (self.chosen[self.layers[i]], ties[i]))
        picked = {self.layers[i] for i in ranked[:k]}
        return [layer for layer in self.layers if layer in picked]

    def next_step(self) -> list[BatchRequest]:
        """Plan the next step: one :class:`BatchRequest` per selected layer; advances the state."""
        out = []
        for layer in self.select_layers(self.step):
            batches = self.epoch_batches(layer, self.epoch[layer])
            n_tokens, rows = batches[self.cursor[layer]]
            out.append(BatchRequest(layer, n_tokens, tuple(int(r) for r in rows)))
            self.chosen[layer] += 1
            self.cursor[layer] += 1
            if self.cursor[layer] >= len(batches):
                self.epoch[layer] += 1
                self.cursor[layer] = 0
        self.step += 1
        return out


@dataclass
class StepBatch:
    """What the trainer consumes for one step: ``batches[layer]`` as returned by
    :meth:`TraceStore.read`, and the planner state after this step (what a checkpoint stores)."""

    step: int
    batches: dict[str, dict[str, torch.Tensor]]
    plan_state: dict[str, Any]


_DONE = object()


class TupleCache:
    """Decoded tuples kept in memory, up to ``max_bytes`` (first read, first kept; nothing is evicted).

    A store that fits is read from zarr once and every later epoch is served from memory; a larger one
    keeps a fixed part in memory and streams the rest. Thread-safe (the reader threads share it).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._rows: dict[tuple[str, int, int], dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int, int]) -> dict[str, torch.Tensor] | None:
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                self.misses += 1
            else:
                self.hits += 1
            return row

    def put(self, key: tuple[str, int, int], row: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in row.values())
        with self._lock:
            if key not in self._rows and self.nbytes + size <= self.max_bytes:
                self._rows[key] = row
                self.nbytes += size


class PrefetchLoader:
    """Iterate :class:`StepBatch` for steps ``planner.step .. stop_step - 1`` with background reads.

    A producer thread plans up to ``prefetch_steps`` steps ahead and submits their reads to a pool of
    ``reader_threads``; the iterator hands steps out in order. Errors in a reader surface in the
    consuming thread. Use as a context manager (or call :meth:`close`) to stop the threads early.
    """

    def __init__(self, store: TraceStore | str | Path, planner: BatchPlanner, *, stop_step: int,
                 prefetch_steps: int = 4, reader_threads: int = 2, cache: TupleCache | None = None) -> None:
        self.store = store if isinstance(store, TraceStore) else TraceStore.open(store)
        self.cache = cache
        self.planner = planner
        self.stop_step = int(stop_step)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(prefetch_steps)))
        self._pool = ThreadPoolExecutor(max_workers=max(1, int(reader_threads)), thread_name_prefix="trace-read")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="trace-plan", daemon=True)
        self._started = False
        self.tuples_read = 0

    def _read(self, req: BatchRequest) -> dict[str, torch.Tensor]:
        rows = list(req.rows)
        if self.cache is None:
            return read_batch(self.store, req.layer, req.n_tokens, rows)
        have = {r: self.cache.get((req.layer, req.n_tokens, r)) for r in dict.fromkeys(rows)}
        missing = [r for r, row in have.items() if row is None]
        if missing:
            batch = read_batch(self.store, req.layer, req.n_tokens, missing)
            for i, r in enumerate(missing):
                have[r] = {k: v[i].clone() for k, v in batch.items()}
                self.cache.put((req.layer, req.n_tokens, r), have[r])
        names = have[rows[0]].keys()
        return {k: torch.stack([have[r][k] for r in rows]) for k in names}

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            while self.planner.step < self.stop_step and not self._stop.is_set():
                step = self.planner.step
                reqs = self.planner.next_step()
                futures = {r.layer: self._pool.submit(self._read, r) for r in reqs}
                if not self._put((step, futures, copy.deepcopy(self.planner.state_dict()))):
                    return
        except BaseException as e:  # planning errors reach the consumer
            self._put(e)
            return
        self._put(_DONE)

    def __iter__(self) -> Iterator[StepBatch]:
        if not self._started:
            self._started = True
            self._thread.start()
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            step, futures, state = item
            batches = {layer: f.result() for layer, f in futures.items()}
            self.tuples_read += sum(int(b["q_sub"].shape[0]) for b in batches.values())
            yield StepBatch(step, batches, state)

    def close(self) -> None:
        self._stop.set()
        # unblock a producer waiting on a full queue, drop pending reads
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, tuple):
                for f in item[1].values():
                    if isinstance(f, Future):
                        f.cancel()
        if self._started:
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "PrefetchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
