"""Routing FLUX.2 attention to flux2ttr students inside ComfyUI.

Everything the ``Flux2TTRController`` node does lives here; the node only declares its inputs.
ComfyUI is never imported at module level: the patch talks to ComfyUI through what it hands over
(a ``ModelPatcher``, ``transformer_options``, wrapper executors), and ``comfy.patcher_extension`` is
imported inside :func:`patch_model` only.

How a sampling run is routed:

- :func:`patch_model` clones the MODEL and puts a :class:`RoutingHolder` into the clone's
  ``transformer_options`` together with :func:`attention_override` as ComfyUI's
  ``optimized_attention_override`` and two wrappers: OUTER_SAMPLE (a fresh holder copy per run,
  like ``comfy_extras/nodes_easycache.py``), DIFFUSION_MODEL (the text length, latent grid, guidance
  and sigma of the current denoiser call: sigma and guidance are read to the host here, once per
  denoiser call, so no attention call waits on the GPU).
- Every attention call of the run comes to :func:`attention_override` with ``q, k, v [B, H, N, D]``
  (after QK-norm and RoPE) and ``block_type``/``block_index`` (the layer key). The step is found
  from the denoiser call's sigma in the run's schedule (``sample_sigmas``); the first call of a step
  decides the step's mask (which layers run their student) and logs one line; every later call of
  the step, cond and uncond alike, reuses it. Layers outside the mask, and non-ready layers always, call
  the native attention (fail-closed: so does any call the student cannot take: an attention mask, a
  token count that is not text + latent grid + reference tokens, a shape it was not built for).
- Reference images (ComfyUI's ``ReferenceLatent``: FLUX.2 appends their latents as extra tokens after
  the latent grid, ``transformer_options["reference_image_num_tokens"]`` lists their counts): the call is
  handed to the student as ``[conditioning, references, latent grid]`` with the references counted as
  conditioning, so every query sees them exactly (:func:`reference_layout`), and its output is put back
  in ComfyUI's order.
- Non-finite student outputs never reach the image (fail-closed at run time, see :func:`checked_run`
  for the design and its cost): each routed call records an on-device "all finite" flag, the OUTER_SAMPLE
  wrapper reads the run's flags once after it, and a layer whose student output had a NaN/inf is turned
  native and the run is sampled again (counted in ``fallbacks`` under :data:`NONFINITE`, logged in the step
  log).
- The students run in the model's device and dtype: :class:`StudentCopies` makes those copies once per
  patched MODEL, device and dtype (outside inference mode, see there) and every run of that MODEL
  shares them; they are freed with the patched MODEL, never kept by a global.
- The number of leading conditioning tokens is ``img_slice[0]`` (single blocks) or the text length,
  unless ``transformer_options`` carries a hint (:data:`COND_TOKEN_HINTS`, as upstream's node accepts).
- A measurement mode (``controller_node(..., measure=True)``) keeps native attention everywhere and
  records, per layer, the cosine similarity between the student's and the native output: the online
  side of the offline-vs-online check (:func:`cosine_table`, :func:`online_vs_offline` against the
  artifact's ``val_cos_sim``).
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from flux2ttr.contract import comfy_key, layer_sort_key, model_layer_keys, reference_token_order
from flux2ttr.seeds import generator

LOG = logging.getLogger("flux2ttr.comfy")

HOLDER_KEY = "flux2ttr"        # transformer_options key of the per-run RoutingHolder
WRAPPER_KEY = "flux2ttr"       # key of our wrappers on the ModelPatcher
POLICY_MODES = ("stochastic", "threshold")
# transformer_options keys that give the number of leading conditioning tokens (first present wins)
COND_TOKEN_HINTS = ("conditioning_token_count", "cond_token_count", "prefix_token_count")
# fallback reason of every call of a layer whose student output was not finite in this run
NONFINITE = "non-finite student output"


class ArtifactMismatch(ValueError):
    """An artifact does not fit the model or the other artifact; the message says what and how to fix."""


@dataclass(frozen=True)
class PatchConfig:
    """Routing numbers of the ComfyUI patch (the node has no params.yaml; these are its defaults).

    ``no_controller_cut``: without a controller, every ready layer runs its student when
    ``quality_speed >= no_controller_cut`` and none does below it.
    """

    no_controller_cut: float = 0.5


# --------------------------------------------------------------------------------------------------
# the per-run state


@dataclass
class CallInfo:
    """What the DIFFUSION_MODEL wrapper saw of the current denoiser call."""

    n_txt: int          # conditioning tokens (the context length ComfyUI passes, 512 for FLUX.2)
    height: int         # latent image-token grid (FLUX.2 patch size is 1: the latent's h, w)
    width: int
    guidance: float | None
    sigma: float | None = None   # this call's sigma (read once here, not per attention call)


def _inference_copy(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` in ``device``/``dtype``, for inference, its parameters normal (non-inference) tensors.

    ComfyUI runs the whole prompt under ``torch.inference_mode()``: a module copied or moved there gets
    inference tensors (no version counter, no in-place update outside inference mode), which code that
    keeps modules across runs or caches on parameter versions cannot use. So the copy is made with
    inference mode off; it needs no autograd either (``requires_grad`` off)."""
    with torch.inference_mode(False), torch.no_grad():
        params = list(module.parameters())
        if params and all(p.device == device and p.dtype == dtype and not p.is_inference() for p in params):
            return module.eval()
        out = copy.deepcopy(module)
        out.__dict__.pop("_fast_cache", None)  # kernel-layout weights of the source, never of the copy
        out = out.to(device=device, dtype=dtype).eval()
        out.requires_grad_(False)
    return out


