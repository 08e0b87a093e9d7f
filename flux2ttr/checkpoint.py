"""Training checkpoints in safetensors with a JSON header (no pickle).

A checkpoint is one ``.safetensors`` file: tensors under flat names (weights, optimiser moments, RNG
states as uint8) and the metadata key ``flux2ttr.checkpoint`` holding a JSON header (step, optimiser
hyper-parameters, data-plan position, readiness, histories, ...). Files are written atomically.

:func:`optimizer_to_flat` / :func:`optimizer_from_flat` turn a ``torch.optim`` state dict into
``{name: tensor}`` plus a JSON-able part and back, so momentum continues exactly on resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from flux2ttr.atomic import atomic_save_safetensors

FORMAT = "flux2ttr.checkpoint"
SCHEMA_VERSION = 1
METADATA_KEY = "flux2ttr.checkpoint"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or belongs to another training setup."""


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> None:
    """Write ``tensors`` and ``header`` to ``path`` atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {METADATA_KEY: json.dumps({"format": FORMAT, "schema": SCHEMA_VERSION, **header}, sort_keys=True)}
    clean = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    atomic_save_safetensors(path, clean, meta)


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, header)`` of a checkpoint; :class:`CheckpointError` when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors has its own error types for truncated files
        raise CheckpointError(f"{path}: unreadable checkpoint (truncated or corrupt?): {e}; delete it to start over") from None
    if METADATA_KEY not in meta:
        raise CheckpointError(f"{path}: not a flux2ttr checkpoint (no '{METADATA_KEY}' metadata)")
    header = json.loads(meta[METADATA_KEY])
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: wrong format {header.get('format')!r}, expected {FORMAT!r}")
    if int(header.get("schema", -1)) > SCHEMA_VERSION:
        raise CheckpointError(f"{path}: checkpoint schema {header.get('schema')} is newer than this flux2ttr "
                              f"({SCHEMA_VERSION}); upgrade flux2ttr or delete the checkpoint")
    return tensors, header


def optimizer_to_flat(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser's state as ``{f"{prefix}.{param_idx}.{name}": tensor}`` and its JSON-able
    ``param_groups`` (non-tensor state entries go to the JSON part too)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{idx}.{name}"] = value.detach().clone()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = json.loads(json.dumps(sd["param_groups"]))
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor],
                        meta: dict[str, Any]) -> None:
    """Load what :func:`optimizer_to_flat` wrote into ``opt`` (built with the same parameters)."""
    state: dict[int, dict[str, Any]] = {}
    head = prefix + "."
    for key, value in tensors.items():
        if not key.startswith(head):
            continue
        idx, name = key[len(head):].split(".", 1)
        state.setdefault(int(idx), {})[name] = value.clone()
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    have = opt.state_dict()["param_groups"]
    if [len(g["params"]) for g in have] != [len(g["params"]) for g in groups]:
        raise CheckpointError(f"optimizer {prefix}: checkpoint has other parameter groups than this model")
    opt.load_state_dict({"state": state, "param_groups": groups})
