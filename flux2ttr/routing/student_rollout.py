"""Student rollouts: sample with a per-step routing mask through the attention router.

A mask ``[steps, L]`` (bool, ``True`` = full softmax attention, ``False`` = the layer's student) over an
ordered list of ``L`` layer keys decides, at denoising step ``s``, which layers run their student. The
router evaluates the route per call from ``router.state.step`` (set by the sampler before each denoiser
call), so one rollout is one ordinary :func:`flux2ttr.teachers.sampler.sample` run. With the ``comfyui``
teacher that run is ComfyUI's, routed by the node's own patch (the route asked once per step), cond and
uncond rows alike.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flux2ttr.contract import RunState
from flux2ttr.teachers.router import AttentionRouter, RouterError
from flux2ttr.teachers.sampler import SamplerConfig, flux2_sigmas, sample


@dataclass
class StudentRolloutResult:
    """``latents [B, h*w, 128]`` fp32, ``images [B, 3, 16h, 16w]`` in [0, 1], wall ``seconds`` of sampling
    plus decoding for the whole batch, and per-layer student call counts of this rollout."""

    latents: torch.Tensor
    images: torch.Tensor
    seconds: float
    student_calls: dict[str, int]


def schedule(cfg: SamplerConfig) -> torch.Tensor:
    """``[steps]`` fp32 noise level of every denoiser call of a rollout with ``cfg`` (what a controller sees)."""
    return flux2_sigmas(cfg.steps, cfg.latent_height * cfg.latent_width, cfg.mu)[:-1].float()


def mask_route(masks: torch.Tensor, layer_keys: Sequence[str]):
    """Route function for :meth:`AttentionRouter.set_route`: the keys whose mask entry at ``state.step`` is
    ``False`` (student). ``masks [steps, L]`` bool."""
    if masks.ndim != 2 or masks.shape[1] != len(layer_keys):
        raise ValueError(f"masks must be [steps, {len(layer_keys)}], got {tuple(masks.shape)}")
    rows = [[k for k, full in zip(layer_keys, row) if not bool(full)] for row in masks.cpu()]

    def route(state: RunState | None) -> list[str]:
        if state is None:
            raise RouterError("a per-step mask route needs router.state (set by the sampler)")
        if not 0 <= state.step < len(rows):
            raise RouterError(f"step {state.step} outside the mask's {len(rows)} steps")
        return rows[state.step]

    return route


def make_router(teacher, students: dict[str, torch.nn.Module]) -> AttentionRouter:
    """A router attached to ``teacher`` (installed into a diffusers transformer; for the comfyui teacher each
    sampling run goes through the ComfyUI node's patch) with ``students`` set and nothing routed yet."""
    router = AttentionRouter(include_double=True)
    device = getattr(teacher, "device", None)
    # students come from the artifact on the host; a router in the teacher's own forward needs them beside it
    router.set_students({k: m.to(device) for k, m in students.items()} if device is not None else students)
    router.external_patch = node_patch
    teacher.attach_router(router)
    return router


def node_patch(model, router: AttentionRouter):
    """``(patched, calls)``: the ComfyUI ``ModelPatcher`` ``model`` routed by the node's own patch
    (:func:`flux2ttr.comfy.patch.patch_model`) with ``router``'s students, every one allowed, the layers of a
    step those ``router.routed_keys_for`` gives for it (the comfyui teacher's route); ``calls()`` after the run:
    ``{layer: student calls}`` of that run (cond and uncond rows are one call)."""
    from flux2ttr.comfy.patch import build_holder, last_runs, patch_model  # noqa: PLC0415

    def decide(step: int, sigma: float, cfg: float, height: int, width: int) -> tuple[frozenset[str], None]:
        return frozenset(router.routed_keys_for(RunState(sigma=sigma, cfg=cfg, step=step, height=height,
                                                         width=width))), None

    holder = build_holder(router.students, set(router.students), decide, label="flux2ttr rollout")

    def calls() -> dict[str, int]:
        out: dict[str, int] = {}
        for (_, key, how), n in last_runs()[-1].routed_calls.items():
            if how == "student":
                out[key] = out.get(key, 0) + n
        return out

    return patch_model(model, holder), calls


def run_student_rollout(teacher, router: AttentionRouter, prompts: list[str], cfg: SamplerConfig,
                        masks: torch.Tensor, layer_keys: Sequence[str], *, seeds: list[int],
                        prompt_indices: list[int] | None = None) -> StudentRolloutResult:
    """Sample ``prompts`` (one shared mask for the batch) with ``masks [cfg.steps, L]`` routing ``layer_keys``.

    Every layer not in ``layer_keys`` runs full attention. An all-``True`` mask is the teacher itself
    (bit-identical: the router passes untouched calls through).
    """
    if masks.shape[0] != cfg.steps:
        raise ValueError(f"masks have {masks.shape[0]} steps, the sampler runs {cfg.steps}")
    missing = [k for k, col in zip(layer_keys, masks.T) if not bool(col.all()) and k not in router.students]
    if missing:
        raise RouterError(f"mask routes layers without a student: {missing}")
    router.set_route(mask_route(masks.bool(), layer_keys))
    router.calls = {}
    try:
        t0 = time.perf_counter()
        latents = sample(teacher, prompts, cfg, router=router, seeds=seeds, prompt_indices=prompt_indices)
        images = teacher.decode(latents, cfg.latent_height, cfg.latent_width)
        seconds = time.perf_counter() - t0
    finally:
        router.set_route(set())
    return StudentRolloutResult(latents=latents.float(), images=images.float(), seconds=seconds,
                                student_calls=dict(router.calls))
