"""DVC stage ``train_controller``: params sections ``teacher``, ``controller`` and ``quality``. Trains the
controller on live student rollouts against the stored teacher rollouts; writes the controller artifact,
the per-rollout records, ``controller.metrics`` (a few numbers for ``dvc metrics show``) and the whole run
summary next to it (``<metrics stem>_details.json``)."""

import time
from pathlib import Path

from flux2ttr.atomic import atomic_write_json
from flux2ttr.comet_log import GuardedComet
from flux2ttr.config import load_section, to_dict
from flux2ttr.routing.quality import QualityConfig, QualityLoss
from flux2ttr.routing.rollouts import RolloutStore
from flux2ttr.routing.training import (
    ControllerTrainConfig,
    ControllerTrainer,
    controller_metrics,
    details_path,
    write_records,
)
from flux2ttr.students.artifacts import load_students
from flux2ttr.teachers.teacher import TeacherConfig, load_teacher
from stages import main


def run_stage(params_path: Path) -> None:
    """DVC stage ``train_controller``."""

    cfg = load_section(ControllerTrainConfig, "controller", params_path)
    tcfg = load_section(TeacherConfig, "teacher", params_path)
    qcfg = load_section(QualityConfig, "quality", params_path)
    store = RolloutStore(cfg.rollouts)
    teacher = load_teacher(tcfg)
    store.check_teacher(teacher)
    art = load_students(cfg.students, expect_num_heads=teacher.num_heads, expect_head_dim=teacher.head_dim)
    quality = QualityLoss(qcfg)
    comet = GuardedComet(params_path, "train_controller", {"controller": to_dict(cfg), "quality": to_dict(qcfg)})
    trainer = ControllerTrainer(cfg, teacher, art, store, quality, comet=comet)
    if trainer.try_resume():
        print(f"train_controller: resumed at iteration {trainer.iteration}")
    t0 = time.perf_counter()
    trainer.train()
    records = trainer.records
    write_records(Path(cfg.records), records)
    trainer.save_artifact(cfg.artifact)
    summary = trainer.summary()
    summary["train_seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_json(Path(cfg.metrics), controller_metrics(summary))
    atomic_write_json(details_path(cfg.metrics), summary)
    comet.call("log_asset", cfg.artifact)
    comet.call("end")
    print(f"train_controller: {trainer.iteration} iterations x {cfg.group_size} rollouts, "
          f"reward {summary['reward_first']:.4f} -> "
          f"{summary['reward_last']:.4f}, full ratio {summary['full_ratio_last']:.2f} -> {cfg.artifact}")


if __name__ == "__main__":
    main(run_stage)
