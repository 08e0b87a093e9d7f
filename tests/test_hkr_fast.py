"""Fast (Triton) inference path of the HKR student: dispatch rules on CPU, and the fused kernels'
numerics under Triton's CPU interpreter (``TRITON_INTERPRET=1``) against the fp32 eager student.

The interpreter runs fp16 kernels faithfully; its bf16 ``tl.dot`` is wrong in Triton 3.8 (it returns
~1e10 for unit-scale inputs), so the numerics here use fp16 inputs; bf16 is checked on the GPU by
``benchmarks/bench_gpu_student.py``.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from flux2ttr import hkr_fast
from flux2ttr.hkr import HKRConfig, HKRLayer

D = 32


def small_cfg(**kw) -> HKRConfig:
    # feature_dim 12 is padded to 16 inside the kernels; hidden = max(32, 24) = 32.
    base = dict(head_dim=D, feature_dim=12, cond_hidden=6, landmark_fraction=0.25, landmark_min=2, landmark_max=0)
    base.update(kw)
    return HKRConfig(**base)


def make_layer(cfg: HKRConfig, seed: int = 0, heads: int = 2) -> HKRLayer:
    """A layer whose conditioner and alpha are off their identity init, so every blend term matters."""
    torch.manual_seed(seed)
    layer = HKRLayer(cfg, num_heads=heads).eval()
    with torch.no_grad():
        layer.cond.net[2].weight.normal_(0.0, 0.2)
        layer.cond.net[2].bias.normal_(0.0, 0.2)
        layer.alpha_logit.fill_(0.8)
        layer.alpha_gamma.fill_(3.0)
    return layer


def qkv(b=2, h=2, n_cond=8, height=6, width=5, seed=1, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    n = n_cond + height * width
    return [torch.randn(b, h, n, D, generator=g).to(dtype) for _ in range(3)]


def eager(layer: HKRLayer, q, k, v, *args, **kw) -> torch.Tensor:
    """The fp32 eager student on the same (upcast) values: the reference."""
    c = layer.config
    old, c.fast_path = c.fast_path, False
    try:
        with torch.no_grad():
            return layer(q.float(), k.float(), v.float(), *args, **kw)
    finally:
        c.fast_path = old


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# ------------------------------------------------------------------ dispatch (no Triton needed)


def test_reasons_cover_every_rule(monkeypatch):
    layer = make_layer(small_cfg())
    q, k, v = qkv()
    with torch.no_grad():
        assert hkr_fast.fast_path_reason(layer, q, k, v) == "inputs are not on a CUDA device"
        layer.train()
        assert "training" in hkr_fast.fast_path_reason(layer, q, k, v)
        layer.eval()
        layer.config.fast_path = False
        assert "hkr.fast_path" in hkr_fast.fast_path_reason(layer, q, k, v)
        layer.config.fast_path = True
        monkeypatch.setenv(hkr_fast.ENV_SWITCH, "0")
        assert hkr_fast.ENV_SWITCH in hkr_fast.fast_path_reason(layer, q, k, v)
        monkeypatch.delenv(hkr_fast.ENV_SWITCH)
    # autograd recording: parameters require grad, so a grad-enabled call stays eager
    assert "autograd" in hkr_fast.fast_path_reason(layer, q, k, v)

    monkeypatch.setattr(hkr_fast, "ALLOW_CPU_INTERPRETER", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with torch.no_grad():
        assert hkr_fast.fast_path_reason(layer, q, k, v) is None
        assert "bf16/fp16" in hkr_fast.fast_path_reason(layer, q.float(), k.float(), v.float())
        assert "bf16/fp16" in hkr_fast.fast_path_reason(layer, q, k.bfloat16(), v)
        qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, last dim strided
        assert "contiguous" in hkr_fast.fast_path_reason(layer, qt, k, v)
        odd = make_layer(small_cfg(head_dim=24))
        assert "power of two" in hkr_fast.fast_path_reason(odd, *[t[..., :24] for t in (q, k, v)])


def test_forward_dispatches_only_when_eligible(monkeypatch):
    layer = make_layer(small_cfg())
    q, k, v = qkv()
    calls = []

    def fake_fast(lay, *a, **kw):
        calls.append(kw)
        return torch.full_like(a[0], 7.0)

    monkeypatch.setattr(hkr_fast, "fast_forward", fake_fast)
    monkeypatch.setattr(hkr_fast, "fast_path_reason", lambda *a: None)
    with torch.no_grad():
        out = layer(q, k, v, 8, 0.5, 3.0, height=6, width=5)
    assert calls == [{"height": 6, "width": 5}] and torch.all(out == 7.0)

    monkeypatch.setattr(hkr_fast, "fast_path_reason", lambda *a: "no")
    with torch.no_grad():
        out = layer(q, k, v, 8, 0.5, 3.0, height=6, width=5)
    assert len(calls) == 1
    ref = eager(layer, q, k, v, 8, 0.5, 3.0, height=6, width=5)
    assert torch.equal(out, ref.to(out.dtype))


def test_cpu_forward_unchanged_by_fast_path_flag():
    """On CPU the eager forward runs whatever the flag: outputs are bit-identical."""
    layer = make_layer(small_cfg())
    q, k, v = qkv(dtype=torch.float32)
    with torch.no_grad():
        a = layer(q, k, v, 8, 0.5, 3.0, height=6, width=5)
        layer.config.fast_path = False
        b = layer(q, k, v, 8, 0.5, 3.0, height=6, width=5)
    assert torch.equal(a, b)


def test_prepared_weights_follow_parameter_updates():
    layer = make_layer(small_cfg())
    p1 = hkr_fast.prepared(layer, torch.float16, torch.device("cpu"))
    assert hkr_fast.prepared(layer, torch.float16, torch.device("cpu")) is p1  # cached
    w = layer.phi_q.net[0].weight
    # layout: w1 is [D, HID] = weight^T in the compute dtype, zero-padded
    assert torch.equal(p1.phi_q[0][:, : w.shape[0]], w.detach().t().half())
    assert p1.fp == 16 and torch.all(p1.phi_q[4][:, 12:] == 0) and torch.all(p1.phi_q[5][12:] == 0)
    with torch.no_grad():
        w.add_(1.0)
    p2 = hkr_fast.prepared(layer, torch.float16, torch.device("cpu"))
    assert p2 is not p1 and torch.equal(p2.phi_q[0][:, : w.shape[0]], w.detach().t().half())
    layer.load_state_dict(make_layer(small_cfg(), seed=5).state_dict())
    p3 = hkr_fast.prepared(layer, torch.float16, torch.device("cpu"))
    assert p3 is not p2 and float(p3.alpha[0]) == pytest.approx(0.8)
    assert hkr_fast.prepared(layer, torch.bfloat16, torch.device("cpu")).phi_q[0].dtype == torch.bfloat16


def test_sigma_cfg_arguments_never_read_on_host():
    dummy = torch.zeros(1)
    assert hkr_fast._scalar_or_tensor(0.25, 3, torch.device("cpu"), "sigma", dummy) == (None, 0, 0.25)
    t, stride, _ = hkr_fast._scalar_or_tensor(torch.tensor([0.5]), 3, torch.device("cpu"), "sigma", dummy)
    assert stride == 0 and t.dtype == torch.float32
    t, stride, _ = hkr_fast._scalar_or_tensor(torch.tensor([1, 2, 3]), 3, torch.device("cpu"), "cfg", dummy)
    assert stride == 1 and t.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=r"cfg must be a float or a \[B=3\]"):
        hkr_fast._scalar_or_tensor(torch.ones(2), 3, torch.device("cpu"), "cfg", dummy)


# ------------------------------------------------------------------ kernels under the interpreter


@pytest.fixture(scope="module")
def interpreted():
    """Triton kernels rebuilt for the CPU interpreter (the decorator reads TRITON_INTERPRET)."""
    pytest.importorskip("triton")
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    mp.setattr(hkr_fast, "ALLOW_CPU_INTERPRETER", True)
    from flux2ttr import hkr_triton

    importlib.reload(hkr_triton)
    yield hkr_triton
    mp.undo()
    importlib.reload(hkr_triton)


SMALL = hkr_fast.KernelConfig(block_n=16, block_m=16, block_l=16, block_m_adaptive=16)


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
        out = hkr_fast.fast_forward(layer, q, k, v, 8, s, torch.tensor(3.5), height=6, width=5, kernel=kc)
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
    hkr_fast.LAST_LAUNCH.clear()
    with torch.no_grad():
        out = layer(qs, k, v, 8, 0.6, 2.0, height=8, width=8, q_idx=q_idx)
    assert "fused" in hkr_fast.LAST_LAUNCH  # the fast path ran (one fused launch)
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
        out = hkr_fast.fast_forward(layer, q, k, v, 8, sig, cfg, height=6, width=5, kernel=SMALL)
    assert rel(out, ref) < 2e-3
    # each batch row used its own sigma/cfg: swapping them changes that row
    with torch.no_grad():
        swapped = hkr_fast.fast_forward(layer, q, k, v, 8, sig.flip(0), cfg.flip(0), height=6, width=5, kernel=SMALL)
    assert rel(swapped[0], out[0]) > 1e-2 and rel(swapped[1], out[1]) < 1e-6


def test_wide_feature_mlps_stay_eager(monkeypatch):
    monkeypatch.setattr(hkr_fast, "ALLOW_CPU_INTERPRETER", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = qkv()
    wide = make_layer(small_cfg(feature_dim=2 * hkr_fast.MAX_FEATURES))
    with torch.no_grad():
        assert "exceed" in hkr_fast.fast_path_reason(wide, q, k, v)


def test_kernels_that_do_not_fit_fall_back_to_eager(interpreted, monkeypatch):
    class OutOfResources(Exception):  # what Triton raises when shared memory or registers run out
        pass

    def no_room(*a, **kw):
        raise OutOfResources("shared memory, Required: 425984, Hardware limit: 232448")

    monkeypatch.setattr(hkr_fast, "_run", no_room)
    monkeypatch.setattr(hkr_fast, "UNAVAILABLE", {})
    layer = make_layer(small_cfg(), seed=8)
    q, k, v = qkv(seed=13)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="do not fit"):
        out = layer(q, k, v, 8, 0.5, 3.0, height=6, width=5)
        assert "do not fit" in hkr_fast.fast_path_reason(layer, q, k, v)  # remembered: no retry per call
    ref = eager(layer, q, k, v, 8, 0.5, 3.0, height=6, width=5)
    assert torch.equal(out, ref.half())  # the eager forward ran

    def other_error(*a, **kw):
        raise ValueError("a real bug")

    monkeypatch.setattr(hkr_fast, "_run", other_error)
    monkeypatch.setattr(hkr_fast, "UNAVAILABLE", {})
    with torch.no_grad(), pytest.raises(ValueError, match="a real bug"):
        layer(q, k, v, 8, 0.5, 3.0, height=6, width=5)
