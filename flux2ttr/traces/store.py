"""The trace store: captured teacher attention tuples in a zarr v3 store (see DESIGN.md "Trace store").

One *tuple* per (rollout, step, layer, batch row)::

    q_sub        [H, Nq, D]  queries at the subsampled positions q_idx (post QK-norm and RoPE)
    q_idx        [Nq]        token positions of those queries in the full sequence (int)
    k, v         [H, N, D]   all keys and values of the sequence (never subsampled)
    teacher_sub  [H, Nq, D]  the teacher's softmax attention output at q_idx
    heads        [H]         only in a head-subset store (``capture.tuple_heads``): which of the teacher's
                             heads the tuple's H rows are (sorted); absent: all heads, in order
    sigma, cfg, n_cond, h, w, prompt, step, seed, uncond   scalars (n_cond conditioning tokens come first;
                             h, w is the latent image-token grid; prompt is the index into the capture prompt
                             list; uncond is 1 for the unconditional half of a true-CFG call, else 0)

Layout on disk (``N`` = token count, one group per layer and token count)::

    capture.zarr/zarr.json                 root attributes: format, schema, teacher, storage dtype, ...
    capture.zarr/single_blocks.0/n768/     q_sub [M,H,Nq,D], q_idx [M,Nq] int32, k, v [M,H,N,D],
                                           teacher_sub [M,H,Nq,D], scalars [M, 9] float64,
                                           heads [M,H] int32 (head-subset stores only)

The nine scalars share one float64 array (columns :data:`SCALAR_FIELDS`, named in the root attribute
``scalar_fields``; integers are exact below 2**53) so that a group is a handful of files. Stores written
before the ``uncond`` column existed (eight columns, same schema 1: the column is additive) read with
``uncond`` 0: they hold no unconditional tuples. Large arrays are chunked one tuple per chunk (a shuffled
reader fetches single tuples) and those chunks are packed into shards (zstd-compressed, or stored as they
are: ``compression``) of about ``shard_bytes``, each shard one file written whole by the single writer, so a
store is a few files per (layer, token count) group, not one per chunk.

Storage dtype: ``float32``, ``float16`` or ``bfloat16``. numpy has no bfloat16, so bf16 data is stored
as its raw uint16 bit pattern and the root attribute ``encoding`` says so; :meth:`TraceStore.read`
always returns float32 tensors.

**Budget and reservoir.** :class:`TraceWriter` keeps a global byte budget (uncompressed storage bytes of
every kept tuple, all arrays and scalars) across all layers by reservoir sampling over tuples: each
offered tuple draws an i.i.d. uniform priority, and the store keeps the tuples of lowest priority, in
priority order, up to the first one that does not fit ("prefix rule"). Streaming, this is a threshold
``tau`` that only falls: tuples above it are refused at once, and when the kept set overflows, the
highest-priority kept tuple is evicted and becomes the new ``tau``. The result equals the prefix rule
applied to all offered tuples at once, independent of the offering order.

Uniformity: when all offered tuples have the same size (one resolution; the usual capture) the kept set
is a uniformly random subset of ``floor(budget / size)`` tuples, so every tuple has exactly the same
inclusion probability. With several tuple sizes (several resolutions), the kept set still never
exceeds the budget, but a tuple of ``s`` bytes must fit into what is left, so its inclusion probability
is about ``(budget - s) / offered_bytes`` instead of ``budget / offered_bytes``: larger tuples are kept
slightly less often, by a relative amount of about ``s / budget`` (1 % when the budget holds 100 large
tuples). No rule can be exactly uniform for all size mixes, never exceed the budget and use it well at
once; this one keeps the bias bounded by ``s_max / budget`` and makes it exact in the common case.
Kept tuples are spilled to a temporary folder on disk by background threads while the caller goes on, so
memory stays at a few tuples plus one shard. Where one tuple fills a shard (``shard_bytes`` under twice its ``k``:
every full-size capture) a tuple is spilled as its final shard files, compressed and hashed as they are
written, and closing renames them into place; smaller tuples are spilled raw and repacked into shards at
close. Both give the same store, byte for byte.

**Planned cut.** When the caller knows ahead of time the priorities of tuples it will certainly offer and a
lower bound on their sizes (capture does: priorities are keyed by the tuple's identity), :meth:`TraceWriter.plan`
applies the prefix rule to them at once and starts ``tau`` at that cut. The true final cut can only be lower
(more tuples, or larger ones, only fill the budget sooner), so a tuple refused by the planned cut could never
have been kept: the store is byte for byte the one written without a plan, but a tuple whose priority is above
the cut is never copied off the device or spilled, and where the budget is smaller than what is offered the
spill writes about the budget instead of everything offered. :meth:`close` checks the plan's premises (every
planned tuple offered, none smaller than its bound) and refuses to publish a store when they fail.

**Head subsets.** A tuple may hold only some of the teacher's heads (``heads``, drawn per tuple by capture,
see ``capture.tuple_heads``): its arrays are ``[Hs, ...]`` and its bytes, which the budget counts, shrink
with ``Hs``. A group is all head-subset tuples or none; the reader returns ``heads`` ``[B, Hs]`` only for
the former, and :meth:`TraceStore.teacher_heads` gives the teacher's head count either way.

Priorities: :meth:`TraceWriter.offer` takes the tuple's priority from the caller (capture draws it from
a generator keyed by the tuple's identity, so the kept set is also independent of how tuples are split over
processes) or, without one, draws the next value of the writer's seeded stream.

**Several ranks** (torchrun; ``dist`` of :class:`TraceWriter`): rank 0 creates the temporary store and every
rank spills into its own hidden ``.spill-<rank>`` folder in it. Each rank runs the reservoir above on its
tuples under the whole budget; :meth:`TraceWriter.sync` (a collective, once per round of batches) applies the
prefix rule to the union of the ranks' kept priorities and drops on every rank what lies above that cut,
so all spills together stay within the budget after each sync. :meth:`TraceWriter.close` merges the
reservoirs (:func:`merge_cut`: the prefix rule over the union, below the lowest rank threshold), which gives
exactly the tuples one writer offered every tuple keeps; then each rank writes whole layers (round-robin in
execution order) and hashes its files, and rank 0 removes the spills, writes the root attributes with the
manifest of every rank's files, and renames the store into place. Rows are ordered by (prompt, seed, step,
priority), so the store's bytes do not depend on the number of ranks. A rank failing while writing is
reported to the others, all ranks raise, and nothing is published.

**Atomicity.** The writer builds the store in ``.<name>.tmp-<pid>-<random>`` next to the target and
renames it into place on :meth:`TraceWriter.close`; on an exception (``with`` block) the temporary
folder is removed. A store killed mid-write is left only as a hidden temporary folder whose root
says ``flux2ttr.traces.partial``; the next writer for the same target removes such leftovers.

**Manifest and integrity.** The store knows what it holds: :meth:`TraceWriter.close` lists, in the root
attribute ``manifest`` (written with the other root attributes, before the rename), every array (shape,
dtype, rows per file) and every file of the store but the root ``zarr.json`` itself, with its size in bytes
and its sha256 (``{"hash": "sha256", "arrays": {...}, "files": {"<relative path>": [bytes, hex]}}``).
sha256 because it is the standard checksum (``sha256sum`` checks a file by hand; the teacher identity uses
it too), it catches any change, and with the SHA extensions of current CPUs it hashes ~1.7 GB/s on one core
here, faster than the disk a store is read from, so a fast non-cryptographic hash (crc32: ~3 GB/s) would
save little. :meth:`TraceStore.open` checks, cheaply, that every listed file exists with its listed size,
that no unlisted file sits in the store (hidden dot-files aside) and that the small metadata files
(``zarr.json``) hash right, and refuses a store that fails with :class:`TraceStoreError` naming the file and
the fix (recapture). Shards and chunks are hashed when a read first touches them (each file once per open
store, in whatever thread reads it), so a reader verifies exactly what it reads; :meth:`TraceStore.verify`
hashes every file (or those of some layers) at once. A zarr error while decoding (checksum, codec) becomes a
:class:`TraceStoreError` naming the array, its file and the fix. Stores written before the manifest existed
(same schema 1: the manifest is an additive attribute, older readers ignore it) open with a
:class:`TraceStoreWarning` and are read unverified: a deleted shard there still reads as zeros, so recapture.

**Readers in DataLoader workers.** zarr runs its own asyncio event loop in a background thread; a
worker forked from a process that already used zarr can hang. Use ``multiprocessing_context="spawn"``
(or ``"forkserver"``) and open the store *inside* each worker (for example in ``worker_init_fn`` or
lazily on the first ``__getitem__``); never pass an open :class:`TraceStore` through ``fork``.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import math
import os
import re
import secrets
import shutil
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from flux2ttr.atomic import pid_alive
from flux2ttr.config import Flux2TTRError
from flux2ttr.distributed import Dist

FORMAT = "flux2ttr.traces"
PARTIAL_FORMAT = "flux2ttr.traces.partial"
SCHEMA_VERSION = 1

STORAGE_DTYPES = ("float32", "float16", "bfloat16")
COMPRESSIONS = ("zstd", "none")  # of the shards; none: stored as they are (FLUX.2's fp16 activations shrink ~8%)
BF16_ENCODING = "bfloat16-bits-as-uint16"

ARRAY_FIELDS = ("q_sub", "k", "v", "teacher_sub")
SCALAR_FIELDS = ("sigma", "cfg", "n_cond", "h", "w", "prompt", "step", "seed", "uncond")
_FLOAT_SCALARS = ("sigma", "cfg")
_MAX_EXACT_INT = 2**53  # float64 holds integers exactly below this
_FP16_MAX = 65504.0  # largest finite float16

DEFAULT_SHARD_BYTES = 64 * 2**20
DEFAULT_ZSTD_LEVEL = 3
DEFAULT_WRITE_THREADS = 4  # spills and shards compressed and written at once (zstd releases the GIL)

_RESERVED_ATTRS = ("format", "schema", "storage_dtype", "encoding", "scalar_fields", "reservoir", "manifest")

MANIFEST_HASH = "sha256"
_META_FILE = "zarr.json"
_HASH_BLOCK = 4 * 2**20
RECAPTURE = "recapture it (`dvc repro capture`, or `flux2ttr capture`)"


class TraceStoreError(RuntimeError, Flux2TTRError):
    """A path is not a readable flux2ttr trace store (message names the path and the fix)."""


class TraceStoreWarning(UserWarning):
    """A trace store that opens but cannot be verified (written before stores carried a manifest)."""


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in blocks; hashlib releases the GIL, so threads overlap)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _store_files(root: Path) -> list[str]:
    """Relative POSIX paths of every file under ``root`` except the root ``zarr.json``, sorted."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        rel_dir = Path(dirpath).relative_to(root)
        for f in files:
            rel = (rel_dir / f).as_posix()
            if rel != _META_FILE:
                out.append(rel)
    return sorted(out)


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def hash_files(root: Path, rels: Sequence[str], threads: int = 4) -> dict[str, list]:
    """``{rel: [bytes, sha256 hex]}`` of the files ``rels`` under ``root`` (in ``rels`` order), hashed by
    ``threads`` threads."""
    with ThreadPoolExecutor(max_workers=max(1, int(threads))) as pool:
        digests = list(pool.map(lambda r: file_sha256(root / r), rels))
    return {r: [(root / r).stat().st_size, h] for r, h in zip(rels, digests)}


