"""``flux2ttr comfy-install`` into a copy of the real ComfyUI, as a user would run it.

ComfyUI's Python is either a real temporary venv (the library really gets installed into it) or an
executable script standing in for it that records its argv (fast, and shows the exact pip command)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flux2ttr.cli import main
from flux2ttr.comfy.install import PYTHON_CANDIDATES, InstallError, find_python, install, pip_command
from helpers.comfy import PACK_DIR, REPO, comfyui_path


@pytest.fixture()
def comfy_copy(tmp_path) -> Path:
    dst = tmp_path / "ComfyUI"
    shutil.copytree(comfyui_path(), dst, ignore=shutil.ignore_patterns("__pycache__", "models", "custom_nodes"))
    return dst


@pytest.fixture()
def artifacts(tmp_path) -> Path:
    d = tmp_path / "artifacts"
    d.mkdir()
    (d / "flux2_ttr.safetensors").write_bytes(b"student-bytes")
    (d / "flux2_ttr_controller.safetensors").write_bytes(b"controller-bytes")
    (d / "notes.txt").write_text("not an artifact")
    return d


def test_cli_links_pack_and_copies_artifacts(comfy_copy, artifacts):
    res = CliRunner().invoke(main, ["comfy-install", str(comfy_copy), "--artifacts", str(artifacts), "--no-pip"])
    assert res.exit_code == 0, res.output
    pack = comfy_copy / "custom_nodes" / "flux2ttr"
    assert pack.is_symlink() and pack.resolve() == PACK_DIR.resolve()
    models = comfy_copy / "models" / "approximate_attention"
    assert sorted(p.name for p in models.iterdir()) == ["flux2_ttr.safetensors", "flux2_ttr_controller.safetensors"]
    assert (models / "flux2_ttr.safetensors").read_bytes() == b"student-bytes"
    assert "linked pack" in res.output and "created model folder" in res.output
    assert res.output.count("copied artifact") == 2
    # a rerun is idempotent and says so
    res = CliRunner().invoke(main, ["comfy-install", str(comfy_copy), "--artifacts", str(artifacts), "--no-pip"])
    assert res.exit_code == 0, res.output
    assert "already linked" in res.output and res.output.count("artifact up to date") == 2
    # a changed artifact is copied again
    (artifacts / "flux2_ttr.safetensors").write_bytes(b"student-v2")
    res = CliRunner().invoke(main, ["comfy-install", str(comfy_copy), "--artifacts", str(artifacts), "--no-pip"])
    assert (models / "flux2_ttr.safetensors").read_bytes() == b"student-v2"
    assert res.output.count("copied artifact") == 1


def test_copy_mode_and_installed_pack_loads_in_comfyui(comfy, comfy_copy, artifacts):
    lines: list[str] = []
    out = install(comfy_copy, artifacts_dir=artifacts, copy_pack=True, echo=lines.append, pip=False)
    pack = out["pack"]
    assert pack.is_dir() and not pack.is_symlink()
    assert (pack / "nodes.py").read_text() == (PACK_DIR / "nodes.py").read_text()
    assert not list(pack.rglob("__pycache__"))
    assert any(line.startswith("copied pack") for line in lines)
    # the copied pack loads through ComfyUI's own loader and registers the five nodes
    for name in ("RandomSeedBatch", "Flux2TTRController"):
        comfy.nodes.NODE_CLASS_MAPPINGS.pop(name)
    assert asyncio.run(comfy.nodes.load_custom_node(str(pack)))
    assert comfy.nodes.NODE_CLASS_MAPPINGS["Flux2TTRController"].__module__.startswith(str(pack).replace(".", "_x_"))
    assert "RandomSeedBatch" in comfy.nodes.NODE_CLASS_MAPPINGS
    # replacing a copied pack by a link works; a foreign folder is refused
    install(comfy_copy, artifacts_dir=artifacts, copy_pack=False, echo=lines.append, pip=False)
    assert pack.is_symlink()
    pack.unlink()
    pack.mkdir()
    (pack / "__init__.py").write_text("# someone else's pack\n")
    with pytest.raises(InstallError, match="is not the flux2ttr pack"):
        install(comfy_copy, artifacts_dir=artifacts, echo=lines.append, pip=False)


def test_missing_artifacts_is_reported_not_fatal(comfy_copy, tmp_path):
    lines: list[str] = []
    out = install(comfy_copy, artifacts_dir=tmp_path / "nowhere", echo=lines.append, pip=False)
    assert out["artifacts"] == [] and out["models"].is_dir()
    assert any("run `dvc repro` first" in line for line in lines)


def test_not_a_comfyui_folder(tmp_path):
    res = CliRunner().invoke(main, ["comfy-install", str(tmp_path)])
    assert res.exit_code == 1
    assert "Error:" in res.output and "is not a ComfyUI folder" in res.output and "main.py" in res.output
    with pytest.raises(InstallError, match="no such folder"):
        install(tmp_path / "missing", echo=lambda s: None)


# --------------------------------------------------------------------------------------------------
# ComfyUI's Python and the pip step


def fake_python(path: Path, rc: int = 0) -> Path:
    """An executable standing in for ComfyUI's Python: it records its argv and PYTHONPATH next to itself
    (``<path>.argv.json``) and exits with ``rc``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = path.with_name(path.name + ".argv.json")
    path.write_text(f"#!{sys.executable}\n"
                    "import json, os, sys\n"
                    f"open({str(record)!r}, 'w').write(json.dumps({{'argv': sys.argv[1:], "
                    "'pythonpath': os.environ.get('PYTHONPATH')}))\n"
                    f"sys.exit({rc})\n")
    path.chmod(0o755)
    return path


