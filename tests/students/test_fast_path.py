"""Fast (Triton) inference path of the HKR student: dispatch rules on CPU, and the fused kernels'
numerics under Triton's CPU interpreter (``TRITON_INTERPRET=1``) against the fp32 eager student.

The interpreter runs fp16 kernels faithfully; its bf16 ``tl.dot`` is wrong in Triton 3.8 (it returns
~1e10 for unit-scale inputs), so the numerics here use fp16 inputs; bf16 is checked on the GPU by
``benchmarks/bench_gpu_student.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flux2ttr.students import fast_path
from helpers.students import eager, make_layer, qkv, small_cfg

# ------------------------------------------------------------------ dispatch (no Triton needed)


def test_reasons_cover_every_rule(monkeypatch):
    layer = make_layer(small_cfg())
    q, k, v = qkv()
    with torch.no_grad():
        assert fast_path.fast_path_reason(layer, q, k, v) == "inputs are not on a CUDA device"
        layer.train()
        assert "training" in fast_path.fast_path_reason(layer, q, k, v)
        layer.eval()
        layer.config.fast_path = False
        assert "hkr.fast_path" in fast_path.fast_path_reason(layer, q, k, v)
        layer.config.fast_path = True
        monkeypatch.setenv(fast_path.ENV_SWITCH, "0")
        assert fast_path.ENV_SWITCH in fast_path.fast_path_reason(layer, q, k, v)
        monkeypatch.delenv(fast_path.ENV_SWITCH)
    # autograd recording: parameters require grad, so a grad-enabled call stays eager
    assert "autograd" in fast_path.fast_path_reason(layer, q, k, v)

    monkeypatch.setattr(fast_path, "ALLOW_CPU_INTERPRETER", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with torch.no_grad():
        assert fast_path.fast_path_reason(layer, q, k, v) is None
        assert "bf16/fp16" in fast_path.fast_path_reason(layer, q.float(), k.float(), v.float())
        assert "bf16/fp16" in fast_path.fast_path_reason(layer, q, k.bfloat16(), v)
        qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, last dim strided
        assert "contiguous" in fast_path.fast_path_reason(layer, qt, k, v)
        odd = make_layer(small_cfg(head_dim=24))
        assert "power of two" in fast_path.fast_path_reason(odd, *[t[..., :24] for t in (q, k, v)])


def test_forward_dispatches_only_when_eligible(monkeypatch):
    layer = make_layer(small_cfg())
    q, k, v = qkv()
    calls = []

    def fake_fast(lay, *a, **kw):
        calls.append(kw)
        return torch.full_like(a[0], 7.0)

    monkeypatch.setattr(fast_path, "fast_forward", fake_fast)
    monkeypatch.setattr(fast_path, "fast_path_reason", lambda *a: None)
    with torch.no_grad():
        out = layer(q, k, v, 8, 0.5, 3.0, height=6, width=5)
    assert calls == [{"height": 6, "width": 5}] and torch.all(out == 7.0)

    monkeypatch.setattr(fast_path, "fast_path_reason", lambda *a: "no")
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
    p1 = fast_path.prepared(layer, torch.float16, torch.device("cpu"))
    assert fast_path.prepared(layer, torch.float16, torch.device("cpu")) is p1  # cached
    w = layer.phi_q.net[0].weight
    # layout: w1 is [D, HID] = weight^T in the compute dtype, zero-padded
    assert torch.equal(p1.phi_q[0][:, : w.shape[0]], w.detach().t().half())
    assert p1.fp == 16 and torch.all(p1.phi_q[4][:, 12:] == 0) and torch.all(p1.phi_q[5][12:] == 0)
    with torch.no_grad():
        w.add_(1.0)
    p2 = fast_path.prepared(layer, torch.float16, torch.device("cpu"))
    assert p2 is not p1 and torch.equal(p2.phi_q[0][:, : w.shape[0]], w.detach().t().half())
    layer.load_state_dict(make_layer(small_cfg(), seed=5).state_dict())
    p3 = fast_path.prepared(layer, torch.float16, torch.device("cpu"))
    assert p3 is not p2 and float(p3.alpha[0]) == pytest.approx(0.8)
    assert fast_path.prepared(layer, torch.bfloat16, torch.device("cpu")).phi_q[0].dtype == torch.bfloat16


def test_prepared_weights_of_inference_tensors():
    """Students built or moved under torch.inference_mode() (as ComfyUI runs every node and sampler) have
    inference-tensor parameters, which keep no version counter: the weight cache must still work, and a
    load_state_dict inside inference mode (no version change to see) must still refresh it."""
    with torch.inference_mode():
        layer = make_layer(small_cfg())
        assert all(p.is_inference() for p in layer.parameters())
        key = fast_path._key(list(layer.parameters()), torch.float16, torch.device("cpu"))
        p1 = fast_path.prepared(layer, torch.float16, torch.device("cpu"))
        assert fast_path.prepared(layer, torch.float16, torch.device("cpu")) is p1  # cached
    assert fast_path._key(list(layer.parameters()), torch.float16, torch.device("cpu")) == key  # outside too
    w = layer.phi_q.net[0].weight
    assert torch.equal(p1.phi_q[0][:, : w.shape[0]], w.t().half())
    other = make_layer(small_cfg(), seed=5)
    with torch.inference_mode():
        layer.load_state_dict(other.state_dict())  # in place: same data_ptr, no version counter
        p2 = fast_path.prepared(layer, torch.float16, torch.device("cpu"))
    assert p2 is not p1
    assert torch.equal(p2.phi_q[0][:, : w.shape[0]], other.phi_q.net[0].weight.detach().t().half())
    # an inference-mode copy moved to another dtype: new storage, new key
    with torch.inference_mode():
        moved = layer.to(torch.bfloat16)
        p3 = fast_path.prepared(moved, torch.bfloat16, torch.device("cpu"))
    assert p3 is not p2 and p3.phi_q[0].dtype == torch.bfloat16
    fast_path.invalidate(moved)
    assert "_fast_cache" not in moved.__dict__


def test_sigma_cfg_arguments_never_read_on_host():
    dummy = torch.zeros(1)
    assert fast_path._scalar_or_tensor(0.25, 3, torch.device("cpu"), "sigma", dummy) == (None, 0, 0.25)
    t, stride, _ = fast_path._scalar_or_tensor(torch.tensor([0.5]), 3, torch.device("cpu"), "sigma", dummy)
    assert stride == 0 and t.dtype == torch.float32
    t, stride, _ = fast_path._scalar_or_tensor(torch.tensor([1, 2, 3]), 3, torch.device("cpu"), "cfg", dummy)
    assert stride == 1 and t.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=r"cfg must be a float or a \[B=3\]"):
        fast_path._scalar_or_tensor(torch.ones(2), 3, torch.device("cpu"), "cfg", dummy)


def test_wide_feature_mlps_stay_eager(monkeypatch):
    monkeypatch.setattr(fast_path, "ALLOW_CPU_INTERPRETER", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = qkv()
    wide = make_layer(small_cfg(feature_dim=2 * fast_path.MAX_FEATURES))
    with torch.no_grad():
        assert "exceed" in fast_path.fast_path_reason(wide, q, k, v)


@pytest.mark.slow
def test_kernels_under_the_interpreter_in_a_fresh_process():
    """The kernel numerics (tests/students/kernels_interp.py) in a child pytest with TRITON_INTERPRET=1."""
    here = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", str(here / "kernels_interp.py")],
        cwd=here.parents[1], env=env, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    m = re.search(r"(\d+) passed", out)
    assert m and int(m.group(1)) >= 10 and "skipped" not in out and "failed" not in out, out
