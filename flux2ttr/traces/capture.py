"""Capture stage: sample the capture prompts with the teacher and record attention tuples in a trace store.

For every chosen (step, layer) and batch row the router's observer sees ``q, k, v, out [B, H, N, D]``
(post QK-norm and RoPE; ``out`` is the teacher's native softmax output) and offers one
:class:`~flux2ttr.traces.store.TraceTuple` to the :class:`~flux2ttr.traces.store.TraceWriter`: ``Nq`` query positions
drawn uniformly without replacement from all ``N`` tokens (text and image; a fresh draw per tuple),
``q_sub``/``teacher_sub`` at those positions, keys and values in full. The draw comes from a generator
seeded by ``(capture.seed, prompt, sample seed, step, layer)``, so it does not depend on the batch size.
The writer keeps a global byte budget by reservoir sampling and renames the store into place only when
it is complete. Each tuple's reservoir priority is a uniform draw keyed the same way
(:func:`tuple_priority`), so which tuples are kept depends neither on the order they are offered in nor on
how the rollouts are split.

**Head subsets** (``capture.tuple_heads`` = ``Hs`` > 0, fewer than the teacher's ``H``): each tuple keeps only
``Hs`` of the heads (``q_sub``, ``k``, ``v``, ``teacher_sub`` of those rows; the query positions are the same as
with every head), a sorted draw without replacement keyed like the query draw (:func:`head_subset`), recorded
in the tuple's ``heads`` field; the store's ``capture`` attributes record ``num_heads`` (the teacher's ``H``).
A tuple is then ``Hs / H`` of the bytes, so the budget keeps about ``H / Hs`` times as many. Meant for students
shared across heads: distill indexes every per-head tensor (the window mode's ``gamma``) by the recorded heads.
``0`` (or ``H``) stores every head, and the store is the one a capture without the setting writes.

**True CFG** (``sampler.cfg`` != 1, the ``comfyui`` teacher): every denoiser call holds the conditional and
the unconditional rows of each prompt; both are captured, the tuple's ``uncond`` field says which half it is,
and an unconditional tuple's query draw and priority are keyed by that flag too (the conditional ones keep
the keys of a capture without CFG).

**Reference latents** (``capture.reference_latents`` = ``N`` > 0, the ``comfyui`` teacher: FLUX.2's
ReferenceLatent, the reference-image editing input): prompt ``i`` is sampled with ``N`` reference latents,
its ``j``-th (``j = 1..N``) being the final latent of prompt ``(i + j) mod P`` (``P`` prompts) sampled alone
(batch 1, no references, not captured) at seed ``sampler.seed + (i + j) mod P``: that prompt's own rollout-0
latent of this capture, so the references are the teacher's own images of the same run. ComfyUI appends
reference tokens after the image grid; the tuples store the sequence as the node hands it to a student,
``[text, ref_1 .. ref_N, image grid]`` with ``n_cond = 512 + N * h * w`` (``h, w`` stay the image grid, and
``q_idx`` indexes that order), so distill trains on them unchanged.

**Planned cut.** Every tuple's priority is known before sampling (its identity is: prompt, seed, step, layer,
half), and so is a lower bound on its bytes (512 conditioning tokens, the reference grids and the image grid),
so capture hands the writer the whole plan (:func:`planned_priorities`,
:meth:`~flux2ttr.traces.store.TraceWriter.plan`): a tuple whose priority is above the planned cut is never
copied off the device nor spilled, and the spill writes about the budget, however much more the sampling
offers (FLUX.2 dev at 1024² offers 48 blocks x 28 steps of 115 MB tuples per image). The store is the one
a capture without the plan writes, byte for byte.

**Under torchrun** (``torchrun --nproc-per-node N -m stages.capture``) the ranks split the sampler batches
(the same batches one process samples, so every tuple is computed exactly as there): batch ``j`` goes to
rank ``j mod N``. Each rank keeps its own reservoir under the whole budget and spills into one temporary
store shared by all ranks; after every round of N batches the ranks exchange their kept priorities and drop
what can no longer be kept (:meth:`~flux2ttr.traces.store.TraceWriter.sync`), so the spill stays near one
budget. At the end the reservoirs merge into exactly the tuples one process keeps, each rank writes whole
layers, and rank 0 writes the manifest over every file and renames the store into place: the store is
byte for byte the one a single process writes with the same params (with the same torch threads per
process: torchrun sets ``OMP_NUM_THREADS=1``, and the thread count can change float rounding).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flux2ttr.config import ConfigError, check_range, to_dict
from flux2ttr.contract import FLUX2_COND_TOKENS, RunState, layer_sort_key
from flux2ttr.distributed import Dist
from flux2ttr.traces.store import COMPRESSIONS, STORAGE_DTYPES, TraceStore, TraceTuple, TraceWriter

MIB = 2**20
PRIORITY_STREAM = 0x9E1  # separates the reservoir priorities from the query draws of the same tuple
UNCOND_STREAM = 0x5C1  # keys the unconditional half of a CFG call apart from its conditional half
HEADS_STREAM = 0x4EAD  # separates the head-subset draws from the query draws and priorities of the same tuple


LAYER_SETS = ("all_single", "all")


@dataclass
class CaptureConfig:
    """params.yaml section ``capture``."""

    prompts: str = "data/prompts/scenes_capture.json"  # JSON array of strings
    store: str = "traces/capture.zarr"  # the trace store written (atomically)
    metrics: str = "metrics/capture.json"  # offered/kept counts and timings; "" = none
    queries: int = 64  # query positions per tuple (all tokens when N is smaller)
    layers: list[str] | str = "all_single"  # layer keys, or "all_single", or "all" (double blocks too)
    steps: list[int] | str = "all"  # 0-based denoising steps, or "all"
    rollouts: int = 1  # sampling runs per prompt; rollout r of prompt i uses seed sampler.seed + r*P + i
    storage_dtype: str = "float16"  # float16 | bfloat16 | float32
    budget_mib: float = 800.0  # global budget: uncompressed bytes of all kept tuples
    batch_size: int = 4  # prompts per sampler batch
    reference_latents: int = 0  # comfyui teacher: reference latents per prompt (ReferenceLatent; module doc); 0 = none
    tuple_heads: int = 0  # heads kept per tuple, a seeded subset recorded in the store (module doc); 0 = all
    seed: int = 0  # query draws and reservoir priorities
    shard_mib: float = 16.0  # target size of one shard file (k, v arrays)
    zstd_level: int = 3  # shard compression level
    compression: str = "zstd"  # zstd | none (shards stored as they are: no compression work at close)
    write_threads: int = 4  # spills and shards compressed and written at once (sampling goes on meanwhile)

    def __post_init__(self) -> None:
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ConfigError(f"capture.storage_dtype must be one of {STORAGE_DTYPES}, got {self.storage_dtype!r}")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"capture.compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        for name in ("queries", "rollouts", "batch_size", "write_threads"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"capture.{name} must be >= 1, got {getattr(self, name)}")
        check_range("capture", self, "reference_latents", "tuple_heads", ge=0)
        if self.budget_mib <= 0 or self.shard_mib <= 0:
            raise ConfigError("capture.budget_mib and capture.shard_mib must be positive")
        if isinstance(self.layers, str) and self.layers not in LAYER_SETS:
            raise ConfigError(f"capture.layers must be a list of layer keys or one of {LAYER_SETS}, got {self.layers!r}")
        if isinstance(self.steps, str) and self.steps != "all":
            raise ConfigError(f"capture.steps must be a list of step indices or 'all', got {self.steps!r}")
        check_range("capture", self, "seed", ge=0)  # seeds a numpy generator, which refuses negatives


def resolve_layers(cfg: CaptureConfig, available: list[str], single: list[str]) -> list[str]:
    """The layer keys to capture, in execution order; unknown keys are a :class:`ConfigError`."""
    if cfg.layers == "all_single":
        return list(single)
    if cfg.layers == "all":  # double blocks (joint attention, text first) and single blocks
        return sorted(available, key=layer_sort_key)
    layers = [str(k) for k in cfg.layers]
    unknown = sorted(set(layers) - set(available))
    if unknown:
        raise ConfigError(f"capture.layers: {unknown} are not layers of this teacher; it has {available}")
    if not layers:
        raise ConfigError("capture.layers is empty; name layer keys or use 'all_single'")
    return sorted(set(layers), key=layer_sort_key)


def resolve_steps(cfg: CaptureConfig, num_steps: int) -> list[int]:
    """The denoising steps to capture; steps outside ``[0, sampler.steps)`` are a :class:`ConfigError`."""
    if cfg.steps == "all":
        return list(range(num_steps))
    steps = sorted({int(s) for s in cfg.steps})
    bad = [s for s in steps if not 0 <= s < num_steps]
    if bad or not steps:
        raise ConfigError(f"capture.steps {list(cfg.steps)}: need step indices in [0, {num_steps}) "
                          "(sampler.steps), or 'all'")
    return steps


def _half(uncond: int) -> list[int]:
    """The extra key of an unconditional tuple (none for a conditional one: its keys are those without CFG)."""
    return [UNCOND_STREAM] if int(uncond) else []


def query_positions(n_tokens: int, queries: int, seed: int, prompt: int, sample_seed: int, step: int,
                    layer: str, uncond: int = 0) -> np.ndarray:
    """``[min(queries, N)]`` sorted distinct token positions for one tuple (deterministic per tuple)."""
    lay_kind, lay_idx = layer_sort_key(layer)
    rng = np.random.default_rng([int(seed), int(prompt), int(sample_seed), int(step), lay_kind, lay_idx,
                                 *_half(uncond)])
    nq = min(int(queries), int(n_tokens))
    return np.sort(rng.choice(int(n_tokens), size=nq, replace=False))


def head_subset(num_heads: int, count: int, seed: int, prompt: int, sample_seed: int, step: int, layer: str,
                uncond: int = 0) -> np.ndarray:
    """``[count]`` sorted distinct head indices of ``range(num_heads)`` for one tuple (deterministic per tuple,
    keyed as :func:`query_positions`, in a stream of its own)."""
    lay_kind, lay_idx = layer_sort_key(layer)
    rng = np.random.default_rng([int(seed), HEADS_STREAM, int(prompt), int(sample_seed), int(step), lay_kind,
                                 lay_idx, *_half(uncond)])
    return np.sort(rng.choice(int(num_heads), size=int(count), replace=False))


def tuple_heads_of(cfg: CaptureConfig, num_heads: int) -> int:
    """Heads per tuple of a capture: ``capture.tuple_heads``, or 0 (every head) where it is 0 or ``num_heads``;
    more than the teacher has is a :class:`ConfigError`."""
    n = int(cfg.tuple_heads)
    if n > int(num_heads):
        raise ConfigError(f"capture.tuple_heads = {n}, but the teacher has {num_heads} heads; set at most {num_heads} "
                          "(or 0 for all)")
    return 0 if n == int(num_heads) else n


def tuple_priority(seed: int, prompt: int, sample_seed: int, step: int, layer: str, uncond: int = 0) -> float:
    """The reservoir priority of one tuple: uniform in ``[0, 1)``, a pure function of the tuple's identity
    (not of when or on which rank it is offered)."""
    lay_kind, lay_idx = layer_sort_key(layer)
    rng = np.random.default_rng([int(seed), PRIORITY_STREAM, int(prompt), int(sample_seed), int(step), lay_kind,
                                 lay_idx, *_half(uncond)])
    return float(rng.random())


def planned_priorities(cfg: CaptureConfig, n_prompts: int, sampler_cfg: Any, layers: list[str],
                       steps: list[int]) -> list[float]:
    """The reservoir priorities (:func:`tuple_priority`) of every tuple a capture of ``n_prompts`` prompts offers:
    each rollout, step and layer, and the unconditional half too under true CFG (``sampler_cfg.true_cfg``)."""
    halves = (0, 1) if sampler_cfg.true_cfg else (0,)
    seed0 = int(sampler_cfg.seed)
    return [tuple_priority(cfg.seed, i, seed0 + r * n_prompts + i, step, layer, u)
            for r in range(cfg.rollouts) for i in range(n_prompts) for step in steps for layer in layers
            for u in halves]


def tuple_bytes(writer: TraceWriter, cfg: CaptureConfig, num_heads: int, n_tokens: int, head_dim: int,
                tuple_heads: int) -> int:
    """The stored bytes of one captured tuple of ``n_tokens`` keys (``tuple_heads`` 0: every head)."""
    n = int(n_tokens)
    return writer.nbytes_of(tuple_heads or num_heads, n, min(int(cfg.queries), n), head_dim, headed=bool(tuple_heads))


def least_tuple_bytes(writer: TraceWriter, cfg: CaptureConfig, sampler_cfg: Any, num_heads: int, head_dim: int,
                      tuple_heads: int) -> int:
    """A lower bound on one tuple's stored bytes: FLUX.2's 512 conditioning tokens (the least a prompt gives),
    the reference latents' grids and the image grid (a tuple smaller than this stops the capture at once)."""
    grid = int(sampler_cfg.latent_height) * int(sampler_cfg.latent_width)
    return tuple_bytes(writer, cfg, num_heads, FLUX2_COND_TOKENS + (1 + int(cfg.reference_latents)) * grid, head_dim,
                       tuple_heads)


