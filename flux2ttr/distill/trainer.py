"""The distill stage: train one HKR student per captured layer from a trace store.

Reads ``(q_sub, k, v, teacher_sub, sigma, cfg, n_cond, h, w)`` tuples from the store, streams them in a
shuffled, prefetched order (:mod:`flux2ttr.traces.loader`) and trains each layer's student with the
Kendall loss (:mod:`flux2ttr.students.losses`): per layer one AdamW over the student (lr, weight decay, grad
clip) and one Adam over the two loss log-variances ``s_h``, ``s_c``. Each step trains a random subset
of layers (``min_swap_layers .. max_swap_layers``, least-trained first, so all layers are covered).

Validation holds out whole prompts. Per layer it measures, over every ``(tuple, head, query)`` token:

* ``val_cos_dist``: mean of ``1 - cos(student, teacher)`` over ``D`` (``val_cos_sim = 1 - val_cos_dist``),
* ``val_nmse``: ``sum |s - t|^2 / sum |t|^2``,
* ``val_p95_err``: 95th percentile of the per-token relative error ``|s - t| / |t|``,
* ``val_cos_dist_ema``: exponential moving average of ``val_cos_dist`` over validations,

and readiness is decided fail-closed with hysteresis (:mod:`flux2ttr.distill.readiness`).

Non-finite tuples (NaN/inf in ``q_sub, k, v, teacher_sub, sigma`` or ``cfg``) are dropped one by one, not
with their batch: an update trains on the finite rows of its batch (and is skipped only when none is left),
validation leaves them out the same way, and each bad tuple is reported once, when first seen, as one line
on stderr (``distill: <layer>: skipping non-finite tuple prompt P step S seed X (...)``). Per layer
``skipped_nonfinite`` counts those tuples (``skipped_updates`` the updates skipped because no row was
finite or the loss/gradients were not); the summary in ``metrics/distill_details.json`` lists them as
``nonfinite_tuples: {layer: [[prompt, step, seed], ...]}``. A store without bad tuples trains exactly as
before (same batches, same RNG draws, same weights).

Before training, every file of this rank's layers is checked against the store's manifest
(:meth:`~flux2ttr.traces.store.TraceStore.verify`), so a damaged store fails before the first step, naming
the file.

Outputs: the student artifact (readiness and metrics in its header); ``metrics/distill.json``, the few
numbers ``dvc metrics show`` compares across runs (:func:`distill_metrics`), and next to it
``metrics/distill_details.json`` (not a DVC metric: every layer's report and the run summary); per-metric
plot tables (CSV ``step, layer, <metric>``, one row per validated layer and step) and ``validation.png``
(the same curves, one panel per metric) in ``plots_dir``; and checkpoints every ``checkpoint_every`` steps
from which a rerun resumes exactly (weights, AdamW moments, loss optimiser, data-plan position, readiness).

:class:`DistillTrainer` holds one run (resume, step, validate, gather, write); :func:`train` builds one
and runs it.

Under ``torchrun --nproc-per-node N`` the layers are sharded round-robin across ranks (layers never share
gradients, so a rank trains its layers exactly as one process would); rank 0 gathers every layer and
writes the outputs, and every rank checkpoints and resumes its own layers. With ``distill.device: cuda``
each rank trains on GPU ``LOCAL_RANK`` and the ranks talk over NCCL; on the CPU over gloo
(:mod:`flux2ttr.distributed`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flux2ttr.atomic import atomic_write_bytes, atomic_write_text
from flux2ttr.checkpoint import (
    CheckpointError,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)
from flux2ttr.comet_log import GuardedComet
from flux2ttr.config import Flux2TTRError, load_section, to_dict
from flux2ttr.contract import layer_sort_key
from flux2ttr.distill.readiness import Readiness
from flux2ttr.distributed import DistError
from flux2ttr.distributed import init as init_dist
from flux2ttr.provenance import source_digest
from flux2ttr.seeds import derive_seed, generator
from flux2ttr.students.artifacts import save_students
from flux2ttr.students.build import build_student
from flux2ttr.students.hkr import HKRConfig
from flux2ttr.students.layer import StudentLayer
from flux2ttr.students.losses import KendallDistillLoss
from flux2ttr.traces.loader import (
    BatchPlanner,
    PrefetchLoader,
    Split,
    StepBatch,
    TupleCache,
    layer_seed,
    read_batch,
    split_by_prompt,
)
from flux2ttr.traces.store import TraceStore, TraceStoreError

JITTER_STREAM = 0x3AD1  # separates the window-radius draws from other seeded streams
_BATCH_TENSORS = ("q_sub", "k", "v", "teacher_sub", "sigma", "cfg")


class DistillError(RuntimeError, Flux2TTRError):
    """The distill stage cannot run on its inputs (message names the file and the fix)."""


@dataclass
class DistillConfig:
    """params.yaml section ``distill``."""

    store: str = "traces/capture.zarr"  # trace store written by the capture stage
    artifact: str = "artifacts/flux2_ttr.safetensors"  # student artifact (output)
    metrics: str = "metrics/distill.json"  # dvc metrics (output); details next to it: distill_details.json
    plots_dir: str = "plots/distill"  # plot tables (one CSV per metric) and validation.png (output)
    checkpoint_dir: str = "checkpoints/distill"  # resumable checkpoints (one file per rank)
    steps: int = 300  # optimisation steps (each trains min..max_swap_layers layers)
    batch_size: int = 4  # tuples per layer per step
    lr: float = 2.0e-3  # AdamW learning rate of the student layers
    alpha_lr: float = 5.0e-2  # AdamW lr of the fusion scalars alpha_logit, alpha_gamma (no weight decay)
    warmup_steps: int = 20  # per-layer linear lr warm-up (in that layer's updates)
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1.0e-8
    grad_clip: float = 1.0  # max global grad norm per layer per update; 0 = off
    loss_lr: float = 1.0e-2  # Adam lr of the Kendall log-variances s_h, s_c
    min_swap_layers: int = 1  # layers trained per step: uniform in [min, max] (clamped to layer count)
    max_swap_layers: int = 4
    val_fraction: float = 0.2  # fraction of prompts held out for validation (whole prompts)
    val_max_tuples: int = 64  # validation tuples per layer (kept in memory)
    val_batch_size: int = 4  # tuples per validation forward
    val_every: int = 50  # validate every this many steps (and at the end)
    ema_decay: float = 0.7  # EMA of the validation cosine distance: ema = d * ema + (1 - d) * new
    window_radius_jitter: bool = True  # window students train at radii drawn from 0..window_radius (see train_step)
    readiness_threshold: float = 0.02  # ready when val cosine distance < this (cos sim > 0.98) ...
    readiness_hysteresis: float = 1.2  # ... and stays ready until it exceeds 1.2 x threshold
    min_updates: int = 100  # ... and only after this many updates of the layer
    checkpoint_every: int = 100  # steps between checkpoints (and one at the end)
    resume: bool = True  # continue from a matching checkpoint in checkpoint_dir
    seed: int = 0  # student init, data order, layer selection, validation split
    prefetch_steps: int = 4  # steps of batches read ahead of training
    reader_threads: int = 2  # threads reading the zarr store
    cache_mib: int = 1024  # decoded training tuples kept in memory (fp32 MiB; 0 = always stream from zarr)
    torch_threads: int = 1  # torch intra-op threads (0 = torch default); 1 leaves a core to the readers and
    # avoids OpenMP spin contention on a busy machine (2 threads were 5-20x slower on a shared 2-core box)
    device: str = "cpu"  # where students train ("cuda" on a GPU machine); the store is read on the CPU
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "val_max_tuples", "val_batch_size", "val_every", "checkpoint_every",
                     "prefetch_steps", "reader_threads", "min_swap_layers", "max_swap_layers"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"distill.{name} must be positive, got {getattr(self, name)}")
        if self.min_swap_layers > self.max_swap_layers:
            raise ValueError(f"distill.min_swap_layers ({self.min_swap_layers}) > max_swap_layers "
                             f"({self.max_swap_layers})")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"distill.val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"distill.ema_decay must be in [0, 1), got {self.ema_decay}")
        if min(self.lr, self.loss_lr, self.alpha_lr) <= 0:
            raise ValueError("distill.lr, distill.alpha_lr and distill.loss_lr must be positive")
        if min(self.grad_clip, self.weight_decay, self.warmup_steps, self.torch_threads, self.cache_mib) < 0:
            raise ValueError("distill.grad_clip, weight_decay, warmup_steps, torch_threads and cache_mib must be >= 0")


# ------------------------------------------------------------------------------------------ teacher check


TEACHER_IDENTITY_KEYS = ("kind", "sha256")  # what must agree: the teacher kind and its weights' hash


def expected_teacher_identity(params_path: str | Path) -> dict[str, Any]:
    """``{"kind", "sha256"}`` of the teacher the ``teacher`` params section names.

    tiny, trained: the sha256 of ``<teacher.out_dir>/flux2_tiny.safetensors`` (what capture records);
    diffusers, comfyui: ``<teacher.out_dir>/identity.json`` written by the teacher stage, else computed from
    the files. A missing teacher is a :class:`DistillError` (the store cannot be checked).
    """
    from flux2ttr.teachers import teacher as tmod  # noqa: PLC0415  (loads diffusers lazily itself)

    tcfg = load_section(tmod.TeacherConfig, "teacher", params_path)
    folder = Path(tcfg.out_dir)
    ident_file = folder / tmod.IDENTITY_FILE_NAME
    if tcfg.kind in tmod.FOLDER_KINDS:
        single = folder / tmod.SINGLE_FILE_NAME
        if single.is_file():
            return {"kind": tcfg.kind, "sha256": tmod.file_sha256(single)}
        raise DistillError(f"{single}: {tcfg.kind} teacher not found, so the trace store cannot be checked against "
                           "it; run `flux2ttr teacher` (or `dvc repro teacher`)")
    if ident_file.is_file():
        ident = json.loads(ident_file.read_text())
    elif tcfg.kind == "comfyui":
        from flux2ttr.teachers.comfyui import comfyui_identity  # noqa: PLC0415  (imports no ComfyUI)

        ident = comfyui_identity(tcfg)
    else:
        ident = tmod.diffusers_identity(tcfg)
    return {k: ident.get(k) for k in TEACHER_IDENTITY_KEYS}


def check_store(store: TraceStore, expected_teacher: dict[str, Any] | None) -> None:
    """Refuse a store without tuples or captured from another teacher (before any training).

    ``expected_teacher``: the store's ``teacher`` attribute must agree on every key of it."""
    if not store.layers or store.count() == 0:
        raise DistillError(f"{store.path}: the trace store holds no tuples; rerun `flux2ttr capture` "
                           "(check capture.layers, capture.steps and capture.budget_mib)")
    have = store.attrs.get("teacher")
    if not isinstance(have, dict):
        raise DistillError(f"{store.path}: the store records no teacher identity; recapture it with `flux2ttr capture`")
    if expected_teacher is not None:
        diff = sorted(k for k, v in expected_teacher.items() if have.get(k) != v)
        if diff:
            detail = ", ".join(f"{k}: store {have.get(k)!r} vs params {expected_teacher[k]!r}" for k in diff)
            raise DistillError(
                f"{store.path}: captured from another teacher than params.yaml names ({detail}); "
                "rerun `dvc repro capture` (or `flux2ttr capture`) for this teacher"
            )


