"""The tiny teacher inside ComfyUI: the logic of ``Flux2TTRTinyTextEncode`` and ``Flux2TTRTinyDecode``
(``comfy_nodes/nodes.py`` wraps it; no ComfyUI here).

The tiny FLUX.2 teacher (``flux2_tiny.safetensors``, loaded by ComfyUI's own UNETLoader) has no real text
encoder or VAE: its prompt encoder and latent decoder live in ``tiny_codec.safetensors`` next to it
(:class:`~flux2ttr.teachers.teacher.TinyPromptEncoder`, :class:`~flux2ttr.teachers.teacher.TinyDecoder`).
``flux2ttr comfy-install`` copies that file into ``models/flux2ttr_tiny``; these functions turn it into

- :func:`encode`: a prompt -> ComfyUI CONDITIONING ``[[cond [1, 512, ctx], {"guidance": g}]]``, the exact
  conditioning the pipeline's tiny teacher sees (real tokens last, zeros before: ComfyUI's left padding);
- :func:`decode`: a FLUX.2 LATENT ``[B, 128, h, w]`` -> IMAGE ``[B, 16h, 16w, 3]`` in [0, 1].

The trained tiny teacher (``teacher.kind: trained``) writes the same two files; its codec's metadata
(``flux2ttr_codec``) selects its vocabulary tokenizer and exact latent map (:mod:`flux2ttr.teachers.trained`).

ComfyUI's FLUX.2 latent format passes latents through unchanged (``process_in``/``process_out`` are the
identity), so a KSampler's output is the latent-token grid the pipeline's sampler produces: row-major
flattening gives the ``[B, h*w, 128]`` tokens :class:`TinyDecoder` expects.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flux2ttr.config import Flux2TTRError
from flux2ttr.contract import FLUX2_COND_TOKENS
from flux2ttr.teachers.teacher import (
    EXTRAS_FILE_NAME,
    FLUX2_LATENT_CHANNELS,
    FLUX2_PIXELS_PER_TOKEN,
    SINGLE_FILE_NAME,
    TinyDecoder,
    TinyPromptEncoder,
)

CODEC_FOLDER = "flux2ttr_tiny"     # models/flux2ttr_tiny: the tiny teacher's codec (comfy-install fills it)
CODEC_FILE = EXTRAS_FILE_NAME      # tiny_codec.safetensors
TEACHER_FILE = SINGLE_FILE_NAME    # flux2_tiny.safetensors, in models/diffusion_models
DEFAULT_GUIDANCE = 2.0             # the pipeline's sampler.guidance / rollout.guidance
MAX_GUIDANCE = 100.0               # FluxGuidance's range
_KEYS = ("prompt_encoder.token", "prompt_encoder.position", "decoder.weight", "decoder.bias")
TRAINED_CODEC_KEY = "flux2ttr_codec"  # = flux2ttr.teachers.trained.CODEC_METADATA_KEY (the trained teacher's codec)


class TinyCodecError(ValueError, Flux2TTRError):
    """The tiny codec cannot be loaded or used; the message names the node, the file and the fix."""


@dataclass(frozen=True)
class TinyCodec:
    """The tiny teacher's prompt encoder and latent decoder, loaded from one codec file."""

    path: Path
    encoder: TinyPromptEncoder  # the trained teacher's: a VocabPromptEncoder (a TinyPromptEncoder)
    decoder: Any  # TinyDecoder, or the trained teacher's LatentMap: (tokens, h, w) -> images in [0, 1]

    @property
    def context_dim(self) -> int:
        """Width of a conditioning token (the tiny teacher's ``joint_attention_dim``)."""
        return int(self.encoder.token.shape[1])


_CACHE: dict[tuple[str, int, int], TinyCodec] = {}
_CACHE_LOCK = threading.Lock()


