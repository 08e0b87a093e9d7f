"""Tiny setups shared by the rollout, student-rollout, controller-training and evaluate tests: a tiny FLUX.2
teacher written to a temp folder, randomly initialised students saved with ``save_students``, a params file."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from flux2ttr.students.artifacts import save_students
from flux2ttr.students.hkr import HKRConfig, HKRLayer
from flux2ttr.teachers.teacher import TeacherConfig, load_teacher, write_tiny_teacher

# 1 head, 1 double + 3 single blocks: the smallest teacher with the real per-head shapes
TEACHER = dict(kind="tiny", num_heads=1, num_double=1, num_single=3, joint_attention_dim=16, seed=3)
HKR = dict(feature_dim=16, landmark_min=4, fast_path=False)
PROMPTS = ["a red fox in snow", "a lighthouse at dusk", "a bowl of ramen", "a blue vintage car"]


def teacher_config(folder: Path) -> TeacherConfig:
    return TeacherConfig(out_dir=str(folder), **TEACHER)


def make_teacher(folder: Path):
    cfg = teacher_config(folder)
    write_tiny_teacher(cfg)
    teacher = load_teacher(cfg)
    teacher.folder = Path(folder)  # tests copy the files for stage runs
    return teacher


def make_students(path: Path, teacher, ready: dict[str, bool], seed: int = 0) -> Path:
    """Random HKR students for ``ready``'s keys (fp32), saved with the real artifact writer."""
    torch.manual_seed(seed)
    hcfg = HKRConfig(**HKR)
    layers = {k: HKRLayer(hcfg, num_heads=teacher.num_heads) for k in ready}
    save_students(path, layers, hcfg, num_heads=teacher.num_heads, ready=ready,
                  metrics={k: {"val_cos_dist": 0.1} for k in ready}, train_config={}, teacher=teacher.identity)
    return path


def write_prompts(path: Path, prompts: list[str] = PROMPTS) -> Path:
    path.write_text(json.dumps(prompts))
    return path


def write_params(path: Path, sections: dict) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path
