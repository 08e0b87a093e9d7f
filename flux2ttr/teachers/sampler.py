"""FLUX.2 flow-matching Euler sampler, batched over prompts.

Schedule (diffusers' ``Flux2Pipeline`` with ``FlowMatchEulerDiscreteScheduler``, dynamic exponential shift):
``t_i = linspace(1, 1/steps, steps)``, ``sigma_i = e^mu / (e^mu + (1/t_i - 1))``, then a final 0. ``mu`` is
FLUX.2's empirical fit :func:`empirical_mu` of the image-token count and the step count, unless
``SamplerConfig.mu`` fixes it. Euler: ``x <- x + (sigma_{i+1} - sigma_i) * v(x, sigma_i)`` from ``x = noise``
at ``sigma_0``; the denoiser gets ``timestep = sigma`` and ``guidance = g`` (guidance-distilled FLUX.2).

A teacher that samples itself (the ``comfyui`` kind: ComfyUI's own CFG guider and Euler sampler on the same
schedule and noise, see :mod:`flux2ttr.teachers.comfyui`) gets the whole run handed over by :func:`sample`;
only such a teacher does true CFG (``cfg != 1``: cond and uncond batched) and reference latents.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from flux2ttr.config import ConfigError, check_range
from flux2ttr.contract import RunState

PIXELS_PER_TOKEN = 16  # FLUX.2: VAE 8x, then 2x2 patchify

# FLUX.2's empirical mu fit (diffusers pipeline_flux2.compute_empirical_mu): mu is linear in the image
# sequence length at 10 and 200 steps, interpolated linearly in the step count; above 4300 tokens only the
# 200-step line is used.
_MU_A10, _MU_B10 = 8.73809524e-05, 1.89833333
_MU_A200, _MU_B200 = 0.00016927, 0.45666666
_MU_LONG_SEQ = 4300


@dataclass
class SamplerConfig:
    """params.yaml section ``sampler``. ``height``/``width`` are in **pixels** (multiples of 16); the latent
    grid is ``height/16 x width/16`` image tokens."""

    steps: int = 6
    guidance: float = 2.0  # FLUX.2's guidance embedding value (FluxGuidance); what the students are given as cfg
    cfg: float = 1.0  # true CFG scale (comfyui teacher only): 1 = the conditional pass alone (dev, distilled Klein)
    negative_prompt: str = ""  # the unconditional prompt when cfg != 1
    height: int = 256  # pixels
    width: int = 256  # pixels
    seed: int = 0  # base seed: prompt i of a run gets seed + i unless seeds are given
    mu: float | None = None  # schedule shift; None = FLUX.2's empirical_mu(image tokens, steps)
    show_progress: bool = False  # tqdm bar over steps

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"sampler.steps must be >= 1, got {self.steps}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v < PIXELS_PER_TOKEN or v % PIXELS_PER_TOKEN:
                raise ConfigError(f"sampler.{name} = {v} px: must be a positive multiple of {PIXELS_PER_TOKEN}")
        check_range("sampler", self, "seed", ge=0)  # seeds feed numpy generators, which refuse negatives
        check_range("sampler", self, "guidance", "cfg", ge=0.0)

    @property
    def true_cfg(self) -> bool:
        """Whether sampling runs an unconditional pass too (ComfyUI skips it at a CFG scale of exactly 1)."""
        return not math.isclose(float(self.cfg), 1.0)

    @property
    def latent_height(self) -> int:
        return self.height // PIXELS_PER_TOKEN

    @property
    def latent_width(self) -> int:
        return self.width // PIXELS_PER_TOKEN


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's schedule shift ``mu`` for ``image_seq_len`` tokens and ``num_steps`` steps."""
    if image_seq_len > _MU_LONG_SEQ:
        return float(_MU_A200 * image_seq_len + _MU_B200)
    m200 = _MU_A200 * image_seq_len + _MU_B200
    m10 = _MU_A10 * image_seq_len + _MU_B10
    a = (m200 - m10) / 190.0
    b = m200 - 200.0 * a
    return float(a * num_steps + b)


