"""Which dataclass owns each top-level section of ``params.yaml`` (dotted ``module:Class``), so loaders,
checks and tests agree on one map. Imports are by name: reading the map imports nothing."""

from __future__ import annotations

import importlib

SECTIONS: dict[str, str] = {
    "teacher": "flux2ttr.teachers.teacher:TeacherConfig",
    "sampler": "flux2ttr.teachers.sampler:SamplerConfig",
    "hkr": "flux2ttr.students.hkr:HKRConfig",
    "capture": "flux2ttr.traces.capture:CaptureConfig",
    "distill": "flux2ttr.distill.trainer:DistillConfig",
    "rollout": "flux2ttr.routing.rollouts:RolloutConfig",
    "controller": "flux2ttr.routing.training:ControllerTrainConfig",
    "quality": "flux2ttr.routing.quality:QualityConfig",
    "evaluate": "flux2ttr.routing.evaluate:EvaluateConfig",
    "comet": "flux2ttr.comet_log:CometConfig",
    "scenes": "flux2ttr.teachers.scenes:SceneConfig",
    "train_teacher": "flux2ttr.teachers.train_teacher:TrainTeacherConfig",
}


def section_class(name: str) -> type:
    """The dataclass of ``params.yaml`` section ``name`` (a key of :data:`SECTIONS`)."""
    module, cls = SECTIONS[name].split(":")
    return getattr(importlib.import_module(module), cls)
