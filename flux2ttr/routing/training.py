"""The ``train_controller`` stage: REINFORCE training of the per-step, per-layer routing controller.

One iteration:

1. take the next training teacher rollout (prompt, seed, setting) from the rollout store;
2. the controller maps each denoising step's ``(sigma, cfg, height, width)`` to one logit per routed layer
   (high = full attention); under ``no_grad`` one Bernoulli mask per step is sampled over the *eligible*
   layers (ready students only); non-ready layers are forced to full attention and tracked apart;
3. a live student rollout runs with that mask (same prompt, seed and setting as the teacher rollout);
4. quality loss vs the teacher rollout (:class:`flux2ttr.routing.quality.QualityLoss`), the full-attention ratio
   over eligible layers and the policy entropy give the reward (:mod:`flux2ttr.routing.reward`);
5. the logged actions' log-probs are recomputed with gradients (the policy is a function of sigma only,
   so the recompute is exact), and the REINFORCE loss ``-(reward - baseline) * sum log_prob`` over
   eligible layers is minimised with AdamW; the reward baseline (EMA, clamped) is updated after.

Steps 2-4 run ``group_size`` times per iteration on the same prompt and seed (masks drawn one after the
other from the iteration's generator); with more than one sample each one's baseline is the leave-one-out
mean of the group's other rewards and the loss is the group mean (:func:`flux2ttr.routing.reward.group_baselines`).
Records are one per rollout (``iteration``, ``sample``).

Each iteration appends a record (mask, reward, every loss term, ratios) to the records file; checkpoints
every ``checkpoint_every`` iterations hold the controller weights, AdamW state, baseline and iteration
count, and a rerun resumes from the last one exactly (the mask of iteration ``i`` comes from a generator
seeded by ``(seed, i)``). The final artifact records the layer order and the student artifact's sha256.

Outputs besides the artifact and the records: ``metrics/controller.json``, the few numbers ``dvc metrics
show`` compares across runs (:func:`controller_metrics`), and next to it ``metrics/controller_details.json``
(:func:`details_path`; not a DVC metric) with the whole :meth:`ControllerTrainer.summary`, which the
artifact header carries too.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from flux2ttr.atomic import atomic_write_text
from flux2ttr.checkpoint import CheckpointError, load_checkpoint
from flux2ttr.comet_log import GuardedComet
from flux2ttr.config import ConfigError, Flux2TTRError, to_dict
from flux2ttr.contract import layer_sort_key
from flux2ttr.provenance import source_digest
from flux2ttr.routing.controller import (
    ControllerConfig,
    TTRController,
    load_controller_checkpoint,
    sample_mask,
    save_controller,
    save_controller_checkpoint,
)
from flux2ttr.routing.reward import (
    RewardBaseline,
    compute_reward,
    eligible_stats,
    group_baselines,
    recompute_log_prob,
    reinforce_loss,
    split_eligible,
)
from flux2ttr.routing.rollouts import RolloutStore, TeacherRollout
from flux2ttr.routing.student_rollout import make_router, run_student_rollout, schedule
from flux2ttr.seeds import generator
from flux2ttr.students.artifacts import StudentArtifact, file_sha256

CHECKPOINT_NAME = "controller_ckpt.safetensors"
RECORDS_NAME = "records.jsonl"


class ControllerTrainError(RuntimeError, Flux2TTRError):
    """The controller stage cannot run on its inputs (message names the file and the fix)."""


@dataclass
class ControllerTrainConfig(ControllerConfig):
    """params.yaml section ``controller``: the model fields of :class:`ControllerConfig` plus the training loop."""

    students: str = "artifacts/flux2_ttr.safetensors"  # student artifact (input)
    rollouts: str = "rollouts/teacher"  # teacher rollout store (input)
    artifact: str = "artifacts/flux2_ttr_controller.safetensors"  # trained controller (output)
    metrics: str = "metrics/controller.json"  # dvc metrics (output); details next to it: controller_details.json
    records: str = "rollouts/controller_records.jsonl"  # per-iteration student rollout records (output)
    checkpoint_dir: str = "checkpoints/controller"  # resumable checkpoint + records so far
    iterations: int = 24  # policy updates (group_size student rollouts each)
    group_size: int = 4  # masks sampled per iteration on one prompt/seed; > 1: leave-one-out group baseline
    checkpoint_every: int = 8  # iterations between checkpoints (0 = only at the end)
    lr: float = 3.0e-3  # AdamW
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max grad norm (0 = off)
    train_seed: int = 0  # mask sampling and prompt order
    metrics_window: int = 8  # final metrics average the last N iterations

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        if self.group_size < 1:
            raise ConfigError(f"controller.group_size must be >= 1, got {self.group_size}")
        if self.iterations < 1:
            raise ConfigError(f"controller.iterations must be >= 1, got {self.iterations}")
        if self.checkpoint_every < 0 or self.metrics_window < 1:
            raise ConfigError("controller.checkpoint_every must be >= 0 and controller.metrics_window >= 1")


# ------------------------------------------------------------------------------------------ metrics files
def details_path(metrics_path: str | Path) -> Path:
    """Where the details of a metrics file go: ``metrics/controller.json`` -> ``metrics/controller_details.json``
    (next to it, not a DVC metric)."""
    p = Path(metrics_path)
    return p.with_name(f"{p.stem}_details.json")


def controller_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics of a run (numbers only, a few) from :meth:`ControllerTrainer.summary`: ``reward``,
    ``quality_loss`` and ``full_ratio`` averaged over the last ``metrics_window`` iterations, and the
    training wall ``seconds`` when the summary has them (``train_seconds``)."""
    out: dict[str, Any] = {"reward": float(summary["reward_last"]), "quality_loss": float(summary["quality_loss_last"]),
                           "full_ratio": float(summary["full_ratio_last"])}
    if summary.get("train_seconds") is not None:
        out["seconds"] = round(float(summary["train_seconds"]), 1)
    return out