def recorded(py: Path) -> dict:
    return json.loads(py.with_name(py.name + ".argv.json").read_text())


def test_cli_installs_core_into_comfyui_venv_python(comfy_copy, artifacts, monkeypatch):
    py = fake_python(comfy_copy / "venv" / "bin" / "python")
    monkeypatch.setenv("PYTHONPATH", "/our/env/only")
    res = CliRunner().invoke(main, ["comfy-install", str(comfy_copy), "--artifacts", str(artifacts)])
    assert res.exit_code == 0, res.output
    # editable (this checkout is a git clone), no extras: ComfyUI gets the core only
    assert recorded(py) == {"argv": ["-m", "pip", "install", "-e", str(REPO)], "pythonpath": None}
    assert f"ComfyUI's Python: {py}" in res.output and "installed flux2ttr into" in res.output
    assert (comfy_copy / "custom_nodes" / "flux2ttr").is_symlink()  # the rest still happens
    # --pip-arg passes through; --no-pip does not run it
    res = CliRunner().invoke(main, ["comfy-install", str(comfy_copy), "--artifacts", str(artifacts),
                                    "--pip-arg=--no-deps", "--pip-arg", "-q"])
    assert res.exit_code == 0, res.output
    assert recorded(py)["argv"] == ["-m", "pip", "install", "--no-deps", "-q", "-e", str(REPO)]
    py.with_name(py.name + ".argv.json").unlink()
    res = CliRunner().invoke(main, ["comfy-install", str(comfy_copy), "--artifacts", str(artifacts), "--no-pip"])
    assert res.exit_code == 0 and "--no-pip" in res.output
    assert not py.with_name(py.name + ".argv.json").exists()


