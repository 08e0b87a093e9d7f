"""DVC stage ``evaluate``: params sections ``teacher``, ``evaluate`` and ``quality``. Quality vs speed of
the controller and fixed baselines on the held-out rollouts: ``evaluate.metrics`` (a few numbers for ``dvc
metrics show``), every score next to it (``<metrics stem>_details.json``), the plot, its table and the image
grid."""

import time
from pathlib import Path

from flux2ttr.atomic import atomic_write_json, file_sha256
from flux2ttr.config import load_section
from flux2ttr.contract import layer_sort_key
from flux2ttr.routing.controller import load_controller
from flux2ttr.routing.evaluate import EvaluateConfig, eval_metrics, evaluate, image_grid, plot_quality_vs_speed
from flux2ttr.routing.quality import QualityConfig, QualityLoss
from flux2ttr.routing.rollouts import RolloutStore
from flux2ttr.routing.training import details_path
from flux2ttr.students.artifacts import load_students
from flux2ttr.teachers.teacher import TeacherConfig, load_teacher
from stages import main


def run_stage(params_path: Path) -> None:
    """DVC stage ``evaluate``."""

    t0 = time.perf_counter()
    cfg = load_section(EvaluateConfig, "evaluate", params_path)
    tcfg = load_section(TeacherConfig, "teacher", params_path)
    qcfg = load_section(QualityConfig, "quality", params_path)
    store = RolloutStore(cfg.rollouts)
    teacher = load_teacher(tcfg)
    store.check_teacher(teacher)
    art = load_students(cfg.students, expect_num_heads=teacher.num_heads, expect_head_dim=teacher.head_dim)
    controller, layer_keys = load_controller(cfg.controller, student_sha256=file_sha256(cfg.students),
                                             expect_layers=sorted(art.layers, key=layer_sort_key))
    details, images, rollouts = evaluate(cfg, teacher, art, store, controller, layer_keys, QualityLoss(qcfg))
    plot_quality_vs_speed(details, Path(cfg.plot), Path(cfg.plot_table))
    image_grid(rollouts, images, ["controller", "all_student", "random"], Path(cfg.grid), cfg.grid_rollouts)
    Path(cfg.metrics).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(details_path(cfg.metrics), details)
    atomic_write_json(Path(cfg.metrics), eval_metrics(details, seconds=time.perf_counter() - t0))
    c = details["comparison"]
    print(f"evaluate: controller quality loss {details['reference']['quality_loss']:.5g} at full ratio "
          f"{details['reference']['full_ratio']:.2f}; all-student {c['all_student']['baseline_quality_loss']:.5g}, "
          f"random {c['random']['baseline_quality_loss']:.5g}; teacher "
          f"{details['teacher']['seconds_per_image']:.2f} s/image -> {cfg.metrics}")


if __name__ == "__main__":
    main(run_stage)
