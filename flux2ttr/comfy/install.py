"""``flux2ttr comfy-install COMFYUI_DIR``: put the node pack and the pipeline's artifacts into ComfyUI.

- links (or, with ``copy_pack``, copies) the repository's ``comfy_nodes/`` to
  ``COMFYUI_DIR/custom_nodes/flux2ttr``;
- creates ``COMFYUI_DIR/models/approximate_attention``;
- copies the artifacts (``*.safetensors`` of ``artifacts_dir``) there, each atomically;
- prints every action. The flux2ttr library itself must be installed into ComfyUI's Python
  (``pip install -e .``); this command does not touch any Python environment.
"""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

import click

import flux2ttr

PACK_NAME = "flux2ttr"
MODEL_FOLDER = "approximate_attention"
COMFYUI_MARKERS = ("main.py", "nodes.py", "folder_paths.py", "comfy")
PACK_MARKER = "flux2ttr ComfyUI node pack"  # first line of the pack's __init__.py docstring


class InstallError(click.ClickException):
    """The install cannot proceed; the message says why and what to do (the CLI prints it without a
    traceback and exits with status 1)."""


def pack_source() -> Path:
    """The repository's ``comfy_nodes/`` (the library must be installed editable from a clone)."""
    src = Path(flux2ttr.__file__).resolve().parent.parent / "comfy_nodes"
    if not (src / "__init__.py").is_file():
        raise InstallError(f"node pack not found at {src}: install flux2ttr from a clone with `pip install -e .` "
                           "so that comfy_nodes/ sits next to the library")
    return src


def check_comfyui(comfyui_dir: Path) -> Path:
    """``comfyui_dir`` resolved, or a clear error when it is not a ComfyUI checkout."""
    root = Path(comfyui_dir).expanduser().resolve()
    if not root.is_dir():
        raise InstallError(f"{root}: no such folder; pass the ComfyUI folder (the one holding main.py)")
    missing = [m for m in COMFYUI_MARKERS if not (root / m).exists()]
    if missing:
        raise InstallError(f"{root} is not a ComfyUI folder (missing {', '.join(missing)}); pass the folder that "
                           "holds ComfyUI's main.py")
    return root


def _is_our_pack(path: Path) -> bool:
    init = path / "__init__.py"
    return init.is_file() and PACK_MARKER in init.read_text(encoding="utf-8", errors="replace")[:500]


def _install_pack(src: Path, target: Path, copy_pack: bool, say) -> None:
    if target.is_symlink() or target.exists():
        if target.is_symlink() and not copy_pack and target.resolve() == src:
            say(f"pack already linked: {target} -> {src}")
            return
        if not target.is_symlink() and not _is_our_pack(target):
            raise InstallError(f"{target} exists and is not the flux2ttr pack; move it away and rerun")
        if target.is_symlink() or target.is_file():
            target.unlink()
        else:
            shutil.rmtree(target)
        say(f"removed previous pack at {target}")
    if copy_pack:
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        tmp.rename(target)
        say(f"copied pack {src} -> {target}")
    else:
        target.symlink_to(src, target_is_directory=True)
        say(f"linked pack {target} -> {src}")


def _copy_artifacts(artifacts_dir: Path, dest: Path, say) -> list[Path]:
    artifacts_dir = Path(artifacts_dir).expanduser().resolve()
    if not artifacts_dir.is_dir():
        say(f"no artifacts folder at {artifacts_dir}: run `dvc repro` first (or pass --artifacts), then rerun "
            "to copy them")
        return []
    files = sorted(p for p in artifacts_dir.glob("*.safetensors") if p.is_file())
    if not files:
        say(f"no *.safetensors in {artifacts_dir}: run `dvc repro` first, then rerun to copy them")
        return []
    copied = []
    for f in files:
        target = dest / f.name
        if target.is_file() and filecmp.cmp(f, target, shallow=False):
            say(f"artifact up to date: {target}")
        else:
            tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
            shutil.copyfile(f, tmp)
            os.replace(tmp, target)
            say(f"copied artifact {f} -> {target}")
        copied.append(target)
    return copied


def install(comfyui_dir: Path, artifacts_dir: Path = Path("artifacts"), copy_pack: bool = False,
            echo=print) -> dict[str, object]:
    """Install the pack and artifacts into ``comfyui_dir``; returns ``{"pack", "models", "artifacts"}``."""
    root = check_comfyui(comfyui_dir)
    src = pack_source()
    custom = root / "custom_nodes"
    custom.mkdir(exist_ok=True)
    target = custom / PACK_NAME
    _install_pack(src, target, copy_pack, echo)
    models = root / "models" / MODEL_FOLDER
    if models.is_dir():
        echo(f"model folder exists: {models}")
    else:
        models.mkdir(parents=True)
        echo(f"created model folder {models}")
    copied = _copy_artifacts(artifacts_dir, models, echo)
    echo("done: restart ComfyUI; make sure flux2ttr is installed in ComfyUI's Python (`pip install -e <repo>`)")
    return {"pack": target, "models": models, "artifacts": copied}
