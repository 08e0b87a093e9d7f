"""Triton kernels for the HKR student's inference forward (two passes, no intermediates in memory).

The math is :class:`flux2ttr.students.hkr.HKRLayer`'s eager forward; only the precision of the matrix
products differs (bf16/fp16 operands, fp32 accumulation, as FlashAttention does):

* **key pass** (:func:`_hkr_key_pass`): one program per ``(b, h, split)`` streams its share of the keys in
  blocks of ``BLOCK_N``: ``phi_k(k)`` (3-layer MLP on the tensor cores, SiLU, softplus) and, in the
  same loop, ``KV += phi^T v`` and ``Ksum += sum phi``. Each split writes one fp32 partial
  ``[F*D + F]``; the partials are summed by one ``torch.sum`` (deterministic, no atomics). The programs
  of ``h == 0, split == 0`` also evaluate the sigma/cfg conditioner for their batch row.
* **query pass** (:func:`_hkr_query_pass`): one program per ``(b, h, BLOCK_M queries)``:
  ``phi_q(q)``, the normalised Nadaraya–Watson apply ``phi(q) KV / (phi(q) Ksum + eps)``, the landmark
  softmax as an online-softmax loop over the landmark keys (gathered through an index vector, never
  copied), the conditioner's scale/bias and the alpha blend, then one store in the input dtype.

Feature MLP widths that are not powers of two are zero-padded by the caller (:mod:`flux2ttr.students.fast_path`);
padded hidden units stay exactly 0 through SiLU, padded features are masked to 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _silu(x, FAST: tl.constexpr):
    if FAST:
        # x * sigmoid(x) = 0.5 x (1 + tanh(x / 2)): one MUFU op instead of exp + reciprocal.
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x * 0.5], dtype=tl.float32,
                                      is_pure=True, pack=1)
        return 0.5 * x * (1.0 + t)
    else:
        return x / (1.0 + tl.exp2(-x * 1.4426950408889634))


@triton.jit
def _features(x, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, eps, F_REAL,
              D: tl.constexpr, HID: tl.constexpr, FP: tl.constexpr, HC: tl.constexpr, FAST: tl.constexpr):
    """``x [M, D]`` (bf16/fp16) -> ``softplus(MLP(x)) + eps`` ``[M, FP]`` fp32; columns >= F_REAL are 0.

    Weights are pre-transposed ``[in, out]`` row-major in x's dtype; biases fp32. ``HC < HID``: the
    hidden layers are computed in ``HC``-wide chunks (wide MLPs do not fit shared memory whole); each
    second-layer chunk recomputes the first layer chunk by chunk, so nothing wider than ``HC`` is live.
    """
    offs_d = tl.arange(0, D)
    offs_f = tl.arange(0, FP)
    if HC == HID:
        offs_h = tl.arange(0, HID)
        w1 = tl.load(w1_ptr + offs_d[:, None] * HID + offs_h[None, :])
        h = tl.dot(x, w1) + tl.load(b1_ptr + offs_h)[None, :]
        h = _silu(h, FAST)
        w2 = tl.load(w2_ptr + offs_h[:, None] * HID + offs_h[None, :])
        h = tl.dot(h.to(x.dtype), w2) + tl.load(b2_ptr + offs_h)[None, :]
        h = _silu(h, FAST)
        w3 = tl.load(w3_ptr + offs_h[:, None] * FP + offs_f[None, :])
        z = tl.dot(h.to(x.dtype), w3) + tl.load(b3_ptr + offs_f)[None, :]
    else:
        offs_c = tl.arange(0, HC)
        z = tl.zeros([x.shape[0], FP], dtype=tl.float32) + tl.load(b3_ptr + offs_f)[None, :]
        for j in range(0, HID // HC):
            acc = tl.zeros([x.shape[0], HC], dtype=tl.float32) + tl.load(b2_ptr + j * HC + offs_c)[None, :]
            for i in range(0, HID // HC):
                w1 = tl.load(w1_ptr + offs_d[:, None] * HID + (i * HC + offs_c)[None, :])
                h1 = _silu(tl.dot(x, w1) + tl.load(b1_ptr + i * HC + offs_c)[None, :], FAST)
                w2 = tl.load(w2_ptr + (i * HC + offs_c)[:, None] * HID + (j * HC + offs_c)[None, :])
                acc = tl.dot(h1.to(x.dtype), w2, acc)
            w3 = tl.load(w3_ptr + (j * HC + offs_c)[:, None] * FP + offs_f[None, :])
            z = tl.dot(_silu(acc, FAST).to(x.dtype), w3, z)
    # softplus, stable form: max(z, 0) + log(1 + exp(-|z|)).
    sp = tl.maximum(z, 0.0) + tl.log2(1.0 + tl.exp2(-tl.abs(z) * 1.4426950408889634)) * 0.6931471805599453
    return tl.where(offs_f[None, :] < F_REAL, sp + eps, 0.0)


@triton.jit
def _conditioner(bh, H, sig_ptr, cfg_ptr, sig_stride, cfg_stride, sig_val, cfg_val,
                 c1w_ptr, c1b_ptr, c2w_ptr, c2b_ptr, cond_ptr, CH_REAL,
                 D: tl.constexpr, CH: tl.constexpr, SIG_SCALAR: tl.constexpr, CFG_SCALAR: tl.constexpr):
    """sigma/cfg conditioner of batch row ``bh // H``: ``[sigma, log1p(cfg)] -> SiLU(CH) -> 4D``;
    writes ``cond[bh] = (1 + s_k, b_k, 1 + s_l, b_l)`` ``[4, D]`` fp32."""
    b = bh // H
    offs_d = tl.arange(0, D)
    if SIG_SCALAR:
        sg = sig_val
    else:
        sg = tl.load(sig_ptr + b * sig_stride)
    if CFG_SCALAR:
        cf = cfg_val
    else:
        cf = tl.load(cfg_ptr + b * cfg_stride)
    x1 = tl.log2(1.0 + tl.maximum(cf, 0.0)) * 0.6931471805599453
    offs_c = tl.arange(0, CH)
    cm = offs_c < CH_REAL
    hc = (tl.load(c1w_ptr + offs_c * 2, mask=cm, other=0.0) * sg
          + tl.load(c1w_ptr + offs_c * 2 + 1, mask=cm, other=0.0) * x1
          + tl.load(c1b_ptr + offs_c, mask=cm, other=0.0))
    hc = hc / (1.0 + tl.exp(-hc))
    for part in tl.static_range(4):
        w = tl.load(c2w_ptr + (part * D + offs_d)[:, None] * CH_REAL + offs_c[None, :], mask=cm[None, :], other=0.0)
        o = tl.sum(w * hc[None, :], axis=1) + tl.load(c2b_ptr + part * D + offs_d)
        if part % 2 == 0:
            o = o + 1.0
        tl.store(cond_ptr + bh * 4 * D + part * D + offs_d, o)


@triton.jit
def _key_partial(k_ptr, v_ptr, skb, skh, skn, svb, svh, svn, bh, H, split, N, BLOCKS_PER_SPLIT,
                 w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, feat_eps, F_REAL,
                 D: tl.constexpr, HID: tl.constexpr, FP: tl.constexpr, HC: tl.constexpr, BLOCK_N: tl.constexpr,
                 FAST: tl.constexpr):
    """``(KV [FP, D], Ksum [FP])`` fp32 over the keys of ``split`` (``BLOCKS_PER_SPLIT`` blocks)."""
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    kv = tl.zeros([FP, D], dtype=tl.float32)
    ks = tl.zeros([FP], dtype=tl.float32)
    for i in range(0, BLOCKS_PER_SPLIT):
        offs_n = (split * BLOCKS_PER_SPLIT + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = offs_n < N
        kt = tl.load(k_base + offs_n[:, None].to(tl.int64) * skn + offs_d[None, :], mask=m[:, None], other=0.0)
        vt = tl.load(v_base + offs_n[:, None].to(tl.int64) * svn + offs_d[None, :], mask=m[:, None], other=0.0)
        phi = _features(kt, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, feat_eps, F_REAL, D, HID, FP, HC, FAST)
        # The numerator uses the rounded features: round once and use the same values for Ksum.
        phi_r = tl.where(m[:, None], phi, 0.0).to(kt.dtype)
        ks += tl.sum(phi_r.to(tl.float32), axis=0)
        kv = tl.dot(tl.trans(phi_r), vt, kv)
    return kv, ks


@triton.jit
def _landmarks(qt, k_ptr, v_ptr, skb, skh, skn, svb, svh, svn, bh, H, idx_ptr, L, qk_scale,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, GATHERED: tl.constexpr,
               EXP16: tl.constexpr, EVEN_L: tl.constexpr):
    """Online softmax of ``qt [BM, D]`` over the ``L`` landmark keys: ``(acc [BM, D], l [BM])`` fp32,
    the output being ``acc / l``. ``GATHERED``: k/v hold the landmarks themselves (``idx`` unused)."""
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start in range(0, L, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        lm = offs_l < L
        if GATHERED:
            tok = offs_l.to(tl.int64)
        elif EVEN_L:
            tok = tl.load(idx_ptr + offs_l).to(tl.int64)
        else:
            tok = tl.load(idx_ptr + offs_l, mask=lm, other=0).to(tl.int64)
        if EVEN_L:  # every step full: no masks (L = 512 text + 256 image landmarks at FLUX.2 sizes)
            kl = tl.load(k_base + tok[None, :] * skn + offs_d[:, None])  # [D, BL]
            s = tl.dot(qt, kl)
        else:
            kl = tl.load(k_base + tok[None, :] * skn + offs_d[:, None], mask=lm[None, :], other=0.0)
            s = tl.where(lm[None, :], tl.dot(qt, kl), float("-inf"))
        # Row max on the raw scores (scaling by qk_scale > 0 commutes with max); one FMA per score below.
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        if EXP16:
            # Packed half-precision exp2: two per MUFU op. p is rounded to 16 bits for the PV product
            # anyway; fp16 keeps 10 mantissa bits on (-inf, 0] -> (0, 1].
            p = tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r",
                                          [(s * qk_scale - m_new[:, None]).to(tl.float16)],
                                          dtype=tl.float16, is_pure=True, pack=2).to(tl.float32)
        else:
            p = tl.exp2(s * qk_scale - m_new[:, None])
        corr = tl.exp2(m_i - m_new)
        l_i = l_i * corr + tl.sum(p, axis=1)
        if EVEN_L:
            vl = tl.load(v_base + tok[:, None] * svn + offs_d[None, :])  # [BL, D]
        else:
            vl = tl.load(v_base + tok[:, None] * svn + offs_d[None, :], mask=lm[:, None], other=0.0)
        acc = tl.dot(p.to(qt.dtype), vl, acc * corr[:, None])
        m_i = m_new
    return acc, l_i


@triton.jit
def _blend_store(qt, phi, acc, l_i, stats_ptr, cond_ptr, bh, H, o_ptr, sob, soh, son, offs_m, mm, denom_eps,
                 alpha_ptr, alpha_max, logit_clamp,
                 D: tl.constexpr, FP: tl.constexpr, ADAPTIVE: tl.constexpr, CG: tl.constexpr):
    """Normalised kernel apply, conditioner, alpha blend and the store of one query block.
    ``CG``: read the statistics past L1 (they were written during this launch)."""
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    offs_f = tl.arange(0, FP)
    st = stats_ptr + bh.to(tl.int64) * (FP * D + FP)
    cb = cond_ptr + bh * 4 * D
    if CG:
        ksum = tl.load(st + FP * D + offs_f, cache_modifier=".cg")
        kvm = tl.load(st + offs_f[:, None] * D + offs_d[None, :], cache_modifier=".cg")  # [FP, D] fp32
        s_k = tl.load(cb + offs_d, cache_modifier=".cg")
        b_k = tl.load(cb + D + offs_d, cache_modifier=".cg")
        s_l = tl.load(cb + 2 * D + offs_d, cache_modifier=".cg")
        b_l = tl.load(cb + 3 * D + offs_d, cache_modifier=".cg")
    else:
        ksum = tl.load(st + FP * D + offs_f)
        kvm = tl.load(st + offs_f[:, None] * D + offs_d[None, :])
        s_k = tl.load(cb + offs_d)
        b_k = tl.load(cb + D + offs_d)
        s_l = tl.load(cb + 2 * D + offs_d)
        b_l = tl.load(cb + 3 * D + offs_d)
    den = tl.sum(phi * ksum[None, :], axis=1) + denom_eps  # [BM]
    logit = tl.load(alpha_ptr)  # [alpha_logit, alpha_gamma]
    if ADAPTIVE:
        out_k = tl.dot((phi / den[:, None]).to(qt.dtype), kvm.to(qt.dtype))
        out_k = out_k * s_k[None, :] + b_k[None, :]
        out_l = acc / l_i[:, None] * s_l[None, :] + b_l[None, :]
        dot = tl.sum(out_k * out_l, axis=1)
        nn = tl.sum(out_k * out_k, axis=1) * tl.sum(out_l * out_l, axis=1)
        cos = dot / tl.sqrt(tl.maximum(nn, denom_eps * denom_eps))
        lg = logit + tl.load(alpha_ptr + 1) * (0.5 - cos)
        lg = tl.minimum(tl.maximum(lg, -logit_clamp), logit_clamp)
        a = alpha_max / (1.0 + tl.exp(-lg))  # [BM]
        res = out_k + a[:, None] * (out_l - out_k)
    else:
        lg = tl.minimum(tl.maximum(logit, -logit_clamp), logit_clamp)
        a = alpha_max / (1.0 + tl.exp(-lg))
        # out = (1-a)(num/den * s_k + b_k) + a (acc/l * s_l + b_l), with the kernel apply accumulated
        # straight into the landmark accumulator (one [BM, D] fp32 tile live).
        res = acc * (a / l_i)[:, None] * s_l[None, :]
        w = (phi * ((1.0 - a) / den)[:, None]).to(qt.dtype)
        res = tl.dot(w, (kvm * s_k[None, :]).to(qt.dtype), res)
        res = res + ((1.0 - a) * b_k + a * b_l)[None, :]
    o_base = o_ptr + b.to(tl.int64) * sob + h.to(tl.int64) * soh
    tl.store(o_base + offs_m[:, None].to(tl.int64) * son + offs_d[None, :], res.to(o_ptr.dtype.element_ty),
             mask=mm[:, None])


@triton.jit
def _hkr_forward(
    q_ptr, k_ptr, v_ptr, kl_ptr, vl_ptr, o_ptr,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, slkb, slkh, slkn, slvb, slvh, slvn, sob, soh, son,
    qw1, qb1, qw2, qb2, qw3, qb3, kw1, kb1, kw2, kb2, kw3, kb3, feat_eps, F_REAL,
    part_ptr, stats_ptr, cond_ptr, sync_ptr, idx_ptr, L, N, NQ, H, BH, SPLITS, BLOCKS_PER_SPLIT,
    qk_scale, denom_eps, alpha_ptr, alpha_max, logit_clamp,
    sig_ptr, cfg_ptr, sig_stride, cfg_stride, sig_val, cfg_val, c1w_ptr, c1b_ptr, c2w_ptr, c2b_ptr, CH_REAL,
    D: tl.constexpr, HID: tl.constexpr, FP: tl.constexpr, HC: tl.constexpr, CH: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
    MODE: tl.constexpr, ADAPTIVE: tl.constexpr, FAST: tl.constexpr, GATHERED: tl.constexpr, EXP16: tl.constexpr,
    EVEN_L: tl.constexpr, MLP_FIRST: tl.constexpr,
    SIG_SCALAR: tl.constexpr, CFG_SCALAR: tl.constexpr,
):
    """The student forward, 1-D grid. ``MODE`` 0: key pass only (``SPLITS * BH`` programs) writing fp32
    partials ``part [SPLITS, BH, FP*D + FP]`` = ``[KV | Ksum]`` and ``cond [BH, 4, D]``; the caller sums
    the partials into ``stats [BH, FP*D + FP]``. ``MODE`` 1: query pass only (``cdiv(NQ, BLOCK_M) * BH``
    programs) reading ``stats`` and ``cond``. ``MODE`` 2: both in one launch, key programs first; the
    last key program of a head sums that head's partials, writes ``stats`` and ``cond`` and raises
    ``sync[BH + bh]``; query programs do their landmark softmax and feature MLP first and wait for the
    flag only before the normalised apply (``sync [2 * BH]`` int32, zeroed by the caller: per-head
    arrival counters, then ready flags). Key programs have the lowest ids so they are dispatched first
    and never wait, which keeps the spin-wait free of deadlock.
    ``qk_scale = log2(e) / sqrt(D)``; ``idx [L]`` int32 landmark token indices."""
    pid = tl.program_id(0)
    n_key = SPLITS * BH
    if MODE == 1:
        is_key = False
        qpid = pid
    else:
        is_key = pid < n_key
        qpid = pid - n_key
    if is_key:
        split = pid // BH
        bh = pid % BH
        kv, ks = _key_partial(k_ptr, v_ptr, skb, skh, skn, svb, svh, svn, bh, H, split, N, BLOCKS_PER_SPLIT,
                              kw1, kb1, kw2, kb2, kw3, kb3, feat_eps, F_REAL, D, HID, FP, HC, BLOCK_N, FAST)
        offs_d = tl.arange(0, D)
        offs_f = tl.arange(0, FP)
        out = part_ptr + pid.to(tl.int64) * (FP * D + FP)
        tl.store(out + offs_f[:, None] * D + offs_d[None, :], kv)
        tl.store(out + FP * D + offs_f, ks)
        if MODE == 0:
            if split == 0:
                _conditioner(bh, H, sig_ptr, cfg_ptr, sig_stride, cfg_stride, sig_val, cfg_val,
                             c1w_ptr, c1b_ptr, c2w_ptr, c2b_ptr, cond_ptr, CH_REAL, D, CH, SIG_SCALAR, CFG_SCALAR)
        else:
            tl.debug_barrier()  # every thread's partial stores precede the release below
            arrived = tl.atomic_add(sync_ptr + bh, 1, sem="acq_rel")
            if arrived == SPLITS - 1:
                # Last of this head: sum the partials (past L1: other SMs wrote them), publish.
                kv = tl.zeros([FP, D], dtype=tl.float32)
                ks = tl.zeros([FP], dtype=tl.float32)
                for s_ in range(0, SPLITS):
                    src = part_ptr + (s_ * BH + bh).to(tl.int64) * (FP * D + FP)
                    kv += tl.load(src + offs_f[:, None] * D + offs_d[None, :], cache_modifier=".cg")
                    ks += tl.load(src + FP * D + offs_f, cache_modifier=".cg")
                dst = stats_ptr + bh.to(tl.int64) * (FP * D + FP)
                tl.store(dst + offs_f[:, None] * D + offs_d[None, :], kv)
                tl.store(dst + FP * D + offs_f, ks)
                _conditioner(bh, H, sig_ptr, cfg_ptr, sig_stride, cfg_stride, sig_val, cfg_val,
                             c1w_ptr, c1b_ptr, c2w_ptr, c2b_ptr, cond_ptr, CH_REAL, D, CH, SIG_SCALAR, CFG_SCALAR)
                tl.debug_barrier()
                tl.atomic_xchg(sync_ptr + BH + bh, 1, sem="release")
    else:
        n_mb = tl.cdiv(NQ, BLOCK_M)
        bh = qpid // n_mb
        pid_m = qpid % n_mb
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mm = offs_m < NQ
        offs_d = tl.arange(0, D)
        q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        qt = tl.load(q_base + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :], mask=mm[:, None], other=0.0)
        if MLP_FIRST:
            phi = _features(qt, qw1, qb1, qw2, qb2, qw3, qb3, feat_eps, F_REAL, D, HID, FP, HC, FAST)
        acc, l_i = _landmarks(qt, kl_ptr, vl_ptr, slkb, slkh, slkn, slvb, slvh, slvn, bh, H, idx_ptr, L, qk_scale,
                              D, BLOCK_M, BLOCK_L, GATHERED, EXP16, EVEN_L)
        if not MLP_FIRST:
            phi = _features(qt, qw1, qb1, qw2, qb2, qw3, qb3, feat_eps, F_REAL, D, HID, FP, HC, FAST)
        if MODE == 2:
            while tl.atomic_add(sync_ptr + BH + bh, 0, sem="acquire") == 0:
                pass
        _blend_store(qt, phi, acc, l_i, stats_ptr, cond_ptr, bh, H, o_ptr, sob, soh, son, offs_m, mm, denom_eps,
                     alpha_ptr, alpha_max, logit_clamp, D, FP, ADAPTIVE, MODE == 2)
