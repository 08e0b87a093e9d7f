"""The attention-call contract every part of flux2ttr hooks.

One call per attention layer: a layer key (ComfyUI naming), ``q, k, v`` of shape ``[B, H, N, D]``
*after* QK-norm and RoPE, the number of conditioning (text) tokens that come first in the sequence,
and the run state. It returns ``[B, H, N, D]``. Teachers (diffusers, ComfyUI) adapt to this call;
students, capture and routing never see framework objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

# FLUX.2 attention always sees 512 conditioning tokens (ComfyUI left-pads shorter prompts with zeros).
FLUX2_COND_TOKENS = 512


@dataclass
class RunState:
    """Where a denoiser call is in a sampling run.

    ``sigma`` is the flow-matching noise level in [0, 1] (ComfyUI's sigma, diffusers' timestep/1000),
    ``cfg`` the guidance value, ``step`` the 0-based denoising step, ``height``/``width`` the latent
    image-token grid (tokens, not pixels). ``prompt_index``, ``seed`` and ``uncond`` are per batch row
    (capture only); ``uncond[b]`` is 1 for a row of the unconditional half of a true-CFG call (cond and uncond
    batched, the ``comfyui`` teacher with ``sampler.cfg`` != 1), 0 otherwise; empty means all rows are cond.
    """

    sigma: float
    cfg: float
    step: int
    height: int
    width: int
    prompt_index: list[int] = field(default_factory=list)
    seed: list[int] = field(default_factory=list)
    uncond: list[int] = field(default_factory=list)


class AttentionCall(Protocol):
    """``(layer_key, q, k, v [B,H,N,D], n_cond, state) -> [B,H,N,D]``."""

    def __call__(
        self, key: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_cond: int, state: RunState
    ) -> torch.Tensor: ...


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The teacher: plain softmax attention, ``[B, H, N, D]`` in and out, scale ``1/sqrt(D)``."""
    return F.scaled_dot_product_attention(q, k, v)


_DIFFUSERS_TO_COMFY = (
    (re.compile(r"^single_transformer_blocks\.(\d+)$"), "single_blocks.{}"),
    (re.compile(r"^transformer_blocks\.(\d+)$"), "double_blocks.{}"),
)
_COMFY_KEY = re.compile(r"^(single|double)_blocks\.(\d+)$")


def layer_key(name: str) -> str:
    """Map a diffusers block name (``single_transformer_blocks.3``) to the ComfyUI key
    (``single_blocks.3``); ComfyUI keys pass through unchanged."""
    if _COMFY_KEY.match(name):
        return name
    for pattern, fmt in _DIFFUSERS_TO_COMFY:
        m = pattern.match(name)
        if m:
            return fmt.format(m.group(1))
    raise ValueError(f"not a FLUX.2 attention block name: {name!r}")


def comfy_key(block_type: str, block_index: int) -> str:
    """The layer key ComfyUI's ``transformer_options`` (``block_type``, ``block_index``) refers to."""
    if block_type not in ("single", "double"):
        raise ValueError(f"unknown block_type {block_type!r}")
    return f"{block_type}_blocks.{int(block_index)}"


def block_layer_keys(block_type: str, count: int) -> list[str]:
    """The layer keys of ``count`` blocks of ``block_type`` ("single" / "double"), by index."""
    return [comfy_key(block_type, i) for i in range(int(count))]


def model_layer_keys(num_double: int, num_single: int) -> list[str]:
    """Every attention layer key of a FLUX.2 transformer in execution order (double blocks first)."""
    return block_layer_keys("double", num_double) + block_layer_keys("single", num_single)


def layer_sort_key(key: str) -> tuple[int, int]:
    """Execution order: double blocks first, then single blocks, by index."""
    m = _COMFY_KEY.match(key)
    if not m:
        raise ValueError(f"not a layer key: {key!r}")
    return (0 if m.group(1) == "double" else 1, int(m.group(2)))


def reference_token_order(n_txt: int, n_img: int, n_ref: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[N]`` token indices that turn ComfyUI's FLUX.2 sequence with reference latents, ``[text (n_txt), image
    grid (n_img), reference tokens (n_ref)]`` (ReferenceLatent appends them after the grid), into the order
    students and the trace store use: ``[text, references, image grid]``, so that the ``n_txt + n_ref``
    conditioning tokens come first and the grid keeps its latent layout. Apply with ``x.index_select(2, idx)``
    on ``[B, H, N, D]``; attention commutes with it (RoPE is already applied to q and k)."""
    n_cond = n_txt + n_ref
    idx = torch.cat([torch.arange(n_txt), torch.arange(n_txt + n_img, n_cond + n_img), torch.arange(n_txt, n_txt + n_img)])
    return idx.to(device) if device is not None else idx
