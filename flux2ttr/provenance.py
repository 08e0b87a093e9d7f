"""Where results come from: a digest of the library source that shaped them, so a checkpoint written by
other code (what makes DVC rerun a stage) is never resumed."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path


def source_digest(modules: tuple[str, ...]) -> str:
    """sha256 over the names and source files of the dotted ``modules`` (imported if needed)."""
    h = hashlib.sha256()
    for name in modules:
        h.update(name.encode())
        h.update(Path(importlib.import_module(name).__file__).read_bytes())
    return h.hexdigest()