def manifest_of(files: Mapping[str, list], arrays: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The manifest from its parts (files and arrays sorted by path: the same JSON however they were
    collected)."""
    return {"hash": MANIFEST_HASH, "arrays": {k: dict(v) for k, v in sorted(arrays.items())},
            "files": {k: list(files[k]) for k in sorted(files)}}


def build_manifest(root: Path, arrays: Mapping[str, Mapping[str, Any]], threads: int = 4) -> dict[str, Any]:
    """The manifest of the store folder ``root`` (see the module doc): ``arrays`` as given, and every file
    but the root ``zarr.json`` with ``[bytes, sha256]``, hashed by ``threads`` threads."""
    return manifest_of(hash_files(root, _store_files(root), threads), arrays)


@dataclass
class TraceTuple:
    """One captured attention tuple. Tensors may be torch tensors or numpy arrays, any float dtype.

    ``q_sub``/``teacher_sub`` ``[H, Nq, D]``, ``q_idx`` ``[Nq]``, ``k``/``v`` ``[H, N, D]``; ``uncond`` 1 marks
    the unconditional half of a true-CFG call (0: the conditional one, or no CFG); ``heads`` ``[H]``: the
    teacher's head indices of the H rows when the tuple holds a head subset (``None``: all heads).
    """

    q_sub: Any
    q_idx: Any
    k: Any
    v: Any
    teacher_sub: Any
    sigma: float
    cfg: float
    n_cond: int
    h: int
    w: int
    prompt: int
    step: int
    seed: int
    uncond: int = 0
    heads: Any = None


def group_name(n_tokens: int) -> str:
    """Sub-group of a layer holding the tuples with ``n_tokens`` tokens, e.g. ``n768``."""
    return f"n{int(n_tokens)}"


def _np_storage_dtype(storage_dtype: str) -> np.dtype:
    return np.dtype(np.uint16) if storage_dtype == "bfloat16" else np.dtype(storage_dtype)


def encode(x: Any, storage_dtype: str) -> np.ndarray:
    """A float tensor/array as the numpy array stored on disk (bf16 as its uint16 bit pattern)."""
    t = torch.as_tensor(x).detach()  # converted on its own device first: fewer bytes cross to the host
    if storage_dtype == "bfloat16":
        return t.to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy().view(np.uint16)
    if storage_dtype == "float16":
        # one max-reduction on the source is far cheaper than isfinite on the fp16 copy (CPU half is slow)
        if t.numel() and t.is_floating_point() and float(t.abs().amax()) > _FP16_MAX:
            raise ValueError(
                "a value overflows float16 (|x| > 65504); set capture.storage_dtype to bfloat16 or float32"
            )
        return t.to(torch.float16).cpu().contiguous().numpy()
    if storage_dtype == "float32":
        return t.to(torch.float32).cpu().contiguous().numpy()
    raise ValueError(f"unknown storage dtype {storage_dtype!r}; use one of {STORAGE_DTYPES}")


def decode(a: np.ndarray, storage_dtype: str) -> torch.Tensor:
    """Stored numpy data back to a float32 tensor (inverse of :func:`encode` up to its rounding)."""
    a = np.ascontiguousarray(a)
    if storage_dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to(torch.float32)
    return torch.from_numpy(a).to(torch.float32)


# ---------------------------------------------------------------------------------------------- writer


def prefix_cut(entries: Iterable[tuple[float, int]], budget: int, below: float = math.inf) -> float:
    """The prefix rule on ``(priority, bytes)`` entries: walking those below ``below`` by rising priority,
    the priority of the first that no longer fits into ``budget`` bytes (``below`` when all fit). The
    entries kept are exactly those with a priority under the returned cut."""
    total = 0
    for priority, nbytes in sorted(e for e in entries if e[0] < below):
        total += int(nbytes)
        if total > budget:
            return float(priority)
    return below


def merge_cut(states: Iterable[Mapping[str, Any]], budget: int) -> float:
    """The cut of the union of several reservoirs (:meth:`TraceWriter.reservoir_state` of each rank): the
    prefix rule over all their kept ``(priority, bytes)``, below the lowest of their thresholds.

    Why it is exact: each reservoir holds every tuple of the global prefix that it was offered (its share
    of the prefix fits into the budget on its own), and the global prefix's first misfit is either kept by
    its reservoir (so the walk here stops at it) or is that reservoir's threshold (so nothing above it is
    walked). The tuples under the cut are exactly those one reservoir offered every tuple would keep,
    whatever the split; a cut from a sync (part of the tuples offered) is never below the final one."""
    states = list(states)
    below = min((_tau_from_json(st["tau"]) for st in states), default=math.inf)
    return prefix_cut(((float(p), int(b)) for st in states for p, b in st["kept"]), budget, below)


SPILL_QUEUE_PER_THREAD = 2  # kept tuples on the host waiting for their spill writes, per writer thread (memory bound)


def _write_raw(path: Path, arrays: Sequence[np.ndarray]) -> None:
    """One spill file: the arrays' raw bytes in order (shapes are known per group): no zip CRC, no pickle."""
    with open(path, "wb") as f:
        for a in arrays:
            f.write(memoryview(np.ascontiguousarray(a)).cast("B"))


_EMPTY_SLOT = 2**64 - 1  # a shard index entry of a chunk the shard does not hold


