"""Rollout stage: teacher rollouts recorded once per prompt/setting into an atomic, cached store; under
torchrun (2 gloo ranks) the same store as one process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flux2ttr.config import ConfigError
from flux2ttr.routing.rollouts import (
    INDEX_FILE,
    RolloutConfig,
    RolloutStore,
    RolloutStoreError,
    plan,
    record_rollouts,
    write_store,
)
from flux2ttr.teachers.sampler import sample
from helpers.rollouts import PROMPTS, TEACHER, make_teacher, write_params, write_prompts
from helpers.torchrun import one_thread, torchrun
from stages.rollout import run_stage


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher"))


def _cfg(**kw) -> RolloutConfig:
    base = dict(steps=2, height=64, width=48, eval_prompts=1, batch_size=2, seed=7)
    base.update(kw)
    return RolloutConfig(**base)


def test_plan_splits_and_seeds():
    cfg = _cfg(num_prompts=3, eval_prompts=1, seeds_per_prompt=2, seed=10)
    items = plan(cfg, PROMPTS)
    assert [(p, s, split) for p, _, s, split in items] == [
        (0, 10, "train"), (0, 11, "train"), (1, 12, "train"), (1, 13, "train"), (2, 14, "eval"), (2, 15, "eval")]
    with pytest.raises(ConfigError, match="eval_prompts"):
        plan(_cfg(num_prompts=2, eval_prompts=2), PROMPTS)


def test_record_matches_direct_sampling_and_round_trips(teacher, tmp_path):
    cfg = _cfg(num_prompts=3)
    rollouts, stats = record_rollouts(teacher, cfg, PROMPTS, show_progress=False)
    assert stats["sampled"] == 3 and stats["reused"] == 0 and stats["seconds_per_image"] > 0
    # rollout 2 alone, sampled directly, equals what the batched recorder stored (batch-independent noise)
    direct = sample(teacher, [PROMPTS[2]], cfg.sampler_config(), seeds=[9])
    torch.testing.assert_close(rollouts[2].latents, direct[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rollouts[2].image, teacher.decode(direct, 4, 3)[0], rtol=1e-4, atol=1e-4)
    assert rollouts[2].image.shape == (3, 64, 48) and rollouts[2].latents.shape == (12, 128)

    out = write_store(tmp_path / "store", rollouts, setting=cfg.setting(), teacher=teacher.identity)
    store = RolloutStore(out)
    assert len(store) == 3 and store.teacher["sha256"] == teacher.identity["sha256"]
    scfg = store.sampler_config()
    assert (scfg.steps, scfg.height, scfg.width, scfg.guidance) == (2, 64, 48, cfg.guidance)
    train, ev = store.entries("train"), store.entries("eval")
    assert [r.prompt for r in train] == PROMPTS[:2] and [r.prompt for r in ev] == [PROMPTS[2]]
    assert [r.seed for r in train + ev] == [7, 8, 9]
    for a, b in zip(rollouts, train + ev):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.image, b.image)
    assert not list(tmp_path.glob(".store.tmp-*"))  # the temporary folder was renamed


def test_rerun_reuses_cache_and_resamples_changed_setting(teacher, tmp_path):
    cfg = _cfg(num_prompts=2)
    first, _ = record_rollouts(teacher, cfg, PROMPTS, show_progress=False)
    write_store(tmp_path / "s", first, setting=cfg.setting(), teacher=teacher.identity)
    cache = RolloutStore(tmp_path / "s").cached()
    again, stats = record_rollouts(teacher, _cfg(num_prompts=3), PROMPTS, cache=cache, show_progress=False)
    assert stats == {"sampled": 1, "reused": 2, "seconds_per_image": stats["seconds_per_image"]}
    assert torch.equal(again[0].latents, first[0].latents)
    _, stats2 = record_rollouts(teacher, _cfg(num_prompts=2, guidance=2.5), PROMPTS, cache=cache,
                                show_progress=False)
    assert stats2["sampled"] == 2 and stats2["reused"] == 0


def test_store_errors_name_the_path(tmp_path):
    with pytest.raises(RolloutStoreError, match="run `flux2ttr rollout`"):
        RolloutStore(tmp_path / "nope")
    d = tmp_path / "bad"
    d.mkdir()
    (d / INDEX_FILE).write_text(json.dumps({"format": "other"}))
    (d / "rollouts.safetensors").write_bytes(b"")
    with pytest.raises(RolloutStoreError, match="format"):
        RolloutStore(d)


def test_run_stage_writes_store(teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "teachers"  # a copy of the module teacher's files (same identity)

    shutil.copytree(teacher.folder, folder)
    write_prompts(tmp_path / "p.json", PROMPTS[:3])
    params = write_params(tmp_path / "params.yaml", {
        "teacher": dict(out_dir=str(folder), **TEACHER),
        "rollout": dict(prompts="p.json", eval_prompts=1, steps=2, height=32, width=32, out_dir="ro"),
    })
    run_stage(params)
    store = RolloutStore(tmp_path / "ro")
    assert len(store.entries("train")) == 2 and len(store.entries("eval")) == 1
    assert json.loads((tmp_path / "ro" / INDEX_FILE).read_text())["stats"]["sampled"] == 3
    run_stage(params)  # rerun: everything reused
    assert json.loads((tmp_path / "ro" / INDEX_FILE).read_text())["stats"]["reused"] == 3



@pytest.mark.slow
def test_torchrun_two_ranks_write_the_single_process_rollouts(teacher, tmp_path, monkeypatch):
    """``torchrun --nproc-per-node 2 -m stages.rollout``: the ranks split the 3 batches (2 + 1) and rank 0
    writes the latents and images one process writes, bit for bit, with the same entries."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(teacher.folder, tmp_path / "teachers")
    write_prompts(tmp_path / "p.json", PROMPTS[:3])
    params = write_params(tmp_path / "params.yaml", {
        "teacher": dict(out_dir="teachers", **TEACHER),
        "rollout": dict(prompts="p.json", eval_prompts=1, steps=2, height=32, width=48, out_dir="ro"),
    })
    with one_thread():
        run_stage(params)
    shutil.move("ro", "ref")
    proc = torchrun(["-m", "stages.rollout", "params.yaml"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("rollout: 3 teacher rollouts (3 sampled") == 1  # rank 0 reports
    assert (Path("ro") / "rollouts.safetensors").read_bytes() == (Path("ref") / "rollouts.safetensors").read_bytes()
    got, want = (json.loads((Path(d) / INDEX_FILE).read_text()) for d in ("ro", "ref"))
    assert got["entries"] == want["entries"] and len(got["entries"]) == 3
    assert got["stats"]["sampled"] == 3 and got["stats"]["seconds_per_image"] > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left behind