class CaptureObserver:
    """Router observer ``(key, q, k, v, out, n_cond, state)``: offers one tuple per batch row of the chosen
    steps to ``writer`` (the router calls it only for the chosen layers)."""

    def __init__(self, writer: TraceWriter, cfg: CaptureConfig, steps: list[int], tuple_heads: int = 0) -> None:
        self.writer, self.cfg, self.steps = writer, cfg, set(steps)
        self.tuple_heads = int(tuple_heads)  # 0: every head (see tuple_heads_of)
        self.seconds = 0.0  # wall time spent here (the capture overhead beyond sampling)
        self.cpu_seconds = 0.0  # process CPU time spent here

    def __call__(self, key: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 n_cond: int, state: RunState | None) -> None:
        if state is None:
            raise RuntimeError(f"{key}: capture needs router.state (sigma, step, prompt, seed)")
        if state.step not in self.steps:
            return
        start, cpu_start = time.perf_counter(), time.process_time()
        B, H, N, D = q.shape
        # a tuple's bytes follow from the call's shapes: a refused one is counted without being built, so it
        # costs no device work and no host-to-device copy (a stream sync) of its query and head indices
        nbytes = tuple_bytes(self.writer, self.cfg, H, N, D, self.tuple_heads)
        for b in range(B):
            prompt, sample_seed = int(state.prompt_index[b]), int(state.seed[b])
            uncond = int(state.uncond[b]) if state.uncond else 0
            priority = tuple_priority(self.cfg.seed, prompt, sample_seed, state.step, key, uncond)
            if self.writer.refuses(key, nbytes, priority):
                continue
            idx = query_positions(N, self.cfg.queries, self.cfg.seed, prompt, sample_seed, state.step, key, uncond)
            idx_t = torch.from_numpy(idx).to(q.device)
            qb, kb, vb, ob, heads = q[b], k[b], v[b], out[b], None
            if self.tuple_heads:
                heads = torch.from_numpy(head_subset(H, self.tuple_heads, self.cfg.seed, prompt, sample_seed, state.step,
                                                     key, uncond))
                rows = heads.to(q.device)
                qb, kb, vb, ob = (t.index_select(0, rows) for t in (qb, kb, vb, ob))
            self.writer.offer(key, TraceTuple(
                q_sub=qb[:, idx_t], q_idx=idx_t, k=kb, v=vb, teacher_sub=ob[:, idx_t],
                sigma=float(state.sigma), cfg=float(state.cfg), n_cond=int(n_cond), h=int(state.height),
                w=int(state.width), prompt=prompt, step=int(state.step), seed=sample_seed, uncond=uncond, heads=heads,
            ), priority=priority)
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.process_time() - cpu_start


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ReferencePlan:
    """The reference latents of a capture (module doc, "Reference latents"): each reference rollout sampled once
    per process when first needed, alone (batch 1, so its value does not depend on which batch or rank asks),
    without references and without capture. ``sampled`` counts those rollouts."""

    def __init__(self, teacher: Any, prompts: list[str], sampler_cfg: Any, count: int) -> None:
        self.teacher, self.prompts, self.sampler_cfg, self.count = teacher, prompts, sampler_cfg, int(count)
        self._latents: dict[int, torch.Tensor] = {}
        self.sampled = 0

    def latent(self, p: int) -> torch.Tensor:
        """``[h*w, 128]`` final latent of prompt ``p`` at seed ``sampler.seed + p``."""
        from flux2ttr.teachers.sampler import sample  # noqa: PLC0415

        if p not in self._latents:
            self._latents[p] = sample(self.teacher, [self.prompts[p]], self.sampler_cfg,
                                      seeds=[int(self.sampler_cfg.seed) + p], prompt_indices=[p])[0].float().cpu()
            self.sampled += 1
        return self._latents[p]

    def of(self, i: int) -> list[torch.Tensor]:
        """The references of prompt ``i`` in order (``[h*w, 128]`` each)."""
        return [self.latent((i + j) % len(self.prompts)) for j in range(1, self.count + 1)]

    def for_prompts(self, indices: list[int]) -> list[list[torch.Tensor]] | None:
        """Per prompt index, its references (``None`` when the capture takes none)."""
        return [self.of(i) for i in indices] if self.count else None


