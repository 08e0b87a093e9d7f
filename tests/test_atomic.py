"""Atomic writes: complete file or the old one, never a partial; no temp files left behind."""

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from flux2ttr.atomic import (
    atomic_save_safetensors,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    building_dir,
    file_sha256,
    make_temp_dir,
    remove_stale_temps,
    replace_dir,
)


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


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_of_a_dead_writer_is_removed_by_the_next_write(tmp_path):
    """A writer killed mid-write leaves its temp; the next write of the same target removes it."""
    p = tmp_path / "ckpt.safetensors"
    dead = _dead_pid()
    stale_file = tmp_path / f".ckpt.safetensors.tmp-{dead}-k3x9_q2a"
    stale_file.write_bytes(b"half a checkpoint")
    stale_dir = tmp_path / f".ckpt.safetensors.tmp-{dead}-0badf00d"  # a folder temp (replace_dir, trace store)
    stale_dir.mkdir()
    (stale_dir / "part").write_bytes(b"x")
    stale_old = tmp_path / f".ckpt.safetensors.old-{dead}"  # what replace_dir used to leave
    stale_old.mkdir()
    atomic_write_bytes(p, b"full")
    assert p.read_bytes() == b"full"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt.safetensors"]


def test_temps_of_live_writers_and_other_files_are_kept(tmp_path):
    import subprocess
    import sys

    p = tmp_path / "out.json"
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        keep = [
            f".out.json.tmp-{live.pid}-abcd1234",  # another live process is writing this target
            f".out.json.tmp-{os.getpid()}-abcd1234",  # this process (another thread) is writing it
            f".other.json.tmp-{dead}-abcd1234",  # a temp of another target
            ".out.json.tmp-12345678",  # an old-style random name: no pid in it, not ours to judge
            f"out.json.tmp-{dead}-abcd1234",  # not a hidden temp name
            f".out.json.tmp-{dead}",  # tmp names always carry a random part
        ]
        for name in keep:
            (tmp_path / name).write_bytes(b"x")
        atomic_write_json(p, {"a": 1})
        assert json.loads(p.read_text()) == {"a": 1}
        assert sorted(x.name for x in tmp_path.iterdir()) == sorted([*keep, "out.json"])
    finally:
        live.kill()
        live.wait()


def test_temp_names_carry_the_pid(tmp_path):
    p = tmp_path / "a.bin"
    seen = []

    def write(tmp):
        seen.append(os.path.basename(tmp))
        with open(tmp, "wb") as f:
            f.write(b"x")

    atomic_write(p, write)
    assert seen[0].startswith(f".a.bin.tmp-{os.getpid()}-")
    assert remove_stale_temps(p) == []


def test_replace_dir_cleans_stale_folders_and_publishes(tmp_path):
    final = tmp_path / "store"
    final.mkdir()
    (final / "old").write_text("old")
    dead = _dead_pid()
    stale = tmp_path / f".store.old-{dead}-deadbeef"
    stale.mkdir()
    tmp = make_temp_dir(final)
    assert tmp.name.startswith(f".store.tmp-{os.getpid()}-")
    (tmp / "new").write_text("new")
    replace_dir(tmp, final)
    assert sorted(x.name for x in final.iterdir()) == ["new"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["store"]


def test_building_dir_publishes_on_success_and_leaves_the_old_folder_on_error(tmp_path):
    final = tmp_path / "out"
    with building_dir(final) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (final / "a.txt").read_text() == "one" and not tmp.exists()
    with pytest.raises(RuntimeError, match="boom"):
        with building_dir(final) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("boom")
    assert (final / "a.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
