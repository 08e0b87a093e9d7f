"""The trained tiny teacher (``teacher.kind: trained``): the tiny FLUX.2 architecture trained on procedural
captioned scenes (:mod:`flux2ttr.teachers.train_teacher`), shipped as one file.

The shipped file (``teacher.trained_file``, next to it ``<file>.sha256``) is a flux2ttr versioned safetensors
file: the transformer in the original (BFL) single-file layout in fp16, the codec under ``codec.`` in fp32
(``codec.prompt_encoder.token`` / ``.position`` of :class:`~flux2ttr.teachers.caption_encoder.VocabPromptEncoder`,
``codec.decoder.weight`` / ``.bias`` of the exact :class:`~flux2ttr.teachers.latent_map.LatentMap`), and a JSON
header with the architecture, the vocabulary, the latent map, the training config, seed, steps and the
commands that trained it.

The ``teacher`` stage turns it into the folder every other stage and ComfyUI read, laid out as the seeded
tiny teacher's (:func:`write_trained_teacher`): ``flux2_tiny.safetensors`` (the transformer, upcast exactly to
fp32, what UNETLoader loads), ``transformer/config.json``, ``tiny_codec.safetensors`` (the codec, its metadata
saying ``tokenizer: vocab`` and ``decoder: clamp``) and ``identity.json``. :func:`load_trained_teacher` loads
that folder through ``Flux2Transformer2DModel.from_single_file``, like the seeded teacher.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from flux2ttr.atomic import atomic_save_safetensors, atomic_write_text, building_dir, file_sha256
from flux2ttr.config import to_dict
from flux2ttr.teachers.caption_encoder import VocabPromptEncoder
from flux2ttr.teachers.latent_map import LatentMap
from flux2ttr.teachers.teacher import (
    EXTRAS_FILE_NAME,
    METADATA_KEY,
    SINGLE_FILE_NAME,
    Teacher,
    TeacherConfig,
    TeacherError,
    load_teacher_folder,
    tiny_model_config,
    write_folder_identity,
)
from flux2ttr.versioned_file import VersionedFile

FORMAT = "flux2ttr.trained_teacher"
SCHEMA_VERSION = 1
CODEC_PREFIX = "codec."
CODEC_METADATA_KEY = "flux2ttr_codec"  # tiny_codec.safetensors metadata: tokenizer, vocab, decoder
CODEC_KEYS = ("prompt_encoder.token", "prompt_encoder.position", "decoder.weight", "decoder.bias")

TRAINED_FILE = VersionedFile(
    what="trained teacher file", metadata_key=METADATA_KEY, format=FORMAT, schema=SCHEMA_VERSION, error=TeacherError,
    not_found_fix="train one with `flux2ttr train-teacher` (see README) or set teacher.kind: tiny",
    unreadable_fix="copy it again from the project (or retrain it)",
    no_header_hint="it is not a file written by `flux2ttr train-teacher`",
)


def sha256_path(path: str | Path) -> Path:
    """The sidecar ``<file>.sha256`` (``sha256sum`` format) that pins a shipped file."""
    return Path(str(path) + ".sha256")


def write_trained_file(path: str | Path, bfl_state: dict[str, torch.Tensor], codec: dict[str, torch.Tensor],
                       header: dict[str, Any]) -> str:
    """Write the shipped file (transformer in fp16, codec in fp32) and its ``.sha256``; returns the digest.

    ``bfl_state``: the transformer in the single-file (BFL) layout; ``codec``: :data:`CODEC_KEYS`;
    ``header``: needs ``arch`` (num_heads, num_double, num_single, context_dim) and ``vocab``."""
    for key in ("arch", "vocab"):
        if key not in header:
            raise ValueError(f"trained teacher header needs {key!r}")
    missing = [k for k in CODEC_KEYS if k not in codec]
    if missing:
        raise ValueError(f"codec lacks {missing}")
    tensors = {k: v.detach().to(torch.float16) for k, v in bfl_state.items()}
    tensors.update({CODEC_PREFIX + k: codec[k].detach().float() for k in CODEC_KEYS})
    path = Path(path)
    TRAINED_FILE.write(path, tensors, {**header, "kind": "trained"})
    digest = file_sha256(path)
    atomic_write_text(sha256_path(path), f"{digest}  {path.name}\n")
    return digest


def read_trained_file(path: str | Path, *, verify: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor],
                                                                        dict[str, torch.Tensor]]:
    """``(header, bfl_state, codec)`` of a shipped file; with ``verify`` its sha256 must match the sidecar."""
    path = Path(path)
    if verify:
        side = sha256_path(path)
        if not side.is_file():
            raise TeacherError(f"teacher.trained_file: {side} not found (the file's sha256 pin); it is written "
                               "next to the file by `flux2ttr train-teacher`")
        want = side.read_text().split()[0] if side.read_text().split() else ""
        got = file_sha256(path) if path.is_file() else ""
        if path.is_file() and got != want:
            raise TeacherError(f"teacher.trained_file: {path} has sha256 {got}, its pin {side} says {want}: the file "
                               "changed or is truncated; copy it again (or retrain it)")
    header, tensors = TRAINED_FILE.read(path)
    codec = {k[len(CODEC_PREFIX):]: v for k, v in tensors.items() if k.startswith(CODEC_PREFIX)}
    bfl = {k: v for k, v in tensors.items() if not k.startswith(CODEC_PREFIX)}
    missing = [k for k in CODEC_KEYS if k not in codec]
    if missing:
        raise TeacherError(f"teacher.trained_file: {path} lacks the codec tensors {missing}")
    return header, bfl, codec


def arch_config(arch: dict[str, Any]) -> TeacherConfig:
    """A :class:`TeacherConfig` carrying a trained file's architecture (for :func:`tiny_model_config`)."""
    return TeacherConfig(num_heads=int(arch["num_heads"]), num_double=int(arch["num_double"]),
                         num_single=int(arch["num_single"]), joint_attention_dim=int(arch["context_dim"]))


