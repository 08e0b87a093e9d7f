"""Does an image show its caption? A checker computed from pixels alone, for captions of the scene grammar
(:mod:`flux2ttr.teachers.scenes`).

The image is averaged to a 128x128 analysis grid and every cell classified as its nearest palette colour
(or none, if farther than :data:`COLOUR_TOL`). Then, for the caption's parts:

* background: its colour is the most common class and covers at least :data:`MIN_BACKGROUND` of the image;
* group ("two small red circles top left"): the named colour is the most common non-background colour in
  the named cell, and exactly the named number of its blobs (4-connected components, after a one-cell
  closing, of at least :data:`MIN_BLOB` of the expected shape area) have their centroid in that cell;
* overlap ("a small red circle on a large blue square top left"): the large shape's colour is the most
  common non-background colour in the cell, one blob of each colour is centred there, and the small
  blob's bounding box lies inside the large one's;
* stripe ("a blue stripe across the bottom"): the colour is the most common non-background colour in the
  band (a row or column of cells), and its largest blob is centred in the band and spans at least
  :data:`MIN_STRIPE_SPAN` of the image.

That is :attr:`CheckResult.passed`. Diagnostics on top (:attr:`CheckResult.strict` needs them too): each
counted blob's kind (:func:`kind_of`: ring, triangle, square or circle from its hole, its vertical mass
balance and its diagonal extent) and size (small or large, by area), and the background texture (speckled: cell-to-cell
luma noise; gradient: lighter top than bottom; plain: neither).

The thresholds are part of the metric's definition (not tunables): they hold for every ground-truth
scene image (see the tests) while wrong captions fail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from flux2ttr.teachers import scenes as sc

GRID = 128                 # analysis grid side (a 256 px image: 2x2 pixels per cell, the latent map's luma blocks)
COLOUR_TOL = 0.22          # RGB distance within which a cell is that palette colour (palette colours are >= 0.33 apart)
MIN_BACKGROUND = 0.4       # the background covers at least 40% of the image (scenes: >= 60%)
MIN_BLOB = 0.3             # a blob counts from 30% of its clause's expected shape area (smallest kind of that size)
MIN_STRIPE_SPAN = 0.75     # a stripe's blob spans 75% of the image along it
SPECKLE_STD = 0.015        # luma std (after removing the row means) above which a background is speckled
GRADIENT_DROP = 0.05       # top-third minus bottom-third mean luma above which it is a gradient
TRIANGLE_DROP = 0.05       # centroid this far below the box middle: a triangle (scenes: triangles >= 0.057, others <= 0.043)
SQUARE_CORNERS = 1.18      # diagonal/axis extent ratio above which a blob is a square (squares >= 1.23, circles <= 1.13)

_NAMES = list(sc.PALETTE)
_RGB = torch.tensor([sc.PALETTE[n] for n in _NAMES])  # [K, 3]


@dataclass
class Blob:
    """A 4-connected component of one colour on the analysis grid (coordinates: fractions of the side)."""

    area: float  # fraction of the image
    cy: float
    cx: float
    y0: float
    x0: float
    y1: float
    x1: float
    hole: bool  # its centroid cell is not part of it
    fill: float  # area / bounding-box area
    drop: float  # centroid below the bounding-box middle, in box heights (upright triangle ~1/6; 0 if symmetric)
    corners: float  # diagonal extents / axis extents (square ~sqrt(2), circle ~1)


@dataclass
class ClauseResult:
    text: str
    colour_ok: bool
    count_ok: bool
    found: int  # blobs of the named colour centred in the region (the large shape's for an overlap)
    kind_ok: bool = True
    size_ok: bool = True

    @property
    def passed(self) -> bool:
        return self.colour_ok and self.count_ok


@dataclass
class CheckResult:
    caption: str
    background_ok: bool
    texture_ok: bool
    clauses: list[ClauseResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Background colour and every clause's colour and count (the issue's checker)."""
        return self.background_ok and all(c.passed for c in self.clauses)

    @property
    def strict(self) -> bool:
        """:attr:`passed`, and every shape's kind and size, and the background texture."""
        return self.passed and self.texture_ok and all(c.kind_ok and c.size_ok for c in self.clauses)


