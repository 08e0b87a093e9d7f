"""DVC stage ``distill``: params sections ``distill`` and ``hkr`` (and ``teacher``, whose identity the
trace store must match). Writes the student artifact, ``distill.metrics`` and the plot tables.

Under ``torchrun --nproc-per-node N -m stages.distill`` the ranks share out the layers (one checkpoint per
rank in ``distill.checkpoint_dir``); with ``distill.device: cuda`` each rank trains on GPU ``LOCAL_RANK``
over NCCL, else on the CPU over gloo. Rank 0 writes the outputs: the same artifact as one process."""

from pathlib import Path

from flux2ttr.config import load_params, load_section
from flux2ttr.distill.trainer import DistillConfig, expected_teacher_identity, train
from flux2ttr.students.hkr import HKRConfig
from stages import main


def run_stage(params_path: Path) -> None:
    """DVC stage ``distill``: params sections ``distill`` and ``hkr``; the teacher identity from the
    ``teacher`` section must match the store's."""
    params_path = Path(params_path)
    cfg = load_section(DistillConfig, "distill", params_path)
    hkr = load_section(HKRConfig, "hkr", params_path)
    load_params(params_path)  # fails early on a broken file
    train(cfg, hkr, expected_teacher=expected_teacher_identity(params_path), params_path=params_path)


if __name__ == "__main__":
    main(run_stage)
