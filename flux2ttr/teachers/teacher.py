"""Teachers: the FLUX.2 transformer whose attention flux2ttr distils, with a prompt encoder and a decoder.

Two kinds share one file format and one interface (:class:`Teacher`):

* ``tiny`` (default): diffusers' real ``Flux2Transformer2DModel`` with FLUX.2's per-head shapes (head_dim
  128, RoPE axes (32, 32, 32, 32), 128 latent channels, mlp ratio 3, theta 2000) but 2 heads and 1 + 4
  blocks. Its weights come from a seed and are *shaped* so that single-block attention looks like a
  real DiT's: peaked, mostly local on the image grid, with some mass on the text tokens (see
  :func:`build_tiny_transformer`). It is written once as the original BFL single-file layout
  (``double_blocks.{i}``, ``single_blocks.{i}``, ``img_in``, ...) that ComfyUI loads, with a diffusers config
  folder, and loaded back through ``Flux2Transformer2DModel.from_single_file``. A hashed-token prompt
  encoder and a linear latent-to-RGB decoder complete it.
* ``diffusers``: a real FLUX.2 (dev or Klein) transformer from a local single file or diffusers folder,
  its text encoder and VAE from local folders. Nothing is downloaded.
* ``comfyui``: the user's three ComfyUI files (diffusion model, text encoder, VAE) through ComfyUI's own
  loaders, conditioning, CFG guider and attention override (:mod:`flux2ttr.teachers.comfyui`, the only
  module that imports ComfyUI, inside its functions).

Shapes: latents are image tokens ``[B, h*w, 128]`` (row-major over the ``h x w`` latent grid, one token per
16x16 pixels); conditioning is ``[B, 512, ctx]``, real prompt tokens last, zeros before (as ComfyUI).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from flux2ttr.atomic import atomic_save_safetensors, atomic_write_text, building_dir, file_sha256
from flux2ttr.config import ConfigError, Flux2TTRError, check_range, to_dict
from flux2ttr.contract import FLUX2_COND_TOKENS, RunState, block_layer_keys

# FLUX.2 architecture constants (fixed by the model family and by ComfyUI's detection, not tunables).
FLUX2_HEAD_DIM = 128
FLUX2_AXES_DIM = (32, 32, 32, 32)
FLUX2_LATENT_CHANNELS = 128
FLUX2_MLP_RATIO = 3.0
FLUX2_ROPE_THETA = 2000
FLUX2_TIMESTEP_CHANNELS = 256
FLUX2_PIXELS_PER_TOKEN = 16  # VAE 8x plus 2x2 patchify

SINGLE_FILE_NAME = "flux2_tiny.safetensors"
EXTRAS_FILE_NAME = "tiny_codec.safetensors"  # prompt encoder + latent decoder of the tiny teacher
IDENTITY_FILE_NAME = "identity.json"
METADATA_KEY = "flux2ttr"


TEACHER_KINDS = ("tiny", "diffusers", "comfyui", "trained")
FOLDER_KINDS = ("tiny", "trained")  # the kinds whose teacher stage writes the model into out_dir (SINGLE_FILE_NAME, ...)
COMFYUI_DEFAULT_DTYPE = "default"  # comfyui kind: the weight dtype UNETLoader's "default" gives (fp8 files stay fp8)


class TeacherError(ValueError, Flux2TTRError):
    """A teacher cannot be built or loaded; the message names the param and the path."""


@dataclass
class TeacherConfig:
    """params.yaml section ``teacher``."""

    kind: str = "trained"  # "trained" | "tiny" | "diffusers" | "comfyui"
    out_dir: str = "teachers/tiny"  # tiny, trained: where the stage writes its files; diffusers, comfyui: identity.json
    dtype: str = "float32"  # float32 | bfloat16 | float16 | default (comfyui: ComfyUI's choice, as UNETLoader)
    device: str = "cpu"
    # --- tiny: architecture (head_dim 128 etc. are FLUX.2 constants) ---
    seed: int = 0
    num_heads: int = 2
    num_double: int = 1
    num_single: int = 4
    joint_attention_dim: int = 64
    # --- tiny: weight shaping (attention sharpness and locality) ---
    weight_gain: float = 1.0  # random weights: std = gain / sqrt(fan_in)
    mod_gain: float = 0.1  # random part of the modulation weights (how much t/guidance change the blocks)
    time_const: float = 4.0  # temb channel 0 = this constant (a bias the bias-free FLUX.2 layers can use)
    resid_const_rms: float = 1.0  # per-channel RMS of the image/text constant written into the residual
    double_gate: float = 1.0  # double-block attention gate (carries the constant into the residual)
    single_gate: float = 0.3  # single-block residual gate (small keeps the constant alive over the blocks)
    qk_norm_scale: float = 2.0  # QK-norm weight: score scale, i.e. attention sharpness
    pos_fraction: float = 0.8  # share of q/k energy in the shared positional component
    rope_bands: tuple[int, ...] = (1, 2, 3, 4)  # RoPE pair indices (frequency 2000^(-i/16)) of that component
    text_affinity: float = 0.0  # text-key score above far image keys, in units of the positional peak
    vocab_size: int = 4096  # hashed prompt-token table
    # --- trained: the shipped trained tiny teacher (flux2ttr/teachers/trained.py), pinned by <file>.sha256 ---
    trained_file: str = "data/teachers/flux2_trained_fp16.safetensors"
    # --- diffusers and comfyui ---
    transformer: str = ""  # single .safetensors (comfyui: the file in models/diffusion_models) or diffusers folder
    transformer_config: str = ""  # diffusers, single file: config folder (holds transformer/config.json)
    text_encoder: str = ""  # diffusers: folder (Mistral3 dev, Qwen3 Klein); comfyui: file in models/text_encoders
    tokenizer: str = ""  # diffusers: its tokenizer/processor folder (default: text_encoder)
    vae: str = ""  # diffusers: AutoencoderKLFlux2 folder; comfyui: the file in models/vae
    comfyui_path: str = ""  # comfyui: the ComfyUI folder whose code loads and samples ("": $COMFYUI_PATH)

    def __post_init__(self) -> None:
        self.rope_bands = tuple(int(i) for i in self.rope_bands)
        if self.kind not in TEACHER_KINDS:
            raise ConfigError(f"teacher.kind must be one of {list(TEACHER_KINDS)}, got {self.kind!r}")
        if self.dtype == COMFYUI_DEFAULT_DTYPE:  # UNETLoader's weight_dtype "default": ComfyUI picks
            if self.kind != "comfyui":
                raise ConfigError(f"teacher.dtype {COMFYUI_DEFAULT_DTYPE!r} (ComfyUI's choice) is for teacher.kind comfyui; "
                                  "the tiny and diffusers kinds need float32, bfloat16 or float16")
        else:
            torch_dtype(self.dtype)  # teacher.dtype must be one of ... (checked before anything loads)
        check_range("teacher", self, "num_heads", "joint_attention_dim", "vocab_size", ge=1)
        check_range("teacher", self, "num_double", "num_single", ge=0)
        if self.num_double + self.num_single < 1:
            raise ConfigError(f"teacher.num_double + teacher.num_single = {self.num_double + self.num_single}: "
                              "must be >= 1 (the tiny teacher needs at least one block)")
        check_range("teacher", self, "weight_gain", "mod_gain", "resid_const_rms", ge=0.0)
        check_range("teacher", self, "qk_norm_scale", gt=0.0)
        check_range("teacher", self, "pos_fraction", ge=0.0, le=1.0)
        pairs = FLUX2_AXES_DIM[1] // 2
        for band in self.rope_bands:
            if not 0 <= band < pairs:
                raise ConfigError(f"teacher.rope_bands = {list(self.rope_bands)}: {band} is not a RoPE pair index "
                                  f"in [0, {pairs})")


def torch_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ConfigError(f"teacher.dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


# ----------------------------------------------------------------------------------------------------
# atomic writes and hashing
# ----------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------
# diffusers <-> original (BFL) single-file layout
# ----------------------------------------------------------------------------------------------------
_TOP_LEVEL = {
    "x_embedder.weight": "img_in.weight",
    "context_embedder.weight": "txt_in.weight",
    "time_guidance_embed.timestep_embedder.linear_1.weight": "time_in.in_layer.weight",
    "time_guidance_embed.timestep_embedder.linear_2.weight": "time_in.out_layer.weight",
    "time_guidance_embed.guidance_embedder.linear_1.weight": "guidance_in.in_layer.weight",
    "time_guidance_embed.guidance_embedder.linear_2.weight": "guidance_in.out_layer.weight",
    "double_stream_modulation_img.linear.weight": "double_stream_modulation_img.lin.weight",
    "double_stream_modulation_txt.linear.weight": "double_stream_modulation_txt.lin.weight",
    "single_stream_modulation.linear.weight": "single_stream_modulation.lin.weight",
    "proj_out.weight": "final_layer.linear.weight",
}
_DOUBLE = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "attn.to_out.0.weight": "img_attn.proj.weight",
    "attn.to_add_out.weight": "txt_attn.proj.weight",
    "ff.linear_in.weight": "img_mlp.0.weight",
    "ff.linear_out.weight": "img_mlp.2.weight",
    "ff_context.linear_in.weight": "txt_mlp.0.weight",
    "ff_context.linear_out.weight": "txt_mlp.2.weight",
}
_SINGLE = {
    "attn.to_qkv_mlp_proj.weight": "linear1.weight",
    "attn.to_out.weight": "linear2.weight",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
}
_QKV = {"attn.to_": "img_attn.qkv.weight", "attn.add_": "txt_attn.qkv.weight"}


def diffusers_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``Flux2Transformer2DModel`` state dict -> the original single-file keys (the inverse of
    diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers``). Unknown keys raise."""
    out: dict[str, torch.Tensor] = {}
    pending_qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        t = t.detach().contiguous()
        if name in _TOP_LEVEL:
            out[_TOP_LEVEL[name]] = t
        elif name == "norm_out.linear.weight":
            scale, shift = t.chunk(2, dim=0)  # diffusers (scale, shift) -> BFL (shift, scale)
            out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale], dim=0)
        elif m := re.match(r"^transformer_blocks\.(\d+)\.(.+)$", name):
            i, rest = m.groups()
            if rest in _DOUBLE:
                out[f"double_blocks.{i}.{_DOUBLE[rest]}"] = t
            elif qm := re.match(r"^attn\.(to_|add_)([qkv])(?:_proj)?\.weight$", rest):
                prefix, which = qm.groups()
                pending_qkv.setdefault(f"double_blocks.{i}.{_QKV['attn.' + prefix]}", {})[which] = t
            else:
                raise TeacherError(f"cannot map diffusers key {name!r} to the single-file layout")
        elif m := re.match(r"^single_transformer_blocks\.(\d+)\.(.+)$", name):
            i, rest = m.groups()
            if rest not in _SINGLE:
                raise TeacherError(f"cannot map diffusers key {name!r} to the single-file layout")
            out[f"single_blocks.{i}.{_SINGLE[rest]}"] = t
        else:
            raise TeacherError(f"cannot map diffusers key {name!r} to the single-file layout")
    for bfl, parts in pending_qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise TeacherError(f"{bfl}: incomplete q/k/v projections {sorted(parts)}")
        out[bfl] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0).contiguous()
    return out


