"""Evaluate stage: policies vs teacher rollouts, fixed baselines at the controller's ratio, outputs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from flux2ttr.routing.controller import TTRController, save_controller
from flux2ttr.routing.evaluate import EvaluateConfig, count_mask, evaluate
from flux2ttr.routing.quality import QualityConfig, QualityLoss
from flux2ttr.routing.rollouts import RolloutConfig, RolloutStore, record_rollouts, write_store
from flux2ttr.routing.student_rollout import make_router, run_student_rollout
from flux2ttr.routing.training import ControllerTrainConfig, controller_inputs
from flux2ttr.students.artifacts import file_sha256, load_students
from helpers.outputs import check_metrics_file, check_png, details_of
from helpers.rollouts import PROMPTS, TEACHER, make_students, make_teacher, write_params
from stages.evaluate import run_stage

ROLLOUT = dict(num_prompts=3, eval_prompts=2, steps=2, height=32, width=48, seed=11, batch_size=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ev")
    teacher = make_teacher(tmp / "teacher")
    keys = teacher.single_layer_keys
    ready = {keys[0]: True, keys[1]: True, keys[2]: False}
    students = make_students(tmp / "students.safetensors", teacher, ready, seed=1)
    rcfg = RolloutConfig(**ROLLOUT)
    rollouts, _ = record_rollouts(teacher, rcfg, PROMPTS, show_progress=False)
    store = write_store(tmp / "rollouts", rollouts, setting=rcfg.setting(), teacher=teacher.identity)
    torch.manual_seed(0)
    ctrl = TTRController(ControllerTrainConfig(), keys)
    ctrl_path = tmp / "controller.safetensors"
    save_controller(ctrl_path, ctrl, layer_keys=keys, student_sha256=file_sha256(students), eligible=keys[:2],
                    train_config={}, metrics={})
    return teacher, keys, students, store, ctrl, ctrl_path


def test_count_mask_exact_counts_and_forced_columns():
    elig = [0, 2, 3]
    fixed = count_mask(4, 3, elig, 5, generator=None)
    assert fixed[:, elig].sum() == 4 and fixed[:, [1, 4]].all()
    assert fixed[:, elig].tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    rnd = count_mask(4, 3, elig, 5, generator=torch.Generator().manual_seed(0))
    assert rnd[:, elig].sum() == 4 and rnd[:, [1, 4]].all()
    assert count_mask(0, 3, elig, 5, generator=None)[:, elig].sum() == 0
    with pytest.raises(ValueError):
        count_mask(10, 3, elig, 5, generator=None)


def _cfg(**kw):
    return EvaluateConfig(quality_speed=[0.2, 0.8], random_repeats=1, grid_rollouts=2, **kw)


def test_evaluate_metrics_structure_and_values(setup):
    teacher, keys, students, store_path, ctrl, _ = setup
    art, store, quality = load_students(students), RolloutStore(store_path), QualityLoss(QualityConfig())
    metrics, images, rollouts = evaluate(_cfg(), teacher, art, store, ctrl, keys, quality, show_progress=False)
    assert metrics["teacher"]["max_abs_latent_diff_vs_store"] == 0.0  # router pass-through is the teacher
    assert metrics["teacher"]["seconds_per_image"] > 0
    assert {(p["mode"], p["quality_speed"]) for p in metrics["points"]} == {
        (m, q) for m in ("stochastic", "threshold") for q in (0.2, 0.8)}
    for p in metrics["points"]:
        assert 0.0 <= p["full_ratio"] <= 1.0 and p["quality_loss"] >= 0 and p["seconds_per_image"] > 0
        assert set(p["quality_terms"]) and len(p["per_rollout_quality_loss"]) == 2
    ref, base = metrics["reference"], metrics["baselines"]
    assert base["all_student"]["full_ratio"] == 0.0
    assert base["random"]["full_ratio"] == pytest.approx(ref["full_ratio"])
    assert base["fixed_schedule"]["full_ratio"] == pytest.approx(ref["full_ratio"])
    for name, c in metrics["comparison"].items():
        assert c["margin"] == pytest.approx(base[name]["quality_loss"] - ref["quality_loss"])
        assert c["controller_beats"] == (c["margin"] > 0)
    assert metrics["forced_full_layers"] == [keys[2]]
    assert len(images["controller"]) == len(rollouts) == 2

    # all-student value, recomputed directly: one rollout per eval prompt, mean quality loss
    router = make_router(teacher, art.layers)
    try:
        losses = []
        for ro in store.entries("eval"):
            masks = torch.ones(2, 3, dtype=torch.bool)
            masks[:, :2] = False
            res = run_student_rollout(teacher, router, [ro.prompt], store.sampler_config(), masks, keys,
                                      seeds=[ro.seed])
            losses.append(float(quality(res.images, ro.image[None], student_latents=res.latents,
                                        teacher_latents=ro.latents[None], prompts=[ro.prompt])[0]))
    finally:
        router.uninstall()
    assert base["all_student"]["quality_loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert base["all_student"]["quality_loss"] > 0


def test_full_attention_policy_scores_zero(setup):
    teacher, keys, students, store_path, ctrl, _ = setup
    full = TTRController(ControllerTrainConfig(), keys)
    with torch.no_grad():
        for p in full.parameters():
            p.zero_()
        last = [m for m in full.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.bias.fill_(50.0)  # sigmoid ~ 1: every layer full attention
    store = RolloutStore(store_path)
    assert (full(*controller_inputs(store).values()) > 40).all()
    metrics, _, _ = evaluate(_cfg(modes=["threshold"]), teacher, load_students(students), store, full, keys,
                             QualityLoss(QualityConfig()), show_progress=False)
    for p in metrics["points"]:
        assert p["full_ratio"] == 1.0 and p["quality_loss"] == pytest.approx(0.0, abs=1e-6)


def test_run_stage_writes_metrics_plot_and_grid(setup, tmp_path, monkeypatch):
    teacher, keys, students, store_path, _, ctrl_path = setup
    monkeypatch.chdir(tmp_path)
    shutil.copytree(teacher.folder, tmp_path / "teacher")
    params = write_params(tmp_path / "params.yaml", {
        "teacher": dict(out_dir="teacher", **TEACHER),
        "evaluate": dict(students=str(students), controller=str(ctrl_path), rollouts=str(store_path),
                         quality_speed=[0.5], modes=["threshold"], random_repeats=1),
        "quality": {},
    })
    run_stage(params)
    small = check_metrics_file(tmp_path / "metrics" / "eval.json")
    metrics = details_of(tmp_path / "metrics" / "eval.json")
    assert set(metrics["comparison"]) == {"all_student", "random", "fixed_schedule"}
    assert "config" not in metrics  # the config is params.yaml's (and dvc.lock's)
    ref, c = metrics["reference"], metrics["comparison"]
    assert small["quality_loss"] == ref["quality_loss"] and small["full_ratio"] == ref["full_ratio"]
    assert small["speedup"] == pytest.approx(metrics["teacher"]["seconds_per_image"] / ref["seconds_per_image"])
    assert small["speedup"] == pytest.approx(ref["speedup_vs_teacher"])
    assert small["margin"] == {k: c[k]["relative_margin"] for k in c} and small["seconds"] > 0
    check_png(tmp_path / "plots" / "evaluate" / "quality_vs_speed.png")
    plot = Image.open(tmp_path / "plots" / "evaluate" / "quality_vs_speed.png")
    assert plot.size[0] > 100 and plot.size[1] > 100
    grid = Image.open(tmp_path / "plots" / "evaluate" / "grid.png")
    assert grid.size == (48 * 4, 14 + 32 * 2)  # teacher + 3 policies, 2 eval rollouts
    arr = torch.tensor(np.array(grid.convert("RGB"))).float() / 255
    ro = RolloutStore(store_path).entries("eval")[0]
    torch.testing.assert_close(arr[14:46, :48].permute(2, 0, 1), ro.image, atol=1 / 255 + 1e-6, rtol=0)
    table = (tmp_path / "plots" / "evaluate" / "quality_vs_speed.csv").read_text().splitlines()
    assert table[0].startswith("policy,")
    policies = [row.split(",")[0] for row in table[1:]]
    # one series per policy: the controller's points (one per quality_speed), each fixed policy, the teacher
    assert policies == ["controller_threshold", "all_student", "fixed_schedule", "random", "teacher"]


@pytest.mark.gpu
def test_evaluate_on_cuda_checks_the_stored_rollouts(tmp_path):
    """The teacher on CUDA: rollouts are stored on the host and evaluate's timing pass, on the device, compares
    its latents with them (the comparison once mixed devices); the pass-through is the stored teacher to fp32
    rounding of the same device."""
    from flux2ttr.teachers.teacher import TeacherConfig, load_teacher, write_tiny_teacher

    cfg = TeacherConfig(out_dir=str(tmp_path / "teacher"), device="cuda", **TEACHER)
    write_tiny_teacher(cfg)
    teacher = load_teacher(cfg)
    keys = teacher.single_layer_keys
    students = make_students(tmp_path / "students.safetensors", teacher, {k: True for k in keys}, seed=1)
    rcfg = RolloutConfig(**ROLLOUT)
    rollouts, _ = record_rollouts(teacher, rcfg, PROMPTS, show_progress=False)
    assert all(ro.latents.device.type == "cpu" for ro in rollouts)
    store = RolloutStore(write_store(tmp_path / "rollouts", rollouts, setting=rcfg.setting(), teacher=teacher.identity))
    ctrl = TTRController(ControllerTrainConfig(), keys)
    metrics, _, _ = evaluate(_cfg(), teacher, load_students(students), store, ctrl, keys,
                             QualityLoss(QualityConfig(device="cuda")), show_progress=False)
    assert metrics["teacher"]["max_abs_latent_diff_vs_store"] == 0.0


def test_caption_check_rates_drawn_scenes_and_skips_other_prompts():
    """caption_check on scene captions: the true scenes' pixels pass, each scene drawn for the next caption
    fails; prompts that are not scene captions give None."""
    from types import SimpleNamespace

    from flux2ttr.routing.evaluate import caption_check
    from flux2ttr.teachers import scenes as sc

    scenes = sc.held_out_scenes(sc.SceneConfig(), 4)
    drawn = list(sc.render(scenes))  # [3, 256, 256] each, in [0, 1]
    rollouts = [SimpleNamespace(prompt=s.caption, image=img) for s, img in zip(scenes, drawn)]
    images = {"controller": drawn, "random": drawn[1:] + drawn[:1]}
    res = caption_check(rollouts, images, ("controller", "all_student", "random"))
    assert res == {"images": 4, "teacher": 1.0, "controller": 1.0, "random": 0.0}
    other = [SimpleNamespace(prompt="a red fox in snow", image=drawn[0])]
    assert caption_check(other, {"controller": drawn[:1]}, ("controller",)) is None
