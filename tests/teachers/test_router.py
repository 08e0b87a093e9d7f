"""The attention router on a small in-memory tiny teacher: pass-through, students, observers, routing."""

from __future__ import annotations

import math

import pytest
import torch

from flux2ttr.contract import FLUX2_COND_TOKENS, RunState, softmax_attention
from flux2ttr.teachers.router import AttentionRouter, RoutedSingleProcessor, RouterError
from flux2ttr.teachers.teacher import (
    Teacher,
    TeacherConfig,
    TinyPromptEncoder,
    build_tiny_codec,
    build_tiny_transformer,
)

H, W = 3, 4  # latent grid: 12 image tokens


@pytest.fixture(scope="module")
def teacher() -> Teacher:
    cfg = TeacherConfig(num_single=2, seed=5)
    codec = build_tiny_codec(cfg)
    enc = TinyPromptEncoder(codec["prompt_encoder.token"], codec["prompt_encoder.position"])
    return Teacher(build_tiny_transformer(cfg), {"kind": "tiny"}, encoder=enc, decoder=None)


@pytest.fixture(scope="module")
def inputs(teacher):
    x = torch.randn(2, H * W, 128, generator=torch.Generator().manual_seed(0))
    cond = teacher.encode_prompts(["a red fox", "a blue boat on a lake"])
    return x, cond


def _state(sigma: float = 0.6, step: int = 2) -> RunState:
    return RunState(sigma=sigma, cfg=4.0, step=step, height=H, width=W, prompt_index=[0, 1], seed=[7, 8])


@torch.no_grad()
def _run(teacher, inputs, router=None, sigma=0.6, state=None):
    x, cond = inputs
    return teacher.denoise(x, sigma, cond, 4.0, H, W, router=router, state=state)


def test_install_maps_keys_and_uninstall_restores(teacher):
    originals = {n: type(m.processor) for n, m in teacher.transformer.named_modules() if n.endswith(".attn")}
    router = AttentionRouter().install(teacher.transformer)
    assert router.layer_keys == ["double_blocks.0", "single_blocks.0", "single_blocks.1"]
    assert isinstance(teacher.transformer.single_transformer_blocks[1].attn.processor, RoutedSingleProcessor)
    router.uninstall()
    assert {n: type(m.processor) for n, m in teacher.transformer.named_modules() if n.endswith(".attn")} == originals
    single_only = AttentionRouter(include_double=False).install(teacher.transformer)
    assert single_only.layer_keys == ["single_blocks.0", "single_blocks.1"]
    single_only.uninstall()


def test_pass_through_is_bit_identical(teacher, inputs):
    ref = _run(teacher, inputs)
    router = AttentionRouter()
    out = _run(teacher, inputs, router=router, state=_state())
    assert torch.equal(out, ref)
    # observers force the [B,H,N,D] path for every layer; the output must still be identical
    router.add_observer(lambda *a: None)
    assert torch.equal(_run(teacher, inputs, router=router, state=_state()), ref)
    assert not router.installed  # attached for the call only


def test_observers_see_contract(teacher, inputs):
    seen = {}

    def observe(key, q, k, v, out, n_cond, state):
        seen[key] = (q.shape, k.shape, v.shape, n_cond, state)
        assert out.shape == q.shape
        ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v.double()
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
        # after QK-norm (RMSNorm weight qk_norm_scale) and RoPE (a rotation, norm-preserving)
        rms = q.pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.full_like(rms, 2.0), atol=1e-3, rtol=1e-3)

    router = AttentionRouter()
    router.add_observer(observe)
    st = _state()
    _run(teacher, inputs, router=router, state=st)
    n = FLUX2_COND_TOKENS + H * W
    assert set(seen) == {"double_blocks.0", "single_blocks.0", "single_blocks.1"}
    for key, (qs, ks, vs, n_cond, state) in seen.items():
        assert qs == ks == vs == (2, 2, n, 128), key
        assert n_cond == FLUX2_COND_TOKENS, key
        assert state is st


def test_observer_layer_filter_and_removal(teacher, inputs):
    calls = []
    router = AttentionRouter()
    remove = router.add_observer(lambda key, *a: calls.append(key), layers=["single_transformer_blocks.1"])
    _run(teacher, inputs, router=router, state=_state())
    assert calls == ["single_blocks.1"]
    remove()
    _run(teacher, inputs, router=router, state=_state())
    assert calls == ["single_blocks.1"]