def flux2_sigmas(steps: int, image_seq_len: int, mu: float | None = None) -> torch.Tensor:
    """``[steps + 1]`` float64 noise levels from ~1 down to 0 (last entry exactly 0)."""
    if mu is None:
        mu = empirical_mu(image_seq_len, steps)
    t = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))
    return torch.cat([shifted, torch.zeros(1, dtype=torch.float64)])


def initial_noise(seeds: list[int], n_tokens: int, channels: int) -> torch.Tensor:
    """``[B, n_tokens, channels]`` fp32 standard normal noise, row b from ``seeds[b]`` (CPU generator, so the
    same seed gives the same noise on any device)."""
    out = torch.empty(len(seeds), n_tokens, channels)
    for b, s in enumerate(seeds):
        out[b] = torch.randn(n_tokens, channels, generator=torch.Generator().manual_seed(int(s)))
    return out


StepCallback = Callable[[int, float, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def sample(teacher, prompts: list[str], cfg: SamplerConfig, *, router=None, seeds: list[int] | None = None,
           prompt_indices: list[int] | None = None, on_step: StepCallback | None = None,
           references: list[list[torch.Tensor]] | None = None) -> torch.Tensor:
    """Sample ``len(prompts)`` images in one batch; returns final latents ``[B, h*w, 128]`` (fp32).

    ``seeds`` (default ``cfg.seed + i``) and ``prompt_indices`` (default ``0..B-1``) go into the
    :class:`RunState` that ``router.state`` is set to before every denoiser call.
    ``on_step(step, sigma, x, velocity)`` is called after each denoiser call (before the Euler update).
    ``references``: per prompt, the same number of reference latents ``[h*w, 128]`` (ComfyUI's
    ReferenceLatent; a teacher that samples itself only). A teacher with ``samples_itself`` runs the whole
    call (same arguments, same result layout).
    """
    B = len(prompts)
    if B == 0:
        raise ValueError("sample() needs at least one prompt")
    seeds = [cfg.seed + i for i in range(B)] if seeds is None else [int(s) for s in seeds]
    prompt_indices = list(range(B)) if prompt_indices is None else [int(i) for i in prompt_indices]
    if len(seeds) != B or len(prompt_indices) != B:
        raise ValueError(f"{B} prompts but {len(seeds)} seeds and {len(prompt_indices)} prompt indices")
    if getattr(teacher, "samples_itself", False):
        return teacher.sample(list(prompts), cfg, router=router, seeds=seeds, prompt_indices=prompt_indices,
                              on_step=on_step, references=references)
    if cfg.true_cfg:
        raise ConfigError(f"cfg = {cfg.cfg:g} (sampler.cfg / rollout.cfg): true CFG (cond and uncond batched) runs "
                          "only with teacher.kind: comfyui; the tiny and diffusers teachers sample with the guidance "
                          "embedding alone (sampler.guidance): set cfg to 1.0")
    if references:
        raise ConfigError("capture.reference_latents > 0 needs teacher.kind: comfyui (reference latents go through "
                          "ComfyUI's FLUX.2 model); set capture.reference_latents: 0")
    h, w = cfg.latent_height, cfg.latent_width
    sigmas = flux2_sigmas(cfg.steps, h * w, cfg.mu)
    cond = teacher.encode_prompts(prompts)
    x = initial_noise(seeds, h * w, teacher.in_channels).to(teacher.device, torch.float32)
    steps = range(cfg.steps)
    for i in tqdm(steps, desc="sampling", disable=not cfg.show_progress, leave=False):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        state = RunState(sigma=sigma, cfg=float(cfg.guidance), step=i, height=h, width=w,
                         prompt_index=list(prompt_indices), seed=list(seeds))
        if router is not None:
            router.state = state
        v = teacher.denoise(x.to(teacher.dtype), sigma, cond, cfg.guidance, h, w, router=router,
                            state=state if router is not None else None).float()
        if on_step is not None:
            on_step(i, sigma, x, v)
        x = x + (sigma_next - sigma) * v
    return x
