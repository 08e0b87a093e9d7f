"""The pixel caption checker: every ground-truth scene passes its own caption (as drawn and as the latent map
represents it), while shuffled captions and captions with one part changed fail."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flux2ttr.teachers import caption_check as cc
from flux2ttr.teachers import scenes as sc
from flux2ttr.teachers.latent_map import LatentMap

CFG = sc.SceneConfig()


@pytest.fixture(scope="module")
def data() -> tuple[list[sc.Scene], torch.Tensor]:
    drawn = [sc.training_scene(CFG, i) for i in range(100)] + sc.held_out_scenes(CFG, 40)
    lmap = LatentMap.build(CFG.latent_seed, CFG.latent_scale)
    return drawn, lmap.project(sc.render(drawn, 256, 256)).clamp(0, 1)


def test_ground_truth_passes(data):
    drawn, images = data
    results = cc.check_batch(images, [s.caption for s in drawn])
    summary = cc.summarize(results)
    bad = [r.caption for r in results if not r.strict]
    assert summary["pass_rate"] == 1.0 and summary["strict_rate"] == 1.0, bad
    assert summary["images"] == len(drawn)


def test_raw_drawings_pass_too(data):
    drawn, _ = data
    raw = sc.render(drawn[:20], 256, 256)
    assert cc.summarize(cc.check_batch(raw, [s.caption for s in drawn[:20]]))["strict_rate"] == 1.0


def test_shuffled_captions_fail(data):
    drawn, images = data
    captions = [s.caption for s in drawn]
    shuffled = captions[1:] + captions[:1]
    assert cc.summarize(cc.check_batch(images, shuffled))["pass_rate"] <= 0.02


def _mutations(scene: sc.Scene) -> dict[str, str]:
    """Captions that differ from the scene's in one part."""
    out = {}
    clauses = list(scene.clauses)
    used = {col for c in clauses for col in c.colours} | {scene.background.colour}
    spare = next(c for c in sc.SHAPE_COLOURS if c not in used)
    taken = {cell for c in clauses for cell in c.cells()}
    free = [cell for cell in sc.CELLS.values() if cell not in taken]

    def caption(new: list[sc.Clause], bg: sc.Background = scene.background) -> str:
        return ", ".join([c.text for c in new] + [bg.text])

    first = clauses[0]
    out["colour"] = caption([dataclasses.replace(first, colour=spare)] + clauses[1:])
    group = next((c for c in clauses if c.type == "group" and c.size == "small"), None)
    if group is not None:
        other = 1 + group.count % 3  # 1 -> 2 -> 3 -> 1
        i = clauses.index(group)
        out["count"] = caption(clauses[:i] + [dataclasses.replace(group, count=other)] + clauses[i + 1:])
    placed = next((c for c in clauses if c.type != "stripe"), None)
    if placed is not None and free:
        i = clauses.index(placed)
        out["cell"] = caption(clauses[:i] + [dataclasses.replace(placed, cell=free[0])] + clauses[i + 1:])
    stripe = next((c for c in clauses if c.type == "stripe"), None)
    if stripe is not None:
        i = clauses.index(stripe)
        moved = dataclasses.replace(stripe, band=(stripe.band + 1) % 3)
        out["band"] = caption(clauses[:i] + [moved] + clauses[i + 1:])
    other_bg = next(b for b in sc.BACKGROUNDS if b not in used)
    out["background"] = caption(clauses, dataclasses.replace(scene.background, colour=other_bg))
    return out


def test_one_changed_part_fails(data):
    drawn, images = data
    tried: dict[str, int] = {}
    failed: dict[str, int] = {}
    for scene, image in zip(drawn[:50], images[:50]):
        for part, caption in _mutations(scene).items():
            tried[part] = tried.get(part, 0) + 1
            failed[part] = failed.get(part, 0) + (not cc.check_image(image, caption).passed)
    assert set(tried) == {"colour", "count", "cell", "band", "background"}
    for part in tried:
        assert failed[part] == tried[part], (part, failed[part], tried[part])


def test_kind_size_and_texture_are_diagnosed(data):
    drawn, images = data
    kind_swaps = size_swaps = texture_swaps = 0
    for scene, image in zip(drawn[:50], images[:50]):
        clauses = list(scene.clauses)
        for i, c in enumerate(clauses):
            if c.type == "group":
                swapped = dataclasses.replace(c, kind=sc.KINDS[(sc.KINDS.index(c.kind) + 1) % 4])
                res = cc.check_image(image, ", ".join([x.text for x in clauses[:i] + [swapped] + clauses[i + 1:]]
                                                      + [scene.background.text]))
                assert res.passed and not res.strict, res  # the checker's colour/count hold, the kind does not
                kind_swaps += 1
                if c.count == 1:
                    resized = dataclasses.replace(c, size="large" if c.size == "small" else "small")
                    res = cc.check_image(image, ", ".join([x.text for x in clauses[:i] + [resized] + clauses[i + 1:]]
                                                          + [scene.background.text]))
                    assert not res.strict, res
                    size_swaps += 1
                break
        texture = sc.TEXTURES[(sc.TEXTURES.index(scene.background.texture) + 1) % 3]
        res = cc.check_image(image, ", ".join([c.text for c in clauses] + [sc.Background(scene.background.colour,
                                                                                          texture).text]))
        assert res.passed and not res.texture_ok, res
        texture_swaps += 1
    assert kind_swaps > 25 and size_swaps > 10 and texture_swaps == 50


def test_a_blank_image_shows_only_its_background():
    image = torch.tensor(sc.PALETTE["grey"]).view(3, 1, 1).expand(3, 256, 256)
    res = cc.check_image(image, "two small red circles top left, on grey")
    assert res.background_ok and not res.passed and res.clauses[0].found == 0
    assert cc.check_image(image, "a red stripe across the top, on black").passed is False


def test_components_are_four_connected():
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[1:4, 1:4] = True          # a square
    mask[4, 4] = True              # touches it only diagonally: its own component
    mask[6:11, 6:11] = True        # a ring
    mask[8, 8] = False
    mask[0, 8:12] = True           # a bar
    labels = cc.components(mask)
    assert int((labels >= 0).sum()) == int(mask.sum())
    assert len(labels[labels >= 0].unique()) == 4
    found = cc.blobs(mask)
    ring = next(b for b in found if b.area == 24 / 144)
    assert ring.hole and cc.kind_of(ring) == "ring"
    assert sorted(round(b.area * 144) for b in found) == [1, 4, 9, 24]
