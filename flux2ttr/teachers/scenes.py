"""Procedural captioned scenes: the trained tiny teacher's data set, generated on the fly from a seed
(nothing is downloaded or stored).

A scene is a plain or textured background and 1-3 *clauses*, each in its own part of a 3x3 grid of cells:

* ``group``: 1-3 small or one large shape of one colour in one cell ("two small red circles top left");
* ``overlap``: a small shape on a large one of another colour in one cell ("a small yellow triangle on a
  large blue square in the center");
* ``stripe``: a full-length band of one colour over a row or a column of cells ("a blue stripe across
  the bottom"); no other clause shares its cells.

The caption names every clause (in a seeded order) and the background: "two small red circles top left,
a blue stripe across the bottom, on grey". Clauses never share a cell and colours never repeat within a
scene, so each clause can be checked from the pixels of its own region
(:mod:`flux2ttr.teachers.caption_check`). :func:`parse_caption` reads a caption back into its clauses.

Geometry is in fractions of the image side (a 256 px image: small shapes ~11 px radius, large ~28 px,
stripes 18-26 px thick). :func:`render` draws scenes as RGB ``[B, 3, H, W]`` in [0, 1] with one-pixel
anti-aliased edges, on any torch device. Held-out captions (:func:`is_held_out`: a hash of the caption's
clause set, so reordering a caption does not leave the split) never appear in training
(:func:`training_scene`); :func:`held_out_scenes` draws the evaluation set.

Pure Python + numpy + torch (no pipeline packages): the ComfyUI runtime may import it.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from flux2ttr.config import ConfigError, check_range
from flux2ttr.seeds import derive_seed

# ------------------------------------------------------------------------------------------ vocabulary
PALETTE: dict[str, tuple[float, float, float]] = {  # RGB in [0, 1]; nearest pairwise distance 0.33
    "red": (0.86, 0.16, 0.14),
    "green": (0.16, 0.68, 0.22),
    "blue": (0.14, 0.30, 0.88),
    "yellow": (0.96, 0.86, 0.16),
    "orange": (0.96, 0.54, 0.10),
    "purple": (0.56, 0.22, 0.74),
    "white": (0.96, 0.96, 0.96),
    "black": (0.07, 0.07, 0.07),
    "grey": (0.50, 0.50, 0.50),
    "beige": (0.84, 0.76, 0.60),
}
SHAPE_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "white", "black")
BACKGROUNDS = ("grey", "white", "black", "beige")
KINDS = ("circle", "square", "triangle", "ring")
OVERLAP_BASE_KINDS = ("circle", "square")  # large shapes a small one sits inside
OVERLAP_TOP_KINDS = ("circle", "square", "triangle")
SIZES = ("small", "large")
TEXTURES = ("plain", "speckled", "gradient")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
WORD_COUNTS = {v: k for k, v in COUNT_WORDS.items()}

# 3x3 cells (row, col) and how a caption names them
CELLS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "at the top": (0, 1), "top right": (0, 2),
    "on the left": (1, 0), "in the center": (1, 1), "on the right": (1, 2),
    "bottom left": (2, 0), "at the bottom": (2, 1), "bottom right": (2, 2),
}
CELL_NAMES = {v: k for k, v in CELLS.items()}
STRIPE_BANDS = {("h", 0): "across the top", ("h", 1): "across the middle", ("h", 2): "across the bottom",
                ("v", 0): "down the left", ("v", 1): "down the middle", ("v", 2): "down the right"}
BAND_NAMES = {v: k for k, v in STRIPE_BANDS.items()}

# geometry (fractions of the image side)
SMALL_RADIUS = 0.043      # 11 px at 256
LARGE_RADIUS = 0.11       # 28 px at 256
RADIUS_JITTER = 0.08      # radius x U(1 - j, 1 + j)
SQUARE_HALF = 0.8         # square half side = 0.8 r
TRIANGLE_APOTHEM = 0.6    # upright equilateral triangle: centre-to-edge 0.6 r (circumradius 1.2 r)
RING_INNER = 0.5          # ring inner radius = 0.5 r
STRIPE_HALF = (0.035, 0.05)  # stripe half thickness range (18-26 px at 256)
SHAPE_GAP = 0.03          # free space between shapes of a group (8 px at 256)
CELL_MARGIN = 0.012       # shapes stay this far inside their cell
PLACE_TRIES = 1000        # random placements tried before a group falls back to SPREAD_LAYOUTS
SPREAD_LAYOUTS = {1: ((0.5, 0.5),), 2: ((0.0, 0.0), (1.0, 1.0)), 3: ((0.0, 0.0), (1.0, 0.0), (0.5, 1.0))}  # in spans
TEXTURE_AMPLITUDE = 0.07  # luma change of a texture (per RGB channel)
SPECKLE_CELLS = 64        # speckle noise is constant on a 64x64 grid (4 px cells at 256)


def shape_area(kind: str, r: float) -> float:
    """Area of a shape of ``kind`` and size ``r`` (fractions of the side, so area in side^2)."""
    if kind == "circle":
        return math.pi * r * r
    if kind == "square":
        return (2 * SQUARE_HALF * r) ** 2
    if kind == "triangle":
        return 3 * math.sqrt(3) * (TRIANGLE_APOTHEM * r) ** 2  # area = 3 sqrt(3) apothem^2
    if kind == "ring":
        return math.pi * r * r * (1 - RING_INNER**2)
    raise ValueError(f"unknown shape kind {kind!r}")


def nominal_radius(size: str) -> float:
    return SMALL_RADIUS if size == "small" else LARGE_RADIUS


def vocabulary() -> list[str]:
    """Every word (and the comma) a caption can contain, sorted: the trained teacher's token vocabulary."""
    words = {","} | set(PALETTE) | set(KINDS) | {k + "s" for k in KINDS} | set(SIZES) | set(COUNT_WORDS.values())
    words |= {"stripe", "on", "speckled", "gradient"}
    for phrase in list(CELLS) + list(STRIPE_BANDS.values()):
        words |= set(phrase.split())
    return sorted(words)


