"""DVC stage ``teacher``: params section ``teacher``. The tiny teacher is written to ``teacher.out_dir``
(single-file FLUX.2 transformer, config folder, prompt codec), the trained one unpacked there from
``teacher.trained_file`` in the same layout; a diffusers or comfyui teacher is checked and its identity (the
files' sha256; comfyui: also ComfyUI's version) written to ``out_dir/identity.json``."""

import json
from pathlib import Path

from flux2ttr.atomic import atomic_write_text
from flux2ttr.config import load_section
from flux2ttr.teachers.comfyui import comfyui_identity
from flux2ttr.teachers.teacher import (
    IDENTITY_FILE_NAME,
    TeacherConfig,
    diffusers_identity,
    validate_diffusers_paths,
    write_tiny_teacher,
)
from flux2ttr.teachers.trained import write_trained_teacher
from stages import main


def run_stage(params_path: Path) -> None:
    """DVC stage ``teacher``: tiny, trained -> write the teacher folder; diffusers, comfyui -> validate paths, write
    ``out_dir/identity.json`` (comfyui: an unchanged file keeps the sha256 the old identity recorded)."""
    cfg = load_section(TeacherConfig, "teacher", params_path)
    if cfg.kind == "tiny":
        out = write_tiny_teacher(cfg)
        print(f"tiny FLUX.2 teacher written to {out}")
        return
    if cfg.kind == "trained":
        out = write_trained_teacher(cfg)
        print(f"trained tiny FLUX.2 teacher ({cfg.trained_file}) written to {out}")
        return
    out = Path(cfg.out_dir)
    if cfg.kind == "comfyui":
        old = out / IDENTITY_FILE_NAME
        identity = comfyui_identity(cfg, json.loads(old.read_text()) if old.is_file() else None)
    else:
        validate_diffusers_paths(cfg)
        identity = diffusers_identity(cfg)
    atomic_write_text(out / IDENTITY_FILE_NAME, json.dumps(identity, indent=2, sort_keys=True) + "\n")
    print(f"{cfg.kind} FLUX.2 teacher identity written to {out / IDENTITY_FILE_NAME}")


if __name__ == "__main__":
    main(run_stage)