# ----------------------------------------------------------------------------------------------------
# the tiny teacher
# ----------------------------------------------------------------------------------------------------
def tiny_model_config(cfg: TeacherConfig) -> dict[str, Any]:
    """``Flux2Transformer2DModel`` kwargs of the tiny teacher."""
    return dict(
        patch_size=1, in_channels=FLUX2_LATENT_CHANNELS, out_channels=None, num_layers=cfg.num_double,
        num_single_layers=cfg.num_single, attention_head_dim=FLUX2_HEAD_DIM, num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.joint_attention_dim, timestep_guidance_channels=FLUX2_TIMESTEP_CHANNELS,
        mlp_ratio=FLUX2_MLP_RATIO, axes_dims_rope=FLUX2_AXES_DIM, rope_theta=FLUX2_ROPE_THETA, guidance_embeds=True,
    )


def _unit_zero_mean(n: int, gen: torch.Generator, exclude: list[torch.Tensor] = ()) -> torch.Tensor:
    """A random unit vector with zero channel mean (LayerNorm keeps it), orthogonal to ``exclude``."""
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    basis = [torch.ones(n, dtype=torch.float64) / math.sqrt(n)] + [e.double() for e in exclude]
    for b in basis:
        v = v - (v @ b) * b
    return v / v.norm()


