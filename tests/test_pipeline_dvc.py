"""The DVC pipeline as a user runs it: `dvc repro capture` in a temporary copy of the repository,
then a second `dvc repro` that does nothing; and what `dvc plots show --json` makes of the plot tables
the stages write (one series per layer, one per policy, the PNGs as images)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.outputs import check_metrics_file, check_png

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # dvc.yaml calls `python`: make it this interpreter (the test venv) whatever PATH says.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("COMET_API_KEY", "")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture()
def repo_copy(tmp_path: Path) -> Path:
    """A fresh git+DVC checkout of the working tree (tracked files and those git would add), with a
    smaller capture so the test stays fast."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True)
    dst = tmp_path / "repo"
    for rel in files.stdout.splitlines():
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["sampler"]["steps"] = 2
    params["capture"]["budget_mib"] = 8
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prompt_file = dst / params["capture"]["prompts"]  # the default teacher's (the trained one's scene captions)
    prompt_file.write_text(json.dumps(json.loads(prompt_file.read_text())[:2]))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True)
    return dst


@pytest.mark.slow
def test_dvc_repro_capture_then_noop(repo_copy: Path):
    from flux2ttr.traces.store import TraceStore

    _run([sys.executable, "-m", "dvc", "repro", "capture"], repo_copy)
    store = TraceStore.open(repo_copy / "traces/capture.zarr")
    assert store.layers == ["single_blocks.0", "single_blocks.1", "single_blocks.2", "single_blocks.3"]
    assert store.count() > 0
    assert store.attrs["teacher"]["kind"] == "trained"  # the default teacher
    metrics = check_metrics_file(repo_copy / "metrics/capture.json")
    assert metrics["kept"] == store.count()
    assert (repo_copy / "dvc.lock").is_file()

    second = _run([sys.executable, "-m", "dvc", "repro", "capture"], repo_copy)
    text = second.stdout + second.stderr
    assert "didn't change" in text and "Running stage" not in text, text
    status = _run([sys.executable, "-m", "dvc", "status", "capture"], repo_copy)
    assert "up to date" in (status.stdout + status.stderr).lower()


def _vega(shown: dict, name: str) -> dict:
    (plot,) = shown["data"][name]
    assert plot["type"] == "vega", plot
    return plot["content"]


LAYERS = ["double_blocks.0", "single_blocks.0", "single_blocks.1", "single_blocks.2", "single_blocks.10"]
STEPS = [50, 100, 150]


def _plot_tables(tmp_path: Path) -> dict:
    """A bare DVC repository in ``tmp_path`` (dvc.yaml, params, the plot templates) holding the plot tables and
    PNGs the stages write, made by the stages' own writers; returns the params."""
    from flux2ttr.distill.trainer import PLOT_METRICS, write_plots
    from flux2ttr.routing.evaluate import plot_quality_vs_speed


    for rel in ("dvc.yaml", "params.yaml", ".dvc/config", *[str(p.relative_to(REPO)) for p in
                                                           (REPO / ".dvc" / "plots").glob("*.json")]):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, tmp_path / rel)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, capture_output=True)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    layers, steps = LAYERS, STEPS
    history = [{"step": s, "layer": k, **{m: 0.1 / (1 + s + i) for m in PLOT_METRICS}}
               for s in steps for i, k in enumerate(layers)]
    history.append({"step": 200, "layer": layers[0], **{m: 1e-3 for m in PLOT_METRICS}})  # one layer only
    write_plots(tmp_path / params["distill"]["plots_dir"], history, layers)
    point = {"quality_terms": {}, "seconds_per_image": 1.0, "per_rollout_quality_loss": []}
    details = {
        "teacher": {"seconds_per_image": 2.0},
        "points": [{**point, "mode": mode, "quality_speed": qs, "full_ratio": 1 - qs / (2 if mode == "stochastic" else 1),
                    "quality_loss": 0.1 * qs} for mode in ("stochastic", "threshold") for qs in (0.25, 0.5, 0.75)],
        "baselines": {name: {**point, "full_ratio": 0.5, "quality_loss": q}
                      for name, q in (("all_student", 0.3), ("fixed_schedule", 0.2), ("random", 0.25))},
    }
    ev = params["evaluate"]
    plot_quality_vs_speed(details, tmp_path / ev["plot"], tmp_path / ev["plot_table"])
    shutil.copy2(tmp_path / ev["plot"], tmp_path / ev["grid"])  # any PNG stands in for the image grid

    return params


