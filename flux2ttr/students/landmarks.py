"""Landmark index math shared by the eager student and its fused kernel: which tokens the landmark
softmax sees (every conditioning token plus an even grid of image tokens)."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from flux2ttr.students.hkr import HKRConfig


def landmark_count(n_img: int, cfg: HKRConfig) -> int:
    """Image landmarks: ``clamp(round(landmark_fraction * n_img), landmark_min, landmark_max)``
    (``landmark_max = 0``: no upper bound), never more than ``n_img``."""
    m = int(round(cfg.landmark_fraction * n_img))
    m = max(m, cfg.landmark_min)
    if cfg.landmark_max > 0:
        m = min(m, cfg.landmark_max)
    return max(0, min(m, n_img))


def grid_points(height: int, width: int, m: int) -> torch.Tensor:
    """``m`` distinct row-major indices ``[m]`` (long, sorted) spread evenly over a ``height x width``
    grid; see :func:`_grid_points` (cached: the same grid recurs every step)."""
    return torch.tensor(_grid_points(int(height), int(width), int(m)), dtype=torch.long)


@functools.lru_cache(maxsize=256)
def _grid_points(height: int, width: int, m: int) -> tuple[int, ...]:
    """Row-major indices of ``m`` points spread evenly over the grid, sorted.

    Rows: ``R ~ sqrt(m * height / width)`` evenly spaced rows (at least ``ceil(m / width)``); the
    ``m`` points are split over them as evenly as possible and evenly spaced within each row
    (cell centres), so the landmarks tile the image like a stratified grid.
    """
    if m <= 0 or height <= 0 or width <= 0:
        return ()
    n = height * width
    if m >= n:
        return tuple(range(n))
    rows = int(round(math.sqrt(m * height / width)))
    rows = min(max(rows, -(-m // width), 1), height, m)
    out: list[int] = []
    base, extra = divmod(m, rows)
    for j in range(rows):
        y = int((j + 0.5) * height / rows)
        c = base + (1 if j < extra else 0)
        for i in range(c):
            out.append(y * width + int((i + 0.5) * width / c))
    return tuple(sorted(out))


def landmark_indices(n_cond: int, height: int, width: int, cfg: HKRConfig) -> torch.Tensor:
    """Token indices ``[L]`` (sorted, long) of the landmark set: all ``n_cond`` conditioning tokens
    plus :func:`landmark_count` image tokens spread over the ``height x width`` grid."""
    n_img = height * width
    img = grid_points(height, width, landmark_count(n_img, cfg)) + n_cond
    return torch.cat([torch.arange(n_cond, dtype=torch.long), img])