# ------------------------------------------------------------------------------------------ eligibility
def eligibility(layer_keys: list[str], art: StudentArtifact) -> tuple[list[str], list[str]]:
    """``(eligible, forced_full)``: layers with a *ready* student, and the other routed layers (always full
    attention). Keys in execution order; a routed layer missing from the artifact is an error."""
    missing = [k for k in layer_keys if k not in art.layers]
    if missing:
        raise ControllerTrainError(f"{art.path}: no student for routed layer(s) {missing}")
    return split_eligible(layer_keys, art.ready)


def full_mask(sampled: torch.Tensor, eligible_cols: list[int], num_layers: int) -> torch.Tensor:
    """``[S, L]`` bool mask: ``sampled [S, len(eligible_cols)]`` on the eligible columns, True (full) elsewhere."""
    out = torch.ones(sampled.shape[0], num_layers, dtype=torch.bool)
    if eligible_cols:
        out[:, eligible_cols] = sampled.bool()
    return out


def iteration_generator(seed: int, iteration: int) -> torch.Generator:
    """The mask RNG of one iteration (a pure function of seed and iteration: resume is exact)."""
    return generator(seed, iteration)


def controller_inputs(store: RolloutStore) -> dict[str, torch.Tensor]:
    """Per-step controller inputs of the store's setting: ``sigma, cfg [S]`` fp32, ``height, width [S]``
    (latent tokens)."""
    scfg = store.sampler_config()
    sig = schedule(scfg)
    S = sig.shape[0]
    return {"sigma": sig, "cfg": torch.full((S,), float(scfg.guidance)),
            "height": torch.full((S,), float(scfg.latent_height)), "width": torch.full((S,), float(scfg.latent_width))}


def pooled_prompt_embedding(teacher, prompt: str) -> torch.Tensor:
    """``[ctx]`` fp32: the mean of the prompt's conditioning rows that are not zero padding (the optional
    prompt input of the controller; its ``prompt_dim`` must equal the teacher's context width)."""
    cond = teacher.encode_prompts([prompt])[0].float().cpu()  # [512, ctx], real tokens last
    real = cond.abs().sum(-1) > 0
    return cond[real].mean(0) if bool(real.any()) else torch.zeros(cond.shape[-1])