def test_dvc_plots_show_one_series_per_layer_and_policy(tmp_path: Path):
    """dvc.yaml's plot definitions on the tables the stages write: every distill table is drawn against its
    ``step`` column with one line per layer (whatever layers the teacher has: no column list anywhere), the
    quality-vs-speed table one series per policy, and the PNGs come back as images."""
    from flux2ttr.distill.trainer import PLOT_METRICS

    params = _plot_tables(tmp_path)
    layers, steps = LAYERS, STEPS
    ev = params["evaluate"]
    proc = _run([sys.executable, "-m", "dvc", "plots", "show", "--json"], tmp_path)
    shown = json.loads(proc.stdout)
    assert not shown.get("errors"), shown["errors"]
    plots_dir = params["distill"]["plots_dir"]
    for metric in PLOT_METRICS:
        spec = _vega(shown, f"{plots_dir}/{metric}.csv")
        enc = spec["encoding"]
        assert (enc["x"]["field"], enc["y"]["field"], enc["color"]["field"]) == ("step", metric, "layer")
        values = spec["data"]["values"]
        series = {}
        for v in values:
            series.setdefault(v["layer"], []).append(int(v["step"]))  # the step column, not a row index
        assert list(series) == layers  # one line per layer, coloured in layer order
        assert series == {k: steps + ([200] if k == layers[0] else []) for k in layers}
    spec = _vega(shown, ev["plot_table"])
    enc = spec["encoding"]
    assert (enc["x"]["field"], enc["y"]["field"], enc["color"]["field"]) == ("full_ratio", "quality_loss", "policy")
    policies = {}
    for v in spec["data"]["values"]:
        policies.setdefault(v["policy"], []).append(float(v["full_ratio"]))
    assert {k: len(v) for k, v in policies.items()} == {
        "controller_stochastic": 3, "controller_threshold": 3, "all_student": 1, "fixed_schedule": 1, "random": 1,
        "teacher": 1}
    for image in (f"{plots_dir}/validation.png", ev["plot"], ev["grid"]):
        (plot,) = shown["data"][image]
        assert plot["type"] == "image", plot
        check_png(plot["url"])


