"""Window student: the exact key sets against their definition, and the forward against an fp64
evaluation of the formula (exact softmax on S_i plus the kernel term on the rest, one normaliser)."""

from __future__ import annotations

import math

import pytest
import torch

from flux2ttr.students.build import build_student
from flux2ttr.students.hkr import HKRConfig
from flux2ttr.students.window import WindowLayer, exact_key_mask

D = 16


def cfg(**kw) -> HKRConfig:
    base = dict(mode="window", head_dim=D, feature_dim=8, window_tile=[2, 3], window_radius=1,
                landmark_fraction=0.2, landmark_min=2, landmark_max=0)
    base.update(kw)
    return HKRConfig(**base)


def brute_mask(n_cond, h, w, c: HKRConfig, landmarks) -> torch.Tensor:
    """The exact set by its definition, one (query, key) pair at a time: an image key is in the window when
    its key tile intersects the query's tile grown by the radius."""
    th, tw = c.window_tile
    kh, kw = c.window_key_tile
    r_ = c.window_radius
    n = n_cond + h * w
    m = torch.zeros(n, n, dtype=torch.bool)
    lm = set(int(x) for x in landmarks)
    for i in range(n):
        for j in range(n):
            if i < n_cond:
                m[i, j] = c.text_query_keys == "all" or j < n_cond or j in lm
                continue
            if j < n_cond or j in lm:
                m[i, j] = True
                continue
            qr, qc = divmod(i - n_cond, w)
            kr, kc = divmod(j - n_cond, w)
            tr, tc = qr // th, qc // tw
            grown_r = (tr * th - r_, (tr + 1) * th - 1 + r_)  # inclusive
            grown_c = (tc * tw - r_, (tc + 1) * tw - 1 + r_)
            key_r = ((kr // kh) * kh, (kr // kh) * kh + kh - 1)
            key_c = ((kc // kw) * kw, (kc // kw) * kw + kw - 1)
            m[i, j] = (key_r[0] <= grown_r[1] and grown_r[0] <= key_r[1]
                       and key_c[0] <= grown_c[1] and grown_c[0] <= key_c[1])
    return m


@pytest.mark.parametrize("kw", [{}, {"window_radius": 0}, {"window_radius": 3, "window_tile": [1, 1]},
                                {"text_query_keys": "text_and_landmarks", "window_landmarks": True},
                                {"window_key_tile": [2, 3]}, {"window_key_tile": [2, 2], "window_radius": 2},
                                {"window_tile": [3, 4], "window_key_tile": [1, 1], "window_radius": 1}])
def test_mask_matches_definition(kw):
    c = cfg(**kw)
    n_cond, h, w = 3, 5, 7  # grid not a multiple of the tile
    layer = WindowLayer(c, num_heads=1)
    lm = layer.landmarks(n_cond, h, w)
    assert (lm.numel() > 0) == c.window_landmarks
    got = exact_key_mask(torch.arange(n_cond + h * w), n_cond, h, w, c, lm)
    assert torch.equal(got, brute_mask(n_cond, h, w, c, lm))
    # every image query sees at least its own (2R+1)^2 neighbourhood
    for i in range(n_cond, n_cond + h * w):
        qr, qc = divmod(i - n_cond, w)
        for j in range(n_cond, n_cond + h * w):
            kr, kc = divmod(j - n_cond, w)
            if abs(kr - qr) <= c.window_radius and abs(kc - qc) <= c.window_radius:
                assert got[i, j]


def reference(layer: WindowLayer, q, k, v, n_cond, h, w) -> torch.Tensor:
    """fp64 evaluation of the formula with the complement sums written as K - K_S, KV - KV_S."""
    c = layer.config
    mask = brute_mask(n_cond, h, w, c, layer.landmarks(n_cond, h, w))
    q64, k64, v64 = q.double(), k.double(), v.double()
    phi_k = layer.phi_q if layer.phi_k is None else layer.phi_k
    with torch.no_grad():  # the feature MLPs compute in fp32 by design; the rest of the formula is fp64
        pq = layer.phi_q(q).double()
        pk = phi_k(k).double()
    gamma = layer.log_gamma.detach().double().exp()
    b, hh, n, d = q.shape
    out = torch.empty(b, hh, n, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(hh):
            g = gamma[hi if gamma.numel() > 1 else 0]
            ksum = pk[bi, hi].sum(0)
            kv = pk[bi, hi].T @ v64[bi, hi]
            for i in range(n):
                s_idx = mask[i].nonzero().flatten()
                s = q64[bi, hi, i] @ k64[bi, hi, s_idx].T / math.sqrt(d)
                e = torch.exp(s - s.max())
                k_s = pk[bi, hi, s_idx].sum(0)
                kv_s = pk[bi, hi, s_idx].T @ v64[bi, hi, s_idx]
                num = e @ v64[bi, hi, s_idx] + g * pq[bi, hi, i] @ (kv - kv_s)
                den = e.sum() + g * pq[bi, hi, i] @ (ksum - k_s) + c.denom_eps
                out[bi, hi, i] = num / den
    return out


def qkv(b=2, h=2, n=3 + 5 * 7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, D, generator=g) * 1.5 for _ in range(3)]


@pytest.mark.parametrize("kw", [{}, {"text_query_keys": "text_and_landmarks", "window_landmarks": True},
                                {"shared_qk": True, "per_head_gamma": False}])
def test_forward_matches_fp64_formula(kw):
    torch.manual_seed(1)
    layer = WindowLayer(cfg(q_chunk=7, **kw), num_heads=2)
    with torch.no_grad():
        layer.log_gamma.copy_(torch.tensor([0.3, -0.5])[: layer.log_gamma.numel()])
    q, k, v = qkv()
    out = layer(q, k, v, 3, 0.5, 4.0, height=5, width=7)
    ref = reference(layer, q, k, v, 3, 5, 7)
    assert torch.allclose(out.double(), ref, atol=2e-5, rtol=1e-4), (out.double() - ref).abs().max()


def test_exact_where_the_window_covers_everything():
    """Radius beyond the grid: S_i is every key, the complement is empty, the student is softmax."""
    layer = WindowLayer(cfg(window_radius=10), num_heads=2)
    q, k, v = qkv()
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(D), -1) @ v.double()
    out = layer(q, k, v, 3, 0.5, 4.0, height=5, width=7)
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_query_subset_equals_full_rows_per_batch_row():
    torch.manual_seed(2)
    layer = WindowLayer(cfg(), num_heads=2)
    q, k, v = qkv()
    full = layer(q, k, v, 3, 0.5, 4.0, height=5, width=7)
    idx = torch.tensor([[0, 4, 9, 37], [2, 3, 20, 30]])
    q_sub = torch.stack([q[b][:, idx[b]] for b in range(2)])
    sub = layer(q_sub, k, v, 3, 0.5, 4.0, height=5, width=7, q_idx=idx)
    for b in range(2):
        assert torch.allclose(sub[b], full[b][:, idx[b]], atol=1e-6)


def test_build_student_follows_mode_and_gamma_trains():
    layer = build_student(cfg(), num_heads=2)
    assert isinstance(layer, WindowLayer) and layer.log_gamma.shape == (2,)
    q, k, v = qkv()
    layer(q, k, v, 3, 0.5, 4.0, height=5, width=7).square().sum().backward()
    assert layer.log_gamma.grad is not None and torch.isfinite(layer.log_gamma.grad).all()
    assert layer.phi_q.net[0].weight.grad.abs().sum() > 0
    assert set(layer.report()) == {"gamma_mean", "gamma_min", "gamma_max"}


def test_head_subset_rows_use_their_own_heads_gamma():
    """A call holding heads [1, 3] of a 4-head layer (per batch row, or one list for the batch) equals those
    rows of the 4-head call: the per-head gamma is indexed by the heads, the feature maps are shared."""
    torch.manual_seed(5)
    layer = WindowLayer(cfg(), num_heads=4)
    with torch.no_grad():
        layer.log_gamma.copy_(torch.tensor([-1.0, 0.5, 0.0, 1.5]))  # distinct balances: a wrong index shows
    q, k, v = (torch.randn(2, 4, 3 + 35, D) for _ in range(3))
    full = layer(q, k, v, 3, 0.5, 4.0, height=5, width=7)
    heads = torch.tensor([1, 3])
    sub = layer(q[:, heads], k[:, heads], v[:, heads], 3, 0.5, 4.0, height=5, width=7, heads=heads)
    torch.testing.assert_close(sub, full[:, heads], rtol=0, atol=1e-6)
    per_row = torch.tensor([[0, 2], [1, 3]])
    rows = [layer(q[b:b + 1, per_row[b]], k[b:b + 1, per_row[b]], v[b:b + 1, per_row[b]], 3, 0.5, 4.0, height=5,
                  width=7, heads=per_row[b]) for b in range(2)]
    pick = lambda t: torch.stack([t[b, per_row[b]] for b in range(2)])  # noqa: E731
    both = layer(pick(q), pick(k), pick(v), 3, 0.5, 4.0, height=5, width=7, heads=per_row)
    torch.testing.assert_close(both, torch.cat(rows), rtol=0, atol=1e-6)
    torch.testing.assert_close(both, pick(full), rtol=0, atol=1e-6)
    # heads must name one head of the layer per head row
    with pytest.raises(ValueError, match="heads must be"):
        layer(q[:, :2], k[:, :2], v[:, :2], 3, 0.5, 4.0, height=5, width=7, heads=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="out of range"):
        layer(q[:, :2], k[:, :2], v[:, :2], 3, 0.5, 4.0, height=5, width=7, heads=torch.tensor([0, 4]))
    # the gradient reaches only the heads the call holds
    layer.zero_grad()
    layer(q[:, heads], k[:, heads], v[:, heads], 3, 0.5, 4.0, height=5, width=7, heads=heads).square().sum().backward()
    g = layer.log_gamma.grad
    assert g[0] == 0 and g[2] == 0 and g[1] != 0 and g[3] != 0