# ------------------------------------------------------------------------------------------ training state


@dataclass
class LayerState:
    """One layer's student, loss and optimisers plus its counters."""

    student: StudentLayer
    loss: KendallDistillLoss
    opt: torch.optim.AdamW
    loss_opt: torch.optim.Adam
    key: str = ""
    updates: int = 0
    skipped_updates: int = 0  # updates not taken: no finite row, or a non-finite loss / gradient
    tuples: int = 0
    # non-finite tuples seen (train and validation), each once: (n_tokens, prompt, step, seed) -> bad fields
    nonfinite: dict[tuple[int, int, int, int], list[str]] = field(default_factory=dict)
    last_parts: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # latest validation
    ema: float | None = None

    @property
    def skipped_nonfinite(self) -> int:
        """Distinct non-finite tuples of this layer left out so far."""
        return len(self.nonfinite)


def _build_layer(key: str, cfg: DistillConfig, hkr: HKRConfig, num_heads: int) -> LayerState:
    # Init depends only on (seed, layer key): the same student whatever the rank layout.
    torch.manual_seed(derive_seed(cfg.seed, layer_seed(key)))
    student = build_student(hkr, num_heads=num_heads).to(cfg.device)
    loss = KendallDistillLoss.from_config(hkr).to(cfg.device)
    # the balance scalars get their own lr (and no weight decay): at the network lr a logit moves ~0.1/100 updates
    fusion = student.balance_parameters()
    rest = [p for p in student.parameters() if all(p is not f for f in fusion)]
    opt = torch.optim.AdamW([{"params": rest, "base_lr": cfg.lr},
                             {"params": fusion, "base_lr": cfg.alpha_lr, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)
    loss_opt = torch.optim.Adam(loss.parameters(), lr=cfg.loss_lr)
    return LayerState(student, loss, opt, loss_opt, key=key)


def finite_rows(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B]`` bool: the rows of a batch whose tensors (``q_sub, k, v, teacher_sub, sigma, cfg``) are all finite."""
    b = int(batch["q_sub"].shape[0])
    ok = torch.ones(b, dtype=torch.bool, device=batch["q_sub"].device)
    for k in _BATCH_TENSORS:
        ok &= torch.isfinite(batch[k].reshape(b, -1)).all(dim=1)
    return ok


def select_rows(batch: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows ``keep`` (bool ``[B]``) of every tensor of a batch."""
    return {k: v[keep] for k, v in batch.items()}


def _note_nonfinite(st: LayerState, batch: dict[str, torch.Tensor], ok: torch.Tensor, where: str) -> None:
    """Record the non-finite rows of ``batch`` (``ok`` False) in ``st.nonfinite``; a tuple seen for the first
    time gets one line on stderr naming it by layer, prompt, step and seed."""
    for i in (~ok).nonzero().flatten().tolist():
        key = (int(batch["k"].shape[2]), int(batch["prompt"][i]), int(batch["step"][i]), int(batch["seed"][i]))
        if key in st.nonfinite:
            continue
        fields = [k for k in _BATCH_TENSORS if not bool(torch.isfinite(batch[k][i]).all())]
        st.nonfinite[key] = fields
        _warn(f"distill: {st.key}: skipping non-finite tuple prompt {key[1]} step {key[2]} seed {key[3]} "
              f"({', '.join(fields)} not finite; n{key[0]}, {where})")


def _warn(line: str) -> None:
    from tqdm import tqdm  # noqa: PLC0415  (writes around an active progress bar)

    tqdm.write(line, file=sys.stderr)


def student_forward(student: StudentLayer, batch: dict[str, torch.Tensor], **kw: Any) -> torch.Tensor:
    """Student output ``[B, H, Nq, D]`` at the stored query positions of a batch from
    :meth:`TraceStore.read` (a head-subset batch's ``heads`` index the student's per-head parameters). Rows
    with different ``(n_cond, h, w)`` run as separate sub-batches."""
    geo = torch.stack([batch["n_cond"], batch["h"], batch["w"]], dim=1)
    uniq = torch.unique(geo, dim=0)
    out = torch.empty_like(batch["teacher_sub"])
    for g in uniq:
        rows = (geo == g).all(dim=1).nonzero().flatten()
        n_cond, h, w = (int(x) for x in g)
        sel = slice(None) if rows.numel() == geo.shape[0] else rows
        if "heads" in batch:
            kw = {**kw, "heads": batch["heads"][rows]}
        o = student(batch["q_sub"][sel], batch["k"][sel], batch["v"][sel], n_cond, batch["sigma"][sel],
                    batch["cfg"][sel], height=h, width=w, q_idx=batch["q_idx"][rows], **kw)
        out[sel] = o.to(out.dtype)
    return out


def _warmup_lr(cfg: DistillConfig, updates: int) -> float:
    if cfg.warmup_steps <= 0:
        return cfg.lr
    return cfg.lr * min(1.0, (updates + 1) / cfg.warmup_steps)


def _to(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _train_variant(st: LayerState, cfg: DistillConfig) -> dict[str, Any]:
    """Forward options of this update: a window student trains at a radius drawn from 0..window_radius
    (a pure function of seed and update count, so resume stays exact); at the capture resolution the
    configured window may hold every key and leave the kernel term nothing to learn."""
    if not (cfg.window_radius_jitter and getattr(st.student, "mode", "") == "window"):
        return {}
    top = int(st.student.config.window_radius)
    g = generator(cfg.seed, st.updates, JITTER_STREAM)
    return {"radius": int(torch.randint(0, top + 1, (1,), generator=g))}


def train_step(st: LayerState, batch: dict[str, torch.Tensor], cfg: DistillConfig) -> int:
    """One update of one layer on the finite rows of ``batch``; returns the tuples trained. Non-finite rows
    are dropped and reported once each (:func:`_note_nonfinite`); with no finite row left, or a non-finite
    loss or gradient, nothing changes, the update is counted in ``skipped_updates`` and 0 is returned."""
    batch = _to(batch, cfg.device)
    ok = finite_rows(batch)
    if not bool(ok.all()):
        _note_nonfinite(st, batch, ok, "train")
        if not bool(ok.any()):
            st.skipped_updates += 1
            return 0
        batch = select_rows(batch, ok)
    st.student.train()
    out = student_forward(st.student, batch, **_train_variant(st, cfg))
    total, parts = st.loss(out, batch["teacher_sub"])
    if not bool(torch.isfinite(total)):
        st.skipped_updates += 1
        return 0
    st.opt.zero_grad(set_to_none=True)
    st.loss_opt.zero_grad(set_to_none=True)
    total.backward()
    params = list(st.student.parameters())
    if cfg.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    loss_grads_ok = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in st.loss.parameters())
    if not bool(torch.isfinite(norm)) or not loss_grads_ok:
        st.opt.zero_grad(set_to_none=True)
        st.loss_opt.zero_grad(set_to_none=True)
        st.skipped_updates += 1
        return 0
    for g in st.opt.param_groups:
        g["lr"] = g["base_lr"] * _warmup_lr(cfg, st.updates) / cfg.lr
    st.opt.step()
    st.loss_opt.step()
    n = int(batch["q_sub"].shape[0])
    st.updates += 1
    st.tuples += n
    st.last_parts = {k: float(v) for k, v in parts.items()}
    return n


# ------------------------------------------------------------------------------------------ validation


def load_val_batches(store: TraceStore, split: Split, layer: str, cfg: DistillConfig,
                     state: LayerState | None = None) -> list[dict[str, torch.Tensor]]:
    """Up to ``val_max_tuples`` held-out tuples of ``layer`` (a seeded choice), in batches, without their
    non-finite tuples (recorded and reported in ``state`` when given)."""
    pairs = [(n, int(r)) for n, rows in split.val.get(layer, []) for r in rows]
    if not pairs:
        return []
    rng = np.random.default_rng([int(cfg.seed), layer_seed(layer), 0x7A1])
    pick = sorted(rng.permutation(len(pairs))[:cfg.val_max_tuples].tolist())
    chosen = [pairs[i] for i in pick]
    out = []
    for n in sorted({n for n, _ in chosen}):
        rows = [r for m, r in chosen if m == n]
        for s in range(0, len(rows), cfg.val_batch_size):
            b = read_batch(store, layer, n, rows[s:s + cfg.val_batch_size])
            ok = finite_rows(b)
            if not bool(ok.all()):
                if state is not None:
                    _note_nonfinite(state, b, ok, "validation")
                if not bool(ok.any()):
                    continue
                b = select_rows(b, ok)
            out.append(b)
    return out


def _finite_part(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """``b`` itself when every row is finite, else its finite rows (``None`` when there are none)."""
    ok = finite_rows(b)
    if bool(ok.all()):
        return b
    return select_rows(b, ok) if bool(ok.any()) else None


@torch.no_grad()
def validation_metrics(student: StudentLayer, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """``val_cos_dist``, ``val_cos_sim``, ``val_nmse``, ``val_p95_err`` and ``val_tuples`` over every
    ``(tuple, head, query)`` token of ``batches`` (non-finite tuples are left out, one by one)."""
    student.eval()
    cos_d, rel, is_img = [], [], []
    sq_err = sq_ref = 0.0
    tuples = 0
    device = next(student.parameters()).device
    for b in batches:
        b = _finite_part(b)
        if b is None:
            continue
        s = student_forward(student, _to(b, str(device))).cpu().double()  # metrics in fp64 on the CPU
        t = b["teacher_sub"].double()
        img = (b["q_idx"] >= b["n_cond"][:, None])[:, None, :].expand(s.shape[:3])  # [B,H,Nq] image queries
        is_img.append(img.flatten())
        cos_d.append((1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-12)).flatten())
        rel.append(((s - t).norm(dim=-1) / t.norm(dim=-1).clamp_min(1e-12)).flatten())
        sq_err += float(((s - t) ** 2).sum())
        sq_ref += float((t ** 2).sum())
        tuples += int(s.shape[0])
    if not tuples:
        return {"val_tuples": 0}
    cd, re_, img = torch.cat(cos_d), torch.cat(rel), torch.cat(is_img)
    mean_cd = float(cd.mean())
    out = {
        "val_cos_dist": mean_cd,
        "val_cos_sim": 1.0 - mean_cd,
        "val_nmse": sq_err / max(sq_ref, 1e-300),
        "val_p95_err": float(torch.quantile(re_, 0.95)),
        "val_tuples": tuples,
    }
    # text and image queries behave differently (the window student is exact on text queries)
    for name, sel in (("image", img), ("text", ~img)):
        if bool(sel.any()):
            out[f"val_{name}_cos_sim"] = 1.0 - float(cd[sel].mean())
    if getattr(student, "mode", "") == "window" and bool(img.any()):
        out["val_kernel_cos_sim"] = _image_cos_at_radius0(student, batches, device)
    return out


def _image_cos_at_radius0(student: StudentLayer, batches: list[dict[str, torch.Tensor]], device) -> float:
    """Image-query cosine with each window shrunk to the query's own tile: how well the kernel term carries
    the mass a window leaves out (at the capture resolution the full window may hold every key)."""
    cos = []
    for b in batches:
        b = _finite_part(b)
        if b is None:
            continue
        s = student_forward(student, _to(b, str(device)), radius=0).cpu().double()
        img = (b["q_idx"] >= b["n_cond"][:, None])[:, None, :].expand(s.shape[:3])
        cos.append(F.cosine_similarity(s, b["teacher_sub"].double(), dim=-1, eps=1e-12)[img])
    return float(torch.cat(cos).mean())


def quantiles(values: list[float]) -> dict[str, float]:
    """min / p25 / p50 / p75 / max of ``values`` (linear interpolation); empty -> {}."""
    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    return {"min": float(a.min()), "p25": float(np.quantile(a, 0.25)), "p50": float(np.quantile(a, 0.5)),
            "p75": float(np.quantile(a, 0.75)), "max": float(a.max())}


def pareto_frontier(layer_metrics: dict[str, dict[str, Any]]) -> float:
    """``ready_layers * (1 - worst ready cosine distance)``; 0 when no layer is ready."""
    ready = [m["val_cos_dist"] for m in layer_metrics.values() if m.get("ready") and "val_cos_dist" in m]
    return float(len(ready) * (1.0 - max(ready))) if ready else 0.0


# ------------------------------------------------------------------------------------------ checkpoints


def _fingerprint(cfg: DistillConfig, hkr: HKRConfig, store: TraceStore, layers: list[str], rank: int,
                 world: int) -> str:
    """What must match for a checkpoint to be resumed: everything that shapes the weights (not the step
    count, I/O, validation size or readiness rules, which may change between a run and its resume)."""
    skip = {"steps", "resume", "progress", "checkpoint_every", "val_every", "artifact", "metrics", "plots_dir",
            "checkpoint_dir", "prefetch_steps", "reader_threads", "cache_mib", "torch_threads", "val_max_tuples",
            "val_batch_size", "ema_decay", "readiness_threshold", "readiness_hysteresis", "min_updates", "device"}
    train = {k: v for k, v in to_dict(cfg).items() if k not in skip}
    blob = json.dumps({"distill": train, "hkr": to_dict(hkr), "store": store.attrs, "layers": layers,
                       "rank": rank, "world": world, "code": _code_digest()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _code_digest() -> str:
    """sha256 of the modules that shape training: a code change (what makes DVC rerun the stage)
    never resumes from a checkpoint of the old code."""
    return source_digest(("flux2ttr.students.hkr", "flux2ttr.students.losses", "flux2ttr.traces.loader", __name__))


def checkpoint_path(cfg: DistillConfig, rank: int, world: int) -> Path:
    return Path(cfg.checkpoint_dir) / f"distill-rank{rank}-of{world}.safetensors"


def _save_ckpt(path: Path, step: int, states: dict[str, LayerState], plan_state: dict[str, Any],
               readiness: Readiness, history: list[dict[str, Any]], fingerprint: str) -> None:
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    layers_meta = {}
    for key, st in states.items():
        for name, t in st.student.state_dict().items():
            tensors[f"model.{key}.{name}"] = t
        for name, t in st.loss.state_dict().items():
            tensors[f"loss.{key}.{name}"] = t
        t_opt, m_opt = optimizer_to_flat(st.opt, f"opt.{key}")
        t_lopt, m_lopt = optimizer_to_flat(st.loss_opt, f"lossopt.{key}")
        tensors.update(t_opt)
        tensors.update(t_lopt)
        layers_meta[key] = {"opt": m_opt, "loss_opt": m_lopt, "updates": st.updates,
                            "skipped_updates": st.skipped_updates, "tuples": st.tuples,
                            "nonfinite": [[*k, *v] for k, v in sorted(st.nonfinite.items())],
                            "last_parts": st.last_parts, "metrics": st.metrics, "ema": st.ema}
    header = {"step": step, "fingerprint": fingerprint, "plan": plan_state, "readiness": readiness.state_dict(),
              "history": history, "layers": layers_meta}
    save_checkpoint(path, tensors, header)


def _load_ckpt(path: Path, states: dict[str, LayerState], readiness: Readiness) -> tuple[int, dict, list]:
    tensors, header = load_checkpoint(path)
    for key, st in states.items():
        meta = header["layers"].get(key)
        if meta is None:
            raise CheckpointError(f"{path}: no state for layer {key}")
        st.student.load_state_dict({n: tensors[f"model.{key}.{n}"] for n in st.student.state_dict()}, strict=True)
        st.loss.load_state_dict({n: tensors[f"loss.{key}.{n}"] for n in st.loss.state_dict()}, strict=True)
        optimizer_from_flat(st.opt, f"opt.{key}", tensors, meta["opt"])
        optimizer_from_flat(st.loss_opt, f"lossopt.{key}", tensors, meta["loss_opt"])
        st.updates = int(meta["updates"])
        st.skipped_updates = int(meta["skipped_updates"])
        for n, p, s, seed, *fields in meta["nonfinite"]:  # union: validation may have found some already
            st.nonfinite.setdefault((int(n), int(p), int(s), int(seed)), list(fields))
        st.tuples = int(meta["tuples"])
        st.last_parts = dict(meta["last_parts"])
        st.metrics = dict(meta["metrics"])
        st.ema = meta["ema"]
    readiness.load_state_dict(header["readiness"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(header["step"]), header["plan"], list(header["history"])


# ------------------------------------------------------------------------------------------ outputs


PLOT_METRICS = ("val_cos_dist", "val_cos_dist_ema", "val_nmse", "val_p95_err")
CURVES_PNG = "validation.png"  # in plots_dir: one panel per PLOT_METRICS entry, one line per layer


def details_path(metrics_path: str | Path) -> Path:
    """Where the details of a metrics file go: ``metrics/distill.json`` -> ``metrics/distill_details.json``
    (next to it, not a DVC metric)."""
    p = Path(metrics_path)
    return p.with_name(f"{p.stem}_details.json")


def plot_rows(history: list[dict[str, Any]], layers: list[str], metric: str) -> list[tuple[int, str, float]]:
    """``(step, layer, value)`` of ``metric`` for every validated layer and step: steps ascending, layers in
    ``layers`` order (a layer not validated at a step has no row)."""
    order = {k: i for i, k in enumerate(layers)}
    rows = {(int(r["step"]), r["layer"]): float(r[metric]) for r in history
            if metric in r and r.get(metric) is not None and r["layer"] in order}
    return [(s, k, v) for (s, k), v in sorted(rows.items(), key=lambda kv: (kv[0][0], order[kv[0][1]]))]


def write_plots(plots_dir: Path, history: list[dict[str, Any]], layers: list[str]) -> list[Path]:
    """One long-format CSV per metric, ``step, layer, <metric>`` (the metric column last: DVC plots take
    it as y), so the tables and their DVC plot definition do not depend on the teacher's layers; then the
    same curves as a PNG (:func:`write_curves_png`)."""
    written = []
    for metric in PLOT_METRICS:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["step", "layer", metric])
        for s, k, v in plot_rows(history, layers, metric):
            w.writerow([s, k, f"{v:.6g}"])
        path = plots_dir / f"{metric}.csv"
        atomic_write_text(path, buf.getvalue())
        written.append(path)
    written.append(write_curves_png(plots_dir / CURVES_PNG, history, layers))
    return written


def write_curves_png(path: Path, history: list[dict[str, Any]], layers: list[str]) -> Path:
    """The validation curves as one PNG (matplotlib Agg, written atomically): a panel per metric of
    :data:`PLOT_METRICS`, x = step, one line per layer (log y where every value is positive). Up to 12
    layers get a legend; more are coloured in layer order with a colour bar."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    many = len(layers) > 12
    cmap = plt.get_cmap("viridis" if many else "tab10" if len(layers) <= 10 else "tab20")
    colour = {k: cmap(i / max(1, len(layers) - 1) if many else i) for i, k in enumerate(layers)}
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4), dpi=100, sharex=True, layout="constrained")
    for ax, metric in zip(axes.flat, PLOT_METRICS):
        rows = plot_rows(history, layers, metric)
        for key in layers:
            pts = [(s, v) for s, k, v in rows if k == key]
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", markersize=3, linewidth=1.2,
                        color=colour[key], label=key)
        if rows and all(v > 0 for _, _, v in rows):
            ax.set_yscale("log")
        ax.set_title(metric, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    if many:
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(0, len(layers) - 1))
        bar = fig.colorbar(sm, ax=axes, fraction=0.03)
        bar.ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        bar.set_label(f"layer, in order ({layers[0]} .. {layers[-1]})")
    elif layers:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle("distill: validation per layer (held-out prompts)", fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def distill_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics of a run (numbers only, a few): ``ready`` layers, the worst layer's validation
    cosine distance ``cos_dist.max`` and the stage's wall ``seconds``. Everything else (every layer's
    figures, counters, the non-finite tuples) is in the details file (:func:`details_path`)."""
    out: dict[str, Any] = {"ready": int(summary["ready_layers"])}
    if "max" in summary.get("val_cos_dist", {}):
        out["cos_dist"] = {"max": float(summary["val_cos_dist"]["max"])}
    out["seconds"] = round(float(summary["stage_seconds"]), 1)
    return out


def summary_lines(layer_metrics: dict[str, dict[str, Any]], threshold: float,
                  nonfinite: dict[str, list[list[int]]] | None = None) -> list[str]:
    """One line per layer, a line listing the non-finite tuples left out (``nonfinite``: ``{layer:
    [[prompt, step, seed], ...]}``; none, no line) and a final line with ready layers and cosine-distance
    quantiles."""
    lines = []
    for key in sorted(layer_metrics, key=layer_sort_key):
        m = layer_metrics[key]
        cd = m.get("val_cos_dist")
        lines.append(
            f"  {key:<18} {'READY' if m.get('ready') else 'not ready':<9} "
            f"cos_sim {('%.4f' % (1 - cd)) if cd is not None else 'n/a':>7}  cos_dist "
            f"{('%.4f' % cd) if cd is not None else 'n/a':>7}  nmse {m.get('val_nmse', float('nan')):.4f}  "
            f"p95_err {m.get('val_p95_err', float('nan')):.3f}  updates {m.get('updates', 0)}  "
            f"nonfinite {m.get('skipped_nonfinite', 0)}  "
            + (f"gamma {m['gamma_mean']:.4f}  kernel cos {m.get('val_kernel_cos_sim', float('nan')):.4f}"
               if "gamma_mean" in m else f"alpha {m.get('alpha', float('nan')):.4f}")
        )
    if nonfinite:
        n_bad = sum(len(v) for v in nonfinite.values())
        listed = "; ".join(f"{k} " + ", ".join(f"p{p}/s{s}/seed{seed}" for p, s, seed in v)
                           for k, v in sorted(nonfinite.items(), key=lambda kv: layer_sort_key(kv[0])))
        lines.append(f"distill: left out {n_bad} non-finite tuple(s) (prompt/step/seed): {listed}")
    dists = [m["val_cos_dist"] for m in layer_metrics.values() if "val_cos_dist" in m]
    q = quantiles(dists)
    n_ready = sum(1 for m in layer_metrics.values() if m.get("ready"))
    qs = " ".join(f"{k} {v:.4f}" for k, v in q.items()) if q else "n/a"
    lines.append(f"distill: {n_ready}/{len(layer_metrics)} layers ready (cos_dist < {threshold:g}); "
                 f"cos_dist {qs}")
    return lines


# ------------------------------------------------------------------------------------------ comet


class _Comet(GuardedComet):
    """Distill's Comet metrics on top of :class:`~flux2ttr.comet_log.GuardedComet` (never stops training)."""

    def __init__(self, params_path: Path | None, train_config: dict[str, Any]) -> None:
        super().__init__(params_path, "distill", train_config)

    def validation(self, step: int, layer_metrics: dict[str, dict[str, Any]]) -> None:
        flat: dict[str, float] = {}
        for key, m in layer_metrics.items():
            for name in ("val_cos_dist", "val_cos_sim", "val_nmse", "val_p95_err", "val_cos_dist_ema",
                         "alpha_sigmoid", "gamma_mean", "log_var_huber", "log_var_cosine", "train_loss"):
                if name in m and m[name] is not None:
                    flat[f"{key}/{name}"] = float(m[name])
            flat[f"{key}/ready"] = float(bool(m.get("ready")))
        flat["ready_layers"] = float(sum(1 for m in layer_metrics.values() if m.get("ready")))
        flat["pareto_frontier"] = pareto_frontier(layer_metrics)
        self.call("log_metrics", flat, step=step, force=True)
        for name in ("val_cos_dist", "val_nmse", "val_p95_err"):
            vals = [float(m[name]) for m in layer_metrics.values() if name in m]
            if vals:
                self.call("log_quantiles", name, vals, step=step, force=True)

    def artifact(self, path: Path) -> None:
        self.call("log_asset", path)

    def end(self) -> None:
        self.call("end")


# ------------------------------------------------------------------------------------------ main loop


@dataclass
class DistillResult:
    """What :func:`train` and :meth:`DistillTrainer.train` return. ``layer_metrics``, ``ready`` and
    ``students`` cover every layer on every rank (gathered); only rank 0 writes the outputs."""

    layer_metrics: dict[str, dict[str, Any]]
    summary: dict[str, Any]
    students: dict[str, StudentLayer]
    ready: dict[str, bool]
    steps_run: int
    resumed_from: int


def _layer_report(st: LayerState, ready: bool) -> dict[str, Any]:
    m = dict(st.metrics)
    m.update({
        "ready": bool(ready),
        "updates": st.updates,
        "skipped_nonfinite": st.skipped_nonfinite,
        "skipped_updates": st.skipped_updates,
        "tuples_trained": st.tuples,
        **st.student.report(),
        "log_var_huber": float(st.loss.s_h.detach()),
        "log_var_cosine": float(st.loss.s_c.detach()),
    })
    if st.ema is not None:
        m["val_cos_dist_ema"] = st.ema
    if st.last_parts:
        m["train_loss"] = st.last_parts.get("total")
    return m


@dataclass
class GatheredRun:
    """Every rank's part of a finished run, collected by :meth:`DistillTrainer.gather`.

    ``students``: every layer's student on every rank (the rank's own layers are its live modules, the
    others received copies); ``history``: the validation rows of all ranks, rank order; ``counts``: per rank
    ``tuples_trained`` (this run), ``train_seconds`` (wall seconds inside :meth:`DistillTrainer.step`),
    ``cache_hits`` and ``cache_misses`` (tuples served by the in-memory cache / read from zarr),
    ``verify_seconds`` (hashing the store's files before training) and ``nonfinite`` (``{layer:
    [[prompt, step, seed], ...]}``, the non-finite tuples left out)."""

    students: dict[str, StudentLayer]
    history: list[dict[str, Any]]
    counts: list[dict[str, Any]]


class DistillTrainer:
    """One distillation run: the store, this rank's layer states, the data plan and readiness.

    Use as a context manager (it owns the torch.distributed process group when it created it)::

        with DistillTrainer(cfg, hkr, expected_teacher=ident) as trainer:
            trainer.try_resume()
            result = trainer.train()

    :meth:`train` runs the loop (steps, validations, checkpoints) and then :meth:`gather`,
    :meth:`summary` and :meth:`write`; these and :meth:`step` / :meth:`validate` can also be driven
    one by one. Under torchrun every rank must make the same calls: :meth:`validate` and :meth:`gather`
    are collectives.
    """

    def __init__(self, cfg: DistillConfig, hkr: HKRConfig, *, expected_teacher: dict[str, Any] | None,
                 params_path: Path | None = None) -> None:
        """Open and check the store, split it by prompt and build this rank's layers (nothing is trained).

        ``expected_teacher``: the identity the params name; the store must agree on every key of it
        (``None`` skips that comparison). ``params_path``: where the ``comet`` section is read (rank 0).
        Raises :class:`DistillError` on a store that cannot be trained from."""
        self.t_start = time.perf_counter()
        self.cfg, self.hkr, self.params_path = cfg, hkr, params_path
        if cfg.torch_threads:
            torch.set_num_threads(int(cfg.torch_threads))
        try:
            self.store = TraceStore.open(cfg.store)
        except TraceStoreError as e:
            raise DistillError(str(e)) from None
        check_store(self.store, expected_teacher)
        try:
            self.split: Split = split_by_prompt(self.store, cfg.val_fraction, cfg.seed)
        except ValueError as e:
            raise DistillError(str(e)) from None
        self.all_layers: list[str] = self.store.layers
        no_train = [k for k in self.all_layers if not self.split.train.get(k)]
        if no_train:
            raise DistillError(f"{self.store.path}: layer(s) {no_train} have no training tuples after holding out "
                               f"prompts {self.split.val_prompts}; capture more prompts or lower distill.val_fraction")
        shapes = self.store.shapes(self.all_layers[0], self.store.groups(self.all_layers[0])[0][0])
        _, _, head_dim = shapes["q_sub"]
        self.num_heads = self.store.teacher_heads()  # a head-subset store holds fewer per tuple
        if head_dim != hkr.head_dim:
            raise DistillError(f"{self.store.path}: stored head_dim {head_dim} != hkr.head_dim {hkr.head_dim} "
                               "in params.yaml")

        try:
            self.dist = init_dist(cfg.device)
        except DistError as e:
            raise DistillError(str(e)) from None
        self.rank, self.world = self.dist.rank, self.dist.world
        try:
            self._build()
        except BaseException:
            self.close()  # a failed setup must not leave the process group behind
            raise

    def _build(self) -> None:
        cfg, rank, world = self.cfg, self.rank, self.world
        self.layers: list[str] = self.all_layers[rank::world]  # this rank's layers (round-robin)
        if not self.layers:
            raise DistillError(f"torchrun world size {world} > {len(self.all_layers)} layers; use fewer processes")
        try:  # every shard this rank can read, hashed once up front: a damaged store fails before step 1
            self.store_check = self.store.verify(layers=self.layers)
        except TraceStoreError as e:
            raise DistillError(str(e)) from None
        # built in layer order: each one reseeds torch (derive_seed), so the RNG state after this is fixed
        self.states: dict[str, LayerState] = {k: _build_layer(k, cfg, self.hkr, self.num_heads) for k in self.layers}
        self.readiness = Readiness(self.layers, threshold=cfg.readiness_threshold,
                                   hysteresis=cfg.readiness_hysteresis, min_updates=cfg.min_updates)
        self.planner = BatchPlanner({k: self.split.train[k] for k in self.layers}, batch_size=cfg.batch_size,
                                    min_layers=cfg.min_swap_layers, max_layers=cfg.max_swap_layers, seed=cfg.seed)
        self.fingerprint = _fingerprint(cfg, self.hkr, self.store, self.layers, rank, world)
        self.checkpoint = checkpoint_path(cfg, rank, world)
        self.start = 0  # step this run began at (> 0 after a resume)
        self.steps_done = 0  # steps trained so far, resumed ones included
        self.plan_state: dict[str, Any] = self.planner.state_dict()  # plan position after steps_done
        self.history: list[dict[str, Any]] = []  # one row per (validation, layer) of this rank
        self.last_metrics: dict[str, dict[str, Any]] | None = None  # every layer's report at the last validation
        self.last_val = -1  # step of that validation
        self.t_train = 0.0  # seconds spent in step() this run
        self.tuples_trained = 0  # tuples of finite updates this run
        self.cache = TupleCache(cfg.cache_mib * 2**20) if cfg.cache_mib > 0 else None
        # validation tuples: a seeded numpy choice read once (no torch RNG, so it may come before a resume)
        self.val = {k: load_val_batches(self.store, self.split, k, cfg, self.states[k]) for k in self.layers}
        self.train_config = {"distill": to_dict(cfg), "store": str(cfg.store), "val_prompts": self.split.val_prompts,
                             "train_prompts": len(self.split.train_prompts), "world_size": world}
        self._comet: _Comet | None = None
        self._trained = False

    # --- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Destroy the process group if this trainer created it (idempotent). No barrier: after an
        error on one rank a barrier would hang the others."""
        self.dist.close()

    def __enter__(self) -> DistillTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def comet(self) -> _Comet:
        """The Comet logger, opened on first use (rank 0 reads ``params_path``; other ranks log nothing)."""
        if self._comet is None:
            self._comet = _Comet(self.params_path if self.rank == 0 else None, self.train_config)
        return self._comet

    # --- checkpoint -----------------------------------------------------------------------------
    def try_resume(self) -> bool:
        """Continue from this rank's checkpoint when ``cfg.resume`` is set and it was made by this setup
        (:func:`_fingerprint`) at a step <= ``cfg.steps``; restores weights, optimisers, counters,
        readiness, history, the plan position and the torch RNG state. Another setup's checkpoint is
        ignored with a message (it is overwritten later); a corrupt one raises :class:`CheckpointError`."""
        if self.steps_done != self.start:
            raise RuntimeError("DistillTrainer.try_resume() must come before the first step")
        if not (self.cfg.resume and self.checkpoint.is_file()):
            return False
        _, head = load_checkpoint(self.checkpoint)
        if head.get("fingerprint") != self.fingerprint or int(head.get("step", 0)) > self.cfg.steps:
            if self.rank == 0:
                print(f"distill: {self.checkpoint} is from another setup or a longer run; starting over",
                      file=sys.stderr)
            return False
        self.start, plan_state, self.history = _load_ckpt(self.checkpoint, self.states, self.readiness)
        self.planner.load_state_dict(plan_state)
        self.steps_done, self.plan_state = self.start, self.planner.state_dict()
        if self.rank == 0:
            print(f"distill: resuming from step {self.start} ({self.checkpoint})", file=sys.stderr)
        return True

    def save_checkpoint(self) -> None:
        """Write this rank's state at ``steps_done`` (torch RNG state included)."""
        _save_ckpt(self.checkpoint, self.steps_done, self.states, self.plan_state, self.readiness, self.history,
                   self.fingerprint)

    # --- training -------------------------------------------------------------------------------
    def step(self, step_batch: StepBatch) -> int:
        """Train one prefetched step (one update per layer in it, in the planner's layer order);
        returns the tuples trained (the finite ones: non-finite tuples are dropped, see :func:`train_step`)."""
        t0 = time.perf_counter()
        n = 0
        for key, batch in step_batch.batches.items():
            n += train_step(self.states[key], batch, self.cfg)
        self.t_train += time.perf_counter() - t0
        self.tuples_trained += n
        self.steps_done, self.plan_state = step_batch.step + 1, step_batch.plan_state
        return n

    def validate(self) -> dict[str, dict[str, Any]]:
        """Validate this rank's layers at ``steps_done``: metrics, EMA, readiness and a history row per
        layer; returns every rank's layer report (:func:`_layer_report`), merged (a collective)."""
        cfg, step = self.cfg, self.steps_done
        for key, st in self.states.items():
            m = validation_metrics(st.student, self.val[key])
            st.metrics = m
            if "val_cos_dist" in m:
                st.ema = m["val_cos_dist"] if st.ema is None else (
                    cfg.ema_decay * st.ema + (1.0 - cfg.ema_decay) * m["val_cos_dist"])
            self.readiness.update(key, m.get("val_cos_dist"), st.updates)
            row = {"step": step, "layer": key,
                   **{n: m[n] for n in ("val_cos_dist", "val_nmse", "val_p95_err") if n in m}}
            if st.ema is not None:
                row["val_cos_dist_ema"] = st.ema
            self.history.append(row)
        local = {k: _layer_report(st, self.readiness.ready[k]) for k, st in self.states.items()}
        merged: dict[str, dict[str, Any]] = {}
        for part in self.dist.all_gather_json(local):
            merged.update(part)
        if self.rank == 0:
            self.comet.validation(step, merged)
        self.last_metrics, self.last_val = merged, step
        return merged

    def final_metrics(self) -> dict[str, dict[str, Any]]:
        """Every layer's report at ``steps_done``: the last validation's, validating first when none ran
        at this step (a collective then)."""
        if self.last_metrics is None or self.last_val != self.steps_done:
            return self.validate()
        return self.last_metrics

    def ready(self) -> dict[str, bool]:
        """Readiness of every layer at ``steps_done`` (store order)."""
        merged = self.final_metrics()
        return {k: bool(merged[k]["ready"]) for k in self.all_layers}

    # --- outputs --------------------------------------------------------------------------------
    def gather(self) -> GatheredRun:
        """Collect every layer's student, the validation history and the run counters of all ranks
        (a collective; flat parameter vectors are broadcast from each layer's owner, no pickle)."""
        students: dict[str, StudentLayer] = {}
        for i, key in enumerate(self.all_layers):
            if self.world == 1:
                students[key] = self.states[key].student
                continue
            owner = i % self.world
            holder = (self.states[key].student if owner == self.rank
                      else _build_layer(key, self.cfg, self.hkr, self.num_heads).student)
            flat = torch.nn.utils.parameters_to_vector(holder.parameters()).detach().clone()
            flat = self.dist.broadcast_tensor(flat, src=owner)  # through the group's device (GPU under NCCL)
            torch.nn.utils.vector_to_parameters(flat, holder.parameters())
            students[key] = holder
        history = [r for part in self.dist.all_gather_json(self.history) for r in part]
        counts = self.dist.all_gather_json({"tuples_trained": self.tuples_trained, "train_seconds": self.t_train,
                                   "cache_hits": self.cache.hits if self.cache else 0,
                                   "cache_misses": self.cache.misses if self.cache else 0,
                                   "verify_seconds": self.store_check["seconds"],
                                   "nonfinite": {k: sorted([p, s, seed] for _, p, s, seed in st.nonfinite)
                                                 for k, st in self.states.items() if st.nonfinite}})
        return GatheredRun(students=students, history=history, counts=counts)

    def summary(self, gathered: GatheredRun) -> dict[str, Any]:
        """The ``summary`` block of ``metrics/distill_details.json`` (:func:`distill_metrics` takes the DVC
        metrics from it): readiness, cosine-distance quantiles, the Pareto frontier, step counts, tuples
        and seconds of this run (slowest rank), reader cache counts,
        ``stage_seconds`` since the trainer was created, the split sizes, the non-finite tuples left out
        (``skipped_nonfinite`` their count, ``nonfinite_tuples`` ``{layer: [[prompt, step, seed], ...]}``)
        and ``store_verify_seconds`` (slowest rank)."""
        cfg, merged = self.cfg, self.final_metrics()
        ready = self.ready()
        dists = [m["val_cos_dist"] for m in merged.values() if "val_cos_dist" in m]
        sims = [m["val_cos_sim"] for m in merged.values() if "val_cos_sim" in m]
        counts = gathered.counts
        total_tuples = sum(c["tuples_trained"] for c in counts)
        train_seconds = max(c["train_seconds"] for c in counts)
        bad: dict[str, list] = {}
        for c in counts:
            bad.update(c["nonfinite"])
        return {
            "layers": len(self.all_layers),
            "ready_layers": sum(ready.values()),
            "readiness_threshold": cfg.readiness_threshold,
            "val_cos_sim_mean": float(np.mean(sims)) if sims else None,
            "val_cos_dist": quantiles(dists),
            "pareto_frontier": pareto_frontier(merged),
            "steps": self.steps_done,
            "resumed_from": self.start,
            "skipped_nonfinite": int(sum(m.get("skipped_nonfinite", 0) for m in merged.values())),
            "skipped_updates": int(sum(m.get("skipped_updates", 0) for m in merged.values())),
            "nonfinite_tuples": {k: bad[k] for k in self.all_layers if k in bad},
            "tuples_trained_this_run": int(total_tuples),
            "train_seconds_this_run": round(train_seconds, 3),
            "tuples_per_s_trained": round(total_tuples / train_seconds, 3) if train_seconds > 0 else None,
            "reader_cache_hits": int(sum(c["cache_hits"] for c in counts)),  # tuples served from memory
            "reader_cache_misses": int(sum(c["cache_misses"] for c in counts)),  # tuples read from zarr
            "stage_seconds": round(time.perf_counter() - self.t_start, 3),
            "store_verify_seconds": round(max(c["verify_seconds"] for c in counts), 3),
            "val_prompts": len(self.split.val_prompts),
            "train_prompts": len(self.split.train_prompts),
            "world_size": self.world,
        }

    def write(self, gathered: GatheredRun, summary: dict[str, Any]) -> None:
        """Rank 0: the student artifact, the metrics JSON (:func:`distill_metrics`) and its details file
        (``{"summary": summary, "layers": {layer: report}}``), the plot tables and PNG, the Comet artifact
        and the summary lines on stdout. Other ranks write nothing."""
        if self.rank != 0:
            return
        cfg, merged = self.cfg, self.final_metrics()
        metrics_ser = {k: merged[k] for k in self.all_layers}
        save_students(cfg.artifact, gathered.students, self.hkr, num_heads=self.num_heads, ready=self.ready(),
                      metrics=metrics_ser, train_config=self.train_config, teacher=self.store.attrs["teacher"])
        atomic_write_text(Path(cfg.metrics), json.dumps(distill_metrics(summary), indent=2, sort_keys=True) + "\n")
        atomic_write_text(details_path(cfg.metrics), json.dumps({"summary": summary, "layers": metrics_ser},
                                                                indent=2, sort_keys=True) + "\n")
        write_plots(Path(cfg.plots_dir), gathered.history, self.all_layers)
        self.comet.artifact(Path(cfg.artifact))
        self.comet.end()
        for line in summary_lines(merged, cfg.readiness_threshold, summary["nonfinite_tuples"]):
            print(line)

    def train(self, stop_after: int | None = None) -> DistillResult:
        """Train to ``cfg.steps`` (validating every ``val_every`` and checkpointing every
        ``checkpoint_every`` steps), validate at the end if that step was not validated, checkpoint,
        gather and write the outputs. ``stop_after`` ends this run after that many steps *of this run*
        (the checkpoint stays resumable, outputs are still written). Runs once per trainer."""
        if self._trained:
            raise RuntimeError("DistillTrainer.train() runs once per trainer; build a new one to continue")
        self._trained = True
        cfg = self.cfg
        stop = cfg.steps if stop_after is None else min(cfg.steps, self.start + int(stop_after))
        _ = self.comet  # opened before the bar, so its messages come first
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm import tqdm  # noqa: PLC0415

            # under DVC stderr is a log file: update it every few seconds, not on every step
            bar = tqdm(total=cfg.steps, initial=self.start, desc="distill", unit="step", dynamic_ncols=True,
                       mininterval=0.1 if sys.stderr.isatty() else 5.0)
        with PrefetchLoader(self.store, self.planner, stop_step=stop, prefetch_steps=cfg.prefetch_steps,
                            reader_threads=cfg.reader_threads, cache=self.cache) as loader:
            for sb in loader:
                self.step(sb)
                if self.steps_done % cfg.val_every == 0:
                    self.validate()
                if self.steps_done % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if bar is not None:
                    bar.update(1)
                    loss = np.mean([s.last_parts.get("total", np.nan) for s in self.states.values()])
                    bar.set_postfix(ready=sum(self.readiness.ready.values()), loss=f"{loss:.3f}")
        if bar is not None:
            bar.close()
        merged = self.final_metrics()
        self.save_checkpoint()
        gathered = self.gather()
        summary = self.summary(gathered)
        self.write(gathered, summary)
        return DistillResult(layer_metrics=merged, summary=summary, students=gathered.students, ready=self.ready(),
                             steps_run=self.steps_done - self.start, resumed_from=self.start)


def train(
    cfg: DistillConfig,
    hkr: HKRConfig,
    *,
    expected_teacher: dict[str, Any] | None,
    params_path: Path | None = None,
    stop_after: int | None = None,
) -> DistillResult:
    """Run the distillation described by ``cfg`` (resuming when it can) and write its outputs (rank 0).

    ``expected_teacher``: the identity the params name; the store must agree on every key of it
    (``None`` skips that comparison). ``stop_after`` ends this run after that many steps *of this
    run* (the checkpoint stays resumable, outputs are still written): for tests and time-boxed runs.
    """
    with DistillTrainer(cfg, hkr, expected_teacher=expected_teacher, params_path=params_path) as trainer:
        trainer.try_resume()
        return trainer.train(stop_after=stop_after)