def _positional_component(cfg: TeacherConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head: the shared q/k component ``c [H, 128]`` and the text-key component ``d [H, 128]``.

    ``c`` lives in RoPE pairs of the row (dims 32..63) and column (64..95) axes at the frequencies
    ``rope_bands`` (so ``q_m . k_n`` falls with the 2-D grid distance) plus an axis-0 part (dims 0..31,
    position-free); ``d`` is a multiple of that axis-0 part (so image queries see text keys at a fixed,
    position-free score ``text_affinity`` x the positional peak).
    """
    H, D = cfg.num_heads, FLUX2_HEAD_DIM
    a0, a1, a2, _ = FLUX2_AXES_DIM
    c = torch.zeros(H, D, dtype=torch.float64)
    d = torch.zeros(H, D, dtype=torch.float64)
    for h in range(H):
        for start in (a0, a0 + a1):  # row axis, column axis
            for band in cfg.rope_bands:
                if not 0 <= band < a1 // 2:
                    raise ConfigError(f"teacher.rope_bands: {band} is not a RoPE pair index in [0, {a1 // 2})")
                phase = 2 * math.pi * torch.rand((), generator=gen, dtype=torch.float64)
                c[h, start + 2 * band] = torch.cos(phase)
                c[h, start + 2 * band + 1] = torch.sin(phase)
        pos_energy = float(c[h].pow(2).sum())  # = 2 * len(bands): the positional peak (2 axes)
        # axis-0 part (energy = pos_energy): image keys score pos_energy + f(distance); text keys get
        # d = (1 + text_affinity) * c0, i.e. pos_energy * (1 + text_affinity): text_affinity = 0 puts text
        # keys level with far-away image keys, 1 level with the query's own position.
        c0 = torch.randn(a0, generator=gen, dtype=torch.float64)
        c0 = c0 / c0.norm() * math.sqrt(pos_energy)
        c[h, :a0] = c0
        d[h, :a0] = c0 * (1.0 + cfg.text_affinity)
    return c, d


@torch.no_grad()
def build_tiny_transformer(cfg: TeacherConfig):
    """The tiny FLUX.2 teacher with seeded, shaped weights (fp32, CPU).

    All weights are random (``std = weight_gain / sqrt(fan_in)``) except for a few structured parts:

    1. temb channel 0 is a constant (``time_const``): the timestep embedder reads FLUX.2's low-frequency
       cosine channels, which are ~1 for every t in [0, 1000]; the bias-free modulations use it as a bias.
    2. The double block's attention writes a constant direction into the residual of every image token
       (``u_img``) and every text token (``u_txt``): the modulation shift puts a constant ``e`` into the
       attention input, ``to_v``/``add_v_proj`` map ``e`` to a value ``v0`` that every attention output
       therefore contains exactly, and ``to_out``/``to_add_out`` map ``v0`` to ``u_img``/``u_txt``.
    3. In the single blocks, q and k of image tokens read ``u_img`` into a shared component ``c`` in the RoPE
       row/column pairs (scores fall with 2-D grid distance), text keys read ``u_txt`` into ``d`` (a fixed
       score: some text mass); the rest of q/k is content. ``pos_fraction`` sets the share of ``c``,
       ``qk_norm_scale`` (the QK-norm weights) the sharpness.
    """
    from diffusers import Flux2Transformer2DModel  # noqa: PLC0415

    gen = torch.Generator().manual_seed(int(cfg.seed))
    model = Flux2Transformer2DModel(**tiny_model_config(cfg))
    for name, p in model.named_parameters():
        if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
            p.fill_(cfg.qk_norm_scale)
        elif p.ndim == 2:
            gain = cfg.mod_gain if ("modulation" in name or name.startswith("norm_out")) else cfg.weight_gain
            p.copy_(torch.randn(p.shape, generator=gen) * (gain / math.sqrt(p.shape[1])))
        else:
            raise TeacherError(f"unexpected parameter {name} {tuple(p.shape)} in Flux2Transformer2DModel")

    hidden = model.inner_dim

    # 1. temb channel 0 == time_const for every timestep (and every guidance value).
    tge = model.time_guidance_embed
    grid = torch.linspace(0, 1000, 201)
    proj = tge.time_proj(grid)  # [201, 256]
    flat = (proj.min(dim=0).values > 0.95).float()
    if flat.sum() == 0:
        raise TeacherError("no constant timestep-projection channel found")
    lin1, lin2 = tge.timestep_embedder.linear_1, tge.timestep_embedder.linear_2
    lin1.weight[0] = flat / flat.sum() * cfg.time_const
    w = lin1.weight.clone()
    w[1:, flat.bool()] = 0.0  # other hidden units do not see the constant channels
    lin1.weight.copy_(w)
    unit0 = nn.functional.silu(torch.tensor(cfg.time_const))
    lin2.weight[0] = 0.0
    lin2.weight[0, 0] = cfg.time_const / unit0
    lin2.weight[1:, 0] = 0.0
    tge.guidance_embedder.linear_2.weight[0] = 0.0
    bias_unit = float(nn.functional.silu(torch.tensor(cfg.time_const)))  # SiLU(temb)[0] inside the modulations

    def set_const(linear: nn.Linear, chunk: int, value: torch.Tensor) -> None:
        """Make output chunk ``chunk`` (of size hidden) of a modulation linear ~ ``value`` (constant)."""
        linear.weight[chunk * hidden:(chunk + 1) * hidden, 0] = value.float() / bias_unit

    # 2. double blocks: constant e in the attention input -> v0 in every attention output -> u_img / u_txt.
    e = _unit_zero_mean(hidden, gen)
    u_img = _unit_zero_mean(hidden, gen, [e])
    u_txt = _unit_zero_mean(hidden, gen, [e, u_img])
    resid = cfg.resid_const_rms * math.sqrt(hidden)  # norm of the residual constant
    shift_norm = math.sqrt(hidden)  # e has the norm of a LayerNorm output: it dominates the value only partly
    for mod in (model.double_stream_modulation_img, model.double_stream_modulation_txt):
        set_const(mod.linear, 0, e * shift_norm)  # shift_msa
        set_const(mod.linear, 2, torch.full((hidden,), cfg.double_gate))  # gate_msa
        set_const(mod.linear, 5, torch.full((hidden,), cfg.single_gate))  # gate_mlp
    v0 = torch.zeros(hidden, dtype=torch.float64)
    v0[:] = _unit_zero_mean(hidden, gen)
    pe = torch.eye(hidden, dtype=torch.float64) - torch.outer(e, e)
    pv = torch.eye(hidden, dtype=torch.float64) - torch.outer(v0, v0)
    for blk in model.transformer_blocks:
        a = blk.attn
        for lin in (a.to_q, a.to_k, a.add_q_proj, a.add_k_proj):
            lin.weight.copy_((lin.weight.double() @ pe).float())  # q/k stay content-only
        for lin in (a.to_v, a.add_v_proj):
            lin.weight.copy_((lin.weight.double() @ pe + torch.outer(v0, e)).float())
        scale = resid / shift_norm / cfg.double_gate
        a.to_out[0].weight.copy_((a.to_out[0].weight.double() @ pv + scale * torch.outer(u_img, v0)).float())
        a.to_add_out.weight.copy_((a.to_add_out.weight.double() @ pv + scale * torch.outer(u_txt, v0)).float())

    # 3. single blocks: gate, and q/k reading the residual constants.
    set_const(model.single_stream_modulation.linear, 2, torch.full((hidden,), cfg.single_gate))
    c, d = _positional_component(cfg, gen)  # [H, D] each
    # LayerNorm(x) of an image token carries u_img with coefficient ~ sqrt(hidden * frac), frac the
    # constant's share of the residual energy: (rms^2 / (rms^2 + 1)) for unit-RMS content.
    coef = math.sqrt(hidden * cfg.resid_const_rms**2 / (cfg.resid_const_rms**2 + 1.0))
    p_u = torch.eye(hidden, dtype=torch.float64) - torch.outer(u_img, u_img) - torch.outer(u_txt, u_txt)
    # content part of q/k has per-dim RMS ~ weight_gain * sqrt(1 - frac); the constant gets pos_fraction.
    content_rms = cfg.weight_gain * math.sqrt(1.0 / (cfg.resid_const_rms**2 + 1.0))
    frac = min(max(cfg.pos_fraction, 0.0), 0.999)
    const_rms = content_rms * math.sqrt(frac / (1.0 - frac))
    for blk in model.single_transformer_blocks:
        w = blk.attn.to_qkv_mlp_proj.weight
        inner = blk.attn.inner_dim
        for part in (0, 1):  # q, k
            rows = slice(part * inner, (part + 1) * inner)
            w_part = w[rows].double() @ p_u
            c_rms = c.pow(2).mean(dim=1, keepdim=True).sqrt()  # [H, 1]
            c_scaled = (c / c_rms * const_rms).reshape(-1)  # [H*D], per-head RMS const_rms
            w_part = w_part + torch.outer(c_scaled, u_img) / coef
            if part == 1:  # text keys read u_txt into d (scaled like c)
                d_scaled = (d / c_rms * const_rms).reshape(-1)
                w_part = w_part + torch.outer(d_scaled, u_txt) / coef
            w[rows] = w_part.float()
    return model


@torch.no_grad()
def build_tiny_codec(cfg: TeacherConfig) -> dict[str, torch.Tensor]:
    """Seeded tensors of the tiny prompt encoder and latent decoder.

    ``prompt_encoder.token``  ``[vocab, ctx]`` hashed-token table, ``prompt_encoder.position`` ``[512, ctx]``,
    ``decoder.weight`` ``[3*16*16, 128]`` and ``decoder.bias`` ``[3*16*16]`` (latent token -> 16x16 RGB patch).
    """
    gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
    p = FLUX2_PIXELS_PER_TOKEN
    return {
        "prompt_encoder.token": torch.randn(cfg.vocab_size, cfg.joint_attention_dim, generator=gen),
        "prompt_encoder.position": 0.1 * torch.randn(FLUX2_COND_TOKENS, cfg.joint_attention_dim, generator=gen),
        "decoder.weight": torch.randn(3 * p * p, FLUX2_LATENT_CHANNELS, generator=gen) / math.sqrt(FLUX2_LATENT_CHANNELS),
        "decoder.bias": torch.zeros(3 * p * p),
    }


def save_single_file(model, path: Path, metadata: dict[str, Any] | None = None) -> None:
    """Write a diffusers FLUX.2 transformer as the original single-file layout (atomic)."""

    tensors = diffusers_to_bfl(model.state_dict())
    atomic_save_safetensors(path, tensors, {METADATA_KEY: json.dumps(metadata or {}, sort_keys=True)})


def write_folder_identity(folder: Path, identity: dict[str, Any]) -> None:
    """``folder/identity.json`` of a tiny-layout teacher folder: ``identity`` plus the sha256 of its
    transformer and codec files and the transformer's file name."""
    identity = {**identity, "sha256": file_sha256(folder / SINGLE_FILE_NAME),
                "codec_sha256": file_sha256(folder / EXTRAS_FILE_NAME), "file": SINGLE_FILE_NAME}
    atomic_write_text(folder / IDENTITY_FILE_NAME, json.dumps(identity, indent=2, sort_keys=True) + "\n")


def write_tiny_teacher(cfg: TeacherConfig, out_dir: str | Path | None = None) -> Path:
    """Build the tiny teacher and write it (atomically, as one folder) to ``out_dir``:
    ``flux2_tiny.safetensors`` (BFL single file), ``transformer/config.json``, ``tiny_codec.safetensors``,
    ``identity.json``. Returns the folder."""
    from safetensors.torch import save_file  # noqa: PLC0415

    final = Path(out_dir or cfg.out_dir)
    with building_dir(final) as tmp:  # pid-named: a killed writer's folder is removed by the next one
        model = build_tiny_transformer(cfg)
        model.save_config(tmp / "transformer")
        save_single_file(model, tmp / SINGLE_FILE_NAME, {"kind": "tiny", "config": to_dict(cfg)})
        save_file(build_tiny_codec(cfg), str(tmp / EXTRAS_FILE_NAME))
        write_folder_identity(tmp, {"kind": "tiny", "config": to_dict(cfg)})
    return final


# ----------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------
def _require(path_str: str, param: str, *, kind: str = "path") -> Path:
    if not path_str:
        raise TeacherError(f"teacher.{param} is empty: set it in params.yaml to the local {kind}")
    path = Path(path_str)
    if not path.exists():
        raise TeacherError(f"teacher.{param}: {path} does not exist (nothing is downloaded; put the {kind} there)")
    return path


def match_comfyui_qk_norm(model: torch.nn.Module) -> torch.nn.Module:
    """Give the attention QK RMSNorms ComfyUI's epsilon (``None``: torch uses ``finfo(dtype).eps``)
    instead of diffusers' ``1e-6``, in place; returns ``model``.

    Why: FLUX.2's zero-padded text tokens have tiny pre-norm q/k, where the two epsilons differ visibly
    (1.9e-4 relative on the tiny teacher); with the same epsilon the pipeline teacher equals what
    ComfyUI runs to float32 rounding, so students distilled offline meet the same attention online.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.RMSNorm):
            module.eps = None
    return model


def load_transformer(path: str | Path, config_dir: str | Path | None = None, *, param: str = "transformer",
                     dtype: torch.dtype = torch.float32):
    """A ``Flux2Transformer2DModel`` from a single ``.safetensors`` file (with ``config_dir/transformer``)
    or a diffusers folder (``config.json`` in it or in ``transformer/``). Local files only. QK norms
    follow ComfyUI (:func:`match_comfyui_qk_norm`)."""
    return match_comfyui_qk_norm(_load_transformer(path, config_dir, param=param, dtype=dtype))


class _EmptyFp32Filter(logging.Filter):
    """Drops diffusers' "modules ... should be kept in float32: []" warning: from_single_file casts with
    ``to(dtype)`` itself and warns even when the list of such modules is empty (nothing to keep)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


@contextlib.contextmanager
def _no_empty_fp32_warning():
    log = logging.getLogger("diffusers.models.modeling_utils")
    flt = _EmptyFp32Filter()
    log.addFilter(flt)
    try:
        yield
    finally:
        log.removeFilter(flt)


def _load_transformer(path: str | Path, config_dir: str | Path | None, *, param: str, dtype: torch.dtype):
    from diffusers import Flux2Transformer2DModel  # noqa: PLC0415

    path = Path(path)
    if not path.exists():
        raise TeacherError(f"teacher.{param}: {path} does not exist (nothing is downloaded)")
    if path.is_file():
        if config_dir is None or not str(config_dir):
            raise TeacherError(f"teacher.transformer_config: a single file ({path}) needs the config folder "
                               "holding transformer/config.json")
        cdir = Path(config_dir)
        if not (cdir / "transformer" / "config.json").is_file():
            raise TeacherError(f"teacher.transformer_config: {cdir / 'transformer' / 'config.json'} not found")
        with _no_empty_fp32_warning():
            return Flux2Transformer2DModel.from_single_file(
                str(path), config=str(cdir), subfolder="transformer", local_files_only=True, torch_dtype=dtype)
    if (path / "config.json").is_file():
        return Flux2Transformer2DModel.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
    if (path / "transformer" / "config.json").is_file():
        return Flux2Transformer2DModel.from_pretrained(str(path), subfolder="transformer", local_files_only=True,
                                                       torch_dtype=dtype)
    raise TeacherError(f"teacher.{param}: {path} is a folder without config.json or transformer/config.json")


_WORD = re.compile(r"\w+|[^\w\s]")


class TinyPromptEncoder:
    """Deterministic prompt encoder: lower-cased word/punctuation tokens, hashed (sha256) into a seeded
    table, plus a position table; real tokens last, zeros before them (ComfyUI's left padding)."""

    def __init__(self, token: torch.Tensor, position: torch.Tensor, cond_tokens: int = FLUX2_COND_TOKENS) -> None:
        self.token, self.position, self.cond_tokens = token, position, cond_tokens

    def token_ids(self, prompt: str) -> list[int]:
        words = _WORD.findall(prompt.lower())[: self.cond_tokens]
        vocab = self.token.shape[0]
        return [int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "little") % vocab for w in words]

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(prompts), self.cond_tokens, self.token.shape[1], dtype=self.token.dtype)
        for b, prompt in enumerate(prompts):
            ids = self.token_ids(prompt)
            if ids:
                n = len(ids)
                out[b, self.cond_tokens - n:] = self.token[torch.tensor(ids)] + self.position[:n]
        return out


