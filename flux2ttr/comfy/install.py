"""``flux2ttr comfy-install COMFYUI_DIR``: put the node pack, the pipeline's artifacts and the library into ComfyUI.

- finds ComfyUI's own Python (``--python PATH``, else ``venv/``, ``.venv/`` or the portable build's
  ``python_embeded/``, see :data:`PYTHON_CANDIDATES`) before changing anything;
- links (or, with ``copy_pack``, copies) the repository's ``comfy_nodes/`` to
  ``COMFYUI_DIR/custom_nodes/flux2ttr``;
- creates ``COMFYUI_DIR/models/approximate_attention``;
- copies the artifacts (``*.safetensors`` of ``artifacts_dir``) there, each atomically;
- copies the tiny teacher (``teacher_dir``, the project's ``teachers/tiny``) where ComfyUI and the pack look
  for it: ``flux2_tiny.safetensors`` into ``models/diffusion_models`` (UNETLoader) and its codec
  ``tiny_codec.safetensors`` into ``models/flux2ttr_tiny`` (the pack's tiny text-encode and decode nodes),
  unless ``tiny_teacher=False`` (``--no-tiny-teacher``), so the shipped tiny workflow runs as installed;
- installs the project's core (no extras: torch, safetensors, numpy) into that Python with
  ``PY -m pip install -e <project>`` (editable for a git checkout, a plain install otherwise), unless
  ``pip=False`` (``--no-pip``);
- prints every action.

No click here: this module sits in the ComfyUI runtime package, which imports only the core
dependencies; the CLI turns :class:`InstallError` into its one-line error.
"""

from __future__ import annotations

import filecmp
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import flux2ttr

PACK_NAME = "flux2ttr"
MODEL_FOLDER = "approximate_attention"
# The tiny teacher's files and where they go (names as flux2ttr.teachers.teacher and flux2ttr.comfy.tiny_nodes
# spell them; not imported, to keep this module free of torch).
TINY_TEACHER_FILE = "flux2_tiny.safetensors"   # -> models/diffusion_models (ComfyUI's UNETLoader folder)
TINY_CODEC_FILE = "tiny_codec.safetensors"     # -> models/flux2ttr_tiny
DIFFUSION_FOLDER = "diffusion_models"
TINY_FOLDER = "flux2ttr_tiny"
COMFYUI_MARKERS = ("main.py", "nodes.py", "folder_paths.py", "comfy")
PACK_MARKER = "flux2ttr ComfyUI node pack"  # first line of the pack's __init__.py docstring
# Where ComfyUI's Python lives, relative to the ComfyUI folder, in the order they are tried: a venv in
# the checkout (POSIX, then Windows layout), then the Windows portable build, whose python_embeded/
# sits inside or (as shipped) beside the ComfyUI folder.
PYTHON_CANDIDATES = (
    "venv/bin/python", ".venv/bin/python",
    "venv/Scripts/python.exe", ".venv/Scripts/python.exe",
    "python_embeded/python.exe", "../python_embeded/python.exe",
)

Echo = Callable[[str], object]


class InstallError(RuntimeError):
    """The install cannot proceed; the message says why and what to do (the CLI prints it without a
    traceback and exits with status 1)."""


def project_root() -> Path:
    """The flux2ttr source tree this library was installed from (it holds ``pyproject.toml``)."""
    root = Path(flux2ttr.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise InstallError(f"flux2ttr at {root} is not a source tree (no pyproject.toml): install flux2ttr from a "
                           "clone with `pip install -e .` and run comfy-install from there")
    return root


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


def _runnable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_python(comfyui_root: Path, python: Path | None = None) -> Path:
    """ComfyUI's Python: ``python`` when given (checked), else the first of :data:`PYTHON_CANDIDATES`
    under ``comfyui_root``. The path is made absolute but not resolved: a venv's ``bin/python`` is a
    symlink, and following it would leave the venv."""
    if python is not None:
        py = Path(os.path.abspath(Path(python).expanduser()))
        if not py.is_file():
            raise InstallError(f"--python {py}: no such file; pass the Python that runs ComfyUI's main.py "
                               f"(for example {comfyui_root / PYTHON_CANDIDATES[0]})")
        if not _runnable(py):
            raise InstallError(f"--python {py} is not executable; pass the Python that runs ComfyUI's main.py")
        return py
    for rel in PYTHON_CANDIDATES:
        py = Path(os.path.normpath(comfyui_root / rel))
        if _runnable(py):
            return py
    looked = ", ".join(str(Path(os.path.normpath(comfyui_root / rel))) for rel in PYTHON_CANDIDATES)
    raise InstallError(
        f"no Python of ComfyUI's found (looked for {looked}); pass --python PATH, the python that runs ComfyUI's "
        "main.py (`python -c 'import sys; print(sys.executable)'` where you start ComfyUI), or pass --no-pip and "
        f"install the library yourself: PYTHON -m pip install -e {_project_hint()}")


def _project_hint() -> str:
    try:
        return str(project_root())
    except InstallError:
        return "/path/to/flux2ttr"


def pip_command(python: Path, project: Path, pip_args: Sequence[str] = ()) -> list[str]:
    """``python -m pip install [pip_args] [-e] project``: editable for a git checkout (edits and
    ``git pull`` reach ComfyUI), a plain install of the tree otherwise. No extras: ComfyUI gets the core."""
    editable = ["-e"] if (project / ".git").exists() else []
    return [str(python), "-m", "pip", "install", *pip_args, *editable, str(project)]


def install_library(python: Path, project: Path, pip_args: Sequence[str] = (), echo: Echo = print) -> list[str]:
    """Run :func:`pip_command`; a failure is an :class:`InstallError` naming the command. Returns the command."""
    cmd = pip_command(python, project, pip_args)
    echo(f"installing flux2ttr (core) into ComfyUI's Python: {shlex.join(cmd)}")
    # our own interpreter's search path must not leak into ComfyUI's
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    try:
        rc = subprocess.run(cmd, env=env, check=False).returncode
    except OSError as e:
        raise InstallError(f"cannot run {python} ({e}); pass --python PATH with the Python that runs ComfyUI") from e
    if rc != 0:
        raise InstallError(f"pip failed (exit {rc}): {shlex.join(cmd)}; fix the error above and rerun, or pass "
                           "--no-pip and install the library into ComfyUI's Python yourself")
    echo(f"installed flux2ttr into {python}")
    return cmd


def _is_our_pack(path: Path) -> bool:
    init = path / "__init__.py"
    return init.is_file() and PACK_MARKER in init.read_text(encoding="utf-8", errors="replace")[:500]


def _install_pack(src: Path, target: Path, copy_pack: bool, say: Echo) -> None:
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


def _copy_file(src: Path, target: Path, what: str, say: Echo) -> Path:
    """Copy ``src`` to ``target`` atomically unless it already holds the same bytes."""
    if target.is_file() and filecmp.cmp(src, target, shallow=False):
        say(f"{what} up to date: {target}")
    else:
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)
        say(f"copied {what} {src} -> {target}")
    return target