def _check(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    missing = [k for k in _KEYS if k not in tensors]
    if missing:
        raise TinyCodecError(f"{path} is not a tiny codec file (missing {', '.join(missing)}); use the "
                             f"{CODEC_FILE} that `flux2ttr teacher` writes next to {TEACHER_FILE}")
    token, position = tensors["prompt_encoder.token"], tensors["prompt_encoder.position"]
    weight, bias = tensors["decoder.weight"], tensors["decoder.bias"]
    p = FLUX2_PIXELS_PER_TOKEN
    problems = []
    if token.ndim != 2 or position.ndim != 2 or position.shape[1] != token.shape[1]:
        problems.append(f"prompt_encoder token {tuple(token.shape)} / position {tuple(position.shape)} must be "
                        "[vocab, ctx] and [tokens, ctx]")
    elif position.shape[0] < FLUX2_COND_TOKENS:
        problems.append(f"prompt_encoder.position has {position.shape[0]} rows, fewer than FLUX.2's "
                        f"{FLUX2_COND_TOKENS} conditioning tokens")
    if tuple(weight.shape) != (3 * p * p, FLUX2_LATENT_CHANNELS) or tuple(bias.shape) != (3 * p * p,):
        problems.append(f"decoder weight {tuple(weight.shape)} / bias {tuple(bias.shape)} must be "
                        f"[{3 * p * p}, {FLUX2_LATENT_CHANNELS}] and [{3 * p * p}]")
    if problems:
        raise TinyCodecError(f"{path}: {'; '.join(problems)}; write it again with `flux2ttr teacher`")


def load_codec(path: str | Path) -> TinyCodec:
    """The codec in ``path``, cached while the file is unchanged (path, size and mtime)."""
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    path = Path(path)
    try:
        st = os.stat(path)
    except OSError:
        raise TinyCodecError(f"tiny codec {path} not found; run `flux2ttr comfy-install COMFYUI_DIR` (it copies "
                             f"teachers/tiny/{CODEC_FILE} into models/{CODEC_FOLDER}) or copy it there") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _CACHE_LOCK:
        codec = _CACHE.get(key)
        if codec is not None:
            return codec
        # ComfyUI runs nodes under torch.inference_mode(): load outside it, so the cached tensors are
        # ordinary ones whichever mode a later run reads them in
        with torch.inference_mode(False):
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    tensors = {k: f.get_tensor(k) for k in f.keys()}
            except (SafetensorError, OSError, ValueError) as e:
                raise TinyCodecError(f"{path} cannot be read as safetensors ({e}); copy {CODEC_FILE} again "
                                     "from the project's teachers/tiny") from None
            _check(path, tensors)
            tensors = {k: tensors[k].float().contiguous() for k in _KEYS}
            if TRAINED_CODEC_KEY in meta:  # the trained teacher's codec: vocabulary tokens, the exact latent map
                from flux2ttr.teachers.trained import codec_parts  # noqa: PLC0415

                try:
                    encoder, decoder = codec_parts(tensors, json.loads(meta[TRAINED_CODEC_KEY]))
                except (ValueError, KeyError) as e:
                    raise TinyCodecError(f"{path}: its trained-teacher metadata is unusable ({e}); write it again with "
                                         "`flux2ttr teacher` (teacher.kind: trained)") from None
                codec = TinyCodec(path=path, encoder=encoder, decoder=decoder)
            else:
                codec = TinyCodec(path=path, encoder=TinyPromptEncoder(tensors["prompt_encoder.token"],
                                                                       tensors["prompt_encoder.position"]),
                                  decoder=TinyDecoder(tensors["decoder.weight"], tensors["decoder.bias"]))
        for old in [k for k in _CACHE if k[0] == key[0]]:  # an older version of the same file
            del _CACHE[old]
        _CACHE[key] = codec
        return codec


def encode(codec: TinyCodec, text: str, guidance: float = DEFAULT_GUIDANCE) -> list[list[Any]]:
    """``text`` -> CONDITIONING ``[[cond [1, 512, ctx] float32, {"guidance": guidance}]]``: the tiny
    teacher's prompt embedding (deterministic: the same text always gives the same tensor) with FLUX.2's
    guidance value in the conditioning dict, where ComfyUI's FLUX.2 model reads it (as FluxGuidance sets it)."""
    if not isinstance(text, str):
        raise TinyCodecError(f"Flux2TTRTinyTextEncode: text must be a string, got {type(text).__name__}")
    g = float(guidance)
    if not math.isfinite(g) or not 0.0 <= g <= MAX_GUIDANCE:
        raise TinyCodecError(f"Flux2TTRTinyTextEncode: guidance must be in [0, {MAX_GUIDANCE:g}], got {guidance!r}")
    cond = codec.encoder([text])
    return [[cond, {"guidance": g}]]


def decode(codec: TinyCodec, samples: torch.Tensor) -> torch.Tensor:
    """A FLUX.2 LATENT ``samples [B, 128, h, w]`` -> IMAGE ``[B, 16h, 16w, 3]`` float32 in [0, 1] (CPU),
    through the tiny teacher's latent-to-RGB decoder."""
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise TinyCodecError(f"Flux2TTRTinyDecode: samples must be a FLUX.2 latent [B, {FLUX2_LATENT_CHANNELS}, h, w], "
                             f"got {shape}")
    b, c, h, w = samples.shape
    if c != FLUX2_LATENT_CHANNELS:
        raise TinyCodecError(f"Flux2TTRTinyDecode: samples have {c} channels; the tiny decoder reads FLUX.2 latents "
                             f"with {FLUX2_LATENT_CHANNELS} (EmptyFlux2LatentImage -> KSampler on the tiny teacher)")
    tokens = samples.detach().to("cpu", torch.float32).flatten(2).transpose(1, 2)  # [B, h*w, 128], row-major
    images = codec.decoder(tokens, h, w)                                            # [B, 3, 16h, 16w]
    return images.permute(0, 2, 3, 1).contiguous().clamp_(0.0, 1.0)