class TinyDecoder:
    """Latent token -> 16x16 RGB patch by a fixed linear map, sigmoid to [0, 1]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight, self.bias = weight, bias

    def __call__(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        B = latents.shape[0]
        p = FLUX2_PIXELS_PER_TOKEN
        # the map stays where it was loaded (the host); it follows the latents to the teacher's device
        w, b = (t.to(latents.device, torch.float32) for t in (self.weight, self.bias))
        x = torch.nn.functional.linear(latents.float(), w, b)  # [B, hw, 3pp]
        x = x.view(B, height, width, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, height * p, width * p)
        return torch.sigmoid(x)


class Teacher:
    """A FLUX.2 teacher behind the attention-call contract.

    ``encode_prompts(prompts) -> cond [B, 512, ctx]``; ``denoise(x [B, h*w, 128], sigma, cond, guidance,
    height, width, router=None, state=None) -> velocity [B, h*w, 128]``; ``decode(latents, height, width) ->
    images [B, 3, 16h, 16w]`` in [0, 1]. ``height``/``width`` are latent tokens (pixels / 16).
    """

    def __init__(self, transformer, identity: dict[str, Any], *, encoder: Callable[[list[str]], torch.Tensor],
                 decoder: Callable[[torch.Tensor, int, int], torch.Tensor], device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if next(transformer.parameters()).dtype != dtype:
            transformer = transformer.to(dtype=dtype)
        self.transformer = transformer.to(device=device).eval()
        self.identity = identity
        self._encoder, self._decoder = encoder, decoder
        self.device, self.dtype = torch.device(device), dtype
        cfg = transformer.config
        self.num_heads = int(cfg.num_attention_heads)
        self.head_dim = int(cfg.attention_head_dim)
        self.in_channels = int(cfg.in_channels)
        self.context_dim = int(cfg.joint_attention_dim)
        self.guidance_embeds = bool(cfg.guidance_embeds)
        self.cond_tokens = FLUX2_COND_TOKENS
        self.single_layer_keys = block_layer_keys("single", cfg.num_single_layers)
        self.double_layer_keys = block_layer_keys("double", cfg.num_layers)

    @property
    def layer_keys(self) -> list[str]:
        return self.double_layer_keys + self.single_layer_keys

    def attach_router(self, router) -> None:
        """Route this teacher's attention through ``router`` from now on (installed into the transformer)."""
        router.install(self.transformer)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """``[B, 512, ctx]`` conditioning on the teacher's device/dtype."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self._encoder(list(prompts)).to(self.device, self.dtype)

    @staticmethod
    def image_ids(height: int, width: int) -> torch.Tensor:
        """``[h*w, 4]`` RoPE ids ``(0, row, col, 0)``, row-major."""
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        ids = torch.zeros(height * width, 4, dtype=torch.long)
        ids[:, 1], ids[:, 2] = rows.reshape(-1), cols.reshape(-1)
        return ids

    @staticmethod
    def text_ids(n: int) -> torch.Tensor:
        """``[n, 4]`` RoPE ids ``(0, 0, 0, i)``."""
        ids = torch.zeros(n, 4, dtype=torch.long)
        ids[:, 3] = torch.arange(n)
        return ids

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor, cond: torch.Tensor, guidance: float,
                height: int, width: int, router=None, state: RunState | None = None) -> torch.Tensor:
        """One denoiser call: flow-matching velocity ``[B, h*w, 128]`` at noise level ``sigma`` (float or ``[B]``,
        in [0, 1]). With ``router``, attention goes through it (installed for the call if needed); ``state``
        becomes ``router.state`` (else the router keeps the state its caller set, or gets one built here)."""
        B, N, C = x.shape
        if N != height * width:
            raise ValueError(f"x has {N} tokens, height*width = {height}*{width} = {height * width}")
        if C != self.in_channels:
            raise ValueError(f"x has {C} channels, the teacher expects {self.in_channels}")
        if cond.shape[0] != B:
            raise ValueError(f"cond batch {cond.shape[0]} != x batch {B}")
        dev, dt = self.device, self.dtype
        sig = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
        sig = (sig.expand(B) if sig.numel() == 1 else sig).to(dev, dt)
        g = torch.full((B,), float(guidance), device=dev, dtype=dt) if self.guidance_embeds else None
        kwargs = dict(hidden_states=x.to(dev, dt), encoder_hidden_states=cond.to(dev, dt), timestep=sig,
                      img_ids=self.image_ids(height, width).to(dev), txt_ids=self.text_ids(cond.shape[1]).to(dev),
                      guidance=g, return_dict=False)
        if router is None:
            return self.transformer(**kwargs)[0]
        if state is not None:
            router.state = state
        elif router.state is None:
            router.state = RunState(sigma=float(sig[0]), cfg=float(guidance), step=0, height=height, width=width)
        with router.attached(self.transformer):
            return self.transformer(**kwargs)[0]

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``[B, h*w, 128]`` -> images ``[B, 3, 16h, 16w]`` float in [0, 1]."""
        return self._decoder(latents, height, width)