def write_transformer_config(arch: dict[str, Any], folder: Path) -> None:
    """``folder/transformer/config.json`` of the architecture (what ``from_single_file`` reads)."""
    from diffusers import Flux2Transformer2DModel  # noqa: PLC0415

    config = tiny_model_config(arch_config(arch))
    with torch.device("meta"):  # the config only: no weights are allocated
        model = Flux2Transformer2DModel(**config)
    model.save_config(folder / "transformer")


def write_trained_teacher(cfg: TeacherConfig, out_dir: str | Path | None = None) -> Path:
    """The teacher folder of ``cfg.trained_file`` (atomically, as one folder) at ``out_dir`` (default
    ``cfg.out_dir``): the seeded tiny teacher's layout (module docstring). Returns the folder."""
    src = Path(cfg.trained_file)
    if not src.is_file():
        raise TeacherError(f"teacher.trained_file: {src} not found; train it with `flux2ttr train-teacher` (README: "
                           "the trained teacher) or set teacher.kind: tiny")
    header, bfl, codec = read_trained_file(src)
    final = Path(out_dir or cfg.out_dir)
    with building_dir(final) as tmp:
        arch = header["arch"]
        write_transformer_config(arch, tmp)
        meta = {"kind": "trained", "arch": arch, "source_sha256": file_sha256(src)}
        atomic_save_safetensors(tmp / SINGLE_FILE_NAME, {k: v.float().contiguous() for k, v in bfl.items()},
                                {METADATA_KEY: json.dumps(meta, sort_keys=True)})
        codec_meta = {"tokenizer": "vocab", "vocab": header["vocab"], "decoder": "clamp",
                      "latent_map": header.get("latent_map", {})}
        atomic_save_safetensors(tmp / EXTRAS_FILE_NAME, {k: codec[k].float().contiguous() for k in CODEC_KEYS},
                                {CODEC_METADATA_KEY: json.dumps(codec_meta, sort_keys=True)})
        write_folder_identity(tmp, {"kind": "trained", "config": to_dict(cfg), "arch": arch,
                                    "source_sha256": meta["source_sha256"],
                                    "train": {k: header.get(k) for k in ("seed", "steps", "commands", "eval")}})
    return final


def read_codec(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a codec file (metadata ``{}`` for the seeded teacher's)."""
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, json.loads(meta[CODEC_METADATA_KEY]) if CODEC_METADATA_KEY in meta else {}


def codec_parts(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[VocabPromptEncoder, LatentMap]:
    """The encoder and decoder of a trained teacher's codec."""
    if meta.get("tokenizer") != "vocab" or meta.get("decoder") != "clamp":
        raise TeacherError(f"codec metadata {sorted(meta)} is not a trained teacher's (tokenizer vocab, decoder clamp)")
    encoder = VocabPromptEncoder(tensors["prompt_encoder.token"].float(), tensors["prompt_encoder.position"].float(),
                                 list(meta["vocab"]))
    return encoder, LatentMap(tensors["decoder.weight"], tensors["decoder.bias"])


def load_trained_teacher(cfg: TeacherConfig, folder: str | Path | None = None) -> Teacher:
    """The trained teacher from the folder :func:`write_trained_teacher` wrote (default ``cfg.out_dir``)."""
    model, identity, dtype, extras = load_teacher_folder(cfg, folder, "", {"kind": "trained"})
    encoder, decoder = codec_parts(*read_codec(extras))
    return Teacher(model, identity, encoder=encoder, decoder=decoder, device=cfg.device, dtype=dtype)
