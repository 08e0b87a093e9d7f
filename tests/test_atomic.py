"""Atomic writes: complete file or the old one, never a partial; no temp files left behind."""

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from flux2ttr.atomic import atomic_save_safetensors, atomic_write, atomic_write_json, atomic_write_text, file_sha256


def test_write_and_replace(tmp_path):
    p = tmp_path / "sub" / "a.json"
    atomic_write_json(p, {"b": 1, "a": [1, 2]})
    assert json.loads(p.read_text()) == {"a": [1, 2], "b": 1} and p.read_text().endswith("\n")
    atomic_write_text(p, "new")
    assert p.read_text() == "new"
    assert os.stat(p).st_mode & 0o777 != 0o600  # published with the umask's mode, not mkstemp's
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.json"]


def test_crash_keeps_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "out.bin"
    p.write_bytes(b"old")

    def half_then_crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(p, half_then_crash)
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["out.bin"]


def test_safetensors_and_sha256(tmp_path):
    p = tmp_path / "t.safetensors"
    t = {"x": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    atomic_save_safetensors(p, t, {"k": "v"})
    assert torch.equal(load_file(p)["x"], t["x"])
    assert file_sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()