def load_teacher_folder(cfg: TeacherConfig, folder: str | Path | None, label: str, identity: dict[str, Any]
                        ) -> tuple[Any, dict[str, Any], torch.dtype, Path]:
    """The parts of a teacher folder the ``teacher`` stage wrote (default ``cfg.out_dir``): its transformer
    (``from_single_file``, in ``cfg.dtype``), its identity (``identity.json``, else ``identity``) with the
    transformer file's sha256, the dtype and the codec file's path. A missing file is a :class:`TeacherError`
    naming it (``label``: "tiny " or "") and the stage that writes it."""
    folder = Path(folder or cfg.out_dir)
    single = folder / SINGLE_FILE_NAME
    for p, what in ((single, f"the {label}transformer file"), (folder / EXTRAS_FILE_NAME, f"the {label}codec file"),
                    (folder / "transformer" / "config.json", "the transformer config")):
        if not p.is_file():
            raise TeacherError(f"teacher.out_dir: {p} ({what}) not found; run `flux2ttr teacher` "
                               "(or `dvc repro teacher`) first")
    ident_path = folder / IDENTITY_FILE_NAME
    found = json.loads(ident_path.read_text()) if ident_path.is_file() else None
    held, wanted = (found or identity).get("kind"), identity["kind"]
    if held != wanted:
        raise TeacherError(f"teacher.out_dir: {folder} holds the {held} teacher, but teacher.kind is {wanted}; run "
                           f"`flux2ttr teacher` (or `dvc repro teacher`) to write the {wanted} one there, or set "
                           f"teacher.kind: {held}")
    dtype = torch_dtype(cfg.dtype)
    model = load_transformer(single, folder, dtype=dtype)
    identity = found if found is not None else dict(identity)
    identity["sha256"] = file_sha256(single)
    return model, identity, dtype, folder / EXTRAS_FILE_NAME