class StudentCopies:
    """The students in the device and dtype the model runs in, made once per (layer, device, dtype).

    One instance belongs to one patched MODEL (the :class:`RoutingHolder` in its ``transformer_options``
    holds it, and every run's fresh holder shares it), so the GPU copies are built at the first routed
    call of the first run and reused by every later run; they are freed when ComfyUI drops the patched
    MODEL (a run's holder lets go of them when the run ends: :meth:`RoutingHolder.end_run`)."""

    def __init__(self, students: dict[str, torch.nn.Module]) -> None:
        self.students = students
        self._copies: dict[tuple[str, str, torch.dtype], torch.nn.Module] = {}
        self.made = 0  # copies built so far (once per layer, device and dtype: tests check it)

    def get(self, key: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        ck = (key, str(device), dtype)
        module = self._copies.get(ck)
        if module is None:
            module = _inference_copy(self.students[key], device, dtype)
            self._copies[ck] = module
            self.made += 1
        return module

    def __len__(self) -> int:
        return len(self._copies)

    def modules(self) -> list[torch.nn.Module]:
        return list(self._copies.values())

    def nbytes(self) -> int:
        """Bytes of the copies' parameters (on whatever device they live)."""
        return sum(p.numel() * p.element_size() for m in self._copies.values() for p in m.parameters())

    def clear(self) -> None:
        self._copies.clear()


@dataclass
class RoutingHolder:
    """Routing configuration plus the state of one sampling run.

    ``students``: layer key -> student module (CPU master copies); ``ready``: keys allowed to route;
    ``decide(step, sigma, cfg, height, width) -> (frozenset of student-routed keys, threshold or None)``
    picks a step's mask (``height``/``width``: latent tokens); ``copies``: the students in the model's
    device and dtype, shared by the configuration and every run made from it.
    The run fields (``schedule`` .. ``cosine``, ``disabled``, ``reruns``) are filled during sampling;
    :meth:`fresh` copies the configuration with empty run state, which the OUTER_SAMPLE wrapper does for
    every run.
    """

    students: dict[str, torch.nn.Module]
    ready: frozenset[str]
    decide: Callable[[int, float, float, int, int], tuple[frozenset[str], float | None]]
    measure: bool = False
    previous_override: Callable | None = None
    label: str = ""
    # run state
    schedule: list[float] | None = None
    call: CallInfo | None = None
    sampler_cfg: float | None = None
    masks: dict[int, frozenset[str]] = field(default_factory=dict)
    log_lines: list[str] = field(default_factory=list)
    routed_calls: Counter = field(default_factory=Counter)     # (step, key, "student"|"native") -> calls
    fallbacks: Counter = field(default_factory=Counter)        # reason -> calls sent native against the mask
    cosine: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    copies: StudentCopies | None = None
    # non-finite guard (checked_run; checked_denoiser_call outside a run): layer -> step its student output
    # was first non-finite (the layer runs native from then on); runs (or lone denoiser calls) computed again
    # because of one; the on-device "all finite" flags of the run's (or call's) student outputs, in call order
    disabled: dict[str, int] = field(default_factory=dict)
    reruns: int = 0
    finite_flags: list[tuple[str, int, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        if self.copies is None:
            self.copies = StudentCopies(self.students)

    def fresh(self) -> "RoutingHolder":
        """A copy with the same students/controller, the same device copies and empty run state."""
        if self.copies is None:
            raise RuntimeError("flux2ttr: fresh() of a holder whose run has ended")
        return RoutingHolder(students=self.students, ready=self.ready, decide=self.decide, measure=self.measure,
                             previous_override=self.previous_override, label=self.label, copies=self.copies)

    def student(self, key: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        """The student of ``key`` in the model's device and dtype (made once per patched MODEL)."""
        if self.copies is None:
            raise RuntimeError("flux2ttr: this sampling run has ended; its holder no longer holds students")
        return self.copies.get(key, device, dtype)

    def end_run(self) -> None:
        """Let go of the device copies (the run is over; a finished holder stays inspectable)."""
        self.copies = None

    def step_of(self, sigma: float) -> int:
        """0-based step whose interval ``(schedule[i+1], schedule[i]]`` holds ``sigma``."""
        sched = self.schedule
        if not sched or len(sched) < 2:
            return 0
        tol = 1e-6 * max(1.0, abs(sigma))
        step = 0
        for i in range(len(sched) - 1):
            if sched[i] >= sigma - tol:
                step = i
        return step

    def mask_for(self, step: int, sigma: float) -> frozenset[str]:
        """The step's mask: decided by the first call of the step, then shared by every call."""
        if step not in self.masks:
            cfg = self.cfg()
            h, w = (self.call.height, self.call.width) if self.call is not None else (0, 0)
            keys, threshold = self.decide(step, sigma, cfg, h, w)
            mask = frozenset(keys) & self.ready  # fail-closed: never a non-ready layer
            self.masks[step] = mask
            thr = "-" if threshold is None else f"{threshold:.4f}"
            line = (f"flux2ttr{(' ' + self.label) if self.label else ''} step {step}: sigma={sigma:.4f} "
                    f"threshold={thr} students={sorted(mask, key=layer_sort_key)}")
            self.log_lines.append(line)
            LOG.info(line)
        return self.masks[step]

    def disable(self, key: str, step: int, how: str) -> None:
        """``key``'s student gave a non-finite output at ``step``: native for it for the rest of the run."""
        self.disabled[key] = step
        line = (f"flux2ttr{(' ' + self.label) if self.label else ''} step {step}: {key} student output is not "
                f"finite (NaN/inf); native attention for {key} for the rest of the run ({how})")
        self.log_lines.append(line)
        LOG.warning(line)

    def cfg(self) -> float:
        """The guidance the students were distilled with: the model's guidance input, else the sampler cfg."""
        if self.call is not None and self.call.guidance is not None:
            return self.call.guidance
        return float(self.sampler_cfg) if self.sampler_cfg is not None else 1.0


# --------------------------------------------------------------------------------------------------
# the hooks ComfyUI calls


def _native(holder: RoutingHolder | None, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    if holder is not None and holder.previous_override is not None:
        return holder.previous_override(func, *args, **kwargs)
    return func(*args, **kwargs)


def _as_native_layout(out: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Student output ``[B, H, N, D]`` in the layout ComfyUI's attention returns (``[B, N, H*D]``
    unless ``skip_output_reshape``)."""
    if kwargs.get("skip_output_reshape", False):
        return out
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def _host_floats(*values: Any) -> list[float | None]:
    """The first element of each value as a Python float (``None`` stays ``None``), with one device->host
    copy for all tensor values that share a device: each copy of a CUDA tensor waits for the GPU."""
    out: list[float | None] = [None if v is None else (None if isinstance(v, torch.Tensor) else float(v))
                               for v in values]
    tensors = [(i, v) for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
    by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for i, t in tensors:
        by_device[t.device].append((i, t))
    for group in by_device.values():
        firsts = torch.stack([t.detach().reshape(-1)[0].float() for _, t in group])
        for (i, _), x in zip(group, firsts.tolist()):
            out[i] = float(x)
    return out


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on ``t``'s device: True when every value of ``t`` is finite (no host sync).

    Computed as ``isfinite(sum(t))`` with an fp32 (fp64 for fp64) accumulator, one reduction kernel: a NaN
    or inf anywhere makes the sum non-finite, so it never misses one; it also says False for an output so
    large that its sum overflows (~3e38), which only sends that layer native. Measured on an H200 (bf16
    ``[1, N, 6144]``): 43 / 68 / 206 us at 4,608 / 16,896 / 66,048 tokens, against 122 / 395 / 1,438 us for
    ``isfinite(t).all()`` (which writes a bool tensor first)."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.isfinite(t.sum(dtype=acc))


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of ``a`` and ``b`` (``[B, H, N, D]``) over every (row, head, token),
    computed in float64 along ``D``: the per-query figure a student's validation reports."""
    a64, b64 = a.double(), b.double()
    cos = torch.nn.functional.cosine_similarity(a64, b64, dim=-1, eps=1e-12)
    return float(cos.mean())


def attention_override(func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
    """ComfyUI's ``optimized_attention_override``: ``func`` is the native attention, ``args`` are
    ``(q, k, v, heads)`` with ``q, k, v [B, H, N, D]`` (``skip_reshape=True`` in FLUX.2)."""
    topts = kwargs.get("transformer_options") or {}
    holder: RoutingHolder | None = topts.get(HOLDER_KEY)
    if holder is None or len(args) < 3 or not kwargs.get("skip_reshape", False):
        return _native(holder, func, args, kwargs)
    block_type, block_index = topts.get("block_type"), topts.get("block_index")
    if block_type not in ("single", "double") or block_index is None:
        return _native(holder, func, args, kwargs)
    # sigma comes from the DIFFUSION_MODEL wrapper (read once per denoiser call): reading
    # transformer_options["sigmas"] here would wait on the GPU at every attention call
    if holder.call is None or holder.call.sigma is None:
        holder.fallbacks["no denoiser call info"] += 1
        return _native(holder, func, args, kwargs)
    sigma = holder.call.sigma
    key = comfy_key(block_type, block_index)
    step = holder.step_of(sigma)
    routed = key in holder.mask_for(step, sigma)
    if routed and key in holder.disabled and not holder.measure:
        holder.fallbacks[NONFINITE] += 1
        holder.routed_calls[(step, key, "native")] += 1
        return _native(holder, func, args, kwargs)
    if key not in holder.students or not (routed or holder.measure):
        holder.routed_calls[(step, key, "native")] += 1
        return _native(holder, func, args, kwargs)

    q, k, v = args[0], args[1], args[2]
    reason = _cannot_route(holder, topts, q, kwargs)
    if reason:
        holder.fallbacks[reason] += 1
        holder.routed_calls[(step, key, "native")] += 1
        return _native(holder, func, args, kwargs)
    n_cond = _n_cond(holder, topts)
    n_grid = holder.call.height * holder.call.width
    n_ref = q.shape[2] - n_cond - n_grid  # reference-image tokens after the grid (_cannot_route checked the sum)
    student = holder.student(key, q.device, q.dtype)
    with torch.inference_mode():
        if n_ref:
            qs, ks, vs = (reference_layout(t, n_cond, n_grid) for t in (q, k, v))
            out = student(qs, ks, vs, n_cond + n_ref, sigma, holder.cfg(), height=holder.call.height,
                          width=holder.call.width)
            out = comfy_layout(out, n_cond, n_grid)
        else:
            out = student(q, k, v, n_cond, sigma, holder.cfg(), height=holder.call.height, width=holder.call.width)
    if holder.measure:
        native = _native(holder, func, args, kwargs)
        native_bhnd = native if kwargs.get("skip_output_reshape", False) else \
            native.reshape(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)
        holder.cosine[key].append(token_cosine(out, native_bhnd))
        holder.routed_calls[(step, key, "native")] += 1
        return native
    res = _as_native_layout(out.to(q.dtype), kwargs)
    finite = all_finite(res)  # on device: no wait on the GPU here
    if holder.finite_flags is not None:  # inside checked_denoiser_call: read once after the forward
        holder.finite_flags.append((key, step, finite))
    elif not bool(finite):  # called outside the DIFFUSION_MODEL wrapper: check now (one host read)
        holder.disable(key, step, "checked at the call")
        holder.fallbacks[NONFINITE] += 1
        holder.routed_calls[(step, key, "native")] += 1
        return _native(holder, func, args, kwargs)
    holder.routed_calls[(step, key, "student")] += 1
    return res


_ORDERS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _orders(n_cond: int, n_grid: int, n_ref: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~flux2ttr.contract.reference_token_order` on ``device`` and its inverse (made once per shape)."""
    key = (n_cond, n_grid, n_ref, str(device))
    hit = _ORDERS.get(key)
    if hit is None:
        if len(_ORDERS) > 64:
            _ORDERS.clear()
        idx = reference_token_order(n_cond, n_grid, n_ref)
        inv = torch.empty_like(idx)
        inv[idx] = torch.arange(idx.numel())
        hit = _ORDERS[key] = (idx.to(device), inv.to(device))
    return hit


def reference_layout(t: torch.Tensor, n_cond: int, n_grid: int) -> torch.Tensor:
    """``t [B, H, N, D]`` in ComfyUI's order ``[conditioning, latent grid, references]`` -> the student's
    ``[conditioning, references, latent grid]`` (a copy; references are the ``N - n_cond - n_grid`` tokens
    after the grid; the order the trace store keeps too, :func:`~flux2ttr.contract.reference_token_order`)."""
    return t.index_select(2, _orders(n_cond, n_grid, t.shape[2] - n_cond - n_grid, t.device)[0])


def comfy_layout(t: torch.Tensor, n_cond: int, n_grid: int) -> torch.Tensor:
    """The inverse of :func:`reference_layout`: ``[conditioning, references, grid]`` -> ComfyUI's order."""
    return t.index_select(2, _orders(n_cond, n_grid, t.shape[2] - n_cond - n_grid, t.device)[1])


def reference_tokens(topts: dict) -> int:
    """Reference-image tokens ComfyUI appended after the latent grid (``reference_image_num_tokens``)."""
    counts = topts.get("reference_image_num_tokens") or ()
    return sum(int(c) for c in counts)


def cond_token_hint(topts: dict) -> int | None:
    """The conditioning-token count a ``transformer_options`` hint gives (:data:`COND_TOKEN_HINTS`, the
    first present wins), ``None`` without one. A hint must be a non-negative integer (an int, or a
    one-element tensor: keep it on the CPU, a CUDA one is read with a wait on the GPU); anything else
    raises ``ValueError`` naming the key."""
    for name in COND_TOKEN_HINTS:
        value = topts.get(name)
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
                raise ValueError(f"transformer_options[{name!r}] must be one integer, got a tensor "
                                 f"{tuple(value.shape)} {value.dtype}")
            value = int(value.reshape(-1)[0])
        elif isinstance(value, bool):
            raise ValueError(f"transformer_options[{name!r}] must be an integer, got {value!r}")
        elif not isinstance(value, int):
            try:
                value = operator.index(value)  # numpy integers
            except TypeError:
                raise ValueError(f"transformer_options[{name!r}] must be an integer, got {value!r}") from None
        if value < 0:
            raise ValueError(f"transformer_options[{name!r}] must be >= 0, got {value}")
        return int(value)
    return None


def _n_cond(holder: RoutingHolder, topts: dict) -> int:
    """Conditioning tokens: a hint in ``transformer_options`` (:func:`cond_token_hint`), else
    ``img_slice[0]`` where ComfyUI passes it (single blocks), else the text length."""
    hint = cond_token_hint(topts)
    if hint is not None:
        return hint
    img_slice = topts.get("img_slice")
    if img_slice is not None:
        return int(img_slice[0])
    return int(holder.call.n_txt)


def _cannot_route(holder: RoutingHolder, topts: dict, q: torch.Tensor, kwargs: dict) -> str:
    """Why this call must stay native ('' when the student can take it)."""
    if kwargs.get("mask") is not None:
        return "attention mask"
    if holder.call is None:
        return "no denoiser call info"
    try:
        n_cond = _n_cond(holder, topts)
    except ValueError as e:
        return f"bad conditioning-token hint: {e}"
    if q.shape[2] != n_cond + holder.call.height * holder.call.width + reference_tokens(topts):
        return "token count is not text + latent grid + reference tokens"
    return ""


def diffusion_model_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """DIFFUSION_MODEL wrapper: record the text length, latent grid, guidance and sigma of this call.

    ComfyUI calls it as ``(x [B, C, h, w], timestep, context [B, T, C], y, guidance, ref_latents,
    control, transformer_options)``. Sigma (``transformer_options["sigmas"]``, else the timestep) and
    guidance are read to the host together: one wait on the GPU per denoiser call (one per step with
    cond and uncond batched, as ComfyUI does), none per attention call. Rows of one call share sigma.
    Inside a sampling run the students' finiteness is checked once at its end (:func:`checked_run`);
    called on its own, each denoiser call checks its own (:func:`checked_denoiser_call`).
    """
    topts = args[7] if len(args) > 7 and isinstance(args[7], dict) else kwargs.get("transformer_options", {})
    holder: RoutingHolder | None = topts.get(HOLDER_KEY) if isinstance(topts, dict) else None
    if holder is not None:
        x = args[0]
        context = args[2] if len(args) > 2 else kwargs.get("context")
        guidance = args[4] if len(args) > 4 else kwargs.get("guidance")
        sigmas = topts.get("sigmas")
        if sigmas is None:
            sigmas = args[1] if len(args) > 1 else kwargs.get("timestep")
        sigma, g = _host_floats(sigmas, guidance)
        if holder.schedule is None and topts.get("sample_sigmas") is not None:
            holder.schedule = [float(s) for s in topts["sample_sigmas"].flatten().tolist()]
        holder.call = CallInfo(n_txt=int(context.shape[1]), height=int(x.shape[-2]), width=int(x.shape[-1]),
                               guidance=g, sigma=sigma)
        if holder.finite_flags is not None:  # the OUTER_SAMPLE wrapper checks them once, after the run
            return executor(*args, **kwargs)
        return checked_denoiser_call(holder, executor, args, kwargs)
    return executor(*args, **kwargs)


def _first_nonfinite(flags: list[tuple[str, int, torch.Tensor]]) -> tuple[str, int] | None:
    """The first (in call order) ``(layer, step)`` whose flag says "not finite"; one host read for all."""
    if not flags:
        return None
    device = flags[0][2].device
    ok = torch.stack([f.to(device) for _, _, f in flags]).tolist()
    return next(((key, step) for (key, step, _), good in zip(flags, ok) if not good), None)


def checked_denoiser_call(holder: RoutingHolder, executor: Callable, args: tuple, kwargs: dict) -> Any:
    """One denoiser call whose student outputs are all finite, for a denoiser called outside a sampling
    run (inside one, :func:`checked_run` does the same once per run, with one host read in all).

    Design: every routed attention call appends :func:`all_finite` of its output (a bool tensor on the
    model's device, no host sync) to ``holder.finite_flags``; after the forward this function reads all
    of the call's flags in one device->host copy. If a student output was not finite, the *first* such
    layer in execution order (later ones may only have seen its NaNs) is disabled for the rest of the run
    (native attention, each call counted in ``holder.fallbacks[NONFINITE]``; ``holder.disabled`` keeps the
    step; one line in the step log), the call's routing counts are rolled back, and the denoiser call is
    computed again; repeated until no student output is non-finite. The result is exactly what the run
    would have produced with those layers native from the start of that call.

    Cost: per routed attention call, one on-device reduction over the output (one read of ``[B, N, H*D]``;
    on an H200 in bf16 with 6144 channels 0.04 / 0.2 ms at 4,608 / 66,048 tokens); here one more host read
    per denoiser call.
    """
    counts = (Counter(holder.routed_calls), Counter(holder.fallbacks))

    def roll_back() -> None:
        holder.routed_calls, holder.fallbacks = Counter(counts[0]), Counter(counts[1])

    return _until_finite(holder, lambda: executor(*args, **kwargs), roll_back, "denoiser call computed again")


def _until_finite(holder: RoutingHolder, attempt: Callable[[], Any], before_retry: Callable[[], None],
                  how: str) -> Any:
    """``attempt()`` with ``holder.finite_flags`` collecting its student outputs' flags, read once after it;
    while one was not finite: disable the first such layer (``how`` goes into the log line), call
    ``before_retry()`` and attempt again. The flags the caller had are restored afterwards."""
    outer = holder.finite_flags
    while True:
        holder.finite_flags = []
        try:
            out = attempt()
            bad = _first_nonfinite(holder.finite_flags)
        finally:
            holder.finite_flags = outer
        if bad is None:
            return out
        if bad[0] in holder.disabled:  # cannot happen (a disabled layer never runs its student): never loop
            raise RuntimeError(f"flux2ttr: {bad[0]} ran its student after it was disabled")
        before_retry()
        holder.reruns += 1
        holder.disable(*bad, how)


def checked_run(holder: RoutingHolder, executor: Callable, args: tuple, kwargs: dict) -> Any:
    """One sampling run whose student outputs were all finite: the run-time half of "a NaN artifact never
    samples silently" (the load-time half: the artifact loaders refuse non-finite tensors).

    Every routed attention call appends :func:`all_finite` of its output (a bool tensor on the model's
    device, no host sync) to ``holder.finite_flags``; after the run all flags are read in one device->host
    copy. If a student output was not finite, the *first* such layer in execution order (later ones may only
    have seen its NaNs) is disabled (native attention, each call counted in ``holder.fallbacks[NONFINITE]``;
    ``holder.disabled`` keeps the step; one line in the step log), the run's routing counts are reset and the
    whole run is sampled again from the same inputs; repeated until no student output is non-finite. The
    result is exactly the run with those layers native throughout.

    Cost: per routed attention call, one on-device reduction over the output (one read of ``[B, N, H*D]``:
    on an H200 in bf16 with 6144 channels 0.04 / 0.2 ms at 4,608 / 66,048 tokens, 2.4 / 11.6 ms per step
    with students on 56 layers, about 0.5% / 0.1% of a routed FLUX.2-dev step at 1024² / 4096²); per run,
    one host read. With the sigma read of each denoiser call that makes one host synchronisation per step
    and one per run, none per attention call. Only when a student went non-finite: the run once more, at
    most once per ready layer (a disabled layer never runs its student again in that run).
    """
    # the sampler must see the same inputs again if a run has to be repeated
    pristine = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    inputs = args

    def reset() -> None:
        nonlocal inputs
        inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in pristine]
        holder.routed_calls, holder.fallbacks = Counter(), Counter()
        holder.cosine.clear()

    return _until_finite(holder, lambda: executor(*inputs, **kwargs), reset, "sampling run computed again")


def outer_sample_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """OUTER_SAMPLE wrapper: a fresh holder for this run (masks, logs, casts), dropped at the end.

    ``args`` are ``(noise, latent_image, sampler, sigmas, ...)`` of ``CFGGuider.outer_sample``.
    """
    import comfy.model_patcher  # lazily: ComfyUI is only importable inside ComfyUI  # noqa: PLC0415

    guider = executor.class_obj
    orig_options = guider.model_options
    try:
        guider.model_options = comfy.model_patcher.create_model_options_clone(orig_options)
        topts = guider.model_options["transformer_options"]
        holder: RoutingHolder = topts[HOLDER_KEY].fresh()
        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        if sigmas is not None:
            holder.schedule = [float(s) for s in sigmas.flatten().tolist()]
        holder.sampler_cfg = getattr(guider, "cfg", None)
        topts[HOLDER_KEY] = holder
        _LAST_RUNS.append(holder)
        del _LAST_RUNS[:-_KEEP_RUNS]
        try:
            return checked_run(holder, executor, args, kwargs)
        finally:
            holder.end_run()  # the finished holder (kept in _LAST_RUNS) must not keep the device copies
    finally:
        guider.model_options = orig_options


# the last few runs' holders, for tests and the measurement mode (finished holders stay inspectable; they
# hold the CPU students and the run logs, never the device copies)
_KEEP_RUNS = 8
_LAST_RUNS: list[RoutingHolder] = []


def last_runs() -> list[RoutingHolder]:
    """Holders of the most recent sampling runs (oldest first)."""
    return list(_LAST_RUNS)


def cosine_table(holder: RoutingHolder) -> dict[str, float]:
    """Per-layer mean cosine (student vs native) recorded by a ``measure=True`` run."""
    return {key: sum(v) / len(v) for key, v in sorted(holder.cosine.items(), key=lambda kv: layer_sort_key(kv[0]))
            if v}


# --------------------------------------------------------------------------------------------------
# building the patch


def patch_model(model: Any, holder: RoutingHolder) -> Any:
    """A clone of ComfyUI ``ModelPatcher`` ``model`` routed by ``holder``; ``model`` is untouched."""
    import comfy.patcher_extension  # noqa: PLC0415

    patched = model.clone()
    topts = patched.model_options.setdefault("transformer_options", {})
    holder.previous_override = topts.get("optimized_attention_override")
    topts[HOLDER_KEY] = holder
    topts["optimized_attention_override"] = attention_override
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                 diffusion_model_wrapper)
    return patched


@dataclass(frozen=True)
class ModelShape:
    """What the artifacts are checked against: the FLUX.2 transformer inside a ComfyUI MODEL."""

    num_heads: int
    head_dim: int
    layers: tuple[str, ...]   # attention layer keys in execution order


def model_shape(model: Any) -> ModelShape:
    """Heads, head_dim and layer keys of the FLUX.2 diffusion model inside ComfyUI ``model``."""
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    params = getattr(dm, "params", None)
    if dm is None or params is None or not hasattr(dm, "single_blocks") or not hasattr(dm, "double_blocks"):
        raise ArtifactMismatch("Flux2TTRController: the MODEL is not a FLUX.2 transformer (no double_blocks/"
                               "single_blocks); load a FLUX.2 model with UNETLoader")
    num_heads = int(params.num_heads)
    head_dim = int(params.hidden_size) // num_heads
    layers = tuple(model_layer_keys(len(dm.double_blocks), len(dm.single_blocks)))
    return ModelShape(num_heads=num_heads, head_dim=head_dim, layers=layers)


def no_controller_policy(ready: frozenset[str], quality_speed: float,
                         config: PatchConfig = PatchConfig()) -> Callable[..., tuple[frozenset[str], float]]:
    """Routing without a controller: every ready layer above the ``quality_speed`` cut, none below.
    The logged threshold is the cut."""
    keys = ready if quality_speed >= config.no_controller_cut else frozenset()

    def decide(step: int, sigma: float, cfg: float, height: int, width: int) -> tuple[frozenset[str], float]:
        return keys, config.no_controller_cut

    return decide


def build_holder(students: dict[str, torch.nn.Module], ready: set[str] | frozenset[str],
                 decide: Callable[..., tuple[frozenset[str], float | None]], *,
                 measure: bool = False, label: str = "") -> RoutingHolder:
    """A :class:`RoutingHolder` for ``students`` (layer key -> module); only keys in ``ready`` that have
    a student can ever route (fail-closed)."""
    ready = frozenset(k for k in ready if k in students)
    return RoutingHolder(students=dict(students), ready=ready, decide=decide, measure=measure, label=label)


def validate_inputs(quality_speed: float, policy_mode: str, seed: int) -> None:
    """The node's scalar inputs, with errors that name the input."""
    if not isinstance(quality_speed, (int, float)) or not 0.0 <= float(quality_speed) <= 1.0 \
            or math.isnan(float(quality_speed)):
        raise ValueError(f"Flux2TTRController: quality_speed must be in [0, 1], got {quality_speed!r}")
    if policy_mode not in POLICY_MODES:
        raise ValueError(f"Flux2TTRController: policy_mode must be one of {POLICY_MODES}, got {policy_mode!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Flux2TTRController: seed must be a non-negative integer, got {seed!r}")


def load_students_for(model: Any, student_path: str | Path) -> tuple[Any, ModelShape]:
    """Load the student artifact and check it against the MODEL: head count and head_dim of the
    teacher, and that every layer it holds exists in the model (feature_dim comes from its header and
    is checked against its own tensors by the loader)."""
    from flux2ttr.students.artifacts import ArtifactError, NonFiniteArtifactError, load_students  # noqa: PLC0415

    shape = model_shape(model)
    try:
        art = load_students(student_path, expect_head_dim=shape.head_dim, expect_num_heads=shape.num_heads)
    except NonFiniteArtifactError as e:  # a NaN/inf tensor: never sample with it
        raise ArtifactMismatch(f"Flux2TTRController: student artifact is unusable: {e}") from None
    except ArtifactError as e:
        raise ArtifactMismatch(f"Flux2TTRController: student artifact does not fit this model: {e}") from None
    unknown = sorted(set(art.layers) - set(shape.layers), key=layer_sort_key)
    if unknown:
        raise ArtifactMismatch(
            f"Flux2TTRController: {student_path}: layer(s) {unknown} do not exist in this model (it has "
            f"{len(shape.layers)} attention layers: {shape.layers[0]} .. {shape.layers[-1]}); the artifact was "
            "distilled from another FLUX.2 variant")
    return art, shape


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step's stochastic mask: it depends on (seed, step) only, so a mask never
    depends on how many calls came before it."""
    return generator(seed, step)


def controller_policy(controller_path: str | Path, student_path: str | Path, art: Any, shape: ModelShape,
                      quality_speed: float, policy_mode: str, seed: int) -> Callable[..., tuple[frozenset[str], float]]:
    """Routing by a trained controller: per step, logits from (sigma, cfg, latent height, width) over the
    layer order it was trained for; only ready layers are eligible (the others always run full).

    ``threshold``: a ready layer runs its student iff ``sigmoid(logit) < threshold_for(quality_speed)``;
    ``stochastic``: one Bernoulli draw per eligible layer with ``p_full = sigmoid(logit - logit(quality_speed))``
    from :func:`step_generator`. Checks: the layer order equals the student artifact's layers and the
    recorded student hash equals ``student_path``'s.
    """
    from flux2ttr.routing.controller import (  # noqa: PLC0415
        ControllerArtifactError,
        NonFiniteControllerError,
        load_controller,
        sample_mask,
        threshold_for,
    )
    from flux2ttr.students.artifacts import file_sha256  # noqa: PLC0415

    order = sorted(art.layers, key=layer_sort_key)
    try:
        controller, layer_keys = load_controller(controller_path, expect_layers=order,
                                                 expect_student_sha256=file_sha256(student_path))
    except NonFiniteControllerError as e:  # a NaN/inf weight: every layer would run its student
        raise ArtifactMismatch(f"Flux2TTRController: controller artifact is unusable: {e}") from None
    except ControllerArtifactError as e:
        raise ArtifactMismatch(f"Flux2TTRController: controller artifact does not fit: {e}") from None
    if controller.cfg.use_prompt_embedding:
        raise ArtifactMismatch(f"Flux2TTRController: {controller_path} needs a pooled prompt embedding "
                               "(use_prompt_embedding), which this node does not provide; use a controller "
                               "trained without it")
    eligible = [k for k in layer_keys if art.ready.get(k, False)]
    cols = [layer_keys.index(k) for k in eligible]
    threshold = threshold_for(quality_speed)

    def decide(step: int, sigma: float, cfg: float, height: int, width: int) -> tuple[frozenset[str], float]:
        if not cols:
            return frozenset(), threshold
        with torch.inference_mode():
            logits = controller(torch.tensor([sigma]), torch.tensor([cfg]), torch.tensor([float(height)]),
                                torch.tensor([float(width)]))[0, cols]
            if policy_mode == "threshold":
                full = torch.sigmoid(logits.float()) >= threshold
            else:
                full = sample_mask(logits, generator=step_generator(seed, step), quality_speed=quality_speed)
        return frozenset(k for k, f in zip(eligible, full.tolist()) if not f), threshold

    return decide


def controller_node(model: Any, student_path: str | Path, controller_path: str | Path | None, *,
                    quality_speed: float, policy_mode: str, seed: int, measure: bool = False,
                    config: PatchConfig = PatchConfig()) -> Any:
    """What ``Flux2TTRController`` does: validate, load the artifacts, return the patched clone."""
    validate_inputs(quality_speed, policy_mode, seed)
    # ComfyUI runs nodes under torch.inference_mode(): modules built there hold inference tensors, which
    # outlive this prompt in ComfyUI's cache; load the artifacts as ordinary tensors.
    with torch.inference_mode(False):
        art, shape = load_students_for(model, student_path)
        ready = frozenset(k for k, r in art.ready.items() if r)
        if controller_path is None:
            decide = no_controller_policy(ready, float(quality_speed), config)
        else:
            decide = controller_policy(controller_path, student_path, art, shape, float(quality_speed),
                                       policy_mode, int(seed))
    mode = policy_mode if controller_path is not None else "no-controller"
    holder = build_holder(art.layers, ready, decide, measure=measure, label=f"{Path(student_path).name} {mode}")
    return patch_model(model, holder)


OFFLINE_COSINE_METRIC = "val_cos_sim"   # what the distill stage stores per layer in the student header


def online_vs_offline(holder: RoutingHolder, metrics: dict[str, dict[str, Any]],
                      metric: str = OFFLINE_COSINE_METRIC) -> dict[str, tuple[float, float | None]]:
    """``{layer: (online cosine measured in ComfyUI, offline validation cosine from the artifact)}`` for a
    ``measure=True`` run; both are means over (row, head, query token) of the cosine along ``D``."""
    table = cosine_table(holder)
    out = {}
    for key, online in table.items():
        off = metrics.get(key, {}).get(metric)
        out[key] = (online, None if off is None else float(off))
    return out