def test_python_detection_order_and_portable_layout(tmp_path):
    root = tmp_path / "portable" / "ComfyUI"
    root.mkdir(parents=True)
    embedded = fake_python(tmp_path / "portable" / "python_embeded" / "python.exe")  # beside ComfyUI/, as shipped
    assert find_python(root) == embedded
    inner = fake_python(root / "python_embeded" / "python.exe")
    assert find_python(root) == inner
    dot_venv = fake_python(root / ".venv" / "bin" / "python")
    assert find_python(root) == dot_venv
    venv = fake_python(root / "venv" / "bin" / "python")
    assert find_python(root) == venv
    not_exec = root / "venv" / "bin" / "python"
    not_exec.chmod(0o644)  # a stray file that cannot run is passed over
    assert find_python(root) == dot_venv
    explicit = fake_python(tmp_path / "elsewhere" / "python3")
    assert find_python(root, explicit) == explicit
    # an explicit path is not resolved: a venv's bin/python is a symlink out of the venv
    link = root / "venv2" / "bin" / "python"
    link.parent.mkdir(parents=True)
    link.symlink_to(explicit)
    assert find_python(root, link) == link


def test_pip_command_editable_only_for_a_checkout(tmp_path):
    py = tmp_path / "python"
    src = tmp_path / "flux2ttr-src"
    src.mkdir()
    assert pip_command(py, src) == [str(py), "-m", "pip", "install", str(src)]
    (src / ".git").mkdir()
    assert pip_command(py, src, ["--no-deps"]) == [str(py), "-m", "pip", "install", "--no-deps", "-e", str(src)]


def test_no_python_found_is_a_clear_error_and_changes_nothing(comfy_copy, artifacts):
    res = CliRunner().invoke(main, ["comfy-install", str(comfy_copy), "--artifacts", str(artifacts)])
    assert res.exit_code == 1
    assert "Error: no Python of ComfyUI's found" in res.output
    for rel in PYTHON_CANDIDATES[:2]:
        assert str(comfy_copy / rel) in res.output
    assert "--python PATH" in res.output and "--no-pip" in res.output and str(REPO) in res.output
    assert "Traceback" not in res.output
    assert not (comfy_copy / "custom_nodes" / "flux2ttr").exists()
    assert not (comfy_copy / "models" / "approximate_attention").exists()
    missing = comfy_copy / "nowhere" / "python"
    res = CliRunner().invoke(main, ["comfy-install", str(comfy_copy), "--python", str(missing)])
    assert res.exit_code == 1 and f"--python {missing}: no such file" in res.output


def test_pip_failure_names_the_command(comfy_copy, artifacts):
    py = fake_python(comfy_copy / ".venv" / "bin" / "python", rc=3)
    res = CliRunner().invoke(main, ["comfy-install", str(comfy_copy), "--artifacts", str(artifacts)])
    assert res.exit_code == 1
    assert f"Error: pip failed (exit 3): {py} -m pip install -e {REPO}" in res.output
    assert "--no-pip" in res.output


@pytest.mark.slow
def test_installs_into_a_real_venv(comfy_copy, artifacts):
    """A real venv as ComfyUI's (its own pip, build isolation); --no-deps keeps it offline and fast,
    since torch is not in that venv."""
    venv = comfy_copy / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    res = CliRunner().invoke(main, ["comfy-install", str(comfy_copy), "--artifacts", str(artifacts),
                                    "--pip-arg=--no-deps", "--pip-arg=-q"])
    assert res.exit_code == 0, res.output
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([str(py), "-c", "import importlib.metadata as m, flux2ttr; "
                            "print(flux2ttr.__file__); print(m.version('flux2ttr'))"],
                           capture_output=True, text=True, env=env, cwd=comfy_copy, check=True)
    where, version = probe.stdout.split()
    assert Path(where).resolve() == (REPO / "flux2ttr" / "__init__.py").resolve()
    assert version


# --------------------------------------------------------------------------------------------------
# the tiny teacher: what the shipped tiny workflow loads


@pytest.fixture()
def tiny_folder(tmp_path) -> Path:
    d = tmp_path / "teachers" / "tiny"
    d.mkdir(parents=True)
    (d / "flux2_tiny.safetensors").write_bytes(b"teacher-bytes")
    (d / "tiny_codec.safetensors").write_bytes(b"codec-bytes")
    (d / "identity.json").write_text("{}")
    return d