# ------------------------------------------------------------------------------------------ scene spec
@dataclass(frozen=True)
class Clause:
    """One captioned part of a scene. ``type`` group: ``count`` shapes of ``kind``/``size``/``colour`` in
    ``cell``; overlap: a small ``kind``/``colour`` shape on a large ``base_kind``/``base_colour`` one in
    ``cell``; stripe: a ``colour`` band, ``orientation`` "h" (a row) or "v" (a column), ``band`` 0..2."""

    type: str
    colour: str
    kind: str = ""
    size: str = ""
    count: int = 1
    cell: tuple[int, int] = (-1, -1)
    base_kind: str = ""
    base_colour: str = ""
    orientation: str = ""
    band: int = -1

    @property
    def text(self) -> str:
        """The clause as a caption phrase."""
        if self.type == "stripe":
            return f"a {self.colour} stripe {STRIPE_BANDS[(self.orientation, self.band)]}"
        where = CELL_NAMES[self.cell]
        if self.type == "overlap":
            return f"a small {self.colour} {self.kind} on a large {self.base_colour} {self.base_kind} {where}"
        noun = self.kind + ("s" if self.count > 1 else "")
        return f"{COUNT_WORDS[self.count]} {self.size} {self.colour} {noun} {where}"

    @property
    def colours(self) -> tuple[str, ...]:
        return (self.colour, self.base_colour) if self.type == "overlap" else (self.colour,)

    def cells(self) -> list[tuple[int, int]]:
        """The grid cells the clause occupies."""
        if self.type != "stripe":
            return [self.cell]
        return [(self.band, c) for c in range(3)] if self.orientation == "h" else [(r, self.band) for r in range(3)]


@dataclass(frozen=True)
class Background:
    colour: str
    texture: str = "plain"

    @property
    def text(self) -> str:
        if self.texture == "speckled":
            return f"on speckled {self.colour}"
        if self.texture == "gradient":
            return f"on a {self.colour} gradient"
        return f"on {self.colour}"


@dataclass(frozen=True)
class Shape:
    """A drawn primitive: ``kind`` circle | square | triangle | ring | hstripe | vstripe, centre ``(x, y)``
    and size ``r`` (radius; a stripe's half thickness), all fractions of the image side."""

    kind: str
    colour: str
    x: float
    y: float
    r: float


@dataclass(frozen=True)
class Scene:
    background: Background
    clauses: tuple[Clause, ...]  # caption order
    shapes: tuple[Shape, ...]  # drawing order
    texture_seed: int = 0

    @property
    def caption(self) -> str:
        return ", ".join([c.text for c in self.clauses] + [self.background.text])


