"""``benchmarks/teacher_checker.py`` on the shipped file: each row is the checker run of
:func:`flux2ttr.teachers.train_teacher.evaluate` at that setting (the same pass rates), the table is printed,
and a schedule shift changes the samples."""

from __future__ import annotations

import json

from benchmarks import teacher_checker as bench
from flux2ttr.teachers import scenes
from flux2ttr.teachers import train_teacher as tt
from flux2ttr.teachers.teacher import TeacherConfig
from flux2ttr.teachers.trained import load_trained_teacher, write_trained_teacher


def test_rows_are_the_checkers_rates_at_each_setting(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = bench.main(["--captions", "4", "--steps", "2", "--guidance", "1,3", "--mu", "auto,0.5", "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    assert [(r["steps"], r["guidance"], r["mu"]) for r in rows] == [(2, 1.0, None), (2, 1.0, 0.5), (2, 3.0, None),
                                                                    (2, 3.0, 0.5)]
    tcfg = TeacherConfig(kind="trained", out_dir=str(tmp_path / "teacher"))
    write_trained_teacher(tcfg)
    teacher = load_trained_teacher(tcfg)
    images = {}
    for r in rows:
        ref, images[(r["guidance"], r["mu"])], _ = tt.evaluate(teacher, scenes.SceneConfig(), 4, steps=2,
                                                               guidance=r["guidance"], seed=0, mu=r["mu"])
        assert all(r[k] == ref[k] for k in ("pass_rate", "clause_count_rate", "clause_colour_rate", "images")), r
        assert r["images"] == 4 and r["seconds"] > 0
    assert (images[(1.0, None)] - images[(1.0, 0.5)]).abs().max() > 0.05  # the shift reached the sampler
    text = capsys.readouterr().out
    assert "| steps | guidance | mu | pass |" in text and text.count("\n| 2 | ") == 4
