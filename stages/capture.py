"""DVC stage ``capture``: params sections ``teacher``, ``sampler``, ``capture``. Samples the capture
prompts with the teacher and writes the trace store ``capture.store``, ``capture.metrics`` (tuples kept, MiB
on disk, seconds: what ``dvc metrics show`` compares) and every statistic next to it
(``<metrics stem>_details.json``: offered/kept counts and MiB, files, the timings breakdown, per rank).

Under ``torchrun --nproc-per-node N -m stages.capture`` the ranks split the sampler batches and write one
store together (the one a single process writes); with ``teacher.device: cuda`` each rank samples on GPU
``LOCAL_RANK`` (NCCL), else on the CPU (gloo). Rank 0 writes the metrics and prints the summary."""

from pathlib import Path
from typing import Any

from flux2ttr import distributed
from flux2ttr.atomic import atomic_write_json
from flux2ttr.config import load_section
from flux2ttr.teachers.prompts import load_prompts
from flux2ttr.teachers.sampler import SamplerConfig
from flux2ttr.teachers.teacher import TeacherConfig, load_teacher
from flux2ttr.traces.capture import CaptureConfig, capture
from stages import main


def capture_metrics(stats: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics of a capture (numbers only, a few) from :func:`~flux2ttr.traces.capture.capture`'s
    statistics: tuples ``kept``, ``disk_mib`` of the store and the wall ``seconds``."""
    return {"kept": int(stats["kept"]), "disk_mib": round(float(stats["disk_mib"]), 1),
            "seconds": round(float(stats["seconds_total"]), 1)}


def run_stage(params_path: Path) -> None:
    """DVC stage ``capture``: params sections ``teacher``, ``sampler``, ``capture``; writes ``capture.store``
    (and ``capture.metrics`` with its details file)."""

    cfg = load_section(CaptureConfig, "capture", params_path)
    sampler_cfg = load_section(SamplerConfig, "sampler", params_path)
    teacher_cfg = load_section(TeacherConfig, "teacher", params_path)
    prompts = load_prompts(cfg.prompts)
    with distributed.init(teacher_cfg.device) as dist:
        teacher = load_teacher(teacher_cfg)
        stats = capture(teacher, prompts, cfg, sampler_cfg, prompts_file=cfg.prompts, dist=dist)
    if not dist.is_main:
        return
    if cfg.metrics:
        metrics = Path(cfg.metrics)
        atomic_write_json(metrics.with_name(f"{metrics.stem}_details.json"), stats)
        atomic_write_json(metrics, capture_metrics(stats))
    ranks = f" by {dist.world} ranks" if dist.world > 1 else ""
    print(f"captured {stats['kept']} of {stats['offered']} tuples ({stats['disk_mib']:.1f} MiB on disk, "
          f"{stats['files']} files) to {cfg.store}{ranks} in {stats['seconds_total']:.1f} s")


if __name__ == "__main__":
    main(run_stage)