def canonical_caption(clauses: list[Clause] | tuple[Clause, ...], background: Background) -> str:
    """The caption with its clauses sorted: one string per scene content, whatever the clause order."""
    return ", ".join(sorted(c.text for c in clauses) + [background.text])


# ------------------------------------------------------------------------------------------ parsing
class CaptionError(ValueError):
    """A caption the scene grammar cannot produce."""


_COLOUR = "|".join(PALETTE)
_CELL = "|".join(CELLS)
_GROUP = re.compile(rf"^(a|two|three) (small|large) ({_COLOUR}) (circle|square|triangle|ring)(s?) ({_CELL})$")
_OVERLAP = re.compile(rf"^a small ({_COLOUR}) (circle|square|triangle) on a large ({_COLOUR}) (circle|square) ({_CELL})$")
_STRIPE = re.compile(rf"^a ({_COLOUR}) stripe ({'|'.join(BAND_NAMES)})$")
_BACKGROUND = re.compile(rf"^on (?:(speckled) ({_COLOUR})|a ({_COLOUR}) gradient|({_COLOUR}))$")


def parse_clause(text: str) -> Clause:
    """One caption phrase -> its :class:`Clause` (the inverse of :attr:`Clause.text`)."""
    if m := _GROUP.match(text):
        count = WORD_COUNTS[m.group(1)]
        if (count > 1) != bool(m.group(5)):
            raise CaptionError(f"{text!r}: count and plural disagree")
        return Clause("group", m.group(3), kind=m.group(4), size=m.group(2), count=count, cell=CELLS[m.group(6)])
    if m := _OVERLAP.match(text):
        return Clause("overlap", m.group(1), kind=m.group(2), size="small", cell=CELLS[m.group(5)],
                      base_kind=m.group(4), base_colour=m.group(3))
    if m := _STRIPE.match(text):
        orientation, band = BAND_NAMES[m.group(2)]
        return Clause("stripe", m.group(1), orientation=orientation, band=band)
    raise CaptionError(f"{text!r} is not a clause of the scene grammar")


def parse_caption(caption: str) -> tuple[list[Clause], Background]:
    """A caption -> ``(clauses, background)``; :class:`CaptionError` when it is not one of the grammar."""
    parts = [p.strip() for p in caption.strip().split(",")]
    if len(parts) < 2:
        raise CaptionError(f"{caption!r}: a caption is 'clause, ..., on <background>'")
    m = _BACKGROUND.match(parts[-1])
    if not m:
        raise CaptionError(f"{caption!r}: the last part must name the background ('on grey', 'on speckled grey', "
                           "'on a grey gradient')")
    if m.group(1):
        background = Background(m.group(2), "speckled")
    elif m.group(3):
        background = Background(m.group(3), "gradient")
    else:
        background = Background(m.group(4), "plain")
    return [parse_clause(p) for p in parts[:-1]], background


# ------------------------------------------------------------------------------------------ config
@dataclass
class SceneConfig:
    """params.yaml section ``scenes``: the procedural data set and its held-out split."""

    seed: int = 0                 # training scenes: scene i comes from derive_seed(seed, i)
    eval_seed: int = 1            # held-out evaluation scenes draw from this stream
    holdout_percent: int = 5      # captions whose clause-set hash falls below this percentage are held out
    clause_probs: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.3])  # 1, 2, 3 clauses
    stripe_prob: float = 0.3      # a scene has a stripe (its first clause)
    overlap_prob: float = 0.15    # a non-stripe clause is an overlap
    small_prob: float = 0.6       # a group is of small shapes (else one large)
    count_probs: list[float] = field(default_factory=lambda: [0.4, 0.3, 0.3])  # 1, 2, 3 small shapes
    texture_probs: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.25])  # plain, speckled, gradient
    latent_seed: int = 0          # the latent map's orthogonal channel mix (flux2ttr/teachers/latent_map.py)
    latent_scale: float = 1.25    # latent = scale * Q^T U^T (pixels - 0.5): data latents ~unit RMS per channel (measured 1.02)

    def __post_init__(self) -> None:
        self.clause_probs = [float(p) for p in self.clause_probs]
        self.count_probs = [float(p) for p in self.count_probs]
        self.texture_probs = [float(p) for p in self.texture_probs]
        check_range("scenes", self, "seed", "eval_seed", "latent_seed", ge=0)
        check_range("scenes", self, "holdout_percent", ge=0, le=50)
        check_range("scenes", self, "stripe_prob", "overlap_prob", "small_prob", ge=0.0, le=1.0)
        check_range("scenes", self, "latent_scale", gt=0.0)
        for name, n in (("clause_probs", 3), ("count_probs", 3), ("texture_probs", 3)):
            probs = getattr(self, name)
            if len(probs) != n or min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
                raise ConfigError(f"scenes.{name} = {probs}: must be {n} non-negative probabilities summing to 1")


