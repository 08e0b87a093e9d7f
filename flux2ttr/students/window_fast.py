"""Dispatch to the fused Triton inference forward of :class:`flux2ttr.students.window.WindowLayer`.

The eager forward in :mod:`flux2ttr.students.window` is the reference and the CPU path; it asks
:func:`fast_path_reason` (``None``: the kernels can run this call) and then calls :func:`fast_forward`.
The fast path runs CUDA bf16/fp16 inference (``eval()``, no autograd) with all queries (no ``q_idx``); it is
switched off by ``hkr.fast_path: false`` or ``FLUX2TTR_FAST_PATH=0``. Kernels: :mod:`flux2ttr.students.window_kernels`.

With ``text_query_keys: all`` the text rows are plain softmax over every key: by default
(``KernelConfig.text_sdpa``) ``scaled_dot_product_attention`` runs them on a side stream beside the kernels;
with ``text_sdpa=False`` (and under the CPU interpreter) the main pass's own text programs do.

Numerics: matrix products on 16-bit operands with fp32 accumulation (like FlashAttention), statistics,
normalisation and the complement sums fp32; the relative error to the fp32 eager forward is ~1e-3
(``benchmarks/bench_gpu_window.py``, ``tests/students/test_window_gpu.py``).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass

import torch

# shared with the HKR fast path: the same switch, dtypes, Triton probes and kernel layout of a FeatureMLP
from flux2ttr.students.fast_path import (  # noqa: F401 - ENV_SWITCH and FAST_DTYPES are public here too
    ENV_SWITCH,
    FAST_DTYPES,
    _mlp_tensors,
    _pow2,
    interpreting,
    triton_available,
)
from flux2ttr.students.fast_path import (
    _launch as _direct_launch,
)

# Tests set this to run the kernels on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1).
ALLOW_CPU_INTERPRETER = False
MAX_HEAD_DIM = 128  # q [BLOCK_M, D] and the [BLOCK_M, D] fp32 accumulator live in registers
MAX_FEATURES = 128  # padded feature width FP: [FP, D] fp32 window sums and [BLOCK_M, FP] features in registers
MAX_HIDDEN = 256  # padded hidden width: computed in KernelConfig.mlp_chunk-wide chunks
UNAVAILABLE: dict[tuple, str] = {}  # (device, D, HID, FP) -> why the kernels could not be built
LAST_LAUNCH: dict = {}  # compiled kernels and the block plan of the latest call (benchmarks read them)


@dataclass(frozen=True)
class KernelConfig:
    """Launch shapes of the two passes (H100/H200: one 8-warp program per SM, ~2 waves of key programs)."""

    block_m: int = 128  # query slots per main program (whole tiles, or part of one tile)
    block_n: int = 64  # keys per online-softmax step (128: the [BM, BN] scores leave no registers to spare)
    warps: int = 8  # main pass: two warpgroups share the 128 query rows
    stages: int = 3  # software pipelining depth of the key/value loads (~150 KB of shared memory)
    feature_block_n: int = 128  # tokens per step of the feature pass
    feature_warps: int = 8
    feature_stages: int = 3  # one MLP per program, its weights resident in shared memory (hidden <= mlp_chunk); ~196 KB
    feature_stages_chunked: int = 1  # wider MLPs re-read chunked weights: >1 would multi-buffer them too
    feature_chunk: int = 64  # features per [FC, D] fp32 window-sum accumulator (power of two, >= 16)
    programs_per_sm: int = 2  # feature pass: the tokens of a head are split so ~this many programs run per SM
    mlp_chunk: int = 128  # hidden units per chunk of the feature MLP (power of two)
    fuse_sums: bool = True  # window kernel sums inside the softmax loop (one pass over V); only when FP <= feature_chunk
    fast_math: bool = True  # SiLU through tanh.approx (one MUFU op); off under the interpreter
    # text_query_keys "all": the text rows are plain softmax over every key; True: SDPA runs them on a side
    # stream while the image programs run (the kernel's text programs are ~40% of its work; 12-15% faster
    # alone on an H200, bench_gpu_window). False: the kernel's own text programs (what the CPU interpreter runs)
    text_sdpa: bool = True


KERNEL = KernelConfig()








def _widths(cfg) -> tuple[int, int]:
    """(HID, FP): the feature MLP's hidden and output widths padded to powers of two (>= 16 for tl.dot)."""
    return _pow2(max(16, cfg.hidden_dim)), _pow2(max(16, cfg.feature_dim))


