"""Numerics of the window student's fused kernels under Triton's CPU interpreter, against the fp64 formula
of tests/students/test_window_kernels.py (exact sets built from their definition).

Run in a fresh process with ``TRITON_INTERPRET=1`` set from the start, by
``test_window_kernels.py::test_kernels_under_the_interpreter_in_a_fresh_process``. fp16 inputs (the
interpreter's bf16 ``tl.dot`` is wrong in Triton 3.8). Small launch shapes (16-row query blocks, 16-key
steps) so that one block holds several tiles, parts of tiles, or tiles with different windows.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from students.test_window_kernels import formula, make_layer, rel, window_cfg

from flux2ttr.students import window_fast

SMALL = window_fast.KernelConfig(block_m=16, block_n=16, feature_block_n=16)
TOL = 2e-3  # fp16 operands, fp32 accumulation (measured ~3e-4)


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("run by test_window_kernels.py with TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    monkeypatch.setattr(window_fast, "ALLOW_CPU_INTERPRETER", True)


def inputs(b, heads, n, d, seed, scale=1.0, layout="bhnd"):
    g = torch.Generator().manual_seed(seed)
    if layout == "bnhd":  # what a fused qkv projection gives: [B, N, H, D] viewed as [B, H, N, D]
        return [(torch.randn(b, n, heads, d, generator=g) * scale).half().transpose(1, 2) for _ in range(3)]
    return [(torch.randn(b, heads, n, d, generator=g) * scale).half() for _ in range(3)]


def check(layer, n_cond, height, width, *, kernel=SMALL, b=2, seed=7, layout="bhnd", tol=TOL, scale=1.0):
    """Fused output vs the fp64 formula; also that both the exact and the kernel term matter."""
    heads, d = layer.num_heads, layer.config.head_dim
    q, k, v = inputs(b, heads, n_cond + height * width, d, seed, scale, layout)
    lm = layer.landmarks(n_cond, height, width)
    with torch.no_grad():
        assert window_fast.fast_path_reason(layer, q, k, v) is None
        out = window_fast.fast_forward(layer, q, k, v, n_cond, 0.5, 3.0, height=height, width=width, kernel=kernel)
    ref = formula(layer, q, k, v, n_cond, height, width, landmarks=lm)
    assert out.dtype == torch.float16 and out.shape == ref.shape and torch.isfinite(out).all()
    err = rel(out, ref)
    assert err < tol, err
    # no row is off on its own (a wrong window shows in a few rows only)
    row_err = (out.double() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-3)
    assert float(row_err.max()) < 20 * tol, float(row_err.max())
    return out, ref, (q, k, v, lm)


def both_terms_matter(layer, n_cond, height, width, qkvl, ref):
    q, k, v, lm = qkvl
    with torch.no_grad():
        old = layer.log_gamma.detach().clone()
        layer.log_gamma.fill_(-30.0)  # kernel term off
        exact_only = formula(layer, q, k, v, n_cond, height, width, landmarks=lm)
        layer.log_gamma.copy_(old)
    assert rel(exact_only, ref) > 2e-2


CASES = {
    # several tiles per block with different windows (2 x 3 tiles, radius 1: 2 tiles per 16-row block)
    "multi_tile_landmarks_in_and_out": (dict(window_tile=[2, 3], window_radius=1), 5, 7, 9, [5 + 3, 5 + 40, 5 + 62]),
    "multi_tile_text_and_landmarks": (dict(window_tile=[2, 3], window_radius=1, text_query_keys="text_and_landmarks"),
                                      5, 7, 9, [5 + 0, 5 + 31, 5 + 62]),
    # 1 x 1 tiles: 16 tiles (and windows) per block, windows clipped at every border
    "unit_tiles": (dict(window_tile=[1, 1], window_radius=2), 3, 5, 7, [3 + 17]),
    # one tile per block, grid not a multiple of the tile (partial tiles on the right and bottom)
    "one_tile_per_block": (dict(window_tile=[4, 4], window_radius=3, text_query_keys="text_and_landmarks"),
                           5, 7, 9, [5 + 0, 5 + 30, 5 + 58]),
    # a tile larger than a block: split along rows (3 x 8 = 24 > 16 slots)
    "tile_split_rows": (dict(window_tile=[3, 8], window_radius=2), 20, 7, 17, [20 + 50, 20 + 118]),
    # a tile wider than a block: split along columns too (2 x 20)
    "tile_split_cols": (dict(window_tile=[2, 20], window_radius=0), 4, 5, 23, [4 + 2, 4 + 100]),
    # radius 0, no landmarks, shared MLP, one gamma for all heads
    "radius0_shared": (dict(window_tile=[2, 2], window_radius=0, shared_qk=True, per_head_gamma=False), 6, 6, 6, []),
    # no conditioning tokens at all
    "no_text": (dict(window_tile=[2, 3], window_radius=2), 0, 6, 8, [10]),
    # windows of whole query tiles (the key tile = the query tile: artifacts from before window_key_tile)
    "whole_key_tiles_multi": (dict(window_tile=[2, 3], window_radius=1, window_key_tile=[2, 3]), 5, 7, 9, [5 + 3, 5 + 62]),
    "whole_key_tiles_split": (dict(window_tile=[3, 8], window_radius=2, window_key_tile=[3, 8]), 20, 7, 17, [20 + 50]),
    # key tiles of their own size, neither 1 nor the query tile
    "key_tiles_2x2": (dict(window_tile=[4, 4], window_radius=3, window_key_tile=[2, 2]), 5, 9, 11, [5 + 0, 5 + 60]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_match_formula(name):
    kw, n_cond, h, w, lm = CASES[name]
    layer = make_layer(window_cfg(**kw), landmarks=lm)
    out, ref, qkvl = check(layer, n_cond, h, w)
    both_terms_matter(layer, n_cond, h, w, qkvl, ref)


def test_feature_and_hidden_chunks():
    """FP 32 in two 16-wide feature chunks, hidden 64 in four 16-wide MLP chunks."""
    layer = make_layer(window_cfg(feature_dim=24, window_tile=[2, 3], window_radius=1), landmarks=[5 + 9])
    kc = dataclasses.replace(SMALL, feature_chunk=16, mlp_chunk=16)
    for multi_tile in (False, True):
        kcm = dataclasses.replace(kc, block_m=16 if multi_tile else 32)
        check(layer, 5, 7, 9, kernel=kcm)
    layer2 = make_layer(window_cfg(feature_dim=24, window_tile=[4, 4], window_radius=2,
                                   text_query_keys="text_and_landmarks"), landmarks=[5 + 9])
    check(layer2, 5, 7, 9, kernel=kc)


def test_window_covering_everything_is_softmax():
    """Radius beyond the grid: every key is exact, the complement is empty: plain softmax."""
    layer = make_layer(window_cfg(window_tile=[2, 3], window_radius=20), log_gamma=(2.0, 1.0))
    out, ref, (q, k, v, _) = check(layer, 5, 6, 7)
    sm = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 32 ** 0.5, -1) @ v.double()
    assert rel(out, sm) < TOL


def test_strided_inputs_and_larger_blocks():
    """[B, N, H, D] views; 32-row blocks (4 tiles of 2 x 4 per block)."""
    layer = make_layer(window_cfg(window_tile=[2, 4], window_radius=2), heads=3, log_gamma=(-3.0, -4.0, -2.5),
                       landmarks=[7 + 5, 7 + 77])
    q, _, _ = inputs(2, 3, 7 + 80, 32, 0, layout="bnhd")
    assert q.stride(2) == 3 * 32 and not q.is_contiguous()
    check(layer, 7, 8, 10, kernel=dataclasses.replace(SMALL, block_m=32), layout="bnhd")


def test_large_gamma_fp16_stays_finite():
    """A kernel term far above the exact one: the 16-bit kernel weights are scaled before the cast."""
    layer = make_layer(window_cfg(window_tile=[2, 3], window_radius=1), log_gamma=(6.0, 4.0), landmarks=[5 + 3])
    out, ref, _ = check(layer, 5, 7, 9, scale=2.0)
    assert torch.isfinite(out).all()