def write_shard_file(path: Path, chunks: Sequence[np.ndarray], slots: int,
                     zstd_level: int | None) -> tuple[int, str]:
    """Write one shard of an array created with ``chunks=(1, ...)``, ``shards=(slots, ...)`` (zarr v3 sharding,
    index at the end, bytes + crc32c index codecs; the zarr array's codecs: bytes, then zstd at ``zstd_level`` or
    none) holding ``chunks`` (each ``[1 or none, ...]`` of the array's dtype, little-endian) as its first slots.

    The file is what zarr writes for the same data with ``write_empty_chunks`` on, byte for byte (tested), but it
    is built and written here, in the calling thread: zarr encodes every shard in its one event-loop thread,
    which held the close of a full-size store to about 0.5 GB/s whatever the writer threads. Returns the file's
    ``(bytes, sha256 hex)``, hashed from the buffers as they are written (the manifest needs no second read)."""
    import google_crc32c  # zarr's crc32c codec  # noqa: PLC0415

    index = np.full((int(slots), 2), _EMPTY_SLOT, dtype="<u8")
    bufs, offset = [], 0
    if zstd_level is not None:
        from numcodecs.zstd import Zstd  # zarr's zstd codec  # noqa: PLC0415

        codec = Zstd(level=int(zstd_level), checksum=False)
    for i, chunk in enumerate(chunks):
        raw = np.ascontiguousarray(chunk)
        buf = memoryview(raw).cast("B") if zstd_level is None else memoryview(codec.encode(raw))
        index[i] = (offset, buf.nbytes)
        bufs.append(buf)
        offset += buf.nbytes
    idx = index.tobytes()
    bufs += [idx, np.uint32(google_crc32c.value(idx)).tobytes()]
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for buf in bufs:
            f.write(buf)
            digest.update(buf)  # releases the GIL on large buffers, as the write does
    return offset + len(idx) + 4, digest.hexdigest()


