"""Atomic file writes and file hashes shared by every stage.

A file is written to a private temp file in the target's folder and renamed over the target when
complete, so a crash never leaves a half-written output that looks finished.

Temp names carry the writer's pid: ``.<target name>.tmp-<pid>-<random>`` (and ``.<name>.old-<pid>-<random>``
for a folder moved aside by :func:`replace_dir`), the scheme the trace store uses too. A process killed
mid-write leaves its temp behind; the next write of the same target removes the temps whose writer
process is gone (:func:`remove_stale_temps`), never those of a live process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def published_mode(mode: int) -> int:
    """``mode`` masked by the process umask (what a plain ``open`` would have given)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def temp_prefix(target: str | Path, kind: str = "tmp") -> str:
    """``.<target name>.<kind>-<this pid>-``: the start of this process's temp names for ``target``."""
    return f".{Path(target).name}.{kind}-{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine); one we may not signal counts as alive."""
    if pid <= 0:
        return True  # not a writer's pid (0 and negatives address process groups): never treat it as dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def remove_stale_temps(target: str | Path) -> list[Path]:
    """Remove leftovers of killed writers of ``target``: ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>[-*]``
    files or folders next to it whose ``pid`` is not alive. Temps of live processes (this one included)
    and anything else are kept. Returns what was removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    # tmp names always have the random part, so a legacy mkstemp/mkdtemp name (".a.tmp-12345678", random
    # characters, no second dash) is never mistaken for a pid; ".a.old-<pid>" is what replace_dir used to write
    pattern = re.compile(re.escape(f".{target.name}.") + r"(?:tmp-(\d+)-[A-Za-z0-9_]+|old-(\d+)(?:-[A-Za-z0-9_]+)?)")
    removed = []
    for p in target.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m is None or pid_alive(int(m.group(1) or m.group(2))):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except FileNotFoundError:  # another writer cleaned it first
            continue
        except OSError:
            continue  # not ours to remove after all (permissions): leave it
        removed.append(p)
    return removed


def make_temp_dir(final: str | Path) -> Path:
    """A private temp folder next to ``final`` named as above, for building a folder that
    :func:`replace_dir` publishes; stale temps of ``final`` are removed first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    return Path(tempfile.mkdtemp(prefix=temp_prefix(final), dir=final.parent))


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Create ``path`` atomically: ``write(tmp_path)`` fills a temp file next to it, then it is renamed.
    Temps left by killed writers of ``path`` are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, published_mode(0o666))  # mkstemp files are 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def building_dir(final: str | Path) -> Iterator[Path]:
    """``with building_dir(final) as tmp:`` fill the private temp folder :func:`make_temp_dir` gives; on a
    clean exit it is published as ``final`` (:func:`replace_dir`), on an error removed and the error raised."""
    final = Path(final)
    tmp = make_temp_dir(final)
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp_dir: Path, final: Path) -> None:
    """Publish a fully written folder ``tmp_dir`` as ``final`` (an old ``final`` is moved aside, then
    removed). Temp files are private (0600/0700); the published folder gets the usual permissions."""
    for p in [tmp_dir, *tmp_dir.rglob("*")]:
        os.chmod(p, published_mode(0o777 if p.is_dir() else 0o666))
    remove_stale_temps(final)  # never tmp_dir itself: it belongs to this live process
    old = None
    if final.exists():
        old = final.with_name(f"{temp_prefix(final, 'old')}{secrets.token_hex(4)}")
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
