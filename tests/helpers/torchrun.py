"""Real ``torchrun`` launches for the multi-rank tests (gloo on the CPU) and the single-thread context their
single-process references run in (torchrun gives each rank ``OMP_NUM_THREADS=1``; the thread count can change
float rounding, and the comparisons are bit for bit)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def torchrun(args: list[str], *, cwd: Path, nproc: int = 2, timeout: float = 300,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node NPROC ARGS`` in ``cwd`` (the repo on
    ``PYTHONPATH``, so ``-m stages.<name>`` resolves); stdout and stderr captured as text."""
    full = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
                **(env or {}))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), *args], cwd=cwd, capture_output=True, text=True, env=full, timeout=timeout)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread inside the block (as a torchrun rank is)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """``{relative path: bytes}`` of every file under ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
