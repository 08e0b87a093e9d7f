"""Checks of what a stage writes for its user: DVC metrics files that stay small and numeric (so ``dvc
metrics show`` fits a terminal), their details file next to them, and PNG images that open anywhere."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_METRICS_LEAVES = 8  # per stage: a few numbers a user compares across runs


def leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of nested dicts (how ``dvc metrics show`` names its columns)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def check_metrics_file(path: str | Path, max_leaves: int = MAX_METRICS_LEAVES) -> dict[str, Any]:
    """The metrics JSON at ``path`` (returned): a dict whose every leaf is a finite number or a bool (no
    strings, lists or nulls: configs and details live elsewhere), at most ``max_leaves`` of them, and a
    details JSON next to it (``<stem>_details.json``) that is not empty."""
    path = Path(path)
    metrics = json.loads(path.read_text())
    assert isinstance(metrics, dict) and metrics, f"{path}: {metrics!r}"
    flat = leaves(metrics)
    bad = {k: v for k, v in flat.items() if not isinstance(v, (int, float)) or
           (isinstance(v, float) and not math.isfinite(v))}
    assert not bad, f"{path}: leaves that are not finite numbers or bools: {bad}"
    assert len(flat) <= max_leaves, f"{path}: {len(flat)} leaves (at most {max_leaves}): {sorted(flat)}"
    details = path.with_name(f"{path.stem}_details.json")
    assert details.is_file() and json.loads(details.read_text()), f"no details file {details}"
    return metrics


def details_of(path: str | Path) -> dict[str, Any]:
    """The details JSON next to the metrics file ``path``."""
    path = Path(path)
    return json.loads(path.with_name(f"{path.stem}_details.json").read_text())


def check_png(path: str | Path, min_bytes: int = 5000) -> None:
    """``path`` is a PNG (magic bytes, a readable image of some size) of more than ``min_bytes``."""
    from PIL import Image  # noqa: PLC0415

    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path}: {len(data)} bytes"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= 100, img.size
