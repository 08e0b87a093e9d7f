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

from flux2ttr.config import Flux2TTRError
from flux2ttr.versioned_file import VersionedFile

FORMAT = "flux2ttr.checkpoint"
SCHEMA_VERSION = 1
METADATA_KEY = "flux2ttr.checkpoint"


class CheckpointError(ValueError, Flux2TTRError):
    """A checkpoint file is missing, corrupt, or belongs to another training setup."""


CHECKPOINT = VersionedFile(
    what="checkpoint", metadata_key=METADATA_KEY, format=FORMAT, schema=SCHEMA_VERSION, error=CheckpointError,
    not_found_fix="nothing to resume from", unreadable_fix="delete it to start over",
)


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> None:
    """Write ``tensors`` and ``header`` to ``path`` atomically (temporary file + rename)."""
    CHECKPOINT.write(path, tensors, header)


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, header)`` of a checkpoint; :class:`CheckpointError` when it is not one."""
    header, tensors = CHECKPOINT.read(path)
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
