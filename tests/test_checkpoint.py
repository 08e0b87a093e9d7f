"""Checkpoints: safetensors + JSON header round trip, optimiser state continues exactly, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from flux2ttr.checkpoint import (
    CheckpointError,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)


def _model_and_opt(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    return model, opt


def _steps(model, opt, xs):
    for x in xs:
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()


def test_optimizer_round_trip_continues_exactly(tmp_path):
    xs = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    ref, ref_opt = _model_and_opt(0)
    _steps(ref, ref_opt, xs)

    model, opt = _model_and_opt(0)
    _steps(model, opt, xs[:3])
    t_opt, meta = optimizer_to_flat(opt, "opt")
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()} | t_opt
    save_checkpoint(tmp_path / "c.safetensors", tensors, {"step": 3, "opt": meta})
    loaded, header = load_checkpoint(tmp_path / "c.safetensors")
    assert header["step"] == 3 and header["format"] == "flux2ttr.checkpoint"

    model2, opt2 = _model_and_opt(1)  # different init: everything must come from the file
    model2.load_state_dict({k[len("model."):]: v for k, v in loaded.items() if k.startswith("model.")})
    optimizer_from_flat(opt2, "opt", loaded, header["opt"])
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)
    _steps(model2, opt2, xs[3:])
    for a, b in zip(ref.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"x": torch.zeros(1000)}, {"step": 1})
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a flux2ttr checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "new.safetensors"),
              metadata={"flux2ttr.checkpoint": json.dumps({"format": "flux2ttr.checkpoint", "schema": 99})})
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(tmp_path / "new.safetensors")
    _, opt = _model_and_opt(0)
    t, meta = optimizer_to_flat(opt, "opt")
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(CheckpointError, match="other parameter groups"):
        optimizer_from_flat(other, "opt", t, meta)
