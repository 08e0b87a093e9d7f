"""The procedural captioned scenes: deterministic, captions that parse back to their clauses, a held-out
split no training scene falls into, clauses in their own cells, and drawn pixels where the caption says."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from flux2ttr.config import ConfigError
from flux2ttr.teachers import scenes as sc
from flux2ttr.teachers.caption_encoder import CaptionTokenizer

CFG = sc.SceneConfig()


@pytest.fixture(scope="module")
def drawn() -> list[sc.Scene]:
    return [sc.training_scene(CFG, i) for i in range(400)]


def test_deterministic_and_varied(drawn):
    assert [sc.training_scene(CFG, i) for i in range(20)] == drawn[:20]
    assert sc.sample_scene(CFG, 12345) == sc.sample_scene(CFG, 12345)
    assert len({s.caption for s in drawn}) >= 390  # a combinatorial set: almost no caption repeats
    other = [sc.training_scene(dataclasses.replace(CFG, seed=1), i) for i in range(20)]
    assert sum(a.caption == b.caption for a, b in zip(other, drawn[:20])) <= 1


def test_caption_parses_back_and_uses_only_the_vocabulary(drawn):
    tok = CaptionTokenizer(sc.vocabulary())
    for s in drawn:
        clauses, bg = sc.parse_caption(s.caption)
        assert (clauses, bg) == (list(s.clauses), s.background)
        assert 0 not in tok.ids(s.caption), s.caption  # no <unk>
    assert drawn[0].caption.count(",") == len(drawn[0].clauses)  # "clause, clause, on bg"


def test_grammar_covers_every_part(drawn):
    kinds = {c.kind for s in drawn for c in s.clauses if c.type == "group"}
    assert kinds == set(sc.KINDS)
    assert {c.type for s in drawn for c in s.clauses} == {"group", "overlap", "stripe"}
    assert {c.count for s in drawn for c in s.clauses if c.type == "group"} == {1, 2, 3}
    assert {s.background.texture for s in drawn} == set(sc.TEXTURES)
    assert {s.background.colour for s in drawn} == set(sc.BACKGROUNDS)
    assert {len(s.clauses) for s in drawn} == {1, 2, 3}
    cells = {c.cell for s in drawn for c in s.clauses if c.type != "stripe"}
    assert len(cells) == 9


def test_clauses_own_their_cells_and_colours(drawn):
    for s in drawn:
        cells = [cell for c in s.clauses for cell in c.cells()]
        assert len(cells) == len(set(cells)), s.caption
        colours = [col for c in s.clauses for col in c.colours]
        assert len(colours) == len(set(colours)) and s.background.colour not in colours, s.caption
        for c in s.clauses:
            if c.type == "group" and c.size == "large":
                assert c.count == 1
        for sh in s.shapes:  # every shape inside the image and (but stripes) inside one cell
            reach = 1.2 * sh.r
            if "stripe" not in sh.kind:
                assert reach <= sh.x <= 1 - reach and reach <= sh.y <= 1 - reach, (s.caption, sh)
                assert int(sh.x * 3) == int((sh.x - reach) * 3) == int(min(sh.x + reach, 0.9999) * 3), (s.caption, sh)


def test_group_shapes_keep_apart(drawn):
    for s in drawn:
        small = [sh for sh in s.shapes if sh.r < sc.LARGE_RADIUS * 0.5]
        by_colour: dict[str, list[sc.Shape]] = {}
        for sh in small:
            by_colour.setdefault(sh.colour, []).append(sh)
        for group in by_colour.values():
            for i, a in enumerate(group):
                for b in group[i + 1:]:
                    assert math.dist((a.x, a.y), (b.x, b.y)) >= 1.2 * (a.r + b.r) + sc.SHAPE_GAP * 0.9


def test_held_out_split():
    n = 4000
    held = sum(sc.is_held_out(sc.sample_scene(CFG, i), CFG.holdout_percent) for i in range(n))
    assert 0.035 < held / n < 0.065  # ~5%
    for i in range(200):
        assert not sc.is_held_out(sc.training_scene(CFG, i), CFG.holdout_percent)
    evals = sc.held_out_scenes(CFG, 40)
    assert len({s.caption for s in evals}) == 40
    assert all(sc.is_held_out(s, CFG.holdout_percent) and sc.is_held_out(s.caption, CFG.holdout_percent) for s in evals)
    assert evals == sc.held_out_scenes(CFG, 40)
    # the split follows the clause set, not the clause order
    multi = next(s for s in evals if len(s.clauses) > 1)
    flipped = dataclasses.replace(multi, clauses=tuple(reversed(multi.clauses)))
    assert flipped.caption != multi.caption and sc.is_held_out(flipped, CFG.holdout_percent)


def test_render_draws_the_scene():
    scene = sc.Scene(sc.Background("grey"),
                     (sc.Clause("group", "red", kind="circle", size="large", cell=(1, 1)),),
                     (sc.Shape("circle", "red", 0.5, 0.5, sc.LARGE_RADIUS),))
    img = sc.render([scene], 256, 256)
    assert img.shape == (1, 3, 256, 256) and img.dtype == torch.float32
    torch.testing.assert_close(img[0, :, 128, 128], torch.tensor(sc.PALETTE["red"]))
    torch.testing.assert_close(img[0, :, 10, 10], torch.tensor(sc.PALETTE["grey"]))
    red = (img[0] - torch.tensor(sc.PALETTE["red"]).view(3, 1, 1)).norm(dim=0) < 0.05
    area = float(red.float().mean())
    assert abs(area - sc.shape_area("circle", sc.LARGE_RADIUS)) < 0.003  # pi r^2 of the image


def test_render_textures_and_range(drawn):
    img = sc.render(drawn[:24], 128, 128)
    assert img.min() >= 0 and img.max() <= 1
    torch.testing.assert_close(img, sc.render(drawn[:24], 128, 128))  # deterministic, speckles too
    speckled = next(s for s in drawn if s.background.texture == "speckled" and s.background.colour == "grey")
    gradient = next(s for s in drawn if s.background.texture == "gradient" and s.background.colour == "grey")
    plain = sc.Scene(sc.Background("grey"), (), ())
    imgs = sc.render([speckled, gradient, plain], 256, 256)
    corner = imgs[:, :, :40, :40]  # no shape reaches into 40 px of the top-left corner... unless one is there
    assert float(imgs[2].std()) == 0.0
    assert float(imgs[1, :, :20].mean() - imgs[1, :, -20:].mean()) > 0.1  # lighter at the top
    assert float(corner[0].std()) > 0.02 or float(imgs[0].std()) > 0.02


def test_parse_errors():
    for bad in ("a red circle", "two small red circle top left, on grey", "a small red circle top left, on pink",
                "a huge red circle top left, on grey", "a small red circle somewhere, on grey", "on grey"):
        with pytest.raises(sc.CaptionError):
            sc.parse_caption(bad)


def test_config_checks():
    with pytest.raises(ConfigError, match="clause_probs"):
        sc.SceneConfig(clause_probs=[0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match="holdout_percent"):
        sc.SceneConfig(holdout_percent=80)
    with pytest.raises(ConfigError, match="holdout_percent is 0"):
        sc.held_out_scenes(sc.SceneConfig(holdout_percent=0), 1)


def test_crowded_group_falls_back_to_a_spread_layout():
    """Training scene 58138 draws three small shapes that 1000 random placements do not fit (it stopped the
    first GPU training run); the spread layout places them apart and inside their cell."""
    s = sc.training_scene(CFG, 58138)
    group = next(c for c in s.clauses if c.type == "group" and c.count == 3)
    mine = [sh for sh in s.shapes if sh.colour == group.colour]
    assert len(mine) == 3
    for i, a in enumerate(mine):
        r, c = group.cell
        assert c / 3 < a.x - a.r and a.x + a.r < (c + 1) / 3 and r / 3 < a.y - a.r and a.y + a.r < (r + 1) / 3
        for b in mine[i + 1:]:
            assert math.dist((a.x, a.y), (b.x, b.y)) >= 1.2 * (a.r + b.r) + sc.SHAPE_GAP * 0.9


def test_scene_prompts_split_and_the_shipped_prompt_files():
    """scene_prompts: training captions are never held out, held-out ones always are, both distinct and the same
    on every call; the trained teacher's prompt files in data/prompts are what `flux2ttr scene-prompts` writes
    from the default params."""
    import json
    from pathlib import Path

    cfg = sc.SceneConfig()
    train, held = sc.scene_prompts(cfg, "train", 40), sc.scene_prompts(cfg, "held_out", 5)
    assert len(set(train)) == 40 and len(set(held)) == 5
    assert not any(sc.is_held_out(c, cfg.holdout_percent) for c in train)
    assert all(sc.is_held_out(c, cfg.holdout_percent) for c in held)
    assert train == sc.scene_prompts(cfg, "train", 40) and train[:3] == sc.scene_prompts(cfg, "train", 3)
    assert all(sc.is_scene_caption(c) for c in train + held)
    assert not sc.is_scene_caption("a red fox in snow") and not sc.is_scene_caption("two small red circles, on mauve")
    root = Path(__file__).resolve().parents[2]
    assert json.loads((root / "data/prompts/scenes_capture.json").read_text()) == train
    assert json.loads((root / "data/prompts/scenes_controller.json").read_text()) == held
    with pytest.raises(ConfigError, match="split must be one of"):
        sc.scene_prompts(cfg, "test", 3)
    with pytest.raises(ConfigError, match=">= 1"):
        sc.scene_prompts(cfg, "train", 0)


def test_scene_prompts_command_writes_the_split(tmp_path):
    """`flux2ttr scene-prompts OUT --split S --count N` writes scene_prompts of the params' scenes section; a bad
    count is one line naming it."""
    import json

    from click.testing import CliRunner

    from flux2ttr.cli import main

    params = tmp_path / "params.yaml"
    params.write_text("scenes:\n  eval_seed: 7\n")
    out = tmp_path / "p" / "held.json"
    res = CliRunner().invoke(main, ["scene-prompts", str(out), "--split", "held_out", "--count", "3",
                                    "--params", str(params)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text()) == sc.scene_prompts(sc.SceneConfig(eval_seed=7), "held_out", 3)
    assert json.loads(out.read_text()) != sc.scene_prompts(sc.SceneConfig(), "held_out", 3)
    bad = CliRunner().invoke(main, ["scene-prompts", str(out), "--count", "0", "--params", str(params)])
    assert bad.exit_code == 1 and "scene-prompts: the number of captions must be >= 1" in bad.output