def classify(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``image [3, H, W]`` in [0, 1] -> ``(classes [G, G] long, grid [3, G, G])``: each analysis cell's palette
    index (order of :data:`scenes.PALETTE`) or -1 when no colour is within :data:`COLOUR_TOL`."""
    grid = torch.nn.functional.adaptive_avg_pool2d(image.float().clamp(0, 1).unsqueeze(0), GRID)[0].cpu()
    px = grid.permute(1, 2, 0).reshape(-1, 3)
    dist2 = px.pow(2).sum(1, keepdim=True) - 2 * px @ _RGB.t() + _RGB.pow(2).sum(1).view(1, -1)  # [G*G, K]
    best, idx = dist2.min(dim=-1)
    idx = torch.where(best <= COLOUR_TOL**2, idx, torch.full_like(idx, -1))
    return idx.view(grid.shape[1], grid.shape[2]), grid


def components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected component labels of a bool ``mask [G0, G1]``: each component's smallest flat index, -1 off
    the mask. Runs of each row are joined to the overlapping runs of the row above (union-find over runs)."""
    m = mask.cpu().numpy().astype(bool)
    G0, G1 = m.shape
    edges = np.diff(np.pad(m, ((0, 0), (1, 1))).astype(np.int8), axis=1)  # +1 at run starts, -1 after run ends
    runs: list[tuple[int, int, int]] = []  # (row, start, end) with end exclusive
    parent: list[int] = []

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev: list[int] = []  # run indices of the row above
    for r in range(G0):
        starts, ends = np.flatnonzero(edges[r] == 1), np.flatnonzero(edges[r] == -1)
        cur = []
        for a, b in zip(starts.tolist(), ends.tolist()):
            idx = len(runs)
            runs.append((r, a, b))
            parent.append(idx)
            for j in prev:
                _, pa, pb = runs[j]
                if a < pb and pa < b:  # column intervals overlap: 4-connected
                    ri, rj = root(idx), root(j)
                    parent[max(ri, rj)] = min(ri, rj)
            cur.append(idx)
        prev = cur
    labels = np.full((G0, G1), -1, dtype=np.int64)
    first: dict[int, int] = {}
    for i, (r, a, _) in enumerate(runs):  # runs come in flat-index order: a root's first run is its minimum
        first.setdefault(root(i), r * G1 + a)
    for i, (r, a, b) in enumerate(runs):
        labels[r, a:b] = first[root(i)]
    return torch.from_numpy(labels)


def _shift_all(mask: torch.Tensor, op, pad: bool) -> torch.Tensor:  # noqa: ANN001 - torch.logical_or / _and
    """``op`` of ``mask`` with its four 4-neighbour shifts (``pad`` outside the grid)."""
    p = torch.nn.functional.pad(mask, (1, 1, 1, 1), value=pad)
    out = mask.clone()
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        out = op(out, p[dy:dy + mask.shape[0], dx:dx + mask.shape[1]])
    return out


def close(mask: torch.Tensor) -> torch.Tensor:
    """Morphological closing with the 4-neighbour cross: bridges one-cell gaps (mixed-colour cells inside a thin
    shape, where the latent map's 2x4 chroma blocks straddle its edge) without joining shapes, which keep
    :data:`scenes.SHAPE_GAP` (4 grid cells) apart."""
    return _shift_all(_shift_all(mask, torch.logical_or, False), torch.logical_and, True)


def fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` with every region it encloses (background not connected to the border) filled."""
    outside = components(~mask)
    border = set(torch.cat([outside[0], outside[-1], outside[:, 0], outside[:, -1]]).tolist()) - {-1}
    enclosed = (outside >= 0) & ~torch.isin(outside, torch.tensor(sorted(border), dtype=outside.dtype))
    return mask | enclosed


def blobs(mask: torch.Tensor, min_area: float = 0.0) -> list[Blob]:
    """The components of ``mask`` with area (fraction of the image) >= ``min_area``."""
    G0, G1 = mask.shape
    labels = components(mask)
    out = []
    for lab in labels.unique():
        if lab < 0:
            continue
        ys, xs = (labels == lab).nonzero(as_tuple=True)
        area = ys.numel() / (G0 * G1)
        if area < min_area:
            continue
        cy, cx = (ys.float().mean() + 0.5) / G0, (xs.float().mean() + 0.5) / G1
        y0, y1 = float(ys.min()) / G0, float(ys.max() + 1) / G0
        x0, x1 = float(xs.min()) / G1, float(xs.max() + 1) / G1
        iy, ix = min(int(cy * G0), G0 - 1), min(int(cx * G1), G1 - 1)
        hgt, wid = int(ys.max()) - int(ys.min()) + 1, int(xs.max()) - int(xs.min()) + 1
        fill = ys.numel() / (hgt * wid)
        drop = (float(ys.float().mean()) - 0.5 * float(ys.min() + ys.max())) / hgt
        u, v = (xs + ys).float(), (xs - ys).float()  # diagonal coordinates (times sqrt 2)
        corners = (float(u.max() - u.min()) + float(v.max() - v.min()) + 2) / math.sqrt(2) / (hgt + wid)
        out.append(Blob(area, float(cy), float(cx), y0, x0, y1, x1, hole=bool(labels[iy, ix] != lab), fill=fill,
                        drop=drop, corners=corners))
    return out


def _cell_of(b: Blob) -> tuple[int, int]:
    return min(int(b.cy * 3), 2), min(int(b.cx * 3), 2)


def _region(classes: torch.Tensor, cells: list[tuple[int, int]]) -> torch.Tensor:
    """The class labels of the analysis cells inside the given 3x3-grid cells (flat)."""
    G = classes.shape[0]
    edges = [round(i * G / 3) for i in range(4)]
    parts = [classes[edges[r]:edges[r + 1], edges[c]:edges[c + 1]].reshape(-1) for r, c in cells]
    return torch.cat(parts)


def _dominant(region: torch.Tensor, background: int) -> int:
    """The most common palette class of ``region`` other than ``background`` (-1 if none)."""
    keep = region[(region >= 0) & (region != background)]
    if keep.numel() == 0:
        return -1
    return int(torch.bincount(keep, minlength=len(_NAMES)).argmax())


def kind_of(b: Blob) -> str:
    """The shape kind a blob looks like: ring (a hole at its centroid), triangle (its mass sits low in its
    box: the upright triangle's centroid is 1/6 of the height below the box middle), square (corners: it
    reaches farther along the diagonals than a disc), else circle."""
    if b.hole:
        return "ring"
    if b.drop >= TRIANGLE_DROP:
        return "triangle"
    return "square" if b.corners >= SQUARE_CORNERS else "circle"


def size_of(b: Blob, kind: str) -> str:
    """small or large: the blob's area against the geometric mean of the two sizes' areas of ``kind``."""
    small, large = sc.shape_area(kind, sc.SMALL_RADIUS), sc.shape_area(kind, sc.LARGE_RADIUS)
    return "small" if b.area < math.sqrt(small * large) else "large"


def _min_area(size: str) -> float:
    r = sc.nominal_radius(size) * (1 - sc.RADIUS_JITTER)
    return MIN_BLOB * min(sc.shape_area(k, r) for k in sc.KINDS)


def _texture(grid: torch.Tensor, classes: torch.Tensor, background: int) -> str:
    """speckled | gradient | plain, from the luma of background cells away from any edge."""
    bg = classes == background
    inner = bg.clone()
    inner[1:] &= bg[:-1]
    inner[:-1] &= bg[1:]
    inner[:, 1:] &= bg[:, :-1]
    inner[:, :-1] &= bg[:, 1:]
    luma = grid.mean(dim=0)
    G = luma.shape[0]
    rows = [luma[r][inner[r]] for r in range(G)]
    means = torch.tensor([float(r.mean()) if r.numel() else float("nan") for r in rows])
    third = G // 3
    top, bottom = means[:third].nanmean(), means[-third:].nanmean()
    resid = [r - means[i] for i, r in enumerate(rows) if r.numel() > 1]
    resid = torch.cat(resid) if resid else torch.zeros(0)
    if resid.numel() > 16 and float(resid.std()) > SPECKLE_STD:
        return "speckled"
    if bool(torch.isfinite(top - bottom)) and float(top - bottom) > GRADIENT_DROP:
        return "gradient"
    return "plain"


def check_image(image: torch.Tensor, caption: str) -> CheckResult:
    """Check one ``image [3, H, W]`` in [0, 1] against ``caption`` (a caption of the scene grammar)."""
    clauses, background = sc.parse_caption(caption)
    classes, grid = classify(image)
    bg = _NAMES.index(background.colour)
    counts = torch.bincount(classes[classes >= 0], minlength=len(_NAMES))
    bg_ok = int(counts.argmax()) == bg and float(counts[bg]) >= MIN_BACKGROUND * classes.numel()
    result = CheckResult(caption, background_ok=bg_ok, texture_ok=_texture(grid, classes, bg) == background.texture)
    cache: dict[tuple[str, float], list[Blob]] = {}

    def colour_blobs(colour: str, min_area: float) -> list[Blob]:
        key = (colour, min_area)
        if key not in cache:
            cache[key] = blobs(close(classes == _NAMES.index(colour)), min_area)
        return cache[key]

    for clause in clauses:
        region = _region(classes, clause.cells())
        dominant = _dominant(region, bg)
        if clause.type == "stripe":
            along = (lambda b: b.x1 - b.x0) if clause.orientation == "h" else (lambda b: b.y1 - b.y0)
            across = (lambda b: int(b.cy * 3)) if clause.orientation == "h" else (lambda b: int(b.cx * 3))
            found = colour_blobs(clause.colour, 0.0)
            best = max(found, key=lambda b: b.area, default=None)
            spans = best is not None and along(best) >= MIN_STRIPE_SPAN and min(across(best), 2) == clause.band
            result.clauses.append(ClauseResult(clause.text, dominant == _NAMES.index(clause.colour), spans,
                                               int(spans)))
            continue
        if clause.type == "overlap":
            base = [b for b in colour_blobs(clause.base_colour, _min_area("large")) if _cell_of(b) == clause.cell]
            top = [b for b in colour_blobs(clause.colour, _min_area("small")) if _cell_of(b) == clause.cell]
            count_ok = len(base) == 1 and len(top) == 1
            if count_ok:  # the small shape inside the large one (2 grid cells of slack)
                s, big = top[0], base[0]
                slack = 2.0 / GRID
                count_ok = (s.y0 >= big.y0 - slack and s.x0 >= big.x0 - slack and s.y1 <= big.y1 + slack
                            and s.x1 <= big.x1 + slack)
            kind_ok = size_ok = True
            if len(top) == 1:
                kind_ok = kind_of(top[0]) == clause.kind
                size_ok = size_of(top[0], clause.kind) == "small"
            if len(base) == 1:  # judge the large shape with the small one (and the fringe between) filled in
                union = blobs(fill_holes(close((classes == _NAMES.index(clause.base_colour))
                                               | (classes == _NAMES.index(clause.colour)))), _min_area("large"))
                union = [b for b in union if _cell_of(b) == clause.cell]
                if len(union) == 1:
                    kind_ok = kind_ok and kind_of(union[0]) == clause.base_kind
                    size_ok = size_ok and size_of(union[0], clause.base_kind) == "large"
            result.clauses.append(ClauseResult(clause.text, dominant == _NAMES.index(clause.base_colour), count_ok,
                                               len(base), kind_ok, size_ok))
            continue
        found = [b for b in colour_blobs(clause.colour, _min_area(clause.size)) if _cell_of(b) == clause.cell]
        kind_ok = all(kind_of(b) == clause.kind for b in found)
        size_ok = all(size_of(b, clause.kind) == clause.size for b in found)
        result.clauses.append(ClauseResult(clause.text, dominant == _NAMES.index(clause.colour),
                                           len(found) == clause.count, len(found), kind_ok, size_ok))
    return result


def check_batch(images: torch.Tensor, captions: list[str]) -> list[CheckResult]:
    """:func:`check_image` for each ``images[b] [3, H, W]`` and ``captions[b]``."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    return [check_image(img, cap) for img, cap in zip(images, captions)]


def summarize(results: list[CheckResult]) -> dict[str, float]:
    """Rates over ``results``: ``pass_rate`` (the checker), ``strict_rate``, and per-part rates."""
    n = max(1, len(results))
    clauses = [c for r in results for c in r.clauses]
    m = max(1, len(clauses))
    return {
        "images": len(results),
        "pass_rate": sum(r.passed for r in results) / n,
        "strict_rate": sum(r.strict for r in results) / n,
        "background_rate": sum(r.background_ok for r in results) / n,
        "texture_rate": sum(r.texture_ok for r in results) / n,
        "clause_colour_rate": sum(c.colour_ok for c in clauses) / m,
        "clause_count_rate": sum(c.count_ok for c in clauses) / m,
        "clause_kind_rate": sum(c.kind_ok for c in clauses) / m,
        "clause_size_rate": sum(c.size_ok for c in clauses) / m,
    }
