"""Build the student of the configured mode (``hkr.mode``)."""

from __future__ import annotations

from flux2ttr.students.hkr import HKRConfig, HKRLayer
from flux2ttr.students.layer import StudentLayer
from flux2ttr.students.window import WindowLayer

STUDENT_CLASSES: dict[str, type[StudentLayer]] = {"hkr": HKRLayer, "window": WindowLayer}


def build_student(cfg: HKRConfig, *, num_heads: int) -> StudentLayer:
    """A fresh student layer of ``cfg.mode`` for a teacher layer with ``num_heads`` heads."""
    return STUDENT_CLASSES[cfg.mode](cfg, num_heads=num_heads)
