"""``flux2ttr comfy-install`` into a copy of the real ComfyUI, as a user would run it."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from flux2ttr.cli import main
from flux2ttr.comfy.install import InstallError, install
from helpers.comfy import PACK_DIR, comfyui_path


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
    res = CliRunner().invoke(main, ["comfy-install", str(comfy_copy), "--artifacts", str(artifacts)])
    assert res.exit_code == 0, res.output
    pack = comfy_copy / "custom_nodes" / "flux2ttr"
    assert pack.is_symlink() and pack.resolve() == PACK_DIR.resolve()
    models = comfy_copy / "models" / "approximate_attention"
    assert sorted(p.name for p in models.iterdir()) == ["flux2_ttr.safetensors", "flux2_ttr_controller.safetensors"]
    assert (models / "flux2_ttr.safetensors").read_bytes() == b"student-bytes"
    assert "linked pack" in res.output and "created model folder" in res.output
    assert res.output.count("copied artifact") == 2
    # a rerun is idempotent and says so
    res = CliRunner().invoke(main, ["comfy-install", str(comfy_copy), "--artifacts", str(artifacts)])
    assert res.exit_code == 0, res.output
    assert "already linked" in res.output and res.output.count("artifact up to date") == 2
    # a changed artifact is copied again
    (artifacts / "flux2_ttr.safetensors").write_bytes(b"student-v2")
    res = CliRunner().invoke(main, ["comfy-install", str(comfy_copy), "--artifacts", str(artifacts)])
    assert (models / "flux2_ttr.safetensors").read_bytes() == b"student-v2"
    assert res.output.count("copied artifact") == 1


def test_copy_mode_and_installed_pack_loads_in_comfyui(comfy, comfy_copy, artifacts):
    lines: list[str] = []
    out = install(comfy_copy, artifacts_dir=artifacts, copy_pack=True, echo=lines.append)
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
    install(comfy_copy, artifacts_dir=artifacts, copy_pack=False, echo=lines.append)
    assert pack.is_symlink()
    pack.unlink()
    pack.mkdir()
    (pack / "__init__.py").write_text("# someone else's pack\n")
    with pytest.raises(InstallError, match="is not the flux2ttr pack"):
        install(comfy_copy, artifacts_dir=artifacts, echo=lines.append)


def test_missing_artifacts_is_reported_not_fatal(comfy_copy, tmp_path):
    lines: list[str] = []
    out = install(comfy_copy, artifacts_dir=tmp_path / "nowhere", echo=lines.append)
    assert out["artifacts"] == [] and out["models"].is_dir()
    assert any("run `dvc repro` first" in line for line in lines)


def test_not_a_comfyui_folder(tmp_path):
    res = CliRunner().invoke(main, ["comfy-install", str(tmp_path)])
    assert res.exit_code == 1
    assert "Error:" in res.output and "is not a ComfyUI folder" in res.output and "main.py" in res.output
    with pytest.raises(InstallError, match="no such folder"):
        install(tmp_path / "missing", echo=lambda s: None)