def rollout_inputs(base: dict[str, torch.Tensor], controller: TTRController, teacher, prompt: str
                   ) -> dict[str, torch.Tensor]:
    """``base`` plus ``prompt_embedding [S, P]`` when the controller takes one."""
    if not controller.cfg.use_prompt_embedding:
        return base
    emb = pooled_prompt_embedding(teacher, prompt)
    if emb.shape[0] != controller.cfg.prompt_dim:
        raise ConfigError(f"controller.prompt_dim = {controller.cfg.prompt_dim} but the teacher's prompt embedding "
                          f"has {emb.shape[0]} channels; set controller.prompt_dim: {emb.shape[0]}")
    return {**base, "prompt_embedding": emb[None].expand(base["sigma"].shape[0], -1)}


def policy_logits(controller: TTRController, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[S, L]`` logits (high = full attention) for every step of a rollout."""
    return controller(inputs["sigma"], inputs["cfg"], inputs["height"], inputs["width"],
                      inputs.get("prompt_embedding"))


# the modules whose code decides what an iteration does: a change there means the checkpoint is stale
# the modules an iteration runs (their source is part of the resume fingerprint)
_CODE_MODULES = ("flux2ttr.routing.training", "flux2ttr.routing.controller", "flux2ttr.routing.reward",
                 "flux2ttr.routing.quality", "flux2ttr.routing.student_rollout", "flux2ttr.teachers.router",
                 "flux2ttr.teachers.sampler", "flux2ttr.students.hkr", "flux2ttr.teachers.comfyui",
                 "flux2ttr.comfy.patch")


def code_digest() -> str:
    """sha256 over the source of the modules an iteration runs (part of the resume fingerprint)."""
    return source_digest(_CODE_MODULES)


# training-loop fields that may change between a checkpoint and its resume (length, logging, output paths)
_RESUMABLE_FIELDS = ("iterations", "checkpoint_every", "metrics_window", "artifact", "metrics", "records")


# ------------------------------------------------------------------------------------------ records
def write_records(path: Path, records: list[dict[str, Any]]) -> None:
    """All records as JSON lines, written atomically."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ training
class ControllerTrainer:
    """Owns the controller, its optimiser, the baseline and the records; :meth:`train` runs iterations."""

    def __init__(self, cfg: ControllerTrainConfig, teacher, students: StudentArtifact, store: RolloutStore,
                 quality, *, comet: GuardedComet | None = None, show_progress: bool = True) -> None:
        self.cfg, self.teacher, self.art, self.store, self.quality = cfg, teacher, students, store, quality
        self.comet = comet or GuardedComet(None, "train_controller", {})
        self.show_progress = show_progress
        self.layer_keys = sorted(students.layers, key=layer_sort_key)
        self.eligible, self.forced = eligibility(self.layer_keys, students)
        self.eligible_cols = [self.layer_keys.index(k) for k in self.eligible]
        self.train_rollouts: list[TeacherRollout] = store.entries("train")
        self.inputs = controller_inputs(store)
        self.sampler_cfg = store.sampler_config()
        torch.manual_seed(cfg.train_seed)  # controller init
        self.controller = TTRController(cfg, self.layer_keys)
        self.opt = torch.optim.AdamW(self.controller.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.baseline = RewardBaseline(cfg)
        self.iteration = 0
        self.records: list[dict[str, Any]] = []
        self.student_sha256 = file_sha256(students.path)

    # --- checkpoint -----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return Path(self.cfg.checkpoint_dir) / CHECKPOINT_NAME

    @property
    def checkpoint_records_path(self) -> Path:
        return Path(self.cfg.checkpoint_dir) / RECORDS_NAME

    def _identity(self) -> dict[str, Any]:
        return {"layer_keys": self.layer_keys, "eligible": self.eligible, "student_sha256": self.student_sha256,
                "setting": self.store.setting, "teacher_sha256": self.store.teacher.get("sha256")}

    def save_checkpoint(self) -> None:
        # records first: a checkpoint never points past the records it needs
        write_records(self.checkpoint_records_path, self.records)
        save_controller_checkpoint(self.checkpoint_path, self.controller, self.opt, self.baseline,
                                   iteration=self.iteration,
                                   extra={"fingerprint": self._fingerprint()})

    def _fingerprint(self) -> dict[str, Any]:
        cfg = {k: v for k, v in to_dict(self.cfg).items() if k not in _RESUMABLE_FIELDS}
        return {**self._identity(), "config": cfg, "code": code_digest()}

    def try_resume(self) -> bool:
        """Continue from the checkpoint if it was made by this setup (same layers, students, rollout setting
        and params apart from the iteration count and output paths). Another setup's checkpoint is ignored
        with a message (training starts over and overwrites it); a corrupt one is an error."""
        if not self.checkpoint_path.is_file():
            return False
        _, header = load_checkpoint(self.checkpoint_path)
        extra = header.get("extra") or {}
        if extra.get("fingerprint") != self._fingerprint():
            print(f"train_controller: ignoring {self.checkpoint_path} (made with other students, rollouts or "
                  "controller params); starting over", file=sys.stderr)
            return False
        load_controller_checkpoint(self.checkpoint_path, self.controller, self.opt, self.baseline)
        self.iteration = int(header["iteration"])
        records = read_records(self.checkpoint_records_path)
        if len(records) < self.iteration * self.cfg.group_size:
            raise CheckpointError(f"{self.checkpoint_records_path}: {len(records)} records for a checkpoint at "
                                  f"iteration {self.iteration}; delete {self.cfg.checkpoint_dir} to start over")
        self.records = records[: self.iteration * self.cfg.group_size]
        return True

    # --- one iteration --------------------------------------------------------------------------
    def step(self, router) -> list[dict[str, Any]]:
        """One policy update: ``group_size`` masks sampled on one prompt/seed, one record per rollout."""
        cfg, it = self.cfg, self.iteration
        ro = self.train_rollouts[it % len(self.train_rollouts)]
        gen = iteration_generator(cfg.train_seed, it)
        inputs = rollout_inputs(self.inputs, self.controller, self.teacher, ro.prompt)
        with torch.no_grad():
            logits = policy_logits(self.controller, inputs)  # [S, L]
        rolls = []
        for _ in range(cfg.group_size):
            with torch.no_grad():
                sampled = sample_mask(logits[:, self.eligible_cols], generator=gen)  # [S, E]
            masks = full_mask(sampled, self.eligible_cols, len(self.layer_keys))
            stats = eligible_stats(logits, masks, self.eligible_cols)
            res = run_student_rollout(self.teacher, router, [ro.prompt], self.sampler_cfg, masks, self.layer_keys,
                                      seeds=[ro.seed], prompt_indices=[ro.prompt_index])
            q_total, q_terms = self.quality(res.images, ro.image[None], student_latents=res.latents,
                                            teacher_latents=ro.latents[None], prompts=[ro.prompt])
            q_total = float(q_total)
            reward = float(compute_reward(q_total, stats["full_ratio"], stats["entropy"], cfg))
            rolls.append((sampled, masks, stats, res, q_total, q_terms, reward))
        rewards = [r[-1] for r in rolls]
        baselines = group_baselines(rewards, float(self.baseline.value))
        # REINFORCE: log-probs of the logged actions, recomputed with gradients; group mean of the losses
        self.opt.zero_grad(set_to_none=True)
        lps, losses = [], []
        for (sampled, *_rest), reward, base in zip(rolls, rewards, baselines):
            lp = recompute_log_prob(self.controller, inputs, sampled, self.eligible_cols)
            lps.append(lp)
            losses.append(reinforce_loss(reward, base, lp) / cfg.group_size)
        torch.stack(losses).sum().backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.controller.parameters(),
                                                     cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
        self.opt.step()
        out = []
        for k, ((sampled, masks, stats, res, q_total, q_terms, reward), base, lp, loss) in enumerate(
                zip(rolls, baselines, lps, losses)):
            self.baseline.update(reward)  # the EMA sees every reward (it is the baseline when group_size = 1)
            out.append({
                "iteration": it, "sample": k, "prompt_index": ro.prompt_index, "prompt": ro.prompt, "seed": ro.seed,
                "layer_keys": self.layer_keys, "eligible": self.eligible, "forced_full": self.forced,
                "mask": masks.int().tolist(), "sigmas": [float(s) for s in self.inputs["sigma"]],
                "reward": reward, "baseline": base, "advantage": reward - base,
                "quality_loss": q_total, "quality_terms": {k2: float(v) for k2, v in q_terms.items()},
                "quality_skipped": list(getattr(self.quality, "skipped", [])),
                "full_ratio": stats["full_ratio"], "student_ratio": 1.0 - stats["full_ratio"],
                "full_ratio_all_layers": stats["full_ratio_all_layers"], "entropy": stats["entropy"],
                "log_prob_sum": float(lp.detach()), "policy_loss": float(loss.detach()), "grad_norm": gnorm,
                "seconds": res.seconds,
            })
        self.records.extend(out)
        self.iteration += 1
        return out

    def train(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        router = make_router(self.teacher, self.art.layers)
        try:
            bar = tqdm(range(self.iteration, cfg.iterations), desc="controller", disable=not self.show_progress)
            for n, _ in enumerate(bar):
                recs = self.step(router)
                bar.set_postfix(reward=f"{recs[-1]['reward']:.4f}", full=f"{recs[-1]['full_ratio']:.2f}")
                for rec in recs:
                    self._log(rec, force=n == 0 and rec["sample"] == 0)
                if cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            router.uninstall()
        self.save_checkpoint()
        return self.records

    def _log(self, rec: dict[str, Any], *, force: bool) -> None:
        flat = {k: rec[k] for k in ("reward", "baseline", "advantage", "quality_loss", "full_ratio",
                                    "full_ratio_all_layers", "entropy", "policy_loss", "grad_norm", "seconds")}
        flat.update({f"quality/{k}": v for k, v in rec["quality_terms"].items()})
        # the first iteration of every run (fresh or resumed) is always logged: a broken setup shows at once
        step = rec["iteration"] * self.cfg.group_size + rec["sample"]  # one Comet step per rollout
        self.comet.call("log_metrics", flat, step=step, force=force)

    # --- outputs --------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The run in numbers (the details file and the artifact header; :func:`controller_metrics` takes
        the DVC metrics from it): counts, first/last-window means of reward, quality loss, full ratio and
        entropy (the window is ``metrics_window`` iterations), the reward baseline, seconds per iteration,
        the forced-full layers and the student artifact's sha256."""
        recs = self.records
        n = self.cfg.metrics_window * self.cfg.group_size  # the window counts iterations, records are rollouts
        win = recs[-n:]

        def mean(key: str, rs: list[dict[str, Any]]) -> float:
            return float(sum(r[key] for r in rs) / len(rs))

        first = recs[:n]
        return {
            "iterations": self.iteration, "rollouts": len(recs), "group_size": self.cfg.group_size,
            "layers": len(self.layer_keys), "eligible_layers": len(self.eligible),
            "forced_full_layers": len(self.forced), "forced_full": self.forced,
            "reward_first": mean("reward", first), "reward_last": mean("reward", win),
            "quality_loss_first": mean("quality_loss", first), "quality_loss_last": mean("quality_loss", win),
            "full_ratio_last": mean("full_ratio", win), "entropy_last": mean("entropy", win),
            "baseline": float(self.baseline.value), "seconds_per_iteration": mean("seconds", recs),
            "student_sha256": self.student_sha256,
        }

    def save_artifact(self, path: str | Path) -> None:
        save_controller(path, self.controller, layer_order=self.layer_keys, student_sha256=self.student_sha256,
                        eligible=self.eligible, config=to_dict(self.cfg), teacher=self.store.teacher,
                        metrics=self.summary())