def test_offline_plots_page_needs_no_internet_and_every_chart_draws(tmp_path: Path):
    """`flux2ttr offline-plots` then `dvc plots show`: the page loads no script from anywhere (the libraries
    are inline), every Vega chart is on it, and each chart's spec, compiled by the Vega-Lite version the page
    carries, draws one line per layer (distill) or one series per policy (quality vs speed)."""
    import vl_convert
    from click.testing import CliRunner

    from flux2ttr import offline_plots
    from flux2ttr.cli import main
    from flux2ttr.distill.trainer import PLOT_METRICS

    _plot_tables(tmp_path)
    res = CliRunner().invoke(main, ["offline-plots", "--repo", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "plots/offline.html" in (tmp_path / ".dvc" / "config.local").read_text()
    _run([sys.executable, "-m", "dvc", "plots", "show"], tmp_path)
    html = (tmp_path / "dvc_plots" / "index.html").read_text()
    assert "<script src" not in html and "cdn.jsdelivr" not in html and "https://cdn" not in html
    assert "window.vegaEmbed=" in html
    shown = json.loads(_run([sys.executable, "-m", "dvc", "plots", "show", "--json"], tmp_path).stdout)
    vega = {name: p[0]["content"] for name, p in shown["data"].items() if p[0]["type"] == "vega"}
    assert len(vega) == len(PLOT_METRICS) + 1 and html.count("vegaEmbed('#") == len(vega)
    for name, spec in vega.items():
        svg = vl_convert.vegalite_to_svg(spec, vl_version=offline_plots.VEGA_LITE_VERSION)
        lines = svg.count('aria-roledescription="line mark"') + svg.count('aria-roledescription="point mark"')
        assert lines >= (len(LAYERS) if "distill" in name else 5), (name, lines)


def test_offline_plots_outside_a_dvc_repository_says_where(tmp_path: Path):
    from click.testing import CliRunner

    from flux2ttr.cli import main

    res = CliRunner().invoke(main, ["offline-plots", "--repo", str(tmp_path)])
    assert res.exit_code == 1 and "is not a DVC repository" in res.output


@pytest.mark.slow
@pytest.mark.comfyui
def test_dvc_repro_end_to_end_with_the_comfyui_teacher(repo_copy: Path, tmp_path: Path):
    """Every stage on the comfyui teacher: the tiny teacher's files (written outside the repository, as a
    user's ComfyUI models are) loaded and run by the real ComfyUI, in a fresh copy of the repository."""
    from flux2ttr.routing.rollouts import RolloutStore
    from flux2ttr.teachers.teacher import TeacherConfig, write_tiny_teacher
    from flux2ttr.traces.store import TraceStore
    from helpers.comfy import comfyui_path

    models = write_tiny_teacher(TeacherConfig(kind="tiny", out_dir=str(tmp_path / "models")))
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["teacher"].update(kind="comfyui", out_dir="teachers/comfyui", transformer=str(models / "flux2_tiny.safetensors"),
                             text_encoder=str(models / "tiny_codec.safetensors"), vae=str(models / "tiny_codec.safetensors"),
                             comfyui_path=str(comfyui_path()))
    params["sampler"].update(steps=2, height=64, width=64)
    params["capture"].update(budget_mib=64)
    params["distill"].update(steps=24, min_updates=8, val_every=8, checkpoint_every=24, progress=False)
    params["rollout"].update(num_prompts=3, eval_prompts=1, steps=2, height=64, width=64)
    params["controller"].update(iterations=2, group_size=2, checkpoint_every=0, metrics_window=2)
    params["evaluate"].update(quality_speed=[0.5], modes=["threshold"], random_repeats=1, grid_rollouts=1)
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prompt_file = repo_copy / params["capture"]["prompts"]
    prompt_file.write_text(json.dumps(json.loads((REPO / params["capture"]["prompts"]).read_text())[:3]))
    subprocess.run(["git", "commit", "-qam", "comfyui teacher"], cwd=repo_copy, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})

    proc = _run([sys.executable, "-m", "dvc", "repro"], repo_copy)
    text = proc.stdout + proc.stderr
    for stage in ("teacher", "capture", "distill", "rollout", "train_controller", "evaluate"):
        assert f"Running stage '{stage}'" in text, text
    identity = json.loads((repo_copy / "teachers/comfyui/identity.json").read_text())
    assert identity["kind"] == "comfyui" and identity["files"]["transformer"]["path"] == str(models / "flux2_tiny.safetensors")
    store = TraceStore.open(repo_copy / "traces/capture.zarr")
    assert store.attrs["teacher"]["sha256"] == identity["sha256"] and store.count() == 3 * 2 * 4
    rollouts = RolloutStore(repo_copy / "rollouts/teacher")
    assert rollouts.teacher["sha256"] == identity["sha256"] and len(rollouts) == 3
    for name in ("distill", "controller", "eval"):
        check_metrics_file(repo_copy / f"metrics/{name}.json")
    details = json.loads((repo_copy / "metrics/eval_details.json").read_text())
    assert details["teacher"]["max_abs_latent_diff_vs_store"] == 0.0  # the stored rollouts are this teacher's
    # the default prompts are scene captions: the checker's pass rates (the controller's also a DVC metric)
    check = details["caption_check"]
    assert check["images"] == 1 and set(check) >= {"teacher", "controller", "all_student", "random"}
    assert json.loads((repo_copy / "metrics/eval.json").read_text())["caption_pass"] == check["controller"]
    from PIL import Image

    with Image.open(repo_copy / "plots/evaluate/grid.png") as grid:  # teacher | controller | all-student | random
        assert grid.format == "PNG" and grid.size[0] >= 4 * 64, grid.size
