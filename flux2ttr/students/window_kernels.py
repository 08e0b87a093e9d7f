"""Triton kernels for the window student's inference forward (:class:`flux2ttr.students.window.WindowLayer`).

For query ``i`` with exact key set ``S_i`` (all conditioning keys, the whole key tiles of its window,
the landmarks), scores ``s_ij = q_i·k_j / sqrt(D)`` and ``m_i = max_{j in S_i} s_ij``::

    out_i = [sum_{S_i} e^{s_ij - m_i} v_j + g_h phi_q(q_i)^T (KV - KV_{S_i})]
            / [sum_{S_i} e^{s_ij - m_i} + g_h phi_q(q_i)^T (K - K_{S_i}) + denom_eps]

Every ``S_i`` holds all conditioning keys (image queries, and text queries in ``text_and_landmarks``
mode), so ``K - K_{S_i}`` and ``KV - KV_{S_i}`` only ever involve image keys: the kernels need the image
totals ``K_img [F]``, ``KV_img [F, D]`` and the features of the image keys the query sees exactly.

Two launches (plus one ``torch.sum`` of fp32 partials, deterministic, no atomics):

* **feature pass** (:func:`_window_feature_pass`): programs per ``(side, split, b, h)`` stream their share
  of the tokens in blocks of ``BLOCK_N``: ``phi_q(q)`` or ``phi_k(k)`` (3-layer MLPs on the tensor cores;
  with one hidden chunk the weights stay resident in shared memory), rounded once to the input dtype and
  stored to ``phiq, phik [B*H, N, FP]``; the same rounded ``phi_k`` of the image keys then accumulate
  ``KV += phi^T v`` and ``K += sum phi`` into the program's partial ``[FP*D + FP]``. (The MLPs live
  here so the main pass keeps its registers for the softmax.)
* **main pass** (:func:`_window_main`): text-query programs first (they are the longest when text queries
  see every key), then one program per block of image queries. A block is a rectangle of whole tiles, or
  a part of one tile (a tile larger than the block), with its rows gathered on the latent grid. Each
  program runs one online softmax over the conditioning keys, the union of its tiles' windows (a
  rectangle of whole tiles, enumerated row-major in ``BLOCK_N`` chunks) and the landmarks outside the
  window; where the block's tiles have different windows (``MULTI``) every (query, key) pair is masked
  by the query's own window. After that loop the max ``m_i`` is final, so the kernel term is added
  straight into the same accumulator:

  - one window for the whole block (one tile): ``KV_S = sum phi_k^T v`` over the window keys and the
    landmarks outside it, an ``[FP, D]`` accumulator (``FP*D`` flops per key instead of
    ``BLOCK_M*(FP + D)``), summed inside the softmax loop from the values it already loaded (``FP <= 64``;
    wider features: a second pass, ``FC`` features at a time); then ``acc += g phi_q (KV_img - KV_S)``;
  - per-query windows (``MULTI``): the same for the union of the block's windows, plus, per query,
    ``acc += g (phi_q phi_k^T ∘ mask) v`` over the union keys outside its own window (a positive sum, so
    no cancellation), minus the landmarks among them. Those kernel weights are cast to 16 bits for the
    tensor cores; the block is first scaled by ``1 / max(g max_i sum(phi_q_i), 1)`` so they stay below
    ``max phi_k`` (fp16 range).

  The complement is a difference of large sums, so its product with ``phi_q`` runs fp32-accurate: the
  ``[FP, D]`` matrix, scaled to ``|x| <= 1``, as a 16-bit high part plus the 16-bit rounding of the rest.

Math is fp32; the matrix products take 16-bit operands (scores, probabilities, features, values) with
fp32 accumulation, as FlashAttention does. Widths that are not powers of two (features, hidden units) are
zero-padded by the caller (:mod:`flux2ttr.students.window_fast`); padded features are exactly 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
_NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max: exp2(-inf - m) stays 0, never NaN

# Sizes and grid geometry change with the resolution; Triton would specialise (recompile) on each one's
# divisibility by 16 and == 1. Only the strides and pointers keep that (16-byte vector loads need it).
_FEATURE_GENERIC = ["F_REAL", "n_cond", "N", "H", "BH", "blocks_per_split", "n_split"]
_MAIN_GENERIC = ["gamma_stride", "n_lm", "n_cond", "height", "width", "H", "BH", "tile_h", "tile_w",
                 "radius", "key_h", "key_w", "blk_er", "blk_ec", "blk_pr", "blk_pc", "blk_cr", "blk_cc",
                 "n_blk_c", "n_img_blocks", "n_text_blocks"]


# ------------------------------------------------------------------------------ feature map


@triton.jit
def _silu(x, FAST: tl.constexpr):
    if FAST:
        # x * sigmoid(x) = x/2 * (1 + tanh(x/2)): one MUFU instruction instead of an exp and a division.
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x * 0.5], dtype=tl.float32,
                                      is_pure=True, pack=1)
        return 0.5 * x * (1.0 + t)
    else:
        return x * tl.sigmoid(x)


@triton.jit
def _feature_map(x, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, feat_eps, F_REAL,
                 D: tl.constexpr, HID: tl.constexpr, FP: tl.constexpr, HC: tl.constexpr, FAST: tl.constexpr):
    """``softplus(W3 silu(W2 silu(W1 x + b1) + b2) + b3) + eps``: ``x [R, D]`` 16-bit -> ``[R, FP]`` fp32,
    columns ``>= F_REAL`` exactly 0.

    Weights ``[in, out]`` row-major in x's dtype, biases fp32. The hidden layers run in ``HC``-wide
    column chunks (``HID // HC`` of them, unrolled) so no ``[R, HID]`` tile is ever live; with more than
    one chunk the first layer is recomputed per second-layer chunk (cheaper than holding it)."""
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, HC)
    offs_f = tl.arange(0, FP)
    z = tl.zeros([x.shape[0], FP], dtype=tl.float32) + tl.load(b3_ptr + offs_f)[None, :]
    for jc in tl.static_range(HID // HC):
        h2 = tl.zeros([x.shape[0], HC], dtype=tl.float32) + tl.load(b2_ptr + jc * HC + offs_c)[None, :]
        for ic in tl.static_range(HID // HC):
            w1 = tl.load(w1_ptr + offs_d[:, None] * HID + (ic * HC + offs_c)[None, :])
            h1 = _silu(tl.dot(x, w1) + tl.load(b1_ptr + ic * HC + offs_c)[None, :], FAST)
            w2 = tl.load(w2_ptr + (ic * HC + offs_c)[:, None] * HID + (jc * HC + offs_c)[None, :])
            h2 = tl.dot(h1.to(x.dtype), w2, h2)
        w3 = tl.load(w3_ptr + (jc * HC + offs_c)[:, None] * FP + offs_f[None, :])
        z = tl.dot(_silu(h2, FAST).to(x.dtype), w3, z)
    # softplus without overflow: max(z, 0) + log(1 + exp(-|z|))
    sp = tl.maximum(z, 0.0) + tl.log2(1.0 + tl.exp2(-tl.abs(z) * _LOG2E)) / _LOG2E
    return tl.where(offs_f[None, :] < F_REAL, sp + feat_eps, 0.0)


# ------------------------------------------------------------------------------ feature pass


@triton.jit
def _mlp_resident(x, w1, b1, w2, b2, w3, b3, feat_eps, F_REAL, FP: tl.constexpr, FAST: tl.constexpr):
    """:func:`_feature_map` with the weights already loaded (loop-invariant: they stay in shared memory)."""
    offs_f = tl.arange(0, FP)
    h = _silu(tl.dot(x, w1) + b1[None, :], FAST)
    h = _silu(tl.dot(h.to(x.dtype), w2) + b2[None, :], FAST)
    z = tl.dot(h.to(x.dtype), w3) + b3[None, :]
    sp = tl.maximum(z, 0.0) + tl.log2(1.0 + tl.exp2(-tl.abs(z) * _LOG2E)) / _LOG2E
    return tl.where(offs_f[None, :] < F_REAL, sp + feat_eps, 0.0)


@triton.jit(do_not_specialize=_FEATURE_GENERIC)
def _window_feature_pass(
    q_ptr, k_ptr, v_ptr, phiq_ptr, phik_ptr, part_ptr,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, feat_eps, F_REAL, n_cond, N, H, BH, blocks_per_split, n_split,
    D: tl.constexpr, HID: tl.constexpr, FP: tl.constexpr, HC: tl.constexpr, FC: tl.constexpr,
    BLOCK_N: tl.constexpr, RESIDENT: tl.constexpr, FAST: tl.constexpr,
):
    """``phi_q(q)``, ``phi_k(k)`` of every token into ``phiq, phik [BH, N, FP]`` (input dtype), and the partial
    image totals ``part [n_split, BH, FP*D + FP]`` = ``[KV (FP x D) | K (FP)]`` fp32.

    The MLP weights come stacked ``[2, ...]`` (``phi_q`` then ``phi_k``; transposed ``[in, out]``, input
    dtype; biases fp32). ``RESIDENT`` (one hidden chunk): programs ``pid = side * n_split * BH + split * BH
    + bh`` run one MLP each with its weights loaded once (they stay in shared memory while the token
    loads are pipelined); otherwise programs ``split * BH + bh`` run both, re-reading the chunked weights.
    Tokens of a program: ``[split * blocks_per_split * BLOCK_N, ...)``. After the features, the phi_k
    programs sum the totals ``FC`` features at a time from the stored (rounded) ``phik`` (the main pass
    reads these very values back, so its exact-set sums cancel exactly the share summed here); no
    ``[FP, D]`` accumulator sits next to the MLP."""
    pid = tl.program_id(0)
    offs_d = tl.arange(0, D)
    offs_f = tl.arange(0, FP)
    offs_c = tl.arange(0, FC)
    if RESIDENT:
        side = pid // (n_split * BH)
        rest = pid % (n_split * BH)
    else:
        side = 1
        rest = pid
    split = rest // BH
    bh = rest % BH
    b = bh // H
    h = bh % H
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    fk_base = phik_ptr + bh.to(tl.int64) * N * FP
    first = split * blocks_per_split * BLOCK_N
    if RESIDENT:
        if side == 0:
            x_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
            x_sn = stride_qn
            f_base = phiq_ptr + bh.to(tl.int64) * N * FP
        else:
            x_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
            x_sn = stride_kn
            f_base = fk_base
        offs_h = tl.arange(0, HID)
        w1 = tl.load(w1_ptr + side * D * HID + offs_d[:, None] * HID + offs_h[None, :])
        w2 = tl.load(w2_ptr + side * HID * HID + offs_h[:, None] * HID + offs_h[None, :])
        w3 = tl.load(w3_ptr + side * HID * FP + offs_h[:, None] * FP + offs_f[None, :])
        b1 = tl.load(b1_ptr + side * HID + offs_h)
        b2 = tl.load(b2_ptr + side * HID + offs_h)
        b3 = tl.load(b3_ptr + side * FP + offs_f)
        for i in range(0, blocks_per_split):
            tok = first + i * BLOCK_N + tl.arange(0, BLOCK_N)
            ok = tok < N
            row = tok.to(tl.int64)
            xt = tl.load(x_base + row[:, None] * x_sn + offs_d[None, :], mask=ok[:, None], other=0.0)
            phi = _mlp_resident(xt, w1, b1, w2, b2, w3, b3, feat_eps, F_REAL, FP, FAST)
            tl.store(f_base + row[:, None] * FP + offs_f[None, :], phi.to(xt.dtype), mask=ok[:, None])
    else:
        q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        fq_base = phiq_ptr + bh.to(tl.int64) * N * FP
        for i in range(0, blocks_per_split):
            tok = first + i * BLOCK_N + tl.arange(0, BLOCK_N)
            ok = tok < N
            row = tok.to(tl.int64)
            qt = tl.load(q_base + row[:, None] * stride_qn + offs_d[None, :], mask=ok[:, None], other=0.0)
            phi = _feature_map(qt, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, feat_eps, F_REAL,
                               D, HID, FP, HC, FAST)
            tl.store(fq_base + row[:, None] * FP + offs_f[None, :], phi.to(qt.dtype), mask=ok[:, None])
            kt = tl.load(k_base + row[:, None] * stride_kn + offs_d[None, :], mask=ok[:, None], other=0.0)
            phi = _feature_map(kt, w1_ptr + D * HID, b1_ptr + HID, w2_ptr + HID * HID, b2_ptr + HID,
                               w3_ptr + HID * FP, b3_ptr + FP, feat_eps, F_REAL, D, HID, FP, HC, FAST)
            tl.store(fk_base + row[:, None] * FP + offs_f[None, :], phi.to(kt.dtype), mask=ok[:, None])
    if side == 1:
        tl.debug_barrier()  # this program's phik stores precede its reads below (.cg: from L2)
        out = part_ptr + rest.to(tl.int64) * (FP * D + FP)
        for fc in tl.static_range(FP // FC):
            kv = tl.zeros([FC, D], dtype=tl.float32)
            ks = tl.zeros([FC], dtype=tl.float32)
            for i in range(0, blocks_per_split):
                tok = first + i * BLOCK_N + tl.arange(0, BLOCK_N)
                ok = (tok < N) & (tok >= n_cond)  # conditioning keys never enter a complement
                row = tok.to(tl.int64)
                fk = tl.load(fk_base + row[:, None] * FP + fc * FC + offs_c[None, :], mask=ok[:, None], other=0.0,
                             cache_modifier=".cg")
                vt = tl.load(v_base + row[:, None] * stride_vn + offs_d[None, :], mask=ok[:, None], other=0.0)
                kv = tl.dot(tl.trans(fk), vt, kv)
                ks += tl.sum(fk.to(tl.float32), axis=0)
            tl.store(out + (fc * FC + offs_c)[:, None] * D + offs_d[None, :], kv)
            tl.store(out + FP * D + fc * FC + offs_c, ks)


# ------------------------------------------------------------------------------ main pass: pieces


@triton.jit
def _softmax_step(qt, kt, vt, keep, acc, l_i, m_i, qk_scale, MASK: tl.constexpr):
    """One online-softmax step over a key block: ``kt [D, BN]``, ``vt [BN, D]``, ``keep`` broadcastable to
    ``[BM, BN]`` (used when ``MASK``). Running max ``m_i`` in log2 units (scores times ``qk_scale``)."""
    s = tl.dot(qt, kt)
    if MASK:
        s = tl.where(keep, s, float("-inf"))
    # qk_scale > 0 commutes with max: one multiply per row, then one FMA per score
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    corr = tl.exp2(m_i - m_new)
    l_i = l_i * corr + tl.sum(p, axis=1)
    acc = tl.dot(p.to(vt.dtype), vt, acc * corr[:, None])
    return acc, l_i, m_new


@triton.jit
def _attend_range(qt, k_base, v_base, stride_kn, stride_vn, start, stop, acc, l_i, m_i, qk_scale,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr):
    """Online softmax over the contiguous keys ``[start, stop)``; ``EVEN``: ``stop - start`` is a multiple
    of ``BLOCK_N`` (no masks)."""
    offs_d = tl.arange(0, D)
    for s0 in range(start, stop, BLOCK_N):
        tok = s0 + tl.arange(0, BLOCK_N)
        row = tok.to(tl.int64)
        if EVEN:
            kt = tl.load(k_base + row[None, :] * stride_kn + offs_d[:, None])
            vt = tl.load(v_base + row[:, None] * stride_vn + offs_d[None, :])
            acc, l_i, m_i = _softmax_step(qt, kt, vt, 0, acc, l_i, m_i, qk_scale, False)
        else:
            ok = tok < stop
            kt = tl.load(k_base + row[None, :] * stride_kn + offs_d[:, None], mask=ok[None, :], other=0.0)
            vt = tl.load(v_base + row[:, None] * stride_vn + offs_d[None, :], mask=ok[:, None], other=0.0)
            acc, l_i, m_i = _softmax_step(qt, kt, vt, ok[None, :], acc, l_i, m_i, qk_scale, True)
    return acc, l_i, m_i


@triton.jit
def _window_keys(s0, wr0, wc0, nwc, nwin, BLOCK_N: tl.constexpr):
    """Keys ``s0 .. s0+BLOCK_N`` of the window rectangle (row-major from ``(wr0, wc0)``, ``nwc`` columns,
    ``nwin`` keys): their grid rows, columns and validity."""
    j = s0 + tl.arange(0, BLOCK_N)
    return wr0 + j // nwc, wc0 + j % nwc, j < nwin


@triton.jit
def _inside(kr, kc, r0, r1, c0, c1):
    """Key at grid ``(kr, kc)`` inside the token rectangle ``[r0, r1) x [c0, c1)`` (any broadcast shapes)."""
    return (kr >= r0) & (kr < r1) & (kc >= c0) & (kc < c1)


@triton.jit
def _outside(kr, kc, r0, r1, c0, c1):
    """Not :func:`_inside`; an empty rectangle (``r1 <= r0``) leaves every key outside."""
    return (kr < r0) | (kr >= r1) | (kc < c0) | (kc >= c1)


@triton.jit
def _attend_window(qt, k_base, v_base, stride_kn, stride_vn, n_cond, width, wr0, wc0, nwc, nwin,
                   qr0, qr1, qc0, qc1, acc, l_i, m_i, qk_scale, f_base, kvw, kw,
                   D: tl.constexpr, FP: tl.constexpr, BLOCK_N: tl.constexpr, MULTI: tl.constexpr,
                   SUMS: tl.constexpr):
    """Online softmax over the window rectangle; ``MULTI``: each query keeps only the keys inside its own
    window ``[qr0, qr1) x [qc0, qc1)`` (``[BM]`` vectors). ``SUMS``: also the rectangle's kernel sums
    ``kvw [FP, D] += phi_k^T v``, ``kw [FP] += sum phi_k`` from the values already loaded (``phik`` at
    ``f_base``), instead of a second pass over the window."""
    offs_d = tl.arange(0, D)
    offs_f = tl.arange(0, FP)
    for s0 in range(0, nwin, BLOCK_N):
        kr, kc, ok = _window_keys(s0, wr0, wc0, nwc, nwin, BLOCK_N)
        row = (n_cond + kr * width + kc).to(tl.int64)
        kt = tl.load(k_base + row[None, :] * stride_kn + offs_d[:, None], mask=ok[None, :], other=0.0)
        vt = tl.load(v_base + row[:, None] * stride_vn + offs_d[None, :], mask=ok[:, None], other=0.0)
        if MULTI:
            keep = ok[None, :] & _inside(kr[None, :], kc[None, :], qr0[:, None], qr1[:, None], qc0[:, None], qc1[:, None])
        else:
            keep = ok[None, :]
        acc, l_i, m_i = _softmax_step(qt, kt, vt, keep, acc, l_i, m_i, qk_scale, True)
        if SUMS:
            fk = tl.load(f_base + row[:, None] * FP + offs_f[None, :], mask=ok[:, None], other=0.0)  # [BN, FP]
            kvw = tl.dot(tl.trans(fk), vt, kvw)
            kw += tl.sum(fk.to(tl.float32), axis=0)
    return acc, l_i, m_i, kvw, kw


@triton.jit
def _landmark_keys(lm_ptr, s0, n_lm, n_cond, width, BLOCK_N: tl.constexpr):
    """Landmarks ``s0 .. s0+BLOCK_N``: token index (int64), grid row, grid column, validity."""
    li = s0 + tl.arange(0, BLOCK_N)
    ok = li < n_lm
    tok = tl.load(lm_ptr + li, mask=ok, other=0).to(tl.int32)
    img = tl.maximum(tok - n_cond, 0)  # landmarks are image tokens; the clamp keeps masked slots non-negative
    return tok.to(tl.int64), img // width, img % width, ok


@triton.jit
def _attend_landmarks(qt, k_base, v_base, stride_kn, stride_vn, lm_ptr, n_lm, n_cond, width, r0, r1, c0, c1,
                      acc, l_i, m_i, qk_scale, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over the landmarks outside the rectangle ``[r0, r1) x [c0, c1)`` (scalars: one
    window for the block; ``[BM, 1]``: per query; an empty rectangle keeps every landmark)."""
    offs_d = tl.arange(0, D)
    for s0 in range(0, n_lm, BLOCK_N):
        tok, lr, lc, ok = _landmark_keys(lm_ptr, s0, n_lm, n_cond, width, BLOCK_N)
        kt = tl.load(k_base + tok[None, :] * stride_kn + offs_d[:, None], mask=ok[None, :], other=0.0)
        vt = tl.load(v_base + tok[:, None] * stride_vn + offs_d[None, :], mask=ok[:, None], other=0.0)
        keep = ok[None, :] & _outside(lr[None, :], lc[None, :], r0, r1, c0, c1)
        acc, l_i, m_i = _softmax_step(qt, kt, vt, keep, acc, l_i, m_i, qk_scale, True)
    return acc, l_i, m_i


@triton.jit
def _kv_window(f_base, v_base, stride_vn, n_cond, width, wr0, wc0, nwc, nwin, kvw, kw,
               D: tl.constexpr, FP: tl.constexpr, FC: tl.constexpr, BLOCK_N: tl.constexpr):
    """``kvw += sum phi_k^T v``, ``kw += sum phi_k`` over the window rectangle (one window per block), for
    the ``FC`` features at ``f_base`` (a feature-chunk offset into ``phik``, row stride ``FP``)."""
    offs_d = tl.arange(0, D)
    offs_f = tl.arange(0, FC)
    for s0 in range(0, nwin, BLOCK_N):
        kr, kc, ok = _window_keys(s0, wr0, wc0, nwc, nwin, BLOCK_N)
        row = (n_cond + kr * width + kc).to(tl.int64)
        fk = tl.load(f_base + row[:, None] * FP + offs_f[None, :], mask=ok[:, None], other=0.0)  # [BN, FC]
        vt = tl.load(v_base + row[:, None] * stride_vn + offs_d[None, :], mask=ok[:, None], other=0.0)
        kvw = tl.dot(tl.trans(fk), vt, kvw)
        kw += tl.sum(fk.to(tl.float32), axis=0)
    return kvw, kw


@triton.jit
def _kv_landmarks(f_base, v_base, stride_vn, lm_ptr, n_lm, n_cond, width, r0, r1, c0, c1, kvw, kw,
                  D: tl.constexpr, FP: tl.constexpr, FC: tl.constexpr, BLOCK_N: tl.constexpr):
    """``kvw``, ``kw`` plus the landmarks outside the (scalar) rectangle ``[r0, r1) x [c0, c1)``."""
    offs_d = tl.arange(0, D)
    offs_f = tl.arange(0, FC)
    for s0 in range(0, n_lm, BLOCK_N):
        tok, lr, lc, ok = _landmark_keys(lm_ptr, s0, n_lm, n_cond, width, BLOCK_N)
        ok = ok & _outside(lr, lc, r0, r1, c0, c1)
        fk = tl.load(f_base + tok[:, None] * FP + offs_f[None, :], mask=ok[:, None], other=0.0)
        vt = tl.load(v_base + tok[:, None] * stride_vn + offs_d[None, :], mask=ok[:, None], other=0.0)
        kvw = tl.dot(tl.trans(fk), vt, kvw)
        kw += tl.sum(fk.to(tl.float32), axis=0)
    return kvw, kw


@triton.jit
def _kernel_weights(phq, fk, keep, acc, lden, wsc, vt):
    """``acc += (wsc * (phq fk) ∘ keep) vt``, ``lden += rowsum((phq fk) ∘ keep)``; ``fk [FP, BN]``."""
    pl = tl.where(keep, tl.dot(phq, fk), 0.0)
    lden += tl.sum(pl, axis=1)
    acc = tl.dot((pl * wsc).to(vt.dtype), vt, acc)
    return acc, lden


@triton.jit
def _lin_window(phq, f_base, v_base, stride_vn, n_cond, width, wr0, wc0, nwc, nwin, qr0, qr1, qc0, qc1,
                acc, lden, wsc, D: tl.constexpr, FP: tl.constexpr, BLOCK_N: tl.constexpr):
    """Kernel weights of the union-window keys outside each query's own window ``[qr0, qr1) x [qc0, qc1)``
    (``MULTI`` blocks), into ``acc`` (times ``wsc``) and ``lden``."""
    offs_d = tl.arange(0, D)
    offs_f = tl.arange(0, FP)
    for s0 in range(0, nwin, BLOCK_N):
        kr, kc, ok = _window_keys(s0, wr0, wc0, nwc, nwin, BLOCK_N)
        row = (n_cond + kr * width + kc).to(tl.int64)
        fk = tl.load(f_base + row[None, :] * FP + offs_f[:, None], mask=ok[None, :], other=0.0)  # [FP, BN]
        vt = tl.load(v_base + row[:, None] * stride_vn + offs_d[None, :], mask=ok[:, None], other=0.0)
        keep = _outside(kr[None, :], kc[None, :], qr0[:, None], qr1[:, None], qc0[:, None], qc1[:, None])
        acc, lden = _kernel_weights(phq, fk, keep, acc, lden, wsc, vt)
    return acc, lden


@triton.jit
def _lin_landmarks(phq, f_base, v_base, stride_vn, lm_ptr, n_lm, n_cond, width, wr0, wr1, wc0, wc1,
                   qr0, qr1, qc0, qc1, acc, lden, wsc, D: tl.constexpr, FP: tl.constexpr, BLOCK_N: tl.constexpr):
    """Kernel weights of the landmarks inside the union window ``[wr0, wr1) x [wc0, wc1)`` but outside each
    query's own window (``MULTI`` blocks)."""
    offs_d = tl.arange(0, D)
    offs_f = tl.arange(0, FP)
    for s0 in range(0, n_lm, BLOCK_N):
        tok, lr, lc, ok = _landmark_keys(lm_ptr, s0, n_lm, n_cond, width, BLOCK_N)
        fk = tl.load(f_base + tok[None, :] * FP + offs_f[:, None], mask=ok[None, :], other=0.0)
        vt = tl.load(v_base + tok[:, None] * stride_vn + offs_d[None, :], mask=ok[:, None], other=0.0)
        keep = (_inside(lr[None, :], lc[None, :], wr0, wr1, wc0, wc1)
                & _outside(lr[None, :], lc[None, :], qr0[:, None], qr1[:, None], qc0[:, None], qc1[:, None]))
        acc, lden = _kernel_weights(phq, fk, keep, acc, lden, wsc, vt)
    return acc, lden


@triton.jit
def _add_kv(acc, phq, kv):
    """``acc + phq @ kv`` for ``kv [FC, D]`` fp32, fp32-accurate on 16-bit tensor cores: ``kv`` scaled to
    ``|kv| <= 1`` (fp16 range) and split into a 16-bit high part and the 16-bit rounding of the rest."""
    u = tl.max(tl.max(tl.abs(kv), axis=1), axis=0)
    u = tl.where(u > 0.0, u, 1.0)
    kvs = kv * (1.0 / u)
    hi = kvs.to(phq.dtype)
    lo = (kvs - hi.to(tl.float32)).to(phq.dtype)
    return tl.dot(phq, lo, tl.dot(phq, hi, acc * (1.0 / u))) * u


@triton.jit
def _complement(acc, den, f_base, v_base, stride_vn, lm_ptr, n_lm, n_cond, width, wr0, wr1, wc0, wc1, nwc, nwin,
                st, fq, qrow, qok, g, kvw0, kw0, D: tl.constexpr, FP: tl.constexpr, FC: tl.constexpr,
                BLOCK_N: tl.constexpr, SUMS_DONE: tl.constexpr):
    """One exact set for the whole block (the window rectangle, ``nwin`` keys, and the landmarks outside
    it): ``acc += g phi_q (KV_img - KV_S)``, ``den += g phi_q·(K_img - K_S)``, ``FC`` features at a time
    (``[FC, D]`` fp32 sums next to the accumulator). ``st``: ``[KV_img | K_img]``; ``fq``: this head's
    ``phiq``; queries at token rows ``qrow``. ``SUMS_DONE`` (``FC == FP``): the window's sums are
    ``kvw0, kw0`` already (summed in the softmax loop)."""
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, FC)
    for fc in tl.static_range(FP // FC):
        if SUMS_DONE:
            kvw = kvw0
            kw = kw0
        else:
            kvw = tl.zeros([FC, D], dtype=tl.float32)
            kw = tl.zeros([FC], dtype=tl.float32)
            kvw, kw = _kv_window(f_base + fc * FC, v_base, stride_vn, n_cond, width, wr0, wc0, nwc, nwin, kvw, kw,
                                 D, FP, FC, BLOCK_N)
        kvw, kw = _kv_landmarks(f_base + fc * FC, v_base, stride_vn, lm_ptr, n_lm, n_cond, width, wr0, wr1, wc0, wc1,
                                kvw, kw, D, FP, FC, BLOCK_N)
        kv_c = tl.load(st + (fc * FC + offs_c)[:, None] * D + offs_d[None, :]) - kvw
        k_c = tl.load(st + FP * D + fc * FC + offs_c) - kw
        phq = tl.load(fq + qrow[:, None] * FP + fc * FC + offs_c[None, :], mask=qok[:, None], other=0.0)
        acc = _add_kv(acc, phq, kv_c * g)
        den += g * tl.sum(phq.to(tl.float32) * k_c[None, :], axis=1)
    return acc, den


# ------------------------------------------------------------------------------ main pass


@triton.jit
def _text_block(pid, q_ptr, k_ptr, v_ptr, o_ptr, phiq_ptr, phik_ptr, stats_ptr, gamma_ptr, lm_ptr,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                gamma_stride, n_lm, n_cond, N, width, H, n_text_blocks, qk_scale, denom_eps,
                D: tl.constexpr, FP: tl.constexpr, FC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                TEXT_ALL: tl.constexpr, EVEN_COND: tl.constexpr):
    """Conditioning queries ``[blk * BLOCK_M, ...)`` of head ``bh`` (``pid = bh * n_text_blocks + blk``)."""
    bh = pid // n_text_blocks
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    tokq = (pid % n_text_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    qok = tokq < n_cond
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    qt = tl.load(q_base + tokq.to(tl.int64)[:, None] * stride_qn + offs_d[None, :], mask=qok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    if TEXT_ALL:
        # plain softmax over every key: the complement is empty
        acc, l_i, m_i = _attend_range(qt, k_base, v_base, stride_kn, stride_vn, 0, N,
                                      acc, l_i, m_i, qk_scale, D, BLOCK_N, False)
        out = acc / (l_i + denom_eps)[:, None]
    else:
        # S = conditioning keys + every landmark; the kernel term covers the other image keys
        acc, l_i, m_i = _attend_range(qt, k_base, v_base, stride_kn, stride_vn, 0, n_cond,
                                      acc, l_i, m_i, qk_scale, D, BLOCK_N, EVEN_COND)
        acc, l_i, m_i = _attend_landmarks(qt, k_base, v_base, stride_kn, stride_vn, lm_ptr, n_lm, n_cond, width,
                                          0, 0, 0, 0, acc, l_i, m_i, qk_scale, D, BLOCK_N)
        f_base = phik_ptr + bh.to(tl.int64) * N * FP
        st = stats_ptr + bh.to(tl.int64) * (FP * D + FP)
        fq = phiq_ptr + bh.to(tl.int64) * N * FP
        g = tl.load(gamma_ptr + h * gamma_stride)
        acc, den = _complement(acc, l_i + denom_eps, f_base, v_base, stride_vn, lm_ptr, n_lm, n_cond, width,
                               0, 0, 0, 0, 1, 0, st, fq, tokq.to(tl.int64), qok, g, 0, 0, D, FP, FC, BLOCK_N, False)
        out = acc / den[:, None]
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + tokq.to(tl.int64)[:, None] * stride_on + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=qok[:, None])


@triton.jit
def _block_rows(blk, n_blk_c, blk_er, blk_ec, blk_pr, blk_pc, blk_cr, blk_cc, height, width,
                BLOCK_M: tl.constexpr):
    """Block ``blk``'s grid rectangle ``[r0, r1) x [c0, c1)`` and its query slots: grid row and column
    ``[BM]`` and validity (slot ``i`` -> ``(i // blk_ec, i % blk_ec)``)."""
    offs_m = tl.arange(0, BLOCK_M)
    ub = blk // n_blk_c
    vb = blk % n_blk_c
    gr = ub // blk_cr
    r0 = gr * blk_pr + (ub % blk_cr) * blk_er
    r1 = tl.minimum(tl.minimum(r0 + blk_er, gr * blk_pr + blk_pr), height)
    gc = vb // blk_cc
    c0 = gc * blk_pc + (vb % blk_cc) * blk_ec
    c1 = tl.minimum(tl.minimum(c0 + blk_ec, gc * blk_pc + blk_pc), width)
    qr = r0 + offs_m // blk_ec
    qc = c0 + offs_m % blk_ec
    qok = (offs_m < blk_er * blk_ec) & (qr < r1) & (qc < c1)
    return r0, r1, c0, c1, qr, qc, qok


@triton.jit
def _window_span(first, last, radius, key, size):
    """Grid rows (or columns) ``[lo, hi)`` of the whole key tiles (``key`` tokens) that cover
    ``[first - radius, last + radius]``, clipped to ``[0, size)`` (``first``, ``last``: a query tile's first
    and last row; non-negative, so ``//`` floors)."""
    lo = (tl.maximum(first - radius, 0) // key) * key
    hi = tl.minimum(((last + radius) // key + 1) * key, size)
    return lo, hi


@triton.jit
def _image_block(p, q_ptr, k_ptr, v_ptr, o_ptr, phiq_ptr, phik_ptr, stats_ptr, gamma_ptr, lm_ptr,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                 gamma_stride, n_lm, n_cond, height, width, H,
                 tile_h, tile_w, radius, key_h, key_w,
                 blk_er, blk_ec, blk_pr, blk_pc, blk_cr, blk_cc, n_blk_c, n_img_blocks, qk_scale, denom_eps,
                 D: tl.constexpr, FP: tl.constexpr, FC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 MULTI: tl.constexpr, EVEN_COND: tl.constexpr, FUSE_SUMS: tl.constexpr):
    """Image block ``p % n_img_blocks`` of head ``p // n_img_blocks`` (see :func:`_window_main`)."""
    bh = p // n_img_blocks
    blk = p % n_img_blocks
    b = bh // H
    h = bh % H
    N = n_cond + height * width
    offs_d = tl.arange(0, D)
    offs_f = tl.arange(0, FP)
    r0, r1, c0, c1, qr, qc, qok = _block_rows(blk, n_blk_c, blk_er, blk_ec, blk_pr, blk_pc, blk_cr, blk_cc,
                                              height, width, BLOCK_M)
    # union of the block's windows (its tiles grown by the radius, in whole key tiles, clipped):
    # grid rows [wr0, wr1) x cols [wc0, wc1)
    wr0, wr1 = _window_span((r0 // tile_h) * tile_h, ((r1 - 1) // tile_h) * tile_h + tile_h - 1, radius, key_h, height)
    wc0, wc1 = _window_span((c0 // tile_w) * tile_w, ((c1 - 1) // tile_w) * tile_w + tile_w - 1, radius, key_w, width)
    nwc = tl.maximum(wc1 - wc0, 1)
    nwin = tl.maximum(wr1 - wr0, 0) * tl.maximum(wc1 - wc0, 0)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    qrow = (n_cond + qr * width + qc).to(tl.int64)
    qt = tl.load(q_base + qrow[:, None] * stride_qn + offs_d[None, :], mask=qok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    acc, l_i, m_i = _attend_range(qt, k_base, v_base, stride_kn, stride_vn, 0, n_cond,
                                  acc, l_i, m_i, qk_scale, D, BLOCK_N, EVEN_COND)
    f_base = phik_ptr + bh.to(tl.int64) * N * FP
    kvw = tl.zeros([FP, D], dtype=tl.float32)
    kw = tl.zeros([FP], dtype=tl.float32)
    if MULTI:
        # each query's own window (its tile's): per (query, key) masks
        qr0, qr1 = _window_span((qr // tile_h) * tile_h, (qr // tile_h) * tile_h + tile_h - 1, radius, key_h, height)
        qc0, qc1 = _window_span((qc // tile_w) * tile_w, (qc // tile_w) * tile_w + tile_w - 1, radius, key_w, width)
        acc, l_i, m_i, kvw, kw = _attend_window(qt, k_base, v_base, stride_kn, stride_vn, n_cond, width, wr0, wc0,
                                                nwc, nwin, qr0, qr1, qc0, qc1, acc, l_i, m_i, qk_scale, f_base, kvw, kw,
                                                D, FP, BLOCK_N, True, FUSE_SUMS)
        acc, l_i, m_i = _attend_landmarks(qt, k_base, v_base, stride_kn, stride_vn, lm_ptr, n_lm, n_cond, width,
                                          qr0[:, None], qr1[:, None], qc0[:, None], qc1[:, None],
                                          acc, l_i, m_i, qk_scale, D, BLOCK_N)
    else:
        acc, l_i, m_i, kvw, kw = _attend_window(qt, k_base, v_base, stride_kn, stride_vn, n_cond, width, wr0, wc0,
                                                nwc, nwin, 0, 0, 0, 0, acc, l_i, m_i, qk_scale, f_base, kvw, kw,
                                                D, FP, BLOCK_N, False, FUSE_SUMS)
        acc, l_i, m_i = _attend_landmarks(qt, k_base, v_base, stride_kn, stride_vn, lm_ptr, n_lm, n_cond, width,
                                          wr0, wr1, wc0, wc1, acc, l_i, m_i, qk_scale, D, BLOCK_N)
    # m_i is final: the kernel term goes straight into the accumulator. First the complement of the
    # block's (union) exact set, exactly in fp32 from [FC, D] sums.
    fq = phiq_ptr + bh.to(tl.int64) * N * FP
    st = stats_ptr + bh.to(tl.int64) * (FP * D + FP)
    g = tl.load(gamma_ptr + h * gamma_stride)
    acc, den = _complement(acc, l_i + denom_eps, f_base, v_base, stride_vn, lm_ptr, n_lm, n_cond, width,
                           wr0, wr1, wc0, wc1, nwc, nwin, st, fq, qrow, qok, g, kvw, kw, D, FP, FC, BLOCK_N, FUSE_SUMS)
    if MULTI:
        # Then per query the union keys outside its own window (a positive sum: no cancellation), less the
        # landmarks among them (exact for every query). Block scale sc: the 16-bit kernel weights
        # g*sc*phi_q·phi_k stay <= max(phi_k) (fp16 range).
        phq = tl.load(fq + qrow[:, None] * FP + offs_f[None, :], mask=qok[:, None], other=0.0)
        sc = 1.0 / tl.maximum(g * tl.max(tl.sum(phq.to(tl.float32), axis=1), axis=0), 1.0)
        acc = acc * sc
        l_add = tl.zeros([BLOCK_M], dtype=tl.float32)
        l_sub = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc, l_add = _lin_window(phq, f_base, v_base, stride_vn, n_cond, width, wr0, wc0, nwc, nwin,
                                 qr0, qr1, qc0, qc1, acc, l_add, g * sc, D, FP, BLOCK_N)
        acc, l_sub = _lin_landmarks(phq, f_base, v_base, stride_vn, lm_ptr, n_lm, n_cond, width, wr0, wr1, wc0, wc1,
                                    qr0, qr1, qc0, qc1, acc, l_sub, -g * sc, D, FP, BLOCK_N)
        out = acc / (sc * (den + g * (l_add - l_sub)))[:, None]
    else:
        out = acc / den[:, None]
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + qrow[:, None] * stride_on + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=qok[:, None])


@triton.jit(do_not_specialize=_MAIN_GENERIC)
def _window_main(
    q_ptr, k_ptr, v_ptr, o_ptr, phiq_ptr, phik_ptr, stats_ptr, gamma_ptr, lm_ptr,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    gamma_stride, n_lm, n_cond, height, width, H, BH,
    tile_h, tile_w, radius, key_h, key_w,
    blk_er, blk_ec, blk_pr, blk_pc, blk_cr, blk_cc, n_blk_c, n_img_blocks, n_text_blocks,
    qk_scale, denom_eps,
    D: tl.constexpr, FP: tl.constexpr, FC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MULTI: tl.constexpr, TEXT_ALL: tl.constexpr, EVEN_COND: tl.constexpr, FUSE_SUMS: tl.constexpr,
):
    """The student's output for one block of queries. 1-D grid: ``n_text_blocks * BH`` text programs
    first (with ``text_query_keys: all`` each sees every key: the longest programs start first), then
    ``n_img_blocks * BH`` image programs, head-major so the programs in flight share key rows.

    Image block geometry, per axis (rows shown): block index ``u`` -> group ``u // blk_cr`` of period
    ``blk_pr`` grid rows (whole tiles per block x ``tile_h``; or ``tile_h`` when a tile is split into
    ``blk_cr`` chunks of ``blk_er`` rows); the block holds grid rows ``[r0, r1)``, at most ``blk_er``, as
    query slots ``i -> (i // blk_ec, i % blk_ec)``. The window of a query tile is the whole key tiles
    (``key_h x key_w``) covering the tile grown by ``radius``, clipped to the grid (``MULTI``: the block's
    tiles have different windows).

    ``q, k, v, o [B, H, N, D]`` (any strides, last dim contiguous); ``phiq, phik [BH, N, FP]`` (from
    :func:`_window_feature_pass`); ``stats [BH, FP*D + FP]`` = ``[KV_img | K_img]``; ``gamma [H or 1]``
    fp32 (``gamma_stride`` 1 or 0); ``lm [n_lm]`` int32 landmark token indices (sorted image tokens);
    ``qk_scale = log2(e) / sqrt(D)``."""
    pid = tl.program_id(0)
    n_text_prog = n_text_blocks * BH
    if pid < n_text_prog:
        _text_block(pid, q_ptr, k_ptr, v_ptr, o_ptr, phiq_ptr, phik_ptr, stats_ptr, gamma_ptr, lm_ptr,
                    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                    gamma_stride, n_lm, n_cond, n_cond + height * width, width, H, n_text_blocks, qk_scale, denom_eps,
                    D, FP, FC, BLOCK_M, BLOCK_N, TEXT_ALL, EVEN_COND)
    else:
        _image_block(pid - n_text_prog, q_ptr, k_ptr, v_ptr, o_ptr, phiq_ptr, phik_ptr, stats_ptr, gamma_ptr, lm_ptr,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                     gamma_stride, n_lm, n_cond, height, width, H,
                     tile_h, tile_w, radius, key_h, key_w,
                     blk_er, blk_ec, blk_pr, blk_pc, blk_cr, blk_cc, n_blk_c, n_img_blocks, qk_scale, denom_eps,
                     D, FP, FC, BLOCK_M, BLOCK_N, MULTI, EVEN_COND, FUSE_SUMS)
