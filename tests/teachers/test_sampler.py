"""The FLUX.2 flow-matching Euler sampler: schedule against the formula and diffusers, determinism,
router state, and the Euler integrator on an exact-velocity denoiser."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flux2ttr.config import ConfigError, from_dict
from flux2ttr.teachers.router import AttentionRouter
from flux2ttr.teachers.sampler import SamplerConfig, empirical_mu, flux2_sigmas, initial_noise, sample
from flux2ttr.teachers.teacher import (
    Teacher,
    TeacherConfig,
    TinyPromptEncoder,
    build_tiny_codec,
    build_tiny_transformer,
)


@pytest.mark.parametrize("seq_len,steps", [(256, 4), (1024, 28), (4096, 50), (5000, 8)])
def test_empirical_mu_matches_diffusers(seq_len, steps):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    assert empirical_mu(seq_len, steps) == pytest.approx(compute_empirical_mu(seq_len, steps), abs=1e-12)


def test_empirical_mu_formula_values():
    # hand-computed from the two linear fits (10 and 200 steps) interpolated at 4 steps, 256 tokens
    m10 = 8.73809524e-05 * 256 + 1.89833333
    m200 = 0.00016927 * 256 + 0.45666666
    a = (m200 - m10) / 190.0
    assert empirical_mu(256, 4) == pytest.approx(m200 + a * (4 - 200), abs=1e-12)
    assert empirical_mu(5000, 4) == pytest.approx(0.00016927 * 5000 + 0.45666666, abs=1e-12)


def test_sigmas_formula_and_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps, seq = 6, 256
    mu = empirical_mu(seq, steps)
    sig = flux2_sigmas(steps, seq)
    t = np.linspace(1.0, 1.0 / steps, steps)
    expected = np.exp(mu) / (np.exp(mu) + (1.0 / t - 1.0))
    np.testing.assert_allclose(sig[:-1].numpy(), expected, rtol=1e-12)
    assert sig[0] == 1.0 and sig[-1] == 0.0 and (sig[1:] < sig[:-1]).all()
    # FLUX.2's scheduler: dynamic exponential shift with the pipeline's linspace sigmas
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    sched.set_timesteps(steps, sigmas=t, mu=mu)
    np.testing.assert_allclose(sig.numpy(), sched.sigmas.double().numpy(), rtol=1e-6, atol=1e-7)
    fixed = flux2_sigmas(steps, seq, mu=0.0)  # mu 0: no shift
    np.testing.assert_allclose(fixed[:-1].numpy(), t, rtol=1e-12)


class ExactVelocityTeacher:
    """Denoiser with the exact rectified-flow velocity towards a fixed ``x0``: ``v = (x - x0) / sigma``.
    Euler on it lands on ``x0`` exactly; it records the calls."""

    in_channels = 8
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, x0: torch.Tensor) -> None:
        self.x0 = x0
        self.calls = []

    def encode_prompts(self, prompts):
        return torch.zeros(len(prompts), 512, 4)

    def denoise(self, x, sigma, cond, guidance, height, width, router=None, state=None):
        self.calls.append((sigma, guidance, height, width, state))
        return (x - self.x0) / sigma


def test_euler_lands_on_x0_and_follows_the_schedule():
    x0 = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(3))
    t = ExactVelocityTeacher(x0)
    cfg = SamplerConfig(steps=5, guidance=3.0, height=32, width=48, seed=11)
    out = sample(t, ["a", "b"], cfg)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)
    sig = flux2_sigmas(5, 2 * 3)
    assert [c[0] for c in t.calls] == pytest.approx(sig[:-1].tolist())
    assert all(c[1:4] == (3.0, 2, 3) for c in t.calls)


def test_sampler_sets_router_state_each_step():
    t = ExactVelocityTeacher(torch.zeros(2, 4, 8))
    router = AttentionRouter()
    seen = []
    sample(t, ["a", "b"], SamplerConfig(steps=3, height=32, width=32, guidance=2.5), router=router,
           seeds=[5, 9], prompt_indices=[10, 3],
           on_step=lambda i, s, x, v: seen.append((i, s, router.state)))
    sig = flux2_sigmas(3, 4)
    for i, (step, s, state) in enumerate(seen):
        assert step == i == state.step and s == state.sigma == pytest.approx(float(sig[i]))
        assert (state.cfg, state.height, state.width) == (2.5, 2, 2)
        assert state.prompt_index == [10, 3] and state.seed == [5, 9]
        assert t.calls[i][4] is state  # the denoiser got the same state


def test_initial_noise_per_seed():
    a = initial_noise([1, 2], 4, 3)
    assert torch.equal(a[1], initial_noise([2], 4, 3)[0])
    assert torch.equal(a[0], torch.randn(4, 3, generator=torch.Generator().manual_seed(1)))


@pytest.fixture(scope="module")
def tiny():
    cfg = TeacherConfig(num_single=1, seed=2)
    codec = build_tiny_codec(cfg)
    enc = TinyPromptEncoder(codec["prompt_encoder.token"], codec["prompt_encoder.position"])
    return Teacher(build_tiny_transformer(cfg), {"kind": "tiny"}, encoder=enc, decoder=None)


def test_tiny_sampling_is_deterministic(tiny):
    cfg = SamplerConfig(steps=2, height=48, width=32, seed=4)
    prompts = ["a red fox", "a city at night"]
    a = sample(tiny, prompts, cfg)
    b = sample(tiny, prompts, cfg)
    assert a.shape == (2, 3 * 2, 128)
    assert torch.equal(a, b)
    c = sample(tiny, prompts, cfg, seeds=[4, 6])  # row 0 same seed, row 1 other seed
    torch.testing.assert_close(c[0], a[0], atol=1e-5, rtol=1e-5)
    assert (c[1] - a[1]).abs().max() > 1e-2
    single = sample(tiny, prompts[1:], cfg, seeds=[5])  # batched == alone
    torch.testing.assert_close(single[0], a[1], atol=1e-4, rtol=1e-4)
    assert math.isfinite(a.abs().max().item())


def test_config_validation():
    with pytest.raises(ConfigError, match="multiple of 16"):
        SamplerConfig(height=250)
    with pytest.raises(ConfigError, match="steps"):
        SamplerConfig(steps=0)
    cfg = from_dict(SamplerConfig, {"height": 512, "width": 256, "mu": None})
    assert (cfg.latent_height, cfg.latent_width) == (32, 16)