class SoftmaxStudent(torch.nn.Module):
    """Exact fp64 softmax, optionally scaled: a student whose effect is known."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.calls = []

    def forward(self, q, k, v, n_cond, sigma, cfg, *, height, width):
        self.calls.append((q.shape, n_cond, sigma, cfg, height, width))
        return (softmax_attention(q.double(), k.double(), v.double()) * self.scale).to(q.dtype)


def test_student_route_replaces_layer_output(teacher, inputs):
    ref = _run(teacher, inputs)
    router = AttentionRouter()
    exact, zero = SoftmaxStudent(1.0), SoftmaxStudent(0.0)
    router.set_students({"single_blocks.1": exact, "single_blocks.0": zero})
    router.set_route({"single_blocks.1"})
    out = _run(teacher, inputs, router=router, state=_state(sigma=0.6))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)  # exact student: same output
    assert exact.calls == [((2, 2, FLUX2_COND_TOKENS + H * W, 128), FLUX2_COND_TOKENS, 0.6, 4.0, H, W)]
    assert zero.calls == []
    router.set_route({"single_transformer_blocks.0"})  # diffusers names map to ComfyUI keys
    out0 = _run(teacher, inputs, router=router, state=_state())
    assert len(zero.calls) == 1
    assert (out0 - ref).abs().max() > 1e-2  # the zero student really replaced the attention

    # a zeroed attention equals a model whose to_out ignores the attention half of its input
    blk = teacher.transformer.single_transformer_blocks[0].attn
    saved = blk.to_out.weight.detach().clone()
    with torch.no_grad():
        blk.to_out.weight[:, : blk.inner_dim] = 0
        manual = _run(teacher, inputs)
        blk.to_out.weight.copy_(saved)
    torch.testing.assert_close(out0, manual, atol=1e-5, rtol=1e-5)


def test_double_block_student_and_route_fn(teacher, inputs):
    router = AttentionRouter()
    student = SoftmaxStudent(1.0)
    router.set_students({"double_blocks.0": student, "single_blocks.0": SoftmaxStudent(0.5)})
    router.set_route(lambda state: {"double_blocks.0"} if state.step >= 1 else set())
    _run(teacher, inputs, router=router, state=_state(step=0))
    assert student.calls == []
    _run(teacher, inputs, router=router, state=_state(step=1))
    assert len(student.calls) == 1 and student.calls[0][1] == FLUX2_COND_TOKENS
    assert router.calls == {"double_blocks.0": 1}


def test_router_errors(teacher, inputs):
    router = AttentionRouter()
    with pytest.raises(RouterError, match="without a student"):
        router.set_route({"single_blocks.0"})
    with pytest.raises(ValueError, match="not a FLUX.2 attention block"):
        router.set_students({"blocks.0": SoftmaxStudent()})
    router.set_students({"single_blocks.0": lambda q, k, v, *a, **kw: q[..., :1]})
    router.set_route({"single_blocks.0"})
    with pytest.raises(RouterError, match=r"expected \(2, 2, 524, 128\)"):
        _run(teacher, inputs, router=router, state=_state())
    bad = AttentionRouter()
    bad.add_observer(lambda *a: None)
    bad.state = RunState(sigma=0.5, cfg=1.0, step=0, height=100, width=100)
    with pytest.raises(RouterError, match="image tokens"):
        _run(teacher, inputs, router=bad)
    with pytest.raises(RouterError, match="no FLUX.2 attention blocks"):
        AttentionRouter().install(torch.nn.Linear(2, 2))


def test_hkr_student_runs_through_the_router(teacher, inputs):
    """The project's real student layer plugs into the router's call as it is."""
    from flux2ttr.students.hkr import HKRConfig, HKRLayer

    student = HKRLayer(HKRConfig(), num_heads=teacher.num_heads)
    router = AttentionRouter()
    router.set_students({"single_blocks.1": student})
    router.set_route({"single_blocks.1"})
    ref = _run(teacher, inputs)
    out = _run(teacher, inputs, router=router, state=_state())
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert router.calls == {"single_blocks.1": 1}
    assert (out - ref).abs().max() > 0  # an untrained student differs from softmax