def load_tiny_teacher(cfg: TeacherConfig, folder: str | Path | None = None) -> Teacher:
    """Load the tiny teacher written by :func:`write_tiny_teacher` through ``from_single_file``."""
    from safetensors.torch import load_file  # noqa: PLC0415

    model, identity, dtype, extras = load_teacher_folder(cfg, folder, "tiny ", {"kind": "tiny", "config": to_dict(cfg)})
    codec = load_file(str(extras))
    encoder = TinyPromptEncoder(codec["prompt_encoder.token"], codec["prompt_encoder.position"])
    decoder = TinyDecoder(codec["decoder.weight"], codec["decoder.bias"])
    return Teacher(model, identity, encoder=encoder, decoder=decoder, device=cfg.device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# diffusers kind
# ----------------------------------------------------------------------------------------------------
class DiffusersPromptEncoder:
    """FLUX.2's text encoder as diffusers' pipelines run it, with ComfyUI's conditioning layout: for
    Mistral3 (dev) the real tokens only, left-padded with zeros to 512; for Qwen3 (Klein) the 512 tokens as
    its tokenizer pads them."""

    def __init__(self, text_encoder, tokenizer, cond_tokens: int = FLUX2_COND_TOKENS) -> None:
        self.text_encoder, self.tokenizer, self.cond_tokens = text_encoder, tokenizer, cond_tokens
        self.model_type = str(getattr(text_encoder.config, "model_type", ""))

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if self.model_type.startswith("qwen3"):
            from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline  # noqa: PLC0415

            return Flux2KleinPipeline._get_qwen3_prompt_embeds(
                self.text_encoder, self.tokenizer, prompts, max_sequence_length=self.cond_tokens)
        from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline, format_input  # noqa: PLC0415
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE  # noqa: PLC0415

        embeds = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            self.text_encoder, self.tokenizer, prompts, max_sequence_length=self.cond_tokens)
        # the real-token mask, to rebuild ComfyUI's zero left padding
        inputs = self.tokenizer.apply_chat_template(
            format_input(prompts=prompts, system_message=SYSTEM_MESSAGE), add_generation_prompt=False,
            tokenize=True, return_dict=True, return_tensors="pt", padding="max_length", truncation=True,
            max_length=self.cond_tokens)
        mask = inputs["attention_mask"].bool()
        out = torch.zeros_like(embeds)
        for b in range(embeds.shape[0]):
            real = embeds[b][mask[b].to(embeds.device)]
            out[b, self.cond_tokens - real.shape[0]:] = real
        return out