def _needs_grad(layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return q.requires_grad or k.requires_grad or v.requires_grad or any(p.requires_grad for p in layer.parameters())


def fast_path_reason(layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why this call must use the eager forward, or ``None`` if the fused kernels can run it.

    ``q, k, v [B, H, N, D]`` as for :meth:`WindowLayer.forward` without ``q_idx`` (shapes already checked
    there). CPU tensors pass only under Triton's interpreter with ``ALLOW_CPU_INTERPRETER`` set (tests)."""
    cfg = layer.config
    if not getattr(cfg, "fast_path", True):
        return "disabled by hkr.fast_path"
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"disabled by {ENV_SWITCH}=0"
    if layer.training:
        return "layer is in training mode"
    if _needs_grad(layer, q, k, v):
        return "autograd is recording (the fused kernels have no backward)"
    if not (q.is_cuda or (ALLOW_CPU_INTERPRETER and interpreting())):
        return "inputs are not on a CUDA device"
    if not (q.device == k.device == v.device):
        return "q, k, v on different devices"
    if q.dtype not in FAST_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype}: the fused path runs bf16/fp16 inputs (fp32 stays eager)"
    if q.shape != k.shape:
        return "a query subset (q_idx): the fused kernels compute every query"
    d = cfg.head_dim
    if d < 16 or d > MAX_HEAD_DIM or d & (d - 1):
        return f"head_dim {d} is not a power of two in [16, {MAX_HEAD_DIM}]"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return "last dimension of q, k or v is not contiguous"
    hid, fp = _widths(cfg)
    if fp > MAX_FEATURES or hid > MAX_HIDDEN:
        return (f"feature MLP widths features {fp} / hidden {hid} exceed {MAX_FEATURES} / {MAX_HIDDEN} "
                "(the fused kernels hold [rows, F] and [F, D] fp32 tiles in registers)")
    if cfg.text_query_keys not in ("all", "text_and_landmarks"):
        return f"text_query_keys {cfg.text_query_keys!r} has no kernel"
    if int(cfg.window_radius) < 0:
        return "negative window_radius"
    g = layer.log_gamma
    if g.numel() not in (1, q.shape[1]):
        return f"log_gamma has {g.numel()} entries for {q.shape[1]} heads"
    why = UNAVAILABLE.get((str(q.device), d, hid, fp))
    if why is not None:
        return why
    if not triton_available():
        return "triton is not installed"
    return None


# ------------------------------------------------------------------------------ prepared weights


@dataclass
class _Prepared:
    key: tuple
    phi_q: tuple[torch.Tensor, ...]  # (w1 [D, HID], b1 [HID], w2 [HID, HID], b2, w3 [HID, FP], b3 [FP])
    phi_k: tuple[torch.Tensor, ...]
    mlps: tuple[torch.Tensor, ...]  # phi_q and phi_k stacked: (w1 [2, D, HID], b1 [2, HID], ...), contiguous
    gamma: torch.Tensor  # [H or 1] fp32 = exp(log_gamma)
    hid: int
    fp: int




def _param_key(p: torch.Tensor) -> tuple:
    # Storage and shape catch a move or a replaced tensor; _version an in-place update of an ordinary
    # tensor. Inference tensors (made under torch.inference_mode(), as in ComfyUI) have no version
    # counter (reading it raises): only storage/shape, the layer's explicit counter and the
    # load_state_dict hook below stand for them.
    return (p.data_ptr(), tuple(p.shape), p.dtype, -1 if p.is_inference() else p._version)


def _cache_key(layer, dtype: torch.dtype, device: torch.device) -> tuple:
    mods = (id(layer.phi_q), id(layer.phi_k))
    return (dtype, str(device), mods, getattr(layer, "weights_version", None),
            tuple(_param_key(p) for p in layer.parameters()))


def invalidate(layer) -> None:
    """Drop the kernel-layout weights cached on ``layer`` (the next fast call prepares them again)."""
    layer.__dict__.pop("_window_fast_cache", None)


def _drop_cache_after_load(module, incompatible_keys) -> None:  # noqa: ANN001 - nn.Module hook signature
    invalidate(module)  # load_state_dict copies in place: inference tensors would show no change


def prepared(layer, dtype: torch.dtype, device: torch.device) -> _Prepared:
    """Kernel-layout copies of the layer's feature MLPs and ``gamma``, cached on the layer while the key
    (:func:`_cache_key`) holds; never reads ``_version`` of an inference tensor."""
    key = _cache_key(layer, dtype, device)
    cache = layer.__dict__.get("_window_fast_cache")
    if cache is not None and cache.key == key:
        return cache
    hid, fp = _widths(layer.config)
    with torch.no_grad():
        pq = _mlp_tensors(layer.phi_q, dtype, device, hid, fp)
        pk = pq if layer.phi_k is None else _mlp_tensors(layer.phi_k, dtype, device, hid, fp)
        gamma = layer.log_gamma.detach().float().exp().reshape(-1).to(device).contiguous()
        mlps = tuple(torch.stack([a, b]).contiguous() for a, b in zip(pq, pk))
    prep = _Prepared(key, pq, pk, mlps, gamma, hid, fp)
    object.__setattr__(layer, "_window_fast_cache", prep)  # a plain attribute, not a buffer
    if not layer.__dict__.get("_window_fast_hooked", False):
        layer.register_load_state_dict_post_hook(_drop_cache_after_load)
        object.__setattr__(layer, "_window_fast_hooked", True)
    return prep


def _landmarks(layer, n_cond: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """``layer.landmarks(...)`` as int32 on ``device``; the device copy is reused while the host list is
    unchanged (no host-to-device copy per call)."""
    lm = layer.landmarks(n_cond, height, width)
    if lm.device.type != "cpu":
        return lm.to(device=device, dtype=torch.int32)
    cache = layer.__dict__.setdefault("_window_fast_landmarks", {})
    key = (n_cond, height, width, str(device))
    hit = cache.get(key)
    if hit is not None and torch.equal(hit[0], lm):
        return hit[1]
    lm = lm.to(torch.long).reshape(-1)
    if lm.numel() and (int(lm.min()) < n_cond or int(lm.max()) >= n_cond + height * width):
        raise ValueError(f"landmarks must be image tokens in [{n_cond}, {n_cond + height * width})")
    if lm.numel() > 1 and not bool((lm[1:] > lm[:-1]).all()):
        raise ValueError("landmarks must be sorted and distinct")
    dev = lm.to(device=device, dtype=torch.int32)
    if len(cache) > 64:
        cache.clear()
    cache[key] = (lm.clone(), dev)
    return dev


_DUMMY: dict[str, torch.Tensor] = {}


def _dummy_index(device: torch.device) -> torch.Tensor:
    """A valid int32 pointer for an empty landmark list (never read; one allocation per device)."""
    t = _DUMMY.get(str(device))
    if t is None:
        t = _DUMMY[str(device)] = torch.zeros(1, dtype=torch.int32, device=device)
    return t


# ------------------------------------------------------------------------------ block plan


@dataclass(frozen=True)
class BlockPlan:
    """How image queries are grouped into blocks of at most ``block_m`` (see ``_window_main``'s docstring).

    Per axis: ``e*`` grid lines per block, ``p*`` the period of a block group, ``c*`` blocks per group
    (> 1 when a tile is split), ``g*`` whole tiles per block; ``n_blk_*`` blocks along the axis."""

    er: int
    ec: int
    pr: int
    pc: int
    cr: int
    cc: int
    gr: int
    gc: int
    n_blk_r: int
    n_blk_c: int

    @property
    def multi(self) -> bool:
        """The block's tiles have different windows (per query-key masks in the kernel)."""
        return self.gr * self.gc > 1

    @property
    def n_blocks(self) -> int:
        return self.n_blk_r * self.n_blk_c


def window_extent(n_tiles: int, tile: int, radius: int, key_tile: int) -> int:
    """Grid lines along one axis of the window of ``n_tiles`` adjacent query tiles starting at line 0
    (unclipped): the whole key tiles covering ``[-radius, n_tiles*tile - 1 + radius]``, as
    ``window_tile_ranges`` gives them. The block plan's cost estimate (the kernel clips to the grid)."""
    return ((n_tiles * tile - 1 + radius) // key_tile + 1 - (-radius) // key_tile) * key_tile


@functools.lru_cache(maxsize=256)
def block_plan(height: int, width: int, th: int, tw: int, radius: int, n_cond: int, n_lm: int, bm: int,
               kh: int | None = None, kw: int | None = None) -> BlockPlan:
    """Blocks of whole tiles (tiles of at most ``bm`` queries) or parts of one tile (larger tiles).

    Whole tiles: the ``gr x gc`` tile group minimising the estimated work per query: every block pays for
    all ``bm`` slots over the conditioning keys, the union of its tiles' windows (key tiles ``kh x kw``,
    default the query tile) and the landmarks, plus the kernel term (an ``[F, D]`` sum over that set, and
    with several tiles also per-query weights, ~4x more)."""
    kh, kw = (th if kh is None else kh), (tw if kw is None else kw)
    ntr, ntc = -(-height // th), -(-width // tw)
    if th * tw <= bm:
        cap = bm // (th * tw)
        best = None
        for gr in range(1, min(cap, ntr) + 1):
            for gc in range(1, min(cap // gr, ntc) + 1):
                union = min(window_extent(gr, th, radius, kh), height) * min(window_extent(gc, tw, radius, kw), width)
                lin = (1.0 if gr * gc > 1 else 0.25) * (union + n_lm)
                cost = (n_cond + union + n_lm + lin) / (gr * gc)
                cand = (cost, -gc, gr, gc)
                if best is None or cand < best:
                    best = cand
        gr, gc = best[2], best[3]
        er, ec = gr * th, gc * tw
        return BlockPlan(er, ec, er, ec, 1, 1, gr, gc, -(-ntr // gr), -(-ntc // gc))
    if tw <= bm:
        ec, cc = tw, 1
        er = min(th, bm // tw)
        cr = -(-th // er)
    else:
        ec, cc = bm, -(-tw // bm)
        er, cr = 1, th
    return BlockPlan(er, ec, th, tw, cr, cc, 1, 1, ntr * cr, ntc * cc)


# ------------------------------------------------------------------------------ forward


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _is_out_of_resources(exc: Exception) -> bool:
    return type(exc).__name__ == "OutOfResources"


def fast_forward(
    layer,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_cond: int,
    sigma: float | torch.Tensor,
    cfg: float | torch.Tensor,
    *,
    height: int,
    width: int,
    kernel: KernelConfig | None = None,
) -> torch.Tensor | None:
    """The student's output ``[B, H, N, D]`` in ``q.dtype`` from the fused kernels, or ``None`` when they
    cannot be built for this device (out of shared memory or registers: recorded in :data:`UNAVAILABLE`,
    warned once; the caller then runs the eager forward) or there are no image tokens.

    ``q, k, v [B, H, N, D]``, ``N = n_cond + height * width``; ``sigma``/``cfg`` belong to the call
    contract and are unused by this mode. Call only when :func:`fast_path_reason` returned ``None``."""
    if q.is_cuda and q.device.index is not None and q.device.index != torch.cuda.current_device():
        with torch.cuda.device(q.device):  # Triton launches on the current device
            return fast_forward(layer, q, k, v, n_cond, sigma, cfg, height=height, width=width, kernel=kernel)
    from flux2ttr.students import window_kernels as wk  # noqa: PLC0415 - Triton is optional

    kc = kernel or KERNEL
    c = layer.config
    b, h, n, d = k.shape
    n_img = height * width
    if n_img <= 0:
        return None
    dev = q.device
    prep = prepared(layer, q.dtype, dev)
    lm = _landmarks(layer, n_cond, height, width, dev)
    n_lm = lm.numel()
    th, tw = (int(x) for x in c.window_tile)
    kh, kw = (int(x) for x in c.window_key_tile)
    radius = int(c.window_radius)
    plan = block_plan(height, width, th, tw, radius, n_cond, n_lm, kc.block_m, kh, kw)
    text_all = c.text_query_keys == "all"
    fast = kc.fast_math and not interpreting()
    hc = min(prep.hid, kc.mlp_chunk)
    fc = min(prep.fp, kc.feature_chunk)

    # feature pass: phi_q and phi_k of every token, and the partial image totals [KV | K] per split
    bh = b * h
    resident = prep.hid <= kc.mlp_chunk  # one hidden chunk: one MLP per program, weights kept on chip
    n_fblocks = -(-n // kc.feature_block_n)
    sides = 2 if resident else 1
    splits = max(1, min(n_fblocks, -(-kc.programs_per_sm * _sm_count(dev) // (bh * sides))))
    per_split = -(-n_fblocks // splits)
    splits = -(-n_fblocks // per_split)
    phiq = torch.empty(bh, n, prep.fp, dtype=q.dtype, device=dev)
    phik = torch.empty(bh, n, prep.fp, dtype=q.dtype, device=dev)
    part = torch.empty(splits, bh, prep.fp * d + prep.fp, dtype=torch.float32, device=dev)
    out = torch.empty(b, h, n, d, dtype=q.dtype, device=dev)
    lm_arg = lm if n_lm else _dummy_index(dev)
    gamma = prep.gamma
    text_sdpa = text_all and kc.text_sdpa and n_cond > 0 and q.is_cuda and not interpreting()
    n_text_blocks = 0 if text_sdpa else -(-n_cond // kc.block_m)
    feature_args = dict(
        q_ptr=q, k_ptr=k, v_ptr=v, phiq_ptr=phiq, phik_ptr=phik, part_ptr=part,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
        w1_ptr=prep.mlps[0], b1_ptr=prep.mlps[1], w2_ptr=prep.mlps[2], b2_ptr=prep.mlps[3],
        w3_ptr=prep.mlps[4], b3_ptr=prep.mlps[5], feat_eps=float(c.feature_eps), F_REAL=int(c.feature_dim),
        n_cond=n_cond, N=n, H=h, BH=bh, blocks_per_split=per_split, n_split=splits,
        D=d, HID=prep.hid, FP=prep.fp, HC=hc, FC=fc, BLOCK_N=kc.feature_block_n, RESIDENT=resident, FAST=fast,
    )
    main_args = dict(
        q_ptr=q, k_ptr=k, v_ptr=v, o_ptr=out, phiq_ptr=phiq, phik_ptr=phik, stats_ptr=part,  # stats: set below
        gamma_ptr=gamma, lm_ptr=lm_arg,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_on=out.stride(2),
        gamma_stride=0 if gamma.numel() == 1 else 1, n_lm=n_lm, n_cond=n_cond, height=height, width=width,
        H=h, BH=bh, tile_h=th, tile_w=tw, radius=radius, key_h=kh, key_w=kw,
        blk_er=plan.er, blk_ec=plan.ec, blk_pr=plan.pr, blk_pc=plan.pc, blk_cr=plan.cr, blk_cc=plan.cc,
        n_blk_c=plan.n_blk_c, n_img_blocks=plan.n_blocks, n_text_blocks=n_text_blocks,
        qk_scale=wk.LOG2E / math.sqrt(d), denom_eps=float(c.denom_eps),
        D=d, FP=prep.fp, FC=fc, BLOCK_M=kc.block_m, BLOCK_N=kc.block_n,
        MULTI=plan.multi, TEXT_ALL=text_all, EVEN_COND=n_cond % kc.block_n == 0, FUSE_SUMS=kc.fuse_sums and prep.fp == fc,
    )
    side = None
    try:
        if text_sdpa:  # first, so it overlaps the feature pass too (it needs only q, k, v)
            side = _text_rows_beside(q, k, v, out, n_cond)
        LAST_LAUNCH["features"] = _launch(wk._window_feature_pass, sides * splits * bh, feature_args,
                                          kc.feature_warps, kc.feature_stages if resident else kc.feature_stages_chunked)
        stats = part[0] if splits == 1 else part.sum(dim=0)  # fixed-order reduction: deterministic
        main_args["stats_ptr"] = stats
        LAST_LAUNCH["main"] = _launch(wk._window_main, (n_text_blocks + plan.n_blocks) * bh, main_args,
                                      kc.warps, kc.stages)
        LAST_LAUNCH["plan"] = plan
        LAST_LAUNCH["text_sdpa"] = text_sdpa
    except Exception as exc:
        if not _is_out_of_resources(exc):
            raise
        key = (str(dev), d, prep.hid, prep.fp)
        UNAVAILABLE[key] = f"window kernels do not fit {dev} ({exc}); running eager"
        warnings.warn(f"flux2ttr.students.window_fast: {UNAVAILABLE[key]}", RuntimeWarning, stacklevel=2)
        return None
    finally:
        if side is not None:  # out (and its memory, should it be dropped) is the caller's stream's again
            torch.cuda.current_stream(dev).wait_stream(side)
    return out


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _text_rows_beside(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, n_cond: int
                      ) -> torch.cuda.Stream:
    """Start ``out[:, :, :n_cond] = softmax(q_text k^T / sqrt(D)) v`` (every key: ``text_query_keys`` all) on
    a side stream and return it; the caller's stream must wait on it before ``out`` is read. The rows are
    disjoint from what the main pass writes, and the side stream first waits for everything queued so far."""
    dev = q.device
    side = _SIDE_STREAMS.get(dev)
    if side is None:
        side = _SIDE_STREAMS[dev] = torch.cuda.Stream(device=dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        text = torch.nn.functional.scaled_dot_product_attention(q[:, :, :n_cond], k, v)
        out[:, :, :n_cond].copy_(text)
    # text was allocated on the side stream; q, k, v and out outlive this call on the caller's stream, which
    # waits on the side stream before it goes on
    return side


_SPLITS: dict[int, tuple[tuple[str, ...], tuple[str, ...]] | None] = {}


def _signature_split(fn) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """``fn``'s argument names split into the runtime ones and the trailing constexprs (what the direct
    relaunch takes positionally and by name), or ``None`` when its constexprs are not all last; worked out
    once per kernel, not on every launch."""
    key = id(fn)
    if key not in _SPLITS:
        names = tuple(fn.arg_names)
        const = set(getattr(fn, "constexprs", ()))
        first = min(const) if const else len(names)
        ok = sorted(const) == list(range(first, len(names)))
        _SPLITS[key] = (names[:first], names[first:]) if ok else None
    return _SPLITS[key]


def _launch(fn, grid: int, args: dict, num_warps: int, num_stages: int):
    """Launch ``fn`` on a 1-D grid with keyword arguments (through the HKR fast path's direct relaunch of
    compiled kernels: Triton's per-call binding of ~60 arguments costs more host time than the whole layer
    at 1024²); a kernel out of shared memory at ``num_stages`` is retried with one stage less at a time
    before giving up."""
    split = _signature_split(fn)
    if split is None:
        pos, meta = None, None
    else:
        runtime, constants = split
        pos = [args[n] for n in runtime]
        meta = {n: args[n] for n in constants}
    while True:
        try:
            if pos is None:
                return fn[(grid,)](**args, num_warps=num_warps, num_stages=num_stages)
            return _direct_launch(fn, grid, pos, meta, num_warps, num_stages)
        except Exception as exc:
            if not _is_out_of_resources(exc) or num_stages <= 1:
                raise
            num_stages -= 1