def _ensure_folder(path: Path, say: Echo) -> Path:
    if path.is_dir():
        say(f"model folder exists: {path}")
    else:
        path.mkdir(parents=True)
        say(f"created model folder {path}")
    return path


def _copy_artifacts(artifacts_dir: Path, dest: Path, say: Echo) -> list[Path]:
    artifacts_dir = Path(artifacts_dir).expanduser().resolve()
    if not artifacts_dir.is_dir():
        say(f"no artifacts folder at {artifacts_dir}: run `dvc repro` first (or pass --artifacts), then rerun "
            "to copy them")
        return []
    files = sorted(p for p in artifacts_dir.glob("*.safetensors") if p.is_file())
    if not files:
        say(f"no *.safetensors in {artifacts_dir}: run `dvc repro` first, then rerun to copy them")
        return []
    return [_copy_file(f, dest / f.name, "artifact", say) for f in files]


def _copy_tiny_teacher(teacher_dir: Path, models_root: Path, say: Echo) -> list[Path]:
    """The tiny teacher's transformer into ``models/diffusion_models`` and its codec into
    ``models/flux2ttr_tiny``; a missing teacher folder or file is reported, not fatal."""
    teacher_dir = Path(teacher_dir).expanduser().resolve()
    hint = ("run `dvc repro teacher` (or `flux2ttr teacher`) first (or pass --teacher DIR), then rerun; "
            "--no-tiny-teacher skips this")
    if not teacher_dir.is_dir():
        say(f"no tiny teacher folder at {teacher_dir}: {hint}")
        return []
    copied = []
    for name, folder, role in ((TINY_TEACHER_FILE, DIFFUSION_FOLDER, "tiny teacher"),
                               (TINY_CODEC_FILE, TINY_FOLDER, "tiny codec")):
        src = teacher_dir / name
        if not src.is_file():
            say(f"no {name} in {teacher_dir}: {hint}")
            continue
        dest = _ensure_folder(models_root / folder, say)
        copied.append(_copy_file(src, dest / name, role, say))
    return copied


def install(comfyui_dir: Path, artifacts_dir: Path = Path("artifacts"), copy_pack: bool = False,
            echo: Echo = print, *, python: Path | None = None, pip: bool = True,
            pip_args: Sequence[str] = (), teacher_dir: Path = Path("teachers/tiny"),
            tiny_teacher: bool = True) -> dict[str, object]:
    """Install the pack, the artifacts, the tiny teacher (``tiny_teacher``, from ``teacher_dir``) and
    (``pip``) the library into ``comfyui_dir``; returns ``{"pack", "models", "artifacts", "tiny_teacher",
    "python", "pip_command"}`` (``tiny_teacher``: the copied files; the last two ``None`` without ``pip``)."""
    root = check_comfyui(comfyui_dir)
    src = pack_source()
    py = project = None
    if pip:  # find ComfyUI's Python before touching anything, so a wrong folder changes nothing
        project = project_root()
        py = find_python(root, python)
        echo(f"ComfyUI's Python: {py}")
    custom = root / "custom_nodes"
    custom.mkdir(exist_ok=True)
    target = custom / PACK_NAME
    _install_pack(src, target, copy_pack, echo)
    models = _ensure_folder(root / "models" / MODEL_FOLDER, echo)
    copied = _copy_artifacts(artifacts_dir, models, echo)
    tiny = _copy_tiny_teacher(teacher_dir, root / "models", echo) if tiny_teacher else []
    if not tiny_teacher:
        echo("tiny teacher not copied (--no-tiny-teacher)")
    cmd = None
    if pip:
        cmd = install_library(py, project, pip_args, echo)
        echo("done: restart ComfyUI")
    else:
        echo("done (--no-pip): install the library into ComfyUI's Python yourself "
             f"(PYTHON -m pip install -e {_project_hint()}), then restart ComfyUI")
    return {"pack": target, "models": models, "artifacts": copied, "tiny_teacher": tiny, "python": py,
            "pip_command": cmd}
