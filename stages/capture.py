"""DVC stage ``capture``: params sections ``teacher``, ``sampler``, ``capture``. Samples the capture
prompts with the teacher and writes the trace store ``capture.store`` and ``capture.metrics``."""

from pathlib import Path

from flux2ttr.atomic import atomic_write_json
from flux2ttr.config import load_section
from flux2ttr.teachers.prompts import load_prompts
from flux2ttr.teachers.sampler import SamplerConfig
from flux2ttr.teachers.teacher import TeacherConfig, load_teacher
from flux2ttr.traces.capture import CaptureConfig, capture
from stages import main


def run_stage(params_path: Path) -> None:
    """DVC stage ``capture``: params sections ``teacher``, ``sampler``, ``capture``; writes ``capture.store``
    (and ``capture.metrics``)."""

    cfg = load_section(CaptureConfig, "capture", params_path)
    sampler_cfg = load_section(SamplerConfig, "sampler", params_path)
    teacher_cfg = load_section(TeacherConfig, "teacher", params_path)
    prompts = load_prompts(cfg.prompts)
    teacher = load_teacher(teacher_cfg)
    stats = capture(teacher, prompts, cfg, sampler_cfg, prompts_file=cfg.prompts)
    if cfg.metrics:
        atomic_write_json(Path(cfg.metrics), stats)
    print(f"captured {stats['kept']} of {stats['offered']} tuples ({stats['disk_mib']:.1f} MiB on disk, "
          f"{stats['files']} files) to {cfg.store} in {stats['seconds_total']:.1f} s")


if __name__ == "__main__":
    main(run_stage)