class DiffusersDecoder:
    """``AutoencoderKLFlux2``: un-normalise (batch-norm stats), unpatchify 2x2, decode, map to [0, 1]."""

    def __init__(self, vae) -> None:
        self.vae = vae

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        vae = self.vae
        B, _, C = latents.shape
        x = latents.transpose(1, 2).reshape(B, C, height, width).to(vae.device, vae.dtype)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(x)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x)
        x = x * std + mean
        x = x.reshape(B, C // 4, 2, 2, height, width).permute(0, 1, 4, 2, 5, 3).reshape(B, C // 4, 2 * height, 2 * width)
        img = vae.decode(x, return_dict=False)[0]
        return ((img.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def load_diffusers_vae(path: str | Path, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKLFlux2  # noqa: PLC0415

    path = Path(path)
    sub = "vae" if (path / "vae" / "config.json").is_file() else None
    if sub is None and not (path / "config.json").is_file():
        raise TeacherError(f"teacher.vae: {path} has no config.json (nor vae/config.json)")
    return AutoencoderKLFlux2.from_pretrained(str(path), subfolder=sub, local_files_only=True, torch_dtype=dtype)


def load_diffusers_text_encoder(path: str | Path, tokenizer_path: str | Path, dtype: torch.dtype = torch.float32):
    """Text encoder and tokenizer/processor from local folders (Mistral3 for dev, Qwen3 for Klein)."""
    import transformers  # noqa: PLC0415

    path, tok = Path(path), Path(tokenizer_path)
    if not (path / "config.json").is_file():
        raise TeacherError(f"teacher.text_encoder: {path} has no config.json")
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    if config.model_type == "mistral3":
        model = transformers.Mistral3ForConditionalGeneration.from_pretrained(
            str(path), local_files_only=True, torch_dtype=dtype)
        tokenizer = transformers.AutoProcessor.from_pretrained(str(tok), local_files_only=True)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok), local_files_only=True)
    return model.eval(), tokenizer


def diffusers_identity(cfg: TeacherConfig) -> dict[str, Any]:
    """Identity of a diffusers teacher: config, and sha256 of the transformer file (or of its config.json
    and weight index for a folder, which is cheap and changes with the weights' names and shapes)."""
    path = Path(cfg.transformer)
    if path.is_file():
        digest = file_sha256(path)
    else:
        h = hashlib.sha256()
        for f in sorted(path.rglob("*.json")):
            h.update(f.relative_to(path).as_posix().encode())
            h.update(f.read_bytes())
        digest = h.hexdigest()
    return {"kind": "diffusers", "config": to_dict(cfg), "sha256": digest, "file": str(path)}


def validate_diffusers_paths(cfg: TeacherConfig) -> None:
    """Every path the diffusers kind needs exists; else a :class:`TeacherError` naming the param."""
    t = _require(cfg.transformer, "transformer", kind="FLUX.2 transformer (single .safetensors or diffusers folder)")
    if t.is_file():
        _require(cfg.transformer_config, "transformer_config", kind="config folder holding transformer/config.json")
    _require(cfg.text_encoder, "text_encoder", kind="text encoder folder")
    if cfg.tokenizer:
        _require(cfg.tokenizer, "tokenizer", kind="tokenizer folder")
    _require(cfg.vae, "vae", kind="VAE folder")


def load_diffusers_teacher(cfg: TeacherConfig) -> Teacher:
    validate_diffusers_paths(cfg)
    dtype = torch_dtype(cfg.dtype)
    model = load_transformer(cfg.transformer, cfg.transformer_config or None, dtype=dtype)
    te, tok = load_diffusers_text_encoder(cfg.text_encoder, cfg.tokenizer or cfg.text_encoder, dtype)
    te = te.to(cfg.device)
    vae = load_diffusers_vae(cfg.vae, dtype).to(cfg.device).eval()
    return Teacher(model, diffusers_identity(cfg), encoder=DiffusersPromptEncoder(te, tok),
                   decoder=DiffusersDecoder(vae), device=cfg.device, dtype=dtype)


def load_teacher(cfg: TeacherConfig):
    """The teacher named by ``cfg`` (tiny: from ``cfg.out_dir``, written by the ``teacher`` stage; comfyui: a
    :class:`~flux2ttr.teachers.comfyui.ComfyTeacher`, same interface)."""
    if cfg.kind == "tiny":
        return load_tiny_teacher(cfg)
    if cfg.kind == "comfyui":
        from flux2ttr.teachers.comfyui import load_comfyui_teacher  # noqa: PLC0415  (imports ComfyUI itself)

        return load_comfyui_teacher(cfg)
    if cfg.kind == "trained":
        from flux2ttr.teachers.trained import load_trained_teacher  # noqa: PLC0415

        return load_trained_teacher(cfg)
    return load_diffusers_teacher(cfg)
