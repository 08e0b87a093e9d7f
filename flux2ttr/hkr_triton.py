"""Triton kernels for the HKR student's inference forward (two passes, no intermediates in memory).

The math is :class:`flux2ttr.hkr.HKRLayer`'s eager forward; only the precision of the matrix
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

Feature MLP widths that are not powers of two are zero-padded by the caller (:mod:`flux2ttr.hkr_fast`);
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
              D: tl.constexpr, HID: tl.constexpr, FP: tl.constexpr, FAST: tl.constexpr):
    """``x [M, D]`` (bf16/fp16) -> ``softplus(MLP(x)) + eps`` ``[M, FP]`` fp32; columns >= F_REAL are 0.

    Weights are pre-transposed ``[in, out]`` row-major in x's dtype; biases fp32.
    """
    offs_d = tl.arange(0, D)
    offs_h = tl.arange(0, HID)
    offs_f = tl.arange(0, FP)
    w1 = tl.load(w1_ptr + offs_d[:, None] * HID + offs_h[None, :])
    h = tl.dot(x, w1) + tl.load(b1_ptr + offs_h)[None, :]
    h = _silu(h, FAST)
    w2 = tl.load(w2_ptr + offs_h[:, None] * HID + offs_h[None, :])
    h = tl.dot(h.to(x.dtype), w2) + tl.load(b2_ptr + offs_h)[None, :]
    h = _silu(h, FAST)
    w3 = tl.load(w3_ptr + offs_h[:, None] * FP + offs_f[None, :])
    z = tl.dot(h.to(x.dtype), w3) + tl.load(b3_ptr + offs_f)[None, :]
    # softplus, stable form: max(z, 0) + log(1 + exp(-|z|)).
    sp = tl.maximum(z, 0.0) + tl.log2(1.0 + tl.exp2(-tl.abs(z) * 1.4426950408889634)) * 0.6931471805599453
    return tl.where(offs_f[None, :] < F_REAL, sp + eps, 0.0)


@triton.jit
def _hkr_key_pass(
    k_ptr, v_ptr, skb, skh, skn, svb, svh, svn,
    w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, feat_eps, F_REAL,
    part_ptr, N, H, BLOCKS_PER_SPLIT,
    sig_ptr, cfg_ptr, sig_val, cfg_val, c1w_ptr, c1b_ptr, c2w_ptr, c2b_ptr, cond_ptr, CH_REAL,
    D: tl.constexpr, HID: tl.constexpr, FP: tl.constexpr, BLOCK_N: tl.constexpr, CH: tl.constexpr,
    SC_SCALAR: tl.constexpr, FAST: tl.constexpr,
):
    """Grid ``(B*H, S)``. Writes ``part[s, b, h] = [KV (FP*D) | Ksum (FP)]`` fp32 and ``cond[b] [4, D]``."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_s = tl.num_programs(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, D)
    offs_f = tl.arange(0, FP)
    k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    kv = tl.zeros([FP, D], dtype=tl.float32)
    ks = tl.zeros([FP], dtype=tl.float32)
    for i in range(0, BLOCKS_PER_SPLIT):
        offs_n = (pid_s * BLOCKS_PER_SPLIT + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = offs_n < N
        kt = tl.load(k_base + offs_n[:, None].to(tl.int64) * skn + offs_d[None, :], mask=m[:, None], other=0.0)
        vt = tl.load(v_base + offs_n[:, None].to(tl.int64) * svn + offs_d[None, :], mask=m[:, None], other=0.0)
        phi = _features(kt, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, feat_eps, F_REAL, D, HID, FP, FAST)
        # The numerator uses the rounded features: round once and use the same values for Ksum.
        phi_r = tl.where(m[:, None], phi, 0.0).to(kt.dtype)
        ks += tl.sum(phi_r.to(tl.float32), axis=0)
        kv = tl.dot(tl.trans(phi_r), vt, kv)
    out = part_ptr + (pid_s * tl.num_programs(0) + pid_bh).to(tl.int64) * (FP * D + FP)
    tl.store(out + offs_f[:, None] * D + offs_d[None, :], kv)
    tl.store(out + FP * D + offs_f, ks)

    if (h == 0) & (pid_s == 0):
        # sigma/cfg conditioner for batch row b: [sigma, log1p(cfg)] -> SiLU(32) -> 4D (scale-1, bias).
        if SC_SCALAR:
            sg = sig_val
            cf = cfg_val
        else:
            sg = tl.load(sig_ptr + b)
            cf = tl.load(cfg_ptr + b)
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
            tl.store(cond_ptr + b * 4 * D + part * D + offs_d, o)


@triton.jit
def _hkr_query_pass(
    q_ptr, k_ptr, v_ptr, o_ptr, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, feat_eps, F_REAL,
    stats_ptr, cond_ptr, idx_ptr, L, NQ, H, qk_scale, denom_eps,
    logit_ptr, gamma_ptr, alpha_max, logit_clamp,
    D: tl.constexpr, HID: tl.constexpr, FP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
    ADAPTIVE: tl.constexpr, FAST: tl.constexpr,
):
    """Grid ``(cdiv(NQ, BLOCK_M), B*H)``. ``stats [B, H, FP*D + FP]`` fp32 (summed key-pass partials),
    ``cond [B, 4, D]`` fp32 (scale_k, bias_k, scale_l, bias_l), ``idx [L]`` int32 landmark token indices.
    ``qk_scale = log2(e) / sqrt(D)``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = offs_m < NQ
    offs_d = tl.arange(0, D)
    offs_f = tl.arange(0, FP)
    q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    qt = tl.load(q_base + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :], mask=mm[:, None], other=0.0)

    # ---- landmark branch: online softmax over the L landmark keys.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start in range(0, L, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        lm = offs_l < L
        tok = tl.load(idx_ptr + offs_l, mask=lm, other=0).to(tl.int64)
        kl = tl.load(k_base + tok[None, :] * skn + offs_d[:, None], mask=lm[None, :], other=0.0)  # [D, BL]
        s = tl.dot(qt, kl) * qk_scale
        s = tl.where(lm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        corr = tl.exp2(m_i - m_new)
        l_i = l_i * corr + tl.sum(p, axis=1)
        vl = tl.load(v_base + tok[:, None] * svn + offs_d[None, :], mask=lm[:, None], other=0.0)  # [BL, D]
        acc = tl.dot(p.to(qt.dtype), vl, acc * corr[:, None])
        m_i = m_new

    # ---- kernel branch statistics and conditioner.
    st = stats_ptr + pid_bh.to(tl.int64) * (FP * D + FP)
    ksum = tl.load(st + FP * D + offs_f)
    cb = cond_ptr + b * 4 * D
    s_k = tl.load(cb + offs_d)
    b_k = tl.load(cb + D + offs_d)
    s_l = tl.load(cb + 2 * D + offs_d)
    b_l = tl.load(cb + 3 * D + offs_d)
    kvm = tl.load(st + offs_f[:, None] * D + offs_d[None, :])  # [FP, D] fp32

    phi = _features(qt, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, feat_eps, F_REAL, D, HID, FP, FAST)
    den = tl.sum(phi * ksum[None, :], axis=1) + denom_eps  # [BM]
    logit = tl.load(logit_ptr)

    if ADAPTIVE:
        out_k = tl.dot((phi / den[:, None]).to(qt.dtype), kvm.to(qt.dtype))
        out_k = out_k * s_k[None, :] + b_k[None, :]
        out_l = acc / l_i[:, None] * s_l[None, :] + b_l[None, :]
        dot = tl.sum(out_k * out_l, axis=1)
        nn = tl.sum(out_k * out_k, axis=1) * tl.sum(out_l * out_l, axis=1)
        cos = dot / tl.sqrt(tl.maximum(nn, denom_eps * denom_eps))
        lg = logit + tl.load(gamma_ptr) * (0.5 - cos)
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
