"""The window student's fused CUDA kernels against the formula evaluated in fp64 (``pytest -m gpu``).

Through :meth:`WindowLayer.forward` (the lead's dispatch into :mod:`flux2ttr.students.window_fast`):
bf16 and fp16 inputs, one tile per block, several tiles per block (per-query windows), tiles split
over blocks, landmarks, both ``text_query_keys`` modes, ``[B, N, H, D]`` views, and ComfyUI's
``torch.inference_mode()`` (inference-tensor parameters). Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from students.test_window_kernels import formula, rel

from flux2ttr.students import window_fast
from flux2ttr.students.hkr import HKRConfig
from flux2ttr.students.window import WindowLayer

pytestmark = pytest.mark.gpu

D, HEADS, N_COND, HEIGHT, WIDTH = 128, 4, 77, 24, 40  # n_cond not a multiple of the key step; 24 x 40 grid


def gpu_layer(seed: int = 0, heads: int = HEADS, **kw) -> WindowLayer:
    base = dict(mode="window", head_dim=D, feature_dim=64, window_tile=[8, 16], window_radius=8,
                landmark_fraction=0.05, landmark_min=16, landmark_max=64)
    base.update(kw)
    torch.manual_seed(seed)
    layer = WindowLayer(HKRConfig(**base), num_heads=heads).eval()
    with torch.no_grad():  # kernel term and exact term of similar weight (N ~ 1000 keys)
        n = layer.log_gamma.numel()
        layer.log_gamma.copy_(torch.linspace(-6.0, -3.0, n))
    return layer.cuda()


def gpu_inputs(dtype, b=2, heads=HEADS, seed=1, layout="bhnd"):
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = N_COND + HEIGHT * WIDTH
    if layout == "bnhd":
        return [torch.randn(b, n, heads, D, generator=g, device="cuda").to(dtype).transpose(1, 2) for _ in range(3)]
    return [torch.randn(b, heads, n, D, generator=g, device="cuda").to(dtype) for _ in range(3)]


def run_fused(layer, q, k, v):
    window_fast.LAST_LAUNCH.clear()
    with torch.inference_mode():
        out = layer(q, k, v, N_COND, 0.5, 3.5, height=HEIGHT, width=WIDTH)
    assert "main" in window_fast.LAST_LAUNCH, "the fused path did not run"
    return out


CASES = {
    "one_tile_per_block": dict(),
    "one_tile_per_block_r4": dict(window_radius=4),
    "whole_key_tiles": dict(window_key_tile=[8, 16]),
    "key_tiles_2x4_multi": dict(window_tile=[4, 4], window_radius=3, window_key_tile=[2, 4]),
    "landmarks_text_and_landmarks": dict(window_landmarks=True, text_query_keys="text_and_landmarks"),
    "multi_tile_blocks": dict(window_tile=[4, 4], window_radius=4, window_landmarks=True),
    "split_tiles_f128": dict(window_tile=[16, 16], window_radius=16, feature_dim=128),
    "shared_gamma_shared_qk": dict(per_head_gamma=False, shared_qk=True, window_radius=20),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_matches_formula_bf16(name):
    layer = gpu_layer(**CASES[name])
    q, k, v = gpu_inputs(torch.bfloat16)
    out = run_fused(layer, q, k, v)
    ref = formula(layer, q, k, v, N_COND, HEIGHT, WIDTH, landmarks=layer.landmarks(N_COND, HEIGHT, WIDTH),
                  explicit=False)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    err = rel(out, ref)
    print(f"{name}: rel err {err:.2e} (bf16)")
    assert err < 1e-2


def test_fused_matches_formula_fp16_and_strided_views():
    layer = gpu_layer(window_tile=[4, 4], window_radius=4, window_landmarks=True)
    for layout in ("bhnd", "bnhd"):
        q, k, v = gpu_inputs(torch.float16, layout=layout)
        out = run_fused(layer, q, k, v)
        ref = formula(layer, q, k, v, N_COND, HEIGHT, WIDTH, landmarks=layer.landmarks(N_COND, HEIGHT, WIDTH),
                      explicit=False)
        err = rel(out, ref)
        print(f"fp16 {layout}: rel err {err:.2e}")
        assert err < 2e-3
    layer = gpu_layer()
    q, k, v = gpu_inputs(torch.float16)
    assert rel(run_fused(layer, q, k, v), formula(layer, q, k, v, N_COND, HEIGHT, WIDTH,
                                                  landmarks=layer.landmarks(N_COND, HEIGHT, WIDTH), explicit=False)) < 2e-3


def test_inference_mode_students_and_eager_fallbacks():
    """A student built and moved to the GPU inside inference mode (as in ComfyUI) runs fused, twice (the
    cached weights); with autograd recording the eager forward runs and agrees."""
    with torch.inference_mode():
        layer = gpu_layer()
        assert all(p.is_inference() for p in layer.parameters())
        q, k, v = gpu_inputs(torch.bfloat16)
        a = run_fused(layer, q, k, v)
        b = run_fused(layer, q, k, v)
    assert torch.equal(a, b)  # deterministic: fixed-order reductions, no atomics
    plain = gpu_layer()
    q, k, v = (t.clone().requires_grad_(True) for t in gpu_inputs(torch.bfloat16))
    window_fast.LAST_LAUNCH.clear()
    eager = plain(q, k, v, N_COND, 0.5, 3.5, height=HEIGHT, width=WIDTH)
    assert "main" not in window_fast.LAST_LAUNCH and eager.requires_grad
    assert rel(eager.detach(), a) < 1e-2


@pytest.mark.parametrize("text_sdpa", [True, False])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_text_rows_by_sdpa_on_a_side_stream_or_in_the_kernel(layout, text_sdpa):
    """KernelConfig.text_sdpa: the text rows (every key, plain softmax) come from SDPA on a side stream while
    the kernels write the image rows (the default), or from the kernel's own text programs: the same output
    as the formula, text rows and image rows alike, also on strided views (ComfyUI's q, k, v are)."""
    import dataclasses

    layer = gpu_layer(window_radius=4)
    q, k, v = gpu_inputs(torch.bfloat16, layout=layout)
    kc = dataclasses.replace(window_fast.KERNEL, text_sdpa=text_sdpa)
    window_fast.LAST_LAUNCH.clear()
    with torch.inference_mode():
        out = window_fast.fast_forward(layer, q, k, v, N_COND, 0.5, 3.5, height=HEIGHT, width=WIDTH, kernel=kc)
    assert window_fast.LAST_LAUNCH["text_sdpa"] is text_sdpa
    ref = formula(layer, q, k, v, N_COND, HEIGHT, WIDTH, landmarks=layer.landmarks(N_COND, HEIGHT, WIDTH),
                  explicit=False)
    assert rel(out[:, :, :N_COND], ref[:, :, :N_COND]) < 1e-2 and rel(out[:, :, N_COND:], ref[:, :, N_COND:]) < 1e-2
