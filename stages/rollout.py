"""DVC stage ``rollout``: params sections ``teacher`` and ``rollout``. Teacher rollouts of the controller
prompts (latents and images per prompt/seed) into ``rollout.out_dir``; unchanged ones are reused.

Under ``torchrun --nproc-per-node N -m stages.rollout`` the ranks split the sampler batches (on GPU
``LOCAL_RANK`` with ``teacher.device: cuda``) and rank 0 writes the store: the one a single process writes."""

from dataclasses import asdict
from pathlib import Path

from flux2ttr import distributed
from flux2ttr.config import load_section
from flux2ttr.routing.rollouts import (
    INDEX_FILE,
    RolloutConfig,
    RolloutStore,
    RolloutStoreError,
    record_rollouts,
    write_store,
)
from flux2ttr.teachers.prompts import load_prompts
from flux2ttr.teachers.sampler import PIXELS_PER_TOKEN
from flux2ttr.teachers.teacher import TeacherConfig, load_teacher
from stages import main


def run_stage(params_path: Path) -> None:
    """DVC stage ``rollout``: teacher rollouts of the controller prompts into ``rollout.out_dir``."""

    cfg = load_section(RolloutConfig, "rollout", params_path)
    tcfg = load_section(TeacherConfig, "teacher", params_path)
    prompts = load_prompts(cfg.prompts)
    cache = None
    if (Path(cfg.out_dir) / INDEX_FILE).is_file():
        try:
            cache = RolloutStore(cfg.out_dir).cached()
        except (RolloutStoreError, KeyError, OSError) as e:  # unreadable old store: sample everything again
            print(f"rollout: not reusing {cfg.out_dir} ({e})")
    with distributed.init(tcfg.device) as dist:
        teacher = load_teacher(tcfg)
        rollouts, stats = record_rollouts(teacher, cfg, prompts, cache=cache, dist=dist)
    if not dist.is_main:
        return
    write_store(cfg.out_dir, rollouts, setting=cfg.setting(), teacher=teacher.identity,
                extra={"config": asdict(cfg), "stats": stats, "pixels_per_token": PIXELS_PER_TOKEN})
    print(f"rollout: {len(rollouts)} teacher rollouts ({stats['sampled']} sampled, {stats['reused']} reused) "
          f"-> {cfg.out_dir}")


if __name__ == "__main__":
    main(run_stage)
