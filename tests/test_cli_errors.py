"""A config or input error in a stage is one line ``<stage>: <message>`` on stderr and exit status 1,
whether the stage runs as DVC runs it (``python -m stages.<name>``) or through the ``flux2ttr`` CLI;
``FLUX2TTR_DEBUG=1`` / ``--debug`` keep the traceback, and a bug always shows its traceback.

Each test runs in a temp copy of the project (``stages/`` and ``params.yaml``), never in the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BAD_BATCH = "  batch_size: 4           # prompts per sampler batch\n"


@pytest.fixture
def project(tmp_path) -> Path:
    """A temp project: the checkout's ``stages/`` and ``params.yaml`` (no data, no outputs)."""
    shutil.copytree(REPO / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def _set_capture_batch_size(project: Path, text: str) -> None:
    params = project / "params.yaml"
    src = params.read_text()
    assert src.count(BAD_BATCH) == 1, "params.yaml's capture.batch_size line changed; update this test"
    params.write_text(src.replace(BAD_BATCH, f"  batch_size: {text}\n"))


def _run(project: Path, *args: str, debug: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FLUX2TTR_DEBUG"}
    # the flux2ttr under test, also where it is not installed (the temp project has only stages/)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    if debug is not None:
        env["FLUX2TTR_DEBUG"] = debug
    return subprocess.run([sys.executable, *args], cwd=project, env=env, capture_output=True, text=True, timeout=300)


def _one_line(res: subprocess.CompletedProcess, prefix: str) -> str:
    assert res.returncode == 1, (res.returncode, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


def test_dvc_stage_bad_params_is_one_line(project):
    _set_capture_batch_size(project, '"4"')
    res = _run(project, "-m", "stages.capture")
    line = _one_line(res, "capture: ")
    assert line == ("capture: params.yaml: capture.batch_size = '4' (a string): expected an integer; "
                    "write 4 without quotes")
    # an explicit params path (what dvc.yaml could pass) is named as given
    res = _run(project, "-m", "stages.capture", str(project / "params.yaml"))
    assert _one_line(res, "capture: ").startswith(f"capture: {project / 'params.yaml'}: capture.batch_size = '4'")


def test_dvc_stage_debug_keeps_the_traceback(project):
    _set_capture_batch_size(project, "true")
    for debug in ("1", "true"):
        res = _run(project, "-m", "stages.capture", debug=debug)
        assert res.returncode != 0
        assert "Traceback (most recent call last)" in res.stderr, res.stderr
        assert "ConfigError: params.yaml: capture.batch_size = true: expected an integer" in res.stderr
    res = _run(project, "-m", "stages.capture", debug="0")  # 0 means off
    _one_line(res, "capture: params.yaml: capture.batch_size = true")


def test_dvc_stage_duplicate_key_and_missing_input_are_one_line(project):
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("  queries: 64 ", "  queries: 64\n  queries: 32 ", 1))
    line = _one_line(_run(project, "-m", "stages.capture"), "capture: ")
    assert line.startswith("capture: params.yaml: duplicate key 'queries' on line "), line
    # a valid params file whose prompt file is missing (the temp project has no data/): an input error
    shutil.copy(REPO / "params.yaml", params)
    line = _one_line(_run(project, "-m", "stages.capture"), "capture: ")
    assert "data/prompts/scenes_capture.json" in line, line


def test_cli_stage_bad_params_is_one_line_and_debug_shows_traceback(project):
    _set_capture_batch_size(project, '"4"')
    params = str(project / "params.yaml")
    res = _run(project, "-m", "flux2ttr.cli", "capture", "--params", params)
    assert _one_line(res, "capture: ") == (f"capture: {params}: capture.batch_size = '4' (a string): expected an "
                                           "integer; write 4 without quotes")
    for args in (["--debug", "capture", "--params", params], ["capture", "--params", params, "--debug"]):
        res = _run(project, "-m", "flux2ttr.cli", *args)
        assert res.returncode != 0 and "Traceback (most recent call last)" in res.stderr, (args, res.stderr)
    res = _run(project, "-m", "flux2ttr.cli", "capture", "--params", params, debug="1")
    assert res.returncode != 0 and "Traceback (most recent call last)" in res.stderr


def test_cli_train_controller_names_its_command(project):
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("  iterations: 24 ", '  iterations: "24" ', 1))
    res = _run(project, "-m", "flux2ttr.cli", "train_controller", "--params", str(params))
    assert _one_line(res, "train_controller: ").endswith("controller.iterations = '24' (a string): expected an "
                                                         "integer; write 24 without quotes")
    res = _run(project, "-m", "stages.train_controller")
    _one_line(res, "train_controller: params.yaml: controller.iterations = '24'")


def test_a_bug_keeps_its_traceback(project):
    """Exceptions that are not the project's config/input errors are bugs: full traceback, both ways."""
    (project / "stages" / "capture.py").write_text(
        "from pathlib import Path\n\nfrom stages import main\n\n\n"
        "def run_stage(params_path: Path) -> None:\n"
        "    raise RuntimeError('a bug, not an input error')\n\n\n"
        "if __name__ == '__main__':\n    main(run_stage)\n")
    for args in (["-m", "stages.capture"], ["-m", "flux2ttr.cli", "capture", "--params", str(project / "params.yaml")]):
        res = _run(project, *args)
        assert res.returncode != 0
        assert "Traceback (most recent call last)" in res.stderr, (args, res.stderr)
        assert "RuntimeError: a bug, not an input error" in res.stderr


def test_distill_missing_teacher_is_one_line(project):
    """DistillError (matched by class name: its module does not mix in Flux2TTRError) is an input error too."""
    line = _one_line(_run(project, "-m", "stages.distill"), "distill: ")
    assert line.startswith("distill: teachers/tiny/flux2_tiny.safetensors: trained teacher not found"), line


@pytest.mark.parametrize(
    "module, name, base",
    [
        ("flux2ttr.config", "ConfigError", ValueError),
        ("flux2ttr.checkpoint", "CheckpointError", ValueError),
        ("flux2ttr.teachers.teacher", "TeacherError", ValueError),
        ("flux2ttr.teachers.prompts", "PromptFileError", ValueError),
        ("flux2ttr.traces.store", "TraceStoreError", RuntimeError),
        ("flux2ttr.students.artifacts", "ArtifactError", ValueError),
        ("flux2ttr.distill.trainer", "DistillError", RuntimeError),
        ("flux2ttr.routing.rollouts", "RolloutStoreError", ValueError),
        ("flux2ttr.routing.controller", "ControllerArtifactError", ValueError),
        ("flux2ttr.routing.training", "ControllerTrainError", RuntimeError),
        ("flux2ttr.routing.evaluate", "EvaluateError", RuntimeError),
        ("flux2ttr.routing.quality", "QualityDependencyError", ImportError),
        ("flux2ttr.routing.quality", "QualityWeightsError", FileNotFoundError),
        ("flux2ttr.comfy.utility_nodes", "UtilityInputError", ValueError),
    ],
)
def test_project_error_classes_are_input_errors_and_keep_their_bases(module, name, base):
    import importlib

    from flux2ttr.config import is_input_error

    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, base)
    assert is_input_error(cls("x"))
    assert not is_input_error(base("x")) and not is_input_error(RuntimeError("x"))