# ------------------------------------------------------------------------------------------ sampling
def _choice(rng: np.random.Generator, items, probs=None):  # noqa: ANN001, ANN202 - any sequence
    return items[int(rng.choice(len(items), p=probs))]


def _place_group(rng: np.random.Generator, cell: tuple[int, int], size: str, count: int) -> list[tuple[float, float]]:
    """``count`` centres (x, y) inside ``cell`` for shapes of ``size`` that keep :data:`SHAPE_GAP` between them
    (a large shape: near the cell centre). Deterministic given ``rng``."""
    if size == "large":
        cy, cx = (cell[0] + 0.5) / 3, (cell[1] + 0.5) / 3
        return [(cx + rng.uniform(-0.02, 0.02), cy + rng.uniform(-0.02, 0.02))]
    reach = 1.2 * SMALL_RADIUS * (1 + RADIUS_JITTER)  # the triangle's circumradius bounds every kind
    lo_y, lo_x = cell[0] / 3 + reach + CELL_MARGIN, cell[1] / 3 + reach + CELL_MARGIN
    span = 1 / 3 - 2 * (reach + CELL_MARGIN)
    gap = 2 * reach + SHAPE_GAP
    for _ in range(PLACE_TRIES):
        pts = [(lo_x + rng.uniform(0, span), lo_y + rng.uniform(0, span)) for _ in range(count)]
        if all(math.dist(a, b) >= gap for i, a in enumerate(pts) for b in pts[i + 1:]):
            return pts
    # rare for 3 small shapes (pairwise gap 0.71 of the span): a fixed spread layout, randomly mirrored
    flip_x, flip_y = rng.random() < 0.5, rng.random() < 0.5
    pts = [(lo_x + span * (1 - u if flip_x else u), lo_y + span * (1 - v if flip_y else v))
           for u, v in SPREAD_LAYOUTS[count]]
    if any(math.dist(a, b) < gap for i, a in enumerate(pts) for b in pts[i + 1:]):
        raise RuntimeError(f"cannot place {count} {size} shapes in a cell")  # geometry constants are off
    return pts


def _radius(rng: np.random.Generator, size: str) -> float:
    return nominal_radius(size) * rng.uniform(1 - RADIUS_JITTER, 1 + RADIUS_JITTER)


def sample_scene(cfg: SceneConfig, seed: int) -> Scene:
    """The scene of one 63-bit ``seed`` (deterministic: numpy PCG64 seeded with it)."""
    rng = np.random.default_rng(seed)
    bg = Background(_choice(rng, BACKGROUNDS), _choice(rng, TEXTURES, cfg.texture_probs))
    colours = [c for c in SHAPE_COLOURS if c != bg.colour]
    rng.shuffle(colours)
    n_clauses = 1 + int(rng.choice(3, p=cfg.clause_probs))
    free = [(r, c) for r in range(3) for c in range(3)]
    clauses: list[Clause] = []
    shapes: list[Shape] = []
    stripes: list[Shape] = []
    if rng.random() < cfg.stripe_prob:
        orientation, band = _choice(rng, ("h", "v")), int(rng.integers(3))
        clause = Clause("stripe", colours.pop(), orientation=orientation, band=band)
        half = rng.uniform(*STRIPE_HALF)
        centre = (band + 0.5) / 3 + rng.uniform(-0.03, 0.03)
        x, y = (0.5, centre) if orientation == "h" else (centre, 0.5)
        stripes.append(Shape(orientation + "stripe", clause.colour, x, y, half))
        clauses.append(clause)
        free = [cell for cell in free if cell not in clause.cells()]
    while len(clauses) < n_clauses and free:
        cell = free.pop(int(rng.integers(len(free))))
        if rng.random() < cfg.overlap_prob:
            top, base = colours.pop(), colours.pop()
            clause = Clause("overlap", top, kind=_choice(rng, OVERLAP_TOP_KINDS), size="small", cell=cell,
                            base_kind=_choice(rng, OVERLAP_BASE_KINDS), base_colour=base)
            (cx, cy), = _place_group(rng, cell, "large", 1)
            shapes.append(Shape(clause.base_kind, base, cx, cy, _radius(rng, "large")))
            ox, oy = rng.uniform(-0.015, 0.015, size=2)
            shapes.append(Shape(clause.kind, top, cx + ox, cy + oy, _radius(rng, "small")))
        else:
            size = "small" if rng.random() < cfg.small_prob else "large"
            count = 1 + int(rng.choice(3, p=cfg.count_probs)) if size == "small" else 1
            clause = Clause("group", colours.pop(), kind=_choice(rng, KINDS), size=size, count=count, cell=cell)
            for cx, cy in _place_group(rng, cell, size, count):
                shapes.append(Shape(clause.kind, clause.colour, cx, cy, _radius(rng, size)))
        clauses.append(clause)
    order = rng.permutation(len(clauses))
    return Scene(bg, tuple(clauses[i] for i in order), tuple(stripes + shapes), int(rng.integers(2**31)))


