"""Kernel numerics of the fast HKR path under Triton's CPU interpreter, against the fp32 eager student.

Run in a fresh interpreter with ``TRITON_INTERPRET=1`` set from the start by
``tests/students/test_fast_path.py::test_kernels_under_the_interpreter_in_a_fresh_process``: once other packages
(ComfyUI's kernels) have imported Triton without the interpreter, ``tl`` builtins such as ``tl.zeros``
no longer run inside interpreted kernels of the same process.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from flux2ttr.students import fast_path
from helpers.students import D, eager, make_layer, qkv, rel, small_cfg

# ------------------------------------------------------------------ kernels under the interpreter


@pytest.fixture(scope="module")
def interpreted():
    """Triton kernels rebuilt for the CPU interpreter (the decorator reads TRITON_INTERPRET)."""
    pytest.importorskip("triton")
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    mp.setattr(fast_path, "ALLOW_CPU_INTERPRETER", True)
    from flux2ttr.students import triton_kernels

    importlib.reload(triton_kernels)
    yield triton_kernels
    mp.undo()
    importlib.reload(triton_kernels)


SMALL = fast_path.KernelConfig(block_n=16, block_m=16, block_l=16, block_m_adaptive=16)


@pytest.mark.parametrize(
    "cfg_kw, kernel_kw, sigma",
    [
        ({}, {"fused": True, "gather_min_tokens": 1 << 30}, 0.4),
        ({}, {"fused": False, "gather_min_tokens": 0}, "per-row"),
        ({"adaptive_alpha": True}, {"fused": True, "gather_min_tokens": 0}, "per-row"),
        ({"shared_qk": True, "adaptive_alpha": True}, {"fused": False, "gather_min_tokens": 1 << 30}, 0.9),
        ({"landmark_fraction": 0.0, "landmark_min": 0}, {"fused": True, "block_n": 8}, 0.4),  # text landmarks only
        ({"feature_dim": 40}, {"fused": True, "mlp_chunk": 32, "mlp_first_min_tokens": 0}, 0.4),  # hidden 128 in 4 chunks
        ({"landmark_fraction": 0.0, "landmark_min": 8}, {"fused": True}, 0.4),  # L = 8 + 8: full landmark steps
    ],
)
def test_kernels_match_eager_student(interpreted, cfg_kw, kernel_kw, sigma):
    layer = make_layer(small_cfg(**cfg_kw), seed=3)
    q, k, v = qkv(seed=11)
    s = torch.tensor([0.2, 0.9]) if sigma == "per-row" else sigma
    ref = eager(layer, q, k, v, 8, s, 3.5, height=6, width=5)
    kc = dataclasses.replace(SMALL, **kernel_kw)
    with torch.no_grad():
        out = fast_path.fast_forward(layer, q, k, v, 8, s, torch.tensor(3.5), height=6, width=5, kernel=kc)
    assert out.dtype == torch.float16 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert rel(out, ref) < 2e-3  # fp16 operands, fp32 accumulation (measured ~2e-4)
    # and not trivially: the landmark and kernel branches differ by far more than that
    c = layer.config
    old, c.alpha_max = c.alpha_max, 1e-4
    try:
        kern_only = eager(layer, q, k, v, 8, s, 3.5, height=6, width=5)
    finally:
        c.alpha_max = old
    assert rel(kern_only, ref) > 2e-2


def test_layer_forward_takes_fast_path_and_matches(interpreted):
    """End to end through HKRLayer.forward (eval, no_grad): a query subset, several splits."""
    layer = make_layer(small_cfg(), seed=4)
    q, k, v = qkv(seed=12, height=8, width=8)
    q_idx = torch.tensor([0, 3, 9, 20, 41, 70, 71])
    qs = q[:, :, q_idx]
    ref = eager(layer, qs, k, v, 8, 0.6, 2.0, height=8, width=8, q_idx=q_idx)
    fast_path.LAST_LAUNCH.clear()
    with torch.no_grad():
        out = layer(qs, k, v, 8, 0.6, 2.0, height=8, width=8, q_idx=q_idx)
    assert "fused" in fast_path.LAST_LAUNCH  # the fast path ran (one fused launch)
    assert out.dtype == torch.float16 and rel(out, ref) < 2e-3


def test_strided_layouts_and_batch_rows(interpreted):
    """q, k, v as [B, N, H, D] tensors viewed as [B, H, N, D] (what a fused qkv projection gives)."""
    layer = make_layer(small_cfg(), seed=6)
    g = torch.Generator().manual_seed(21)
    b, h, n = 3, 2, 8 + 6 * 5
    q, k, v = (torch.randn(b, n, h, D, generator=g).half().transpose(1, 2) for _ in range(3))
    assert q.stride(2) == h * D and not q.is_contiguous()
    sig = torch.tensor([0.1, 0.5, 1.0])
    cfg = torch.tensor([1.0, 3.5, 7.0])
    ref = eager(layer, q, k, v, 8, sig, cfg, height=6, width=5)
    with torch.no_grad():
        out = fast_path.fast_forward(layer, q, k, v, 8, sig, cfg, height=6, width=5, kernel=SMALL)
    assert rel(out, ref) < 2e-3
    # each batch row used its own sigma/cfg: swapping them changes that row
    with torch.no_grad():
        swapped = fast_path.fast_forward(layer, q, k, v, 8, sig.flip(0), cfg.flip(0), height=6, width=5, kernel=SMALL)
    assert rel(swapped[0], out[0]) > 1e-2 and rel(swapped[1], out[1]) < 1e-6


def test_kernels_that_do_not_fit_fall_back_to_eager(interpreted, monkeypatch):
    class OutOfResources(Exception):  # what Triton raises when shared memory or registers run out
        pass

    def no_room(*a, **kw):
        raise OutOfResources("shared memory, Required: 425984, Hardware limit: 232448")

    monkeypatch.setattr(fast_path, "_run", no_room)
    monkeypatch.setattr(fast_path, "UNAVAILABLE", {})
    layer = make_layer(small_cfg(), seed=8)
    q, k, v = qkv(seed=13)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="do not fit"):
        out = layer(q, k, v, 8, 0.5, 3.0, height=6, width=5)
        assert "do not fit" in fast_path.fast_path_reason(layer, q, k, v)  # remembered: no retry per call
    ref = eager(layer, q, k, v, 8, 0.5, 3.0, height=6, width=5)
    assert torch.equal(out, ref.half())  # the eager forward ran

    def other_error(*a, **kw):
        raise ValueError("a real bug")

    monkeypatch.setattr(fast_path, "_run", other_error)
    monkeypatch.setattr(fast_path, "UNAVAILABLE", {})
    with torch.no_grad(), pytest.raises(ValueError, match="a real bug"):
        layer(q, k, v, 8, 0.5, 3.0, height=6, width=5)
