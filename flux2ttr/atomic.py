"""Atomic file writes and file hashes shared by every stage.

A file is written to a private temp file in the target's folder and renamed over the target when
complete, so a crash never leaves a half-written output that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def published_mode(mode: int) -> int:
    """``mode`` masked by the process umask (what a plain ``open`` would have given)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Create ``path`` atomically: ``write(tmp_path)`` fills a temp file next to it, then it is renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, published_mode(0o666))  # mkstemp files are 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def replace_dir(tmp_dir: Path, final: Path) -> None:
    """Publish a fully written folder ``tmp_dir`` as ``final`` (an old ``final`` is moved aside, then
    removed). Temp files are private (0600/0700); the published folder gets the usual permissions."""
    for p in [tmp_dir, *tmp_dir.rglob("*")]:
        os.chmod(p, published_mode(0o777 if p.is_dir() else 0o666))
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp_dir, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Pretty, key-sorted JSON with a trailing newline (what DVC metrics files look like)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` made atomic."""
    from safetensors.torch import save_file  # noqa: PLC0415

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