def split_batches(n_runs: int, batch_size: int, world: int) -> list[list[tuple[int, int]]]:
    """``[round][k] = (batch index, rank)``: the sampler batches of ``n_runs`` runs (``batch_size`` each, in
    run order: the batches one process samples) dealt round-robin to ``world`` ranks, one batch per rank
    per round (the last round may leave ranks idle)."""
    n_batches = -(-int(n_runs) // int(batch_size))
    return [[(j, j % world) for j in range(r * world, min(n_batches, (r + 1) * world))]
            for r in range(-(-n_batches // world))]


def capture(teacher: Any, prompts: list[str], cfg: CaptureConfig, sampler_cfg: Any, *,
            prompts_file: str | Path | None = None, progress: bool = True, dist: Dist | None = None) -> dict[str, Any]:
    """Sample every prompt ``cfg.rollouts`` times and write the trace store at ``cfg.store``.

    ``teacher``: a :class:`flux2ttr.teachers.teacher.Teacher`; ``sampler_cfg``: a ``SamplerConfig``;
    ``dist``: the torchrun ranks sharing the work (module doc; ``None``: this process alone). A collective:
    every rank calls it with the same arguments and gets the statistics of the whole capture (also written
    to ``cfg.metrics`` by the stage): counts and store size of the store, wall seconds of this rank, CPU
    seconds summed over the ranks, and ``ranks`` (per rank: rollouts sampled, sampling and observer seconds).
    """
    from tqdm import tqdm  # noqa: PLC0415

    from flux2ttr.teachers.router import AttentionRouter  # noqa: PLC0415
    from flux2ttr.teachers.sampler import sample  # noqa: PLC0415

    dist = dist if dist is not None else Dist()
    layers = resolve_layers(cfg, teacher.layer_keys, teacher.single_layer_keys)
    steps = resolve_steps(cfg, int(sampler_cfg.steps))
    if cfg.reference_latents and not getattr(teacher, "samples_itself", False):
        raise ConfigError(f"capture.reference_latents = {cfg.reference_latents} needs teacher.kind: comfyui (reference "
                          "latents go through ComfyUI's FLUX.2 model); set capture.reference_latents: 0")
    runs = [(r, i) for r in range(cfg.rollouts) for i in range(len(prompts))]
    batches = [runs[s:s + cfg.batch_size] for s in range(0, len(runs), cfg.batch_size)]
    tuple_heads = tuple_heads_of(cfg, teacher.num_heads) if cfg.tuple_heads else 0
    recorded = to_dict(cfg)
    if tuple_heads:
        recorded.update(tuple_heads=tuple_heads, num_heads=int(teacher.num_heads))
    else:  # every head: the attributes of a capture without the setting (the same store, byte for byte)
        recorded.pop("tuple_heads")
    attrs = {
        "teacher": teacher.identity,
        "sampler": to_dict(sampler_cfg),
        "capture": {**recorded, "layers": layers, "steps": steps},
        "prompts": {"file": str(prompts_file) if prompts_file else None, "count": len(prompts),
                    "sha256": _sha256_file(Path(prompts_file)) if prompts_file else None},
    }
    if cfg.reference_latents:
        grid = sampler_cfg.latent_height * sampler_cfg.latent_width
        attrs["references"] = {
            "count": int(cfg.reference_latents), "tokens_each": grid, "order": "text, references, image grid",
            "rule": "reference j (1..count) of prompt i: the final latent of prompt (i + j) mod prompts, sampled "
                    "alone without references at seed sampler.seed + that prompt index",
        }
    references = ReferencePlan(teacher, prompts, sampler_cfg, int(cfg.reference_latents))
    router = AttentionRouter(include_double=any(k.startswith("double_") for k in layers))
    t0, c0 = time.perf_counter(), time.process_time()
    sampled = 0
    with TraceWriter(cfg.store, attrs=attrs, budget_bytes=int(cfg.budget_mib * MIB),
                     storage_dtype=cfg.storage_dtype, seed=cfg.seed, shard_bytes=int(cfg.shard_mib * MIB),
                     zstd_level=cfg.zstd_level, compression=cfg.compression, write_threads=cfg.write_threads,
                     dist=dist) as writer:
        writer.plan(planned_priorities(cfg, len(prompts), sampler_cfg, layers, steps),
                    least_tuple_bytes(writer, cfg, sampler_cfg, teacher.num_heads, teacher.head_dim, tuple_heads))
        observer = CaptureObserver(writer, cfg, steps, tuple_heads)
        router.add_observer(observer, layers)
        bar = tqdm(total=len(runs), desc="capture", unit="rollout", disable=not progress or not dist.is_main)
        for round_ in split_batches(len(runs), cfg.batch_size, dist.world):
            for j, rank in round_:
                if rank != dist.rank:
                    continue
                batch = batches[j]
                sample(teacher, [prompts[i] for _, i in batch], sampler_cfg, router=router,
                       seeds=[int(sampler_cfg.seed) + r * len(prompts) + i for r, i in batch],
                       prompt_indices=[i for _, i in batch], references=references.for_prompts([i for _, i in batch]))
                sampled += len(batch)
            writer.sync()  # a collective: every rank, every round
            bar.update(sum(len(batches[j]) for j, _ in round_))
            bar.set_postfix(kept=writer.kept, offered=writer.offered)
        bar.close()
        t_sample, c_sample = time.perf_counter() - t0, time.process_time() - c0
        writer.close(progress=progress and dist.is_main)
        t_close = time.perf_counter() - t0 - t_sample  # shards, manifest and rename: the rest of the capture's cost
    store = TraceStore.open(cfg.store)
    res = store.attrs["reservoir"]
    mine = {"rollouts": sampled, "reference_rollouts": references.sampled, "seconds_sampling": round(t_sample, 3),
            "seconds_observer": round(observer.seconds, 3), "spilled": writer.spilled,
            "seconds_write": round(writer.write_seconds, 3), "seconds_manifest": round(writer.manifest_seconds, 3),
            "seconds_close": round(t_close, 3),
            "cpu_seconds_observer": observer.cpu_seconds, "cpu_seconds_sampling": c_sample,
            "cpu_seconds_total": time.process_time() - c0}
    ranks = dist.all_gather_json(mine)
    return {
        "rollouts": len(runs), "layers": len(layers), "steps": len(steps),
        "offered": res["offered"], "kept": res["kept"], "kept_mib": res["kept_bytes"] / MIB,
        "disk_mib": store.nbytes_on_disk() / MIB, "files": store.file_count(),
        "seconds_sampling": t_sample, "seconds_observer": observer.seconds,
        "cpu_seconds_observer": sum(r["cpu_seconds_observer"] for r in ranks),
        "seconds_total": time.perf_counter() - t0,
        "cpu_seconds_sampling": sum(r["cpu_seconds_sampling"] for r in ranks),
        "cpu_seconds_total": sum(r["cpu_seconds_total"] for r in ranks),
        "world_size": dist.world,
        "spilled": sum(r["spilled"] for r in ranks), "seconds_close": max(r["seconds_close"] for r in ranks),
        "ranks": [{k: r[k] for k in ("rollouts", "reference_rollouts", "spilled", "seconds_sampling", "seconds_observer",
                                     "seconds_write", "seconds_manifest", "seconds_close")} for r in ranks],
    }