def is_held_out(scene_or_caption: Scene | str, percent: int) -> bool:
    """Whether a caption belongs to the held-out split: sha256 of its :func:`canonical_caption` mod 100 <
    ``percent``."""
    if isinstance(scene_or_caption, Scene):
        key = canonical_caption(scene_or_caption.clauses, scene_or_caption.background)
    else:
        key = canonical_caption(*parse_caption(scene_or_caption))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % 100 < percent


def training_scene(cfg: SceneConfig, index: int) -> Scene:
    """Training scene ``index``: the first draw of ``derive_seed(seed, index, j)``, j = 0, 1, ... whose caption
    is not held out."""
    for j in range(10_000):
        scene = sample_scene(cfg, derive_seed(cfg.seed, index, j))
        if not is_held_out(scene, cfg.holdout_percent):
            return scene
    raise RuntimeError("no training scene found: scenes.holdout_percent leaves nothing to train on")


def held_out_scenes(cfg: SceneConfig, n: int) -> list[Scene]:
    """The first ``n`` held-out scenes of the ``eval_seed`` stream (distinct captions)."""
    if cfg.holdout_percent <= 0:
        raise ConfigError("scenes.holdout_percent is 0: there are no held-out captions to evaluate on")
    out: list[Scene] = []
    seen: set[str] = set()
    i = 0
    while len(out) < n:
        scene = sample_scene(cfg, derive_seed(cfg.eval_seed, i))
        i += 1
        if is_held_out(scene, cfg.holdout_percent) and scene.caption not in seen:
            seen.add(scene.caption)
            out.append(scene)
    return out


PROMPT_SPLITS = ("train", "held_out")


def scene_prompts(cfg: SceneConfig, split: str, n: int) -> list[str]:
    """``n`` distinct captions of a split, in stream order: ``train`` from the training scenes
    (:func:`training_scene` 0, 1, ...), ``held_out`` from :func:`held_out_scenes` (never trained on). The trained
    teacher's prompt files for capture (training captions) and for the controller's rollouts (held out)."""
    if split not in PROMPT_SPLITS:
        raise ConfigError(f"split must be one of {PROMPT_SPLITS}, got {split!r}")
    if n < 1:
        raise ConfigError(f"the number of captions must be >= 1, got {n}")
    if split == "held_out":
        return [sc.caption for sc in held_out_scenes(cfg, n)]
    out: list[str] = []
    i = 0
    while len(out) < n:
        caption = training_scene(cfg, i).caption
        i += 1
        if caption not in out:
            out.append(caption)
    return out


def is_scene_caption(text: str) -> bool:
    """Whether ``text`` is a caption of the scene grammar (what the caption checker can judge)."""
    try:
        parse_caption(text)
    except CaptionError:
        return False
    return True


# ------------------------------------------------------------------------------------------ rendering
_KIND_IDS = {"circle": 0, "square": 1, "triangle": 2, "ring": 3, "hstripe": 4, "vstripe": 5}


