"""A file written by the teacher-training script (one exported here, and the shipped one), unpacked by the
``teacher`` stage (``teacher.kind: trained``), is a ComfyUI FLUX.2 model: UNETLoader detects it and its
denoiser equals the pipeline's teacher to float32 rounding, as for the seeded tiny teacher
(tests/teachers/test_comfy_teacher.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flux2ttr.teachers import scenes as sc
from flux2ttr.teachers import train_teacher as tt
from flux2ttr.teachers.teacher import SINGLE_FILE_NAME, TeacherConfig, load_teacher
from flux2ttr.teachers.trained import write_trained_teacher

SHIPPED = str(Path(__file__).resolve().parents[2] / TeacherConfig().trained_file)  # the shipped file

ROUNDING_REL = 2e-6  # float32 rounding over a few blocks (the seeded teacher's bound)


def exported_file(tmp) -> str:
    """A file the training script exports after one step, every layer made active."""
    cfg = tt.TrainTeacherConfig(num_heads=2, num_double=1, num_single=2, context_dim=32, height=128, width=128,
                                batch_size=2, steps=2, eval_captions=0, checkpoint=str(tmp / "state.safetensors"),
                                out_file=str(tmp / "trained.safetensors"))
    trainer = tt.Trainer(cfg, sc.SceneConfig())
    trainer.step()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every layer active (two steps from adaLN-zero leave the output ~0)
        for p in trainer.ema_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    trainer.export(cfg.out_file)
    return cfg.out_file


@pytest.fixture(scope="module", params=["exported", "shipped"])
def both(comfy, tmp_path_factory, request):
    import nodes

    tmp = tmp_path_factory.mktemp("trained")
    source = exported_file(tmp) if request.param == "exported" else SHIPPED
    tcfg = TeacherConfig(kind="trained", trained_file=source, out_dir=str(tmp / "teacher"))
    folder = write_trained_teacher(tcfg)
    name = comfy.add_model_file("diffusion_models", folder / SINGLE_FILE_NAME,
                                f"flux2_trained_{request.param}.safetensors")
    model = nodes.UNETLoader().load_unet(name, "default")[0]
    return model, load_teacher(tcfg)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_comfyui_detects_the_trained_teacher(both):
    import comfy.model_base

    model, teacher = both
    assert isinstance(model.model, comfy.model_base.Flux2)
    params = model.model.diffusion_model.params
    assert params.num_heads == teacher.num_heads == 2 and params.context_in_dim == teacher.context_dim
    singles = [k for k in teacher.layer_keys if k.startswith("single_blocks.")]
    assert len(model.model.diffusion_model.single_blocks) == len(singles) and params.guidance_embed


@pytest.mark.parametrize("sigma, guidance, h, w", [(0.9, 4.0, 8, 8), (0.4, 1.0, 6, 10)])
def test_denoiser_equals_pipeline_teacher(both, sigma, guidance, h, w):
    model, teacher = both
    x = torch.randn(2, 128, h, w, generator=torch.Generator().manual_seed(5))
    cond = teacher.encode_prompts(["two small red circles top left, on grey", "a blue stripe down the left, on white"])
    with torch.inference_mode():
        out_comfy = model.model.diffusion_model(x, torch.full((2,), sigma), cond, guidance=torch.full((2,), guidance))
        out_pipe = teacher.denoise(x.flatten(2).transpose(1, 2), sigma, cond, guidance, h, w)
    out_comfy = out_comfy.flatten(2).transpose(1, 2)
    assert float(out_pipe.abs().mean()) > 1e-2
    assert rel(out_comfy, out_pipe) < ROUNDING_REL
    with torch.inference_mode():  # and the comparison can fail: another caption is far off
        other = teacher.denoise(x.flatten(2).transpose(1, 2), sigma, teacher.encode_prompts(["on black", "on grey"]),
                                guidance, h, w)
    assert rel(other, out_pipe) > 1e-3