@dataclass
class _Kept:
    priority: float
    serial: int
    layer: str
    n_tokens: int
    nbytes: int
    spill: Path
    scalars: np.ndarray  # [9] float64, SCALAR_FIELDS order
    rank: int = 0  # whose spill folder holds it
    shards: dict[str, list] | None = None  # a shard-ready spill: {array: [bytes, sha256]} of its final shard files

    def shard_path(self, name: str) -> Path:
        """The spilled shard file of array ``name`` (shard-ready spills: one tuple per shard)."""
        return self.spill.with_suffix(f".{name}")


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove leftovers of interrupted writers of ``target`` (temporary and replaced-old folders whose
    writer process is gone). Returns what was removed."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    pattern = re.compile(re.escape(f".{target.name}.") + r"(tmp|old)-(\d+)-[0-9a-f]+$")
    for p in target.parent.iterdir():
        m = pattern.match(p.name)
        if m and (int(m.group(2)) == os.getpid() or not pid_alive(int(m.group(2)))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


class TraceWriter:
    """Collects offered tuples under a global byte budget and writes the store atomically.

    ``attrs`` (JSON-serialisable; for example ``{"teacher": {...identity and config...},
    "capture": {...capture params...}}``) become root attributes next to the ones the writer sets
    (``format``, ``schema``, ``storage_dtype``, ``encoding``, ``scalar_fields``, ``reservoir``).
    ``budget_bytes`` bounds the uncompressed storage bytes of all kept tuples; ``seed`` seeds the
    reservoir priorities that :meth:`offer` draws when the caller gives none. Use as a context manager,
    or call :meth:`close` / :meth:`abort`.

    ``dist``: the torchrun ranks writing one store together (module doc, "Several ranks"); every rank
    builds its writer with the same arguments, and :meth:`sync` and :meth:`close` are collectives.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        attrs: Mapping[str, Any],
        budget_bytes: int,
        storage_dtype: str,
        seed: int,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        zstd_level: int = DEFAULT_ZSTD_LEVEL,
        compression: str = "zstd",
        write_threads: int = DEFAULT_WRITE_THREADS,
        dist: Dist | None = None,
    ) -> None:
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype {storage_dtype!r} is not one of {STORAGE_DTYPES}")
        if int(budget_bytes) <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        clash = sorted(set(attrs) & set(_RESERVED_ATTRS))
        if clash:
            raise ValueError(f"attrs keys {clash} are reserved for the trace store itself")
        self.attrs = json.loads(json.dumps(dict(attrs)))  # a JSON-clean copy; fails early if not JSON
        self.path = Path(path)
        self.budget_bytes = int(budget_bytes)
        self.storage_dtype = storage_dtype
        self.seed = int(seed)
        self.shard_bytes = int(shard_bytes)
        self.zstd_level = int(zstd_level)
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression {compression!r} is not one of {COMPRESSIONS}")
        self.compression = compression
        if int(write_threads) < 1:
            raise ValueError(f"write_threads must be >= 1, got {write_threads}")
        self.write_threads = int(write_threads)
        self.dist = dist if dist is not None else Dist()
        self._rng = np.random.default_rng(self.seed)
        self._serial = itertools.count()
        self._heap: list[tuple[float, int, _Kept]] = []  # max-heap on priority (negated)
        self._kept_bytes = 0
        self._tau = math.inf
        self._offered: dict[str, int] = {}
        self._offered_bytes = 0
        self._shapes: dict[tuple[str, int], tuple] = {}
        self._planned = (0, 0)  # (tuples the plan says will be offered, the least bytes of one)
        self.spilled = 0  # tuples written to the spill (kept at the time; some may be evicted later)
        self._pending: dict[int, Any] = {}  # serial -> Future of its spill file write (oldest first)
        self._spill_pool: ThreadPoolExecutor | None = None
        self._closed = False
        self.manifest_seconds = 0.0  # time close() spent hashing the written files (this rank's share)
        self.write_seconds = 0.0  # time close() spent writing shards (this rank's layers)

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = None
        if self.dist.rank == 0:  # one temporary store for all ranks, named by rank 0's pid
            remove_stale_temps(self.path)
            tmp = self.path.parent / f"{_temp_prefix(self.path)}{os.getpid()}-{secrets.token_hex(4)}"
            import zarr  # zarr starts its event loop on first use; keep the import local  # noqa: PLC0415

            root = zarr.open_group(str(tmp), mode="w")
            root.attrs.update({"format": PARTIAL_FORMAT})
        self._tmp = Path(self.dist.broadcast_json(None if tmp is None else str(tmp)))
        if not self._tmp.is_dir():
            raise TraceStoreError(f"{self._tmp}: rank {self.dist.rank} does not see rank 0's temporary store; "
                                  "the ranks of one capture must share the store's folder (one host, or a "
                                  "shared file system)")
        # kept tuples wait here until close(); hidden (never in the manifest), removed before the rename
        self._spill = self._tmp / f".spill-{self.dist.rank}"
        self._spill.mkdir()

    # -- reservoir -----------------------------------------------------------------------------------

    @property
    def kept_bytes(self) -> int:
        """Uncompressed storage bytes of the tuples kept so far on this rank (never above the budget)."""
        return self._kept_bytes

    @property
    def offered(self) -> int:
        """Tuples offered so far on this rank."""
        return sum(self._offered.values())

    @property
    def kept(self) -> int:
        """Tuples in this rank's reservoir so far."""
        return len(self._heap)

    def tuple_nbytes(self, t: TraceTuple) -> int:
        """Storage bytes one tuple takes in this store (all arrays and the scalar row, uncompressed)."""
        (h_, nq, d), n = np.shape(t.q_sub), np.shape(t.k)[1]
        return self.nbytes_of(h_, n, nq, d, headed=t.heads is not None)

    def nbytes_of(self, heads: int, n_tokens: int, queries: int, head_dim: int, *, headed: bool) -> int:
        """Storage bytes of a tuple of ``heads`` head rows, ``n_tokens`` keys and ``queries`` query rows of
        ``head_dim`` (``headed``: it records its head subset), uncompressed."""
        item = _np_storage_dtype(self.storage_dtype).itemsize
        h_, n, nq, d = int(heads), int(n_tokens), int(queries), int(head_dim)
        return 2 * item * h_ * nq * d + 2 * item * h_ * n * d + 4 * nq + 8 * len(SCALAR_FIELDS) + (4 * h_ if headed else 0)

    def plan(self, priorities: Sequence[float], min_nbytes: int) -> float:
        """Start the reservoir at the prefix rule's cut over tuples that will certainly be offered (module doc,
        "Planned cut"): ``priorities`` theirs, ``min_nbytes`` at most the bytes of any one of them. Call before
        the first :meth:`offer`; every rank of a torchrun capture passes the whole capture's plan. Returns the cut."""
        if self.offered:
            raise RuntimeError("TraceWriter.plan must come before the first offer")
        if int(min_nbytes) <= 0:
            raise ValueError(f"min_nbytes must be positive, got {min_nbytes}")
        cut = prefix_cut(((float(p), int(min_nbytes)) for p in priorities), self.budget_bytes)
        self._planned = (len(priorities), int(min_nbytes))
        self._tau = min(self._tau, cut)
        return cut

    def offer(self, layer: str, t: TraceTuple, priority: float | None = None) -> bool:
        """Offer one tuple of ``layer``; returns whether it is (for now) in the reservoir.

        Shapes: ``q_sub``/``teacher_sub`` ``[H, Nq, D]``, ``q_idx`` ``[Nq]``, ``k``/``v`` ``[H, N, D]``;
        within one (layer, N) group H, Nq and D must not change. ``priority`` in ``[0, 1)``: the tuple's
        reservoir priority (a uniform draw keyed by the tuple, so that the kept set does not depend on the
        offering order or on how tuples are split over ranks); ``None`` draws the next one from the
        writer's seeded stream (offering order matters then).
        """
        if self._closed:
            raise RuntimeError("TraceWriter is closed")
        n_tokens = self._check(layer, t)
        nbytes = self.tuple_nbytes(t)
        priority = self._count_offer(layer, nbytes, priority)
        if priority >= self._tau:
            return False
        serial = next(self._serial)
        spill = self._spill / f"{serial}.bin"
        scalars = np.array([float(getattr(t, f)) for f in SCALAR_FIELDS], dtype=np.float64)
        kept = _Kept(priority, serial, layer, n_tokens, nbytes, spill, scalars, self.dist.rank)
        self._write_spill(kept, t)
        self.spilled += 1
        heapq.heappush(self._heap, (-priority, serial, kept))
        self._kept_bytes += nbytes
        while self._kept_bytes > self.budget_bytes:
            _, _, out = heapq.heappop(self._heap)
            self._kept_bytes -= out.nbytes
            self._tau = out.priority  # everything at or above it can never be in the prefix again
            self._drop_spill(out)
        return priority < self._tau

    def refuses(self, layer: str, nbytes: int, priority: float) -> bool:
        """Whether a tuple of ``layer`` taking ``nbytes`` (:meth:`nbytes_of`) at ``priority`` is refused before
        it is built: its priority is at or above the cut, so it can never be kept. A refused tuple is counted
        as offered, after :meth:`offer`'s checks, and the caller skips it (no device work, no host copy);
        otherwise nothing is counted and the caller offers the tuple."""
        from flux2ttr.contract import layer_sort_key  # noqa: PLC0415

        if float(priority) < self._tau:
            return False
        layer_sort_key(layer)
        self._count_offer(layer, int(nbytes), priority)
        return True

    def _count_offer(self, layer: str, nbytes: int, priority: float | None) -> float:
        """The checks every offer passes, then the offer counted; returns its priority (drawn if ``None``)."""
        if self._closed:
            raise RuntimeError("TraceWriter is closed")
        for done in [f for f in self._pending.values() if f.done()]:
            done.result()  # a spill write that failed stops the capture at the next tuple
        if nbytes > self.budget_bytes:
            raise ValueError(
                f"one tuple of layer {layer} ({nbytes / 2**20:.2f} MiB) is larger than the whole budget "
                f"({self.budget_bytes / 2**20:.2f} MiB); raise capture.budget_mib"
            )
        if priority is None:
            priority = float(self._rng.random())
        elif not 0.0 <= float(priority) < 1.0:
            raise ValueError(f"priority must be in [0, 1), got {priority}")
        priority = float(priority)
        if nbytes < self._planned[1]:
            raise ValueError(f"layer {layer}: a tuple of {nbytes} bytes is smaller than the plan's lower bound "
                             f"({self._planned[1]}); the planned cut would drop tuples the budget keeps")
        self._offered[layer] = self._offered.get(layer, 0) + 1
        self._offered_bytes += nbytes
        return priority

    def reservoir_state(self) -> dict[str, Any]:
        """This rank's reservoir as JSON: ``{"kept": [[priority, bytes], ...], "tau": threshold or None}``
        (``None``: nothing refused yet)."""
        return {"kept": [[it.priority, it.nbytes] for _, _, it in self._heap], "tau": _json_tau(self._tau)}

    def cap(self, cut: float) -> None:
        """Drop every kept tuple at or above priority ``cut`` (they can no longer be in the store)."""
        while self._heap and self._heap[0][2].priority >= cut:
            _, _, out = heapq.heappop(self._heap)
            self._kept_bytes -= out.nbytes
            self._drop_spill(out)
        self._tau = min(self._tau, cut)

    def sync(self) -> float:
        """A collective (every rank calls it equally often): apply the prefix rule to the union of all
        ranks' reservoirs so far and drop, on each rank, the kept tuples at or above its cut. The final
        cut can only be lower (it falls as tuples are offered), so nothing that could end in the store is
        lost, and after a sync the spill of all ranks together holds at most ``budget_bytes``. Returns the
        cut (one process: this reservoir's threshold, nothing exchanged)."""
        if self.dist.world == 1:
            return self._tau
        cut = merge_cut(self.dist.all_gather_json(self.reservoir_state()), self.budget_bytes)
        self.cap(cut)
        return cut

    def _check(self, layer: str, t: TraceTuple) -> int:
        from flux2ttr.contract import layer_sort_key  # noqa: PLC0415

        layer_sort_key(layer)  # raises on a key that is not single_blocks.i / double_blocks.i
        q, k, v, ts, qi = (np.shape(x) for x in (t.q_sub, t.k, t.v, t.teacher_sub, t.q_idx))
        if len(k) != 3 or v != k or len(q) != 3 or ts != q or q[0] != k[0] or q[2] != k[2] or qi != (q[1],):
            raise ValueError(
                f"layer {layer}: tuple shapes q_sub {q}, q_idx {qi}, k {k}, v {v}, teacher_sub {ts} do not "
                "match [H,Nq,D], [Nq], [H,N,D], [H,N,D], [H,Nq,D]"
            )
        if int(t.uncond) not in (0, 1):
            raise ValueError(f"tuple field uncond={t.uncond} must be 0 or 1")
        headed = t.heads is not None
        if headed:
            hs = np.asarray(torch.as_tensor(t.heads).cpu().numpy())
            if hs.shape != (q[0],) or (hs.size and (hs.min() < 0 or np.any(np.diff(hs) <= 0))):
                raise ValueError(f"layer {layer}: tuple heads {np.shape(t.heads)} must be [{q[0]}] sorted distinct "
                                 "head indices >= 0 (one per head row of q_sub, k, v)")
        for name in ("n_cond", "h", "w", "prompt", "step", "seed"):
            value = int(getattr(t, name))
            if not 0 <= value < _MAX_EXACT_INT:
                raise ValueError(f"tuple field {name}={value} must be in [0, 2**53)")
        n_tokens = int(k[1])
        key = (layer, n_tokens)
        shape = (q, k, headed)
        if self._shapes.setdefault(key, shape) != shape:
            raise ValueError(
                f"layer {layer}, {n_tokens} tokens: shapes and head subset {shape} differ from the first tuple's "
                f"{self._shapes[key]} (queries per tuple and heads must be constant within a group)"
            )
        return n_tokens

    @property
    def _shard_zstd_level(self) -> int | None:
        """The shards' zstd level (``None``: stored uncompressed)."""
        return self.zstd_level if self.compression == "zstd" else None

    def _tuples_per_shard(self, layer: str, n_tokens: int) -> int:
        """How many tuples of a group one shard holds at most: ``shard_bytes`` over one tuple's ``k`` bytes, at
        least 1 (a group of ``m`` tuples has ``min(m, this)`` rows per shard)."""
        (h_, _, d), (_, n, _), _ = self._shapes[(layer, n_tokens)]
        return max(1, self.shard_bytes // max(1, h_ * n * d * _np_storage_dtype(self.storage_dtype).itemsize))

    def _shard_ready(self, item: _Kept) -> bool:
        """Whether ``item``'s group stores one tuple per shard (its k is over half of ``shard_bytes``: every full-size
        capture), so that its spill can be its final shard files, renamed into place at close."""
        return self._tuples_per_shard(item.layer, item.n_tokens) == 1

    def _write_spill(self, item: _Kept, t: TraceTuple) -> None:
        """Spill one kept tuple: its arrays copied to the host here (off the device, in the storage dtype), the
        files written by the spill threads while the caller samples on (at most :data:`SPILL_QUEUE_PER_THREAD`
        x ``write_threads`` tuples wait; a failed write raises at the next offer, sync or close). A shard-ready
        tuple (:meth:`_shard_ready`) is spilled as its four final shard files (compressed there, hashed as
        written) plus its indices; any other as one raw file, repacked into shards at close."""
        arrays = [encode(getattr(t, name), self.storage_dtype) for name in ARRAY_FIELDS]
        small = [np.ascontiguousarray(torch.as_tensor(t.q_idx).cpu().numpy(), dtype=np.int32)]
        if t.heads is not None:
            small.append(np.ascontiguousarray(torch.as_tensor(t.heads).cpu().numpy(), dtype=np.int32))
        self._wait_spills(SPILL_QUEUE_PER_THREAD * self.write_threads - 1)
        if self._spill_pool is None:  # write_threads: the shard-ready spills compress there, several at once
            self._spill_pool = ThreadPoolExecutor(max_workers=self.write_threads, thread_name_prefix="flux2ttr-spill")
        if not self._shard_ready(item):
            self._pending[item.serial] = self._spill_pool.submit(_write_raw, item.spill, arrays + small)
            return
        level = self._shard_zstd_level

        def spill_shards() -> None:
            shards = {name: list(write_shard_file(item.shard_path(name), [a[None]], 1, level))
                      for name, a in zip(ARRAY_FIELDS, arrays)}
            _write_raw(item.spill, small)
            item.shards = shards  # read only after this write's result() (close waits for every spill)

        self._pending[item.serial] = self._spill_pool.submit(spill_shards)

    def _wait_spills(self, keep: int = 0) -> None:
        """Wait for the oldest pending spill writes until at most ``keep`` are left (raising a write's error)."""
        while len(self._pending) > keep:
            self._pending.pop(next(iter(self._pending))).result()

    def _drop_spill(self, item: _Kept) -> None:
        pending = self._pending.pop(item.serial, None)
        if pending is not None:
            pending.result()  # its files must exist before they can go
        item.spill.unlink()
        if item.shards is not None:
            for name in ARRAY_FIELDS:
                item.shard_path(name).unlink()

    def _read_small_spill(self, item: _Kept) -> dict[str, np.ndarray]:
        """``q_idx`` (and ``heads``) of a shard-ready spill."""
        (h_, nq, _), _, headed = self._shapes[(item.layer, item.n_tokens)]
        raw = np.fromfile(item.spill, dtype=np.int32)
        return {"q_idx": raw[:nq], **({"heads": raw[nq:nq + h_]} if headed else {})}

    def _read_spill(self, item: _Kept) -> dict[str, np.ndarray]:
        (h_, nq, d), (_, n, _), headed = self._shapes[(item.layer, item.n_tokens)]
        dtype = _np_storage_dtype(self.storage_dtype)
        shapes = {"q_sub": (h_, nq, d), "k": (h_, n, d), "v": (h_, n, d), "teacher_sub": (h_, nq, d)}
        raw = np.fromfile(item.spill, dtype=np.uint8)
        out, offset = {}, 0
        for name in ARRAY_FIELDS:
            size = int(np.prod(shapes[name])) * dtype.itemsize
            out[name] = raw[offset:offset + size].view(dtype).reshape(shapes[name])
            offset += size
        out["q_idx"] = raw[offset:offset + 4 * nq].view(np.int32)
        if headed:
            out["heads"] = raw[offset + 4 * nq:offset + 4 * nq + 4 * h_].view(np.int32)
        return out

    # -- writing -------------------------------------------------------------------------------------

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return  # close() or abort() already ran inside the block
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Drop everything: rank 0 removes the temporary folder, other ranks their spill in it; the target
        is left as it was. Not a collective (it runs after an error, when the other ranks may be anywhere)."""
        self._closed = True
        self._stop_spills()
        shutil.rmtree(self._tmp if self.dist.rank == 0 else self._spill, ignore_errors=True)

    def _stop_spills(self) -> None:
        """Let the spill threads finish what they hold (errors were or will be raised elsewhere) and end them."""
        if self._spill_pool is not None:
            self._spill_pool.shutdown(wait=True)
            self._spill_pool = None
        self._pending.clear()

    def close(self, progress: bool = False) -> Path:
        """Write all kept tuples into the temporary store, then rename it onto the target path
        (replacing an older store there). Returns the target path. A collective under torchrun: every rank
        returns once the store is in place (or raises when any rank failed to write its part)."""
        if self._closed:
            raise RuntimeError("TraceWriter is already closed")
        try:
            self._write_store(progress)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    def _merge(self, parts: list[dict[str, Any]]) -> tuple[list[_Kept], dict[tuple[str, int], tuple]]:
        """The store's tuples (:func:`merge_cut`) and group shapes from every rank's reservoir (the same on
        every rank)."""
        cut = merge_cut(({"kept": [[e[0], e[4]] for e in p["kept"]], "tau": p["tau"]} for p in parts),
                        self.budget_bytes)
        kept = [_Kept(float(pr), int(serial), str(layer), int(n), int(nbytes),
                      self._tmp / f".spill-{rank}" / f"{int(serial)}.bin", np.array(scalars, dtype=np.float64), rank,
                      shards)
                for rank, p in enumerate(parts) for pr, serial, layer, n, nbytes, scalars, shards in p["kept"]
                if float(pr) < cut]
        shapes: dict[tuple[str, int], tuple] = {}
        for p in parts:
            for layer, n, q, k, headed in p["shapes"]:
                key, shape = (str(layer), int(n)), (tuple(q), tuple(k), bool(headed))
                if shapes.setdefault(key, shape) != shape:
                    raise ValueError(f"layer {layer}, {n} tokens: ranks captured tuples of shapes {shape} and "
                                     f"{shapes[key]} (queries per tuple and heads must be constant within a group)")
        return kept, shapes

    def _write_store(self, progress: bool) -> None:
        from flux2ttr.contract import layer_sort_key  # noqa: PLC0415

        dist = self.dist
        self._wait_spills()  # every spilled file complete (a failed write raises here)
        self._stop_spills()
        local = {
            "kept": [[it.priority, it.serial, it.layer, it.n_tokens, it.nbytes, it.scalars.tolist(), it.shards]
                     for _, _, it in self._heap],
            "tau": _json_tau(self._tau),
            "shapes": [[layer, n, list(q), list(k), headed] for (layer, n), (q, k, headed) in self._shapes.items()],
            "offered": self._offered, "offered_bytes": self._offered_bytes,
        }
        parts = dist.all_gather_json(local)
        offered = sum(sum(int(c) for c in p["offered"].values()) for p in parts)
        if offered < self._planned[0]:
            raise TraceStoreError(f"{self.path}: {self._planned[0]} tuples were planned but only {offered} offered; the "
                                  "planned cut may have dropped tuples the budget keeps, so nothing was published")
        kept, self._shapes = self._merge(parts)
        groups: dict[tuple[str, int], list[_Kept]] = {}
        for item in kept:
            groups.setdefault((item.layer, item.n_tokens), []).append(item)
        # ranks write whole layers (a layer's folder has one writer), round-robin in execution order
        layers = sorted({layer for layer, _ in groups}, key=layer_sort_key)
        mine = set(layers[dist.rank::dist.world])
        error: BaseException | None = None
        try:
            arrays, files = self._write_groups({g: v for g, v in groups.items() if g[0] in mine}, progress)
        except Exception as e:  # reported to the other ranks first, so that none waits forever
            error, arrays, files = e, {}, {}
        results = dist.all_gather_json({"error": None if error is None else f"{type(error).__name__}: {error}",
                                        "arrays": arrays, "files": files})
        if error is not None:
            raise error
        failed = [(r, res["error"]) for r, res in enumerate(results) if res["error"]]
        if failed:
            raise TraceStoreError(f"{self.path}: rank {failed[0][0]} could not write its part of the store "
                                  f"({failed[0][1]}); nothing was published")

        status = None
        if dist.rank == 0:
            try:
                self._publish(parts, kept, results)
            except Exception as e:
                error, status = e, f"{type(e).__name__}: {e}"
        status = dist.broadcast_json(status)  # the other ranks return once the store is in place
        if error is not None:
            raise error
        if status is not None:
            raise TraceStoreError(f"{self.path}: rank 0 could not publish the store ({status})")

    def _write_groups(self, groups: dict[tuple[str, int], list[_Kept]],
                      progress: bool) -> tuple[dict[str, dict[str, Any]], dict[str, list]]:
        """Write this rank's groups into the temporary store; returns their manifest entries (arrays and
        ``{file: [bytes, sha256]}`` of their layers' folders)."""
        import zarr  # noqa: PLC0415
        from zarr.codecs import ZstdCodec  # noqa: PLC0415

        from flux2ttr.contract import layer_sort_key  # noqa: PLC0415

        t0 = time.perf_counter()
        root = zarr.open_group(str(self._tmp), mode="r+")
        store_dtype = _np_storage_dtype(self.storage_dtype)
        level = self._shard_zstd_level
        compressor = None if level is None else ZstdCodec(level=level)
        array_info: dict[str, dict[str, Any]] = {}
        hashed: dict[str, list] = {}  # shard files: [bytes, sha256] as written (dict writes are atomic under the GIL)

        bar = None
        if progress:
            from tqdm import tqdm  # noqa: PLC0415

            bar = tqdm(total=sum(len(v) for v in groups.values()), desc="write traces", unit="tuple")
        for (layer, n_tokens) in sorted(groups, key=lambda g: (layer_sort_key(g[0]), g[1])):
            items = groups[(layer, n_tokens)]
            # deterministic row order: by prompt, seed, step (reading a prompt's tuples stays local), then
            # priority: the same rows whichever rank kept which tuple
            items = sorted(items, key=lambda it: (it.scalars[5], it.scalars[7], it.scalars[6], it.priority, it.rank,
                                                  it.serial))
            m = len(items)
            (h_, nq, d), (_, n, _), headed = self._shapes[(layer, n_tokens)]
            g = root.require_group(layer).require_group(group_name(n_tokens))
            rows = min(m, self._tuples_per_shard(layer, n_tokens))
            arrays = {}
            for name, shape in (("q_sub", (h_, nq, d)), ("teacher_sub", (h_, nq, d)),
                                ("k", (h_, n, d)), ("v", (h_, n, d))):
                arrays[name] = g.create_array(
                    name, shape=(m, *shape), dtype=store_dtype, chunks=(1, *shape), shards=(rows, *shape),
                    compressors=compressor, fill_value=0, config={"write_empty_chunks": True},
                )
            q_idx = np.empty((m, nq), dtype=np.int32)
            heads = np.empty((m, h_), dtype=np.int32) if headed else None
            scalars = np.empty((m, len(SCALAR_FIELDS)), dtype=np.float64)
            def write_shard(start: int, stop: int) -> int:
                # a shard-ready spill (one tuple per shard) already is its final shard files: renamed into place
                ready = rows == 1 and items[start].shards is not None
                batch = {name: [] for name in arrays}
                for j in range(start, stop):
                    z = self._read_small_spill(items[j]) if ready else self._read_spill(items[j])
                    for name in () if ready else arrays:
                        batch[name].append(z[name])
                    q_idx[j] = z["q_idx"]  # rows of one shard: no two threads write the same row
                    if heads is not None:
                        heads[j] = z["heads"]
                    scalars[j] = items[j].scalars
                for name, arr in arrays.items():  # one whole shard per file, by this thread
                    rel = f"{arr.path}/{arr.metadata.encode_chunk_key((start // rows, 0, 0, 0))}"
                    if ready:
                        (self._tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                        os.replace(items[start].shard_path(name), self._tmp / rel)
                        hashed[rel] = list(items[start].shards[name])
                    else:
                        hashed[rel] = list(write_shard_file(self._tmp / rel, batch[name], rows, level))
                for j in range(start, stop):
                    items[j].spill.unlink()  # spill and store stay near one budget (+ the shards in flight)
                return stop - start

            # shards are separate files: compressing and writing several at once leaves the bytes as they are
            with ThreadPoolExecutor(max_workers=self.write_threads) as pool:
                for n_done in pool.map(lambda r: write_shard(*r), [(a, min(m, a + rows)) for a in range(0, m, rows)]):
                    if bar is not None:
                        bar.update(n_done)
            g.create_array("q_idx", data=q_idx, chunks=q_idx.shape, compressors=compressor)
            g.create_array("scalars", data=scalars, chunks=scalars.shape, compressors=compressor)
            if heads is not None:
                g.create_array("heads", data=heads, chunks=heads.shape, compressors=compressor)
            g.attrs.update({"n_tokens": int(n_tokens), "count": int(m)})
            prefix = f"{layer}/{group_name(n_tokens)}"
            for name in arrays:
                array_info[f"{prefix}/{name}"] = {"shape": [m, *arrays[name].shape[1:]], "dtype": str(store_dtype),
                                                  "rows_per_file": rows}
            array_info[f"{prefix}/q_idx"] = {"shape": [m, nq], "dtype": "int32", "rows_per_file": m}
            array_info[f"{prefix}/scalars"] = {"shape": [m, len(SCALAR_FIELDS)], "dtype": "float64",
                                               "rows_per_file": m}
            if heads is not None:
                array_info[f"{prefix}/heads"] = {"shape": [m, h_], "dtype": "int32", "rows_per_file": m}
        if bar is not None:
            bar.close()
        t1 = time.perf_counter()
        # every file of these layers (the layer's own zarr.json too): the shards as hashed while written (their
        # size checked against the file), the small files read back from disk
        rels = [f"{layer}/{rel}" for layer in sorted({lay for lay, _ in groups})
                for rel in (_META_FILE, *_store_files(self._tmp / layer))]
        rest = hash_files(self._tmp, [r for r in rels if r not in hashed])
        for rel, (size, _) in hashed.items():
            if (self._tmp / rel).stat().st_size != size:
                raise TraceStoreError(f"{self._tmp / rel}: {(self._tmp / rel).stat().st_size} bytes on disk, {size} "
                                      "written; the disk may be full or failing")
        files = {r: rest[r] if r in rest else hashed[r] for r in rels}
        self.write_seconds, self.manifest_seconds = t1 - t0, time.perf_counter() - t1
        return array_info, files

    def _publish(self, parts: list[dict[str, Any]], kept: list[_Kept], results: list[dict[str, Any]]) -> None:
        """Rank 0, once every rank wrote its layers: remove the spills, write the root attributes (the
        manifest covers every rank's files) and rename the store into place."""
        import zarr  # noqa: PLC0415

        for spill in self._tmp.glob(".spill-*"):
            shutil.rmtree(spill)
        offered: dict[str, int] = {}
        for p in parts:
            for layer, count in p["offered"].items():
                offered[layer] = offered.get(layer, 0) + int(count)
        kept_per_layer: dict[str, int] = {}
        for item in kept:
            kept_per_layer[item.layer] = kept_per_layer.get(item.layer, 0) + 1
        files: dict[str, list] = {}
        arrays: dict[str, dict[str, Any]] = {}
        for res in results:
            files.update(res["files"])
            arrays.update(res["arrays"])
        attrs = dict(self.attrs)
        attrs.update({
            "format": FORMAT,
            "schema": SCHEMA_VERSION,
            "storage_dtype": self.storage_dtype,
            "encoding": BF16_ENCODING if self.storage_dtype == "bfloat16" else self.storage_dtype,
            "scalar_fields": list(SCALAR_FIELDS),
            "reservoir": {
                "rule": "lowest i.i.d. uniform priorities in priority order up to the first that does not fit",
                "seed": self.seed,
                "budget_bytes": self.budget_bytes,
                "offered": int(sum(offered.values())),
                "kept": len(kept),
                "offered_bytes": int(sum(int(p["offered_bytes"]) for p in parts)),
                "kept_bytes": int(sum(item.nbytes for item in kept)),
                "offered_per_layer": dict(sorted(offered.items())),
                "kept_per_layer": {k: kept_per_layer.get(k, 0) for k in sorted(offered)},
            },
            "manifest": manifest_of(files, arrays),
        })
        root = zarr.open_group(str(self._tmp), mode="r+")
        root.attrs.put(attrs)  # written last: a store is marked complete only once its arrays are
        self._swap_into_place()

    def _swap_into_place(self) -> None:
        old = None
        if self.path.exists() or self.path.is_symlink():
            old = self.path.parent / f".{self.path.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.replace(self.path, old)
        os.replace(self._tmp, self.path)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()


def _json_tau(tau: float) -> float | None:
    """A reservoir threshold as JSON (``None`` for infinity: strict JSON has no inf)."""
    return None if math.isinf(tau) else float(tau)


def _tau_from_json(value: float | None) -> float:
    return math.inf if value is None else float(value)


# ---------------------------------------------------------------------------------------------- reader


class TraceStore:
    """Read access to a finished trace store. Open with :meth:`TraceStore.open`.

    Integrity (module doc, "Manifest and integrity"): :meth:`open` checks every file's presence and size and
    the metadata files' hashes; every read hashes the shard/chunk files it touches the first time it touches
    them; :meth:`verify` hashes everything. Reads are thread-safe.

    In DataLoader workers, open the store inside each worker (spawn/forkserver), see the module doc.
    """

    def __init__(self, path: Path, root: Any, attrs: dict[str, Any], manifest: dict[str, Any] | None = None,
                 verified: Iterable[str] = ()) -> None:
        self.path = path
        self._root = root
        self.attrs = attrs
        self.storage_dtype: str = attrs["storage_dtype"]
        self.manifest = manifest  # None: a store written before manifests (read unverified)
        self._verified: set[str] = set(verified)  # files whose sha256 matched the manifest
        self._lock = threading.Lock()
        self._file_locks: dict[str, threading.Lock] = {}
        self._groups: dict[str, list[tuple[int, int]]] = {}
        self._headed: dict[tuple[str, int], bool] = {}  # has_heads per group, filled on first ask
        try:
            for layer in root.group_keys():
                entries = []
                for name in root[layer].group_keys():
                    g = root[layer][name]
                    entries.append((int(g.attrs["n_tokens"]), int(g.attrs["count"])))
                self._groups[layer] = sorted(entries)
        except (KeyError, ValueError, TypeError, OSError) as e:
            raise TraceStoreError(f"{path}: unreadable group metadata ({type(e).__name__}: {e}); the store is "
                                  f"damaged: {RECAPTURE}") from e

    @classmethod
    def open(cls, path: str | Path) -> "TraceStore":
        """Open and validate the store at ``path``; :class:`TraceStoreError` says what is wrong.

        Checks the root attributes, then (stores with a manifest) that every listed file exists with its
        listed size, that no unlisted file is in the store and that the metadata files hash right. A store
        without a manifest opens with a :class:`TraceStoreWarning`."""
        path = Path(path)
        if not path.exists():
            raise TraceStoreError(
                f"{path}: no trace store here; run `flux2ttr capture` (or `dvc repro capture`) to create it"
            )
        meta = path / _META_FILE
        if not path.is_dir() or not meta.is_file():
            raise TraceStoreError(f"{path}: not a zarr v3 store (no zarr.json); pass a flux2ttr trace store")
        try:
            head = json.loads(meta.read_text())
        except (OSError, ValueError) as e:
            raise TraceStoreError(f"{path}: unreadable zarr.json ({e}); recreate the store with flux2ttr capture")
        attrs = head.get("attributes", {}) if isinstance(head, dict) else {}
        fmt = attrs.get("format")
        if fmt == PARTIAL_FORMAT:
            raise TraceStoreError(
                f"{path}: an incomplete trace store (its writer was interrupted); rerun `flux2ttr capture`"
            )
        if head.get("zarr_format") != 3 or head.get("node_type") != "group" or fmt != FORMAT:
            raise TraceStoreError(
                f"{path}: not a flux2ttr trace store (format {fmt!r}, expected {FORMAT!r}); "
                "pass a store written by `flux2ttr capture`"
            )
        schema = attrs.get("schema")
        if not isinstance(schema, int):
            raise TraceStoreError(f"{path}: trace store without an integer schema version; recreate it")
        if schema > SCHEMA_VERSION:
            raise TraceStoreError(
                f"{path}: trace store schema {schema} is newer than this flux2ttr reads ({SCHEMA_VERSION}); "
                "upgrade flux2ttr or recapture with this version"
            )
        if schema < SCHEMA_VERSION:
            raise TraceStoreError(
                f"{path}: trace store schema {schema} is older than {SCHEMA_VERSION}; recapture it"
            )
        if attrs.get("storage_dtype") not in STORAGE_DTYPES:
            raise TraceStoreError(f"{path}: unknown storage dtype {attrs.get('storage_dtype')!r}; recapture it")
        manifest = attrs.get("manifest")
        verified: list[str] = []
        if manifest is None:
            warnings.warn(
                f"{path}: this trace store has no manifest (written before flux2ttr recorded one), so missing, "
                f"truncated or corrupt shards cannot be detected (a deleted shard reads as zeros); {RECAPTURE}",
                TraceStoreWarning, stacklevel=2)
        else:
            _check_manifest_shape(path, manifest)
            verified = _check_files(path, manifest)
        import zarr  # noqa: PLC0415

        try:
            root = zarr.open_group(str(path), mode="r")
        except Exception as e:  # zarr raises assorted errors on broken metadata
            raise TraceStoreError(f"{path}: zarr cannot open the store ({type(e).__name__}: {e}); "
                                  f"the store is damaged: {RECAPTURE}") from e
        return cls(path, root, attrs, manifest, verified)

    @property
    def schema(self) -> int:
        return int(self.attrs["schema"])

    @property
    def layers(self) -> list[str]:
        """Layer keys with stored tuples, in execution order."""
        from flux2ttr.contract import layer_sort_key  # noqa: PLC0415

        return sorted(self._groups, key=layer_sort_key)

    def groups(self, layer: str) -> list[tuple[int, int]]:
        """``[(n_tokens, count), ...]`` of ``layer``, by token count."""
        if layer not in self._groups:
            raise KeyError(f"{self.path}: no layer {layer!r}; stored layers: {self.layers}")
        return list(self._groups[layer])

    def count(self, layer: str | None = None) -> int:
        """Tuples stored for ``layer`` (all layers when ``None``)."""
        layers = self.layers if layer is None else [layer]
        return sum(c for lay in layers for _, c in self.groups(lay))

    def _group(self, layer: str, n_tokens: int) -> Any:
        if int(n_tokens) not in [n for n, _ in self.groups(layer)]:
            raise KeyError(f"{self.path}: layer {layer} has no tuples with {n_tokens} tokens; "
                           f"it has {self.groups(layer)}")
        return self._root[layer][group_name(n_tokens)]

    def shapes(self, layer: str, n_tokens: int) -> dict[str, tuple[int, ...]]:
        """Per-tuple shapes of a group: ``q_sub``/``teacher_sub`` ``(H, Nq, D)``, ``k``/``v`` ``(H, N, D)``
        (``H``: heads per tuple), ``q_idx`` ``(Nq,)``, and ``heads`` ``(H,)`` in a head-subset group."""
        g = self._group(layer, n_tokens)
        names = (*ARRAY_FIELDS, "q_idx", *(("heads",) if self.has_heads(layer, n_tokens) else ()))
        return {name: tuple(g[name].shape[1:]) for name in names}

    def has_heads(self, layer: str, n_tokens: int) -> bool:
        """Whether the group's tuples hold a head subset (a ``heads`` array; stores without one: all heads)."""
        key = (layer, int(n_tokens))
        if key not in self._headed:  # listed once per group (a zarr listing is not free)
            self._headed[key] = "heads" in set(self._group(layer, n_tokens).array_keys())
        return self._headed[key]

    def teacher_heads(self) -> int:
        """The teacher's head count: ``capture.num_heads`` of a head-subset store, else the stored heads per
        tuple (every head)."""
        recorded = (self.attrs.get("capture") or {}).get("num_heads")
        if recorded is not None:
            return int(recorded)
        layer = self.layers[0]
        return int(self.shapes(layer, self.groups(layer)[0][0])["q_sub"][0])

    # -- verified reads --------------------------------------------------------------------------------

    def _array_files(self, arr: Any, prefix: str, rows: np.ndarray | None) -> list[str]:
        """Store-relative paths of the files (shards, or chunks of unsharded arrays) holding ``rows`` of
        ``arr`` (all its files when ``None``)."""
        per_file = int(arr.metadata.chunk_grid.chunk_shape[0])
        count = int(arr.shape[0])
        index = range(-(-count // per_file)) if rows is None else np.unique(np.asarray(rows) // per_file).tolist()
        rest = (0,) * (len(arr.shape) - 1)
        return [f"{prefix}/{arr.metadata.encode_chunk_key((int(i), *rest))}" for i in index]

    def _verify_files(self, rels: Iterable[str], array: str) -> None:
        """Hash each of ``rels`` not verified yet against the manifest (files it does not list were never
        written: zarr left an all-fill chunk out, and reads it as fill)."""
        if self.manifest is None:
            return
        files = self.manifest["files"]
        for rel in rels:
            if rel in self._verified or rel not in files:
                continue
            with self._lock:
                lock = self._file_locks.setdefault(rel, threading.Lock())
            with lock:  # one thread hashes a shard; the others wait for its verdict
                if rel in self._verified:
                    continue
                self._check_hash(rel, array)
                with self._lock:
                    self._verified.add(rel)

    def _check_hash(self, rel: str, array: str) -> None:
        size, want = self.manifest["files"][rel]
        f = self.path / rel
        try:
            got_size = f.stat().st_size
            got = file_sha256(f) if got_size == size else None
        except FileNotFoundError:
            raise TraceStoreError(f"{self.path}: file {rel} of array {array} is missing (deleted after the store "
                                  f"was opened); the store is damaged: {RECAPTURE}") from None
        if got_size != size:
            raise TraceStoreError(f"{self.path}: file {rel} of array {array} is {got_size} bytes, the store's "
                                  f"manifest says {size} (changed after the store was opened); the store is "
                                  f"damaged: {RECAPTURE}")
        if got != want:
            raise TraceStoreError(f"{self.path}: file {rel} of array {array} is corrupt: its {MANIFEST_HASH} "
                                  f"{got[:12]}... differs from the manifest's {want[:12]}... (same size, other "
                                  f"bytes); the store is damaged: {RECAPTURE}")

    def read_array(self, layer: str, n_tokens: int, name: str, rows: np.ndarray | None = None, *,
                   runs: bool = False) -> np.ndarray:
        """Stored rows of one array of a group as numpy (storage dtype), verified (see the class doc).

        ``rows``: sorted unique row indices (``None``: the whole array); ``runs``: read them with one slice
        per contiguous run (touches only the selected chunks) instead of zarr's orthogonal indexing.
        Decoding errors become a :class:`TraceStoreError` naming the array, its file(s) and the fix."""
        g = self._group(layer, n_tokens)
        prefix = f"{layer}/{group_name(n_tokens)}/{name}"
        arr = g[name]
        rels = self._array_files(arr, prefix, rows)
        self._verify_files(rels, prefix)
        try:
            if rows is None:
                return np.asarray(arr[:])
            if not runs:
                return np.asarray(arr.oindex[rows])
            parts = [np.asarray(arr[a:b]) for a, b in _runs(np.asarray(rows))]
            return np.concatenate(parts) if parts else np.asarray(arr[0:0])
        except (IndexError, TraceStoreError):
            raise
        except Exception as e:  # zarr/numcodecs: checksum mismatch, zstd or shard-index decoding errors
            named = ", ".join(rels[:3]) + (f" (+{len(rels) - 3} more)" if len(rels) > 3 else "")
            raise TraceStoreError(f"{self.path}: cannot decode array {prefix} from {named or 'its chunks'} "
                                  f"({type(e).__name__}: {e}); the store is damaged: {RECAPTURE}") from e

    def verify(self, layers: Sequence[str] | None = None, threads: int = 4) -> dict[str, Any]:
        """Hash every file of the store (or of ``layers``, plus the metadata) against the manifest, with
        ``threads`` threads; raises :class:`TraceStoreError` naming every bad file. Returns ``{"manifest",
        "files", "bytes", "seconds"}`` (``manifest`` False, nothing checked, for a store without one)."""
        t0 = time.perf_counter()
        if self.manifest is None:
            return {"manifest": False, "files": 0, "bytes": 0, "seconds": 0.0}
        files = self.manifest["files"]
        want = set(layers) if layers is not None else None
        rels = [r for r in files if want is None or r.split("/", 1)[0] in want or "/" not in r]
        todo = [r for r in rels if r not in self._verified]
        bad: list[tuple[str, str]] = []

        def one(rel: str) -> None:
            try:
                self._verify_files([rel], rel.rsplit("/c/", 1)[0])
            except TraceStoreError as e:
                bad.append((rel, str(e)))

        with ThreadPoolExecutor(max_workers=max(1, int(threads))) as pool:
            list(pool.map(one, todo))
        if bad:
            bad.sort()
            others = [rel for rel, _ in bad[1:]]
            more = (f" (and {len(others)} more damaged file(s): {', '.join(others[:5])}"
                    + (", ..." if len(others) > 5 else "") + ")") if others else ""
            raise TraceStoreError(bad[0][1] + more)
        return {"manifest": True, "files": len(rels), "bytes": int(sum(files[r][0] for r in rels)),
                "seconds": round(time.perf_counter() - t0, 3)}

    def scalars(self, layer: str, n_tokens: int) -> dict[str, np.ndarray]:
        """All scalar fields of a group as numpy arrays ``[count]`` (sigma/cfg float64, others int64)."""
        return {name: col if name in _FLOAT_SCALARS else col.astype(np.int64)
                for name, col in self.scalar_columns(self.read_array(layer, n_tokens, "scalars")).items()}

    def scalar_columns(self, table: np.ndarray) -> dict[str, np.ndarray]:
        """``{field: table[:, column]}`` for every field of :data:`SCALAR_FIELDS` from a raw ``scalars`` table
        ``[M, columns]`` of this store, by the column names it records (``scalar_fields``); a field an older
        store lacks (``uncond``) reads as zeros."""
        names = list(self.attrs.get("scalar_fields") or SCALAR_FIELDS[:table.shape[1]])
        if len(names) != table.shape[1]:
            raise TraceStoreError(f"{self.path}: scalars have {table.shape[1]} columns but scalar_fields names "
                                  f"{len(names)}; {RECAPTURE}")
        col = {n: i for i, n in enumerate(names)}
        return {name: table[:, col[name]] if name in col else np.zeros(table.shape[0], dtype=np.float64)
                for name in SCALAR_FIELDS}

    def prompt_indices(self, layer: str) -> dict[int, np.ndarray]:
        """``{n_tokens: prompt index of every stored tuple [count]}`` for splitting by prompt."""
        return {n: self.scalars(layer, n)["prompt"] for n, _ in self.groups(layer)}

    def read(self, layer: str, n_tokens: int, indices: Sequence[int] | np.ndarray | slice) -> dict[str, torch.Tensor]:
        """Tuples ``indices`` (rows of the group, any order) as a batch:

        ``q_sub``/``teacher_sub`` ``[B, H, Nq, D]`` float32, ``k``/``v`` ``[B, H, N, D]`` float32,
        ``q_idx`` ``[B, Nq]`` int64, ``sigma``/``cfg`` ``[B]`` float32, ``n_cond, h, w, prompt, step,
        seed, uncond`` ``[B]`` int64; in a head-subset group also ``heads`` ``[B, H]`` int64 (the teacher's
        head index of each row).
        """
        g = self._group(layer, n_tokens)
        count = g["scalars"].shape[0]
        if isinstance(indices, slice):
            idx = np.arange(count)[indices]
        else:
            idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -count or idx.max() >= count):
            raise IndexError(f"{self.path}: {layer}/{group_name(n_tokens)} has {count} tuples, asked for {idx}")
        idx = np.where(idx < 0, idx + count, idx)
        # zarr orthogonal selection wants sorted unique rows; gather, then restore the asked order
        uniq, inverse = np.unique(idx, return_inverse=True)
        out: dict[str, torch.Tensor] = {}
        for name in ARRAY_FIELDS:
            data = self.read_array(layer, n_tokens, name, uniq)[inverse]
            out[name] = decode(data, self.storage_dtype)
        out["q_idx"] = torch.from_numpy(self.read_array(layer, n_tokens, "q_idx", uniq)[inverse].astype(np.int64))
        if self.has_heads(layer, n_tokens):
            out["heads"] = torch.from_numpy(self.read_array(layer, n_tokens, "heads", uniq)[inverse].astype(np.int64))
        table = self.read_array(layer, n_tokens, "scalars", uniq)[inverse]
        for name, col in self.scalar_columns(table).items():
            out[name] = torch.from_numpy(col.astype(np.float32) if name in _FLOAT_SCALARS else col.astype(np.int64))
        return out

    def nbytes_on_disk(self) -> int:
        """Bytes of all files of the store."""
        return sum(f.stat().st_size for f in _files(self.path))

    def file_count(self) -> int:
        return sum(1 for _ in _files(self.path))


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Sorted unique rows as contiguous ``[start, stop)`` runs."""
    if rows.size == 0:
        return []
    cuts = np.nonzero(np.diff(rows) != 1)[0] + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(rows, cuts)]


def _check_manifest_shape(path: Path, manifest: Any) -> None:
    files = manifest.get("files") if isinstance(manifest, dict) else None
    ok = (isinstance(files, dict) and manifest.get("hash") == MANIFEST_HASH
          and all(isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], str)
                  for v in files.values()))
    if not ok:
        raise TraceStoreError(f"{path}: the store's manifest (root attribute 'manifest') is malformed or uses "
                              f"another hash than {MANIFEST_HASH}; {RECAPTURE}")


def _check_files(path: Path, manifest: dict[str, Any]) -> list[str]:
    """The cheap checks at open: every listed file present with its size, nothing unlisted (dot-files
    aside), metadata files hashed. Returns the files verified by hash; raises naming every bad file."""
    files: dict[str, list] = manifest["files"]
    problems: list[str] = []
    for rel, (size, _) in files.items():
        try:
            got = (path / rel).stat().st_size
        except FileNotFoundError:
            problems.append(f"{rel} is missing")
            continue
        if got != size:
            how = "truncated" if got < size else "grown"
            problems.append(f"{rel} is {got} bytes, the manifest says {size} ({how})")
    extra = [r for r in _store_files(path) if r not in files and not _hidden(r)]
    problems += [f"{r} is not in the manifest (not written by the capture that made the store: remove it)"
                 for r in extra]
    verified = []
    if not problems:
        for rel, (_, digest) in files.items():
            if rel.rsplit("/", 1)[-1] == _META_FILE:
                if file_sha256(path / rel) != digest:
                    problems.append(f"{rel} (metadata) is corrupt: its {MANIFEST_HASH} differs from the manifest's")
                else:
                    verified.append(rel)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        one = "file" if len(problems) == 1 else "files"
        raise TraceStoreError(f"{path}: damaged trace store, {one} " + "; ".join(problems[:5]) + more
                              + f"; {RECAPTURE}")
    return verified


def _files(path: Path) -> Iterable[Path]:
    for root, _, files in os.walk(path):
        for f in files:
            yield Path(root) / f
