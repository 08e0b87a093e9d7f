"""DVC stage ``teacher``: params section ``teacher``. The tiny teacher is written to ``teacher.out_dir``
(single-file FLUX.2 transformer, config folder, prompt codec), the trained one unpacked there from
``teacher.trained_file`` in the same layout; a diffusers teacher is checked and its identity written to
``out_dir/identity.json``."""

import json
from pathlib import Path

from flux2ttr.atomic import atomic_write_text
from flux2ttr.config import load_section
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
    """DVC stage ``teacher``: tiny -> write the teacher folder; diffusers -> validate paths, write
    ``out_dir/identity.json``."""
    cfg = load_section(TeacherConfig, "teacher", params_path)
    if cfg.kind == "tiny":
        out = write_tiny_teacher(cfg)
        print(f"tiny FLUX.2 teacher written to {out}")
        return
    if cfg.kind == "trained":
        out = write_trained_teacher(cfg)
        print(f"trained tiny FLUX.2 teacher ({cfg.trained_file}) written to {out}")
        return
    validate_diffusers_paths(cfg)
    out = Path(cfg.out_dir)
    atomic_write_text(out / IDENTITY_FILE_NAME, json.dumps(diffusers_identity(cfg), indent=2, sort_keys=True) + "\n")
    print(f"diffusers FLUX.2 teacher identity written to {out / IDENTITY_FILE_NAME}")


if __name__ == "__main__":
    main(run_stage)