def test_cli_copies_the_tiny_teacher_where_comfyui_and_the_pack_look(comfy_copy, artifacts, tiny_folder):
    args = ["comfy-install", str(comfy_copy), "--artifacts", str(artifacts), "--teacher", str(tiny_folder), "--no-pip"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    models = comfy_copy / "models"
    assert (models / "diffusion_models" / "flux2_tiny.safetensors").read_bytes() == b"teacher-bytes"
    assert (models / "flux2ttr_tiny" / "tiny_codec.safetensors").read_bytes() == b"codec-bytes"
    assert sorted(p.name for p in (models / "flux2ttr_tiny").iterdir()) == ["tiny_codec.safetensors"]
    assert "copied tiny teacher" in res.output and "copied tiny codec" in res.output
    # idempotent; a regenerated teacher is copied again
    res = CliRunner().invoke(main, args)
    assert "tiny teacher up to date" in res.output and "tiny codec up to date" in res.output
    (tiny_folder / "flux2_tiny.safetensors").write_bytes(b"teacher-v2")
    res = CliRunner().invoke(main, args)
    assert (models / "diffusion_models" / "flux2_tiny.safetensors").read_bytes() == b"teacher-v2"
    assert res.output.count("copied tiny teacher") == 1 and "tiny codec up to date" in res.output


def test_no_tiny_teacher_flag_and_missing_teacher(comfy_copy, artifacts, tiny_folder, tmp_path):
    res = CliRunner().invoke(main, ["comfy-install", str(comfy_copy), "--artifacts", str(artifacts), "--teacher",
                                    str(tiny_folder), "--no-tiny-teacher", "--no-pip"])
    assert res.exit_code == 0, res.output
    assert "--no-tiny-teacher" in res.output
    assert not (comfy_copy / "models" / "flux2ttr_tiny").exists()
    assert not (comfy_copy / "models" / "diffusion_models" / "flux2_tiny.safetensors").exists()
    lines: list[str] = []
    out = install(comfy_copy, artifacts_dir=artifacts, teacher_dir=tmp_path / "nowhere", echo=lines.append, pip=False)
    assert out["tiny_teacher"] == [] and len(out["artifacts"]) == 2  # reported, not fatal
    assert any("no tiny teacher folder" in line and "dvc repro teacher" in line for line in lines)
    (tiny_folder / "tiny_codec.safetensors").unlink()
    lines.clear()
    out = install(comfy_copy, artifacts_dir=artifacts, teacher_dir=tiny_folder, echo=lines.append, pip=False)
    assert [p.name for p in out["tiny_teacher"]] == ["flux2_tiny.safetensors"]
    assert any("no tiny_codec.safetensors in" in line for line in lines)


def test_tiny_names_and_folders_agree_with_comfyui_and_the_pack(comfy):
    """install.py spells the file and folder names without importing torch; they must be the teacher's and
    the nodes' own, and models/diffusion_models must be a folder ComfyUI's UNETLoader reads."""
    from flux2ttr.comfy import install as install_mod
    from flux2ttr.comfy import tiny_nodes
    from flux2ttr.teachers.teacher import EXTRAS_FILE_NAME, SINGLE_FILE_NAME

    assert install_mod.TINY_TEACHER_FILE == SINGLE_FILE_NAME == tiny_nodes.TEACHER_FILE
    assert install_mod.TINY_CODEC_FILE == EXTRAS_FILE_NAME == tiny_nodes.CODEC_FILE
    assert install_mod.TINY_FOLDER == tiny_nodes.CODEC_FOLDER
    fp = comfy.folder_paths
    assert os.path.join(fp.models_dir, install_mod.DIFFUSION_FOLDER) in fp.get_folder_paths("diffusion_models")
    assert os.path.join(fp.models_dir, install_mod.TINY_FOLDER) in fp.get_folder_paths(tiny_nodes.CODEC_FOLDER)
    assert os.path.join(fp.models_dir, install_mod.MODEL_FOLDER) in fp.get_folder_paths("approximate_attention")
