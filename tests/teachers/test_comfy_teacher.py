"""The tiny teacher file is a ComfyUI FLUX.2 model: UNETLoader detects it, and ComfyUI's denoiser gives
the pipeline's (diffusers) teacher output for the same latent, sigma, guidance and conditioning.

One architectural difference sat in the QK RMSNorm: ComfyUI builds it with ``eps=None`` (torch then
uses ``finfo(dtype).eps``: 1.2e-7 in fp32, 7.8e-3 in bf16) where diffusers uses ``1e-6``. It matters
for tokens whose pre-norm q/k are small, such as FLUX.2's zero-padded text tokens (1.9e-4 relative
on the tiny teacher), so the pipeline's loader gives diffusers ComfyUI's epsilon; the two then agree
to float32 rounding.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from flux2ttr.teachers.teacher import load_tiny_teacher

ROUNDING_REL = 2e-6   # float32 rounding over a 5-block forward (measured 8e-7)
EPS_GAP_REL = 5e-5    # diffusers' own 1e-6 eps differs from ComfyUI's by more than rounding (1.9e-4)


@pytest.fixture(scope="module")
def both(comfy, tiny_teacher):
    import nodes

    name = comfy.add_model_file("diffusion_models", tiny_teacher.path)
    model = nodes.UNETLoader().load_unet(name, "default")[0]
    teacher = load_tiny_teacher(tiny_teacher.config, tiny_teacher.folder)
    return model, teacher


def rms_norms(module: torch.nn.Module) -> list[torch.nn.RMSNorm]:
    return [m for m in module.modules() if isinstance(m, torch.nn.RMSNorm)]


@contextlib.contextmanager
def eps(module: torch.nn.Module, value):
    norms = rms_norms(module)
    saved = [m.eps for m in norms]
    for m in norms:
        m.eps = value
    try:
        yield
    finally:
        for m, e in zip(norms, saved):
            m.eps = e


def outputs(model, teacher, sigma, guidance, h, w):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 128, h, w, generator=gen)
    cond = teacher.encode_prompts(["a red fox in the snow", "ein Leuchtturm"])
    assert cond.shape == (2, 512, teacher.context_dim)
    with torch.inference_mode():
        out_comfy = model.model.diffusion_model(x, torch.full((2,), sigma), cond, guidance=torch.full((2,), guidance))
        out_pipe = teacher.denoise(x.flatten(2).transpose(1, 2), sigma, cond, guidance, h, w)  # row-major tokens
    return out_comfy.flatten(2).transpose(1, 2), out_pipe


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_comfyui_detects_flux2(both, tiny_teacher):
    import comfy.model_base

    model, teacher = both
    assert isinstance(model.model, comfy.model_base.Flux2)
    params = model.model.diffusion_model.params
    assert params.num_heads == teacher.num_heads == tiny_teacher.num_heads
    assert params.hidden_size // params.num_heads == teacher.head_dim == 128
    assert len(model.model.diffusion_model.double_blocks) == tiny_teacher.config.num_double
    assert len(model.model.diffusion_model.single_blocks) == tiny_teacher.config.num_single
    assert params.context_in_dim == teacher.context_dim and params.guidance_embed == teacher.guidance_embeds
    # QK RMSNorm eps: ComfyUI None (= finfo(dtype).eps); the pipeline's loader matches it
    assert {m.eps for m in rms_norms(model.model.diffusion_model)} == {None}
    assert {m.eps for m in rms_norms(teacher.transformer)} == {None}


@pytest.mark.parametrize("sigma, guidance, h, w", [(1.0, 4.0, 8, 8), (0.37, 2.5, 6, 10)])
def test_denoiser_equals_pipeline_teacher(both, sigma, guidance, h, w):
    model, teacher = both
    comfy_out, pipe_out = outputs(model, teacher, sigma, guidance, h, w)  # the pipeline as it loads
    assert rel(comfy_out, pipe_out) < ROUNDING_REL
    torch.testing.assert_close(comfy_out, pipe_out, rtol=1e-4, atol=1e-5)
    # diffusers' default eps would not pass: the alignment is what makes the two equal
    with eps(teacher.transformer, 1e-6):
        comfy_out2, pipe_out2 = outputs(model, teacher, sigma, guidance, h, w)
    assert torch.equal(comfy_out2, comfy_out)
    assert rel(comfy_out2, pipe_out2) > EPS_GAP_REL
    # the comparison can fail: another sigma is far off
    with torch.inference_mode():
        cond = teacher.encode_prompts(["a red fox in the snow", "ein Leuchtturm"])
        x = torch.randn(2, 128, h, w, generator=torch.Generator().manual_seed(11))
        other = teacher.denoise(x.flatten(2).transpose(1, 2), sigma * 0.5, cond, guidance, h, w)
    assert rel(other, pipe_out) > 1e-3