def _background(scenes: list[Scene], height: int, width: int, device: torch.device) -> torch.Tensor:
    """``[B, 3, H, W]`` background colour with its texture, built on ``device`` (only the 64x64 speckle noise
    is drawn on the CPU, from each scene's ``texture_seed``)."""
    B = len(scenes)
    base = torch.tensor([PALETTE[s.background.colour] for s in scenes]).view(B, 3, 1, 1).to(device)
    noise = torch.zeros(B, 1, SPECKLE_CELLS, SPECKLE_CELLS)
    gradient = torch.zeros(B, 1, 1, 1)
    for b, s in enumerate(scenes):
        if s.background.texture == "speckled":
            g = torch.Generator().manual_seed(s.texture_seed)
            noise[b, 0] = (torch.rand(SPECKLE_CELLS, SPECKLE_CELLS, generator=g) * 2 - 1) * TEXTURE_AMPLITUDE
        elif s.background.texture == "gradient":
            gradient[b] = 1.0
    speckle = torch.nn.functional.interpolate(noise.to(device), size=(height, width), mode="nearest")
    ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
    ramp = (TEXTURE_AMPLITUDE * (1 - 2 * ys)).view(1, 1, height, 1)  # lighter at the top
    return (base + speckle + gradient.to(device) * ramp).clamp(0.0, 1.0)


def _sdf(kind: str, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (px, negative inside) of a ``kind`` shape of size ``r`` px at offsets ``dx, dy`` px."""
    if kind == "circle":
        return torch.sqrt(dx * dx + dy * dy) - r
    if kind == "square":
        return torch.maximum(dx.abs(), dy.abs()) - SQUARE_HALF * r
    if kind == "triangle":  # upright: flat bottom edge, apex up (image y grows downwards)
        edges = torch.maximum(dy, torch.maximum(0.8660254 * dx - 0.5 * dy, -0.8660254 * dx - 0.5 * dy))
        return edges - TRIANGLE_APOTHEM * r
    if kind == "ring":
        return (torch.sqrt(dx * dx + dy * dy) - 0.5 * (1 + RING_INNER) * r).abs() - 0.5 * (1 - RING_INNER) * r
    if kind == "hstripe":
        return dy.abs() - r + 0.0 * dx  # broadcast to [B, H, W]
    if kind == "vstripe":
        return dx.abs() - r + 0.0 * dy
    raise ValueError(f"unknown shape kind {kind!r}")


@torch.no_grad()
def render(scenes: list[Scene], height: int = 256, width: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """Draw ``scenes`` as RGB ``[B, 3, H, W]`` fp32 in [0, 1] on ``device`` (shapes in drawing order, each
    edge anti-aliased over one pixel: coverage = clamp(0.5 - signed distance in px, 0, 1))."""
    B = len(scenes)
    device = torch.device(device)
    img = _background(scenes, height, width, device)
    S = max((len(s.shapes) for s in scenes), default=0)
    if S == 0:
        return img
    params = torch.zeros(B, S, 5)  # kind, x, y, r, valid
    colours = torch.zeros(B, S, 3)
    for b, s in enumerate(scenes):
        for i, sh in enumerate(s.shapes):
            params[b, i] = torch.tensor([_KIND_IDS[sh.kind], sh.x, sh.y, sh.r, 1.0])
            colours[b, i] = torch.tensor(PALETTE[sh.colour])
    params, colours = params.to(device), colours.to(device)
    side = float(min(height, width))  # px per unit of size
    py = (torch.arange(height, device=device, dtype=torch.float32) + 0.5).view(1, height, 1)
    px = (torch.arange(width, device=device, dtype=torch.float32) + 0.5).view(1, 1, width)
    kinds = params[:, :, 0].long().cpu()
    for i in range(S):
        x, y, r, valid = (params[:, i, j].view(B, 1, 1) for j in range(1, 5))
        dx, dy = px - x * width, py - y * height  # [B, H, W] px from the centre
        rp = r * side
        sdf = torch.empty(B, height, width, device=device)
        for kind, kid in _KIND_IDS.items():  # each kind's signed distance (px) on the rows that draw it
            rows = (kinds[:, i] == kid).nonzero().flatten().to(device)
            if rows.numel():
                sdf[rows] = _sdf(kind, dx[rows], dy[rows], rp[rows])
        alpha = ((0.5 - sdf).clamp(0.0, 1.0) * valid).unsqueeze(1)  # [B, 1, H, W]
        img = img + alpha * (colours[:, i].view(B, 3, 1, 1) - img)
    return img
