"""The ``evaluate`` stage: the trained controller against the teacher and two fixed policies.

On the held-out (``eval``) teacher rollouts, for every ``quality_speed`` in the config and both policy modes

* ``stochastic``: one Bernoulli mask per step sampled from the controller (seeded),
* ``threshold``: deterministic, full attention where ``sigmoid(logit)`` clears the threshold mapped from
  ``quality_speed``,

student rollouts (same prompt, seed and setting as the teacher rollout) are scored with the quality loss
(every term), the full-attention ratio over eligible layers, and the wall time per image next to the
teacher's (timed here, in the same process, through the same router with nothing routed).

At the reference point (``reference_quality_speed``, threshold mode) three fixed policies are scored too:
``all_student`` (every eligible layer runs its student on every step), ``random`` (random masks with exactly
the controller's number of full-attention slots, ``random_repeats`` draws) and ``fixed_schedule`` (the same
number of full slots given to the earliest steps, layers in order). ``comparison`` in the metrics says by
how much the controller's quality loss is below each.

Outputs: ``metrics/eval.json``, the few numbers ``dvc metrics show`` compares across runs
(:func:`eval_metrics`: the controller at the reference point, its speed-up over the teacher and its relative
margin over each fixed policy), and next to it ``metrics/eval_details.json`` (not a DVC metric: every point,
baseline, per-rollout loss and quality term; with scene-caption prompts also ``caption_check``, the caption
checker's pass rate of the teacher's and each policy's images); a quality-vs-speed plot (PNG, plus its CSV table: one row per
point, ``policy`` naming its series) and a teacher/student image grid (PNG).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from flux2ttr.atomic import atomic_write_bytes
from flux2ttr.config import ConfigError, Flux2TTRError, check_range
from flux2ttr.routing.controller import sample_mask, threshold_mask
from flux2ttr.routing.rollouts import RolloutStore, TeacherRollout
from flux2ttr.routing.student_rollout import make_router, run_student_rollout
from flux2ttr.routing.training import controller_inputs, eligibility, full_mask, policy_logits, rollout_inputs
from flux2ttr.seeds import generator
from flux2ttr.students.artifacts import StudentArtifact

MODES = ("stochastic", "threshold")


class EvaluateError(RuntimeError, Flux2TTRError):
    """The evaluate stage cannot run on its inputs (message names the file and the fix)."""


@dataclass
class EvaluateConfig:
    """params.yaml section ``evaluate``."""

    students: str = "artifacts/flux2_ttr.safetensors"
    controller: str = "artifacts/flux2_ttr_controller.safetensors"
    rollouts: str = "rollouts/teacher"
    metrics: str = "metrics/eval.json"  # dvc metrics (output); details next to it: eval_details.json
    plot: str = "plots/evaluate/quality_vs_speed.png"
    plot_table: str = "plots/evaluate/quality_vs_speed.csv"
    grid: str = "plots/evaluate/grid.png"
    quality_speed: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # 0 = quality, 1 = speed
    modes: list[str] = field(default_factory=lambda: list(MODES))
    reference_quality_speed: float = 0.5  # where the fixed policies are compared (threshold mode)
    random_repeats: int = 2  # random-mask draws per rollout
    seed: int = 0  # stochastic masks and random baselines
    timing_repeats: int = 1  # teacher timing runs per rollout (the first also checks the stored latents)
    grid_rollouts: int = 2  # teacher/student pairs in the image grid

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ConfigError(f"evaluate.modes: {bad or self.modes} not in {list(MODES)}")
        if not self.quality_speed or any(not 0.0 <= float(q) <= 1.0 for q in self.quality_speed):
            raise ConfigError(f"evaluate.quality_speed: values in [0, 1] expected, got {self.quality_speed}")
        if not 0.0 <= self.reference_quality_speed <= 1.0:
            raise ConfigError("evaluate.reference_quality_speed must be in [0, 1]")
        if self.random_repeats < 1 or self.timing_repeats < 1 or self.grid_rollouts < 1:
            raise ConfigError("evaluate.random_repeats, timing_repeats and grid_rollouts must be >= 1")
        check_range("evaluate", self, "seed", ge=0)


# ------------------------------------------------------------------------------------------ masks
def controller_masks(controller, inputs: dict[str, torch.Tensor], eligible_cols: list[int], num_layers: int,
                     mode: str, quality_speed: float, generator: torch.Generator) -> torch.Tensor:
    """``[S, L]`` bool mask (True = full attention) of the controller policy in ``mode``; ``inputs`` as
    :func:`flux2ttr.routing.training.rollout_inputs` builds them."""
    with torch.no_grad():
        logits = policy_logits(controller, inputs)[:, eligible_cols]
        if mode == "stochastic":
            sampled = sample_mask(logits, generator=generator, quality_speed=quality_speed)
        elif mode == "threshold":
            sampled = threshold_mask(logits, quality_speed)
        else:
            raise ValueError(f"unknown mode {mode!r}")
    return full_mask(sampled, eligible_cols, num_layers)


def count_mask(n_full: int, steps: int, eligible_cols: list[int], num_layers: int, *,
               generator: torch.Generator | None) -> torch.Tensor:
    """A fixed policy with exactly ``n_full`` full-attention slots among the ``steps x eligible`` ones:
    random positions (``generator``) or, with ``generator=None``, the earliest steps first (layers in order)."""
    slots = steps * len(eligible_cols)
    if not 0 <= n_full <= slots:
        raise ValueError(f"n_full = {n_full} outside [0, {slots}]")
    flat = torch.zeros(slots, dtype=torch.bool)
    order = torch.randperm(slots, generator=generator) if generator is not None else torch.arange(slots)
    flat[order[:n_full]] = True
    return full_mask(flat.view(steps, len(eligible_cols)), eligible_cols, num_layers)


# ------------------------------------------------------------------------------------------ scoring
def _mean_dicts(ds: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(sum(d[k] for d in ds) / len(ds)) for k in ds[0]}


class Evaluator:
    """Runs and scores policies on the eval rollouts (one router for all of them)."""

    def __init__(self, teacher, art: StudentArtifact, store: RolloutStore, quality, layer_keys: list[str]) -> None:
        self.teacher, self.art, self.store, self.quality = teacher, art, store, quality
        self.layer_keys = layer_keys
        self.eligible, self.forced = eligibility(layer_keys, art)
        self.eligible_cols = [layer_keys.index(k) for k in self.eligible]
        self.rollouts: list[TeacherRollout] = store.entries("eval")
        self.sampler_cfg = store.sampler_config()
        self.inputs = controller_inputs(store)
        self.router = make_router(teacher, art.layers)
        self.images: dict[str, list[torch.Tensor]] = {}

    def close(self) -> None:
        self.router.uninstall()

    def run(self, name: str, masks_for) -> dict[str, Any]:
        """Score the policy ``masks_for(rollout_position, rollout) -> [S, L] mask`` on every eval rollout."""
        losses, terms, ratios, seconds = [], [], [], []
        imgs = []
        for i, ro in enumerate(self.rollouts):
            masks = masks_for(i, ro)
            res = run_student_rollout(self.teacher, self.router, [ro.prompt], self.sampler_cfg, masks,
                                      self.layer_keys, seeds=[ro.seed], prompt_indices=[ro.prompt_index])
            total, t = self.quality(res.images, ro.image[None], student_latents=res.latents,
                                    teacher_latents=ro.latents[None], prompts=[ro.prompt])
            losses.append(float(total))
            terms.append({k: float(v) for k, v in t.items()})
            elig = masks[:, self.eligible_cols]
            ratios.append(float(elig.float().mean()) if self.eligible_cols else 1.0)
            seconds.append(res.seconds)
            imgs.append(res.images[0])
        self.images[name] = imgs
        return {"quality_loss": float(sum(losses) / len(losses)), "quality_terms": _mean_dicts(terms),
                "full_ratio": float(sum(ratios) / len(ratios)), "seconds_per_image": float(sum(seconds) / len(seconds)),
                "per_rollout_quality_loss": losses}

    def time_teacher(self, repeats: int) -> dict[str, Any]:
        """Teacher wall time per image through the same router with nothing routed; checks the stored latents."""
        all_full = torch.ones(self.sampler_cfg.steps, len(self.layer_keys), dtype=torch.bool)
        secs, max_diff = [], 0.0
        for ro in self.rollouts:
            for r in range(repeats):
                res = run_student_rollout(self.teacher, self.router, [ro.prompt], self.sampler_cfg, all_full,
                                          self.layer_keys, seeds=[ro.seed], prompt_indices=[ro.prompt_index])
                secs.append(res.seconds)
                if r == 0:
                    max_diff = max(max_diff, float((res.latents[0].cpu() - ro.latents.cpu()).abs().max()))  # stored on the host
        return {"seconds_per_image": float(sum(secs) / len(secs)), "max_abs_latent_diff_vs_store": max_diff}


def evaluate(cfg: EvaluateConfig, teacher, art: StudentArtifact, store: RolloutStore, controller,
             layer_keys: list[str], quality, *, show_progress: bool = True
             ) -> tuple[dict[str, Any], dict[str, list[torch.Tensor]], list[TeacherRollout]]:
    """``(metrics, images, rollouts)``: every score as the ``metrics/eval.json`` dict (see the module
    docstring), the student images ``[3, H, W]`` of each named policy per eval rollout, and those rollouts."""
    ev = Evaluator(teacher, art, store, quality, layer_keys)
    S, L = ev.sampler_cfg.steps, len(layer_keys)
    try:
        teacher_t = ev.time_teacher(cfg.timing_repeats)
        points = []
        jobs = [(qs, mode) for mode in cfg.modes for qs in cfg.quality_speed]
        for j, (qs, mode) in enumerate(tqdm(jobs, desc="evaluate", disable=not show_progress)):
            res = ev.run(f"{mode}@{qs}", lambda i, ro, qs=qs, mode=mode, j=j: controller_masks(
                controller, rollout_inputs(ev.inputs, controller, teacher, ro.prompt), ev.eligible_cols, L, mode,
                qs, generator(cfg.seed, j, i)))
            res.update(mode=mode, quality_speed=float(qs),
                       speedup_vs_teacher=teacher_t["seconds_per_image"] / res["seconds_per_image"])
            points.append(res)

        ref_masks = [controller_masks(controller, rollout_inputs(ev.inputs, controller, teacher, ro.prompt),
                                      ev.eligible_cols, L, "threshold", cfg.reference_quality_speed,
                                      generator(cfg.seed, -1, i))
                     for i, ro in enumerate(ev.rollouts)]
        n_full = [int(m[:, ev.eligible_cols].sum()) for m in ref_masks]
        reference = ev.run("controller", lambda i, ro: ref_masks[i])
        baselines = {
            "all_student": ev.run("all_student", lambda i, ro: full_mask(
                torch.zeros(S, len(ev.eligible_cols), dtype=torch.bool), ev.eligible_cols, L)),
            "fixed_schedule": ev.run("fixed_schedule", lambda i, ro: count_mask(
                n_full[i], S, ev.eligible_cols, L, generator=None)),
        }
        rand = [ev.run(f"random#{r}", lambda i, ro, r=r: count_mask(
            n_full[i], S, ev.eligible_cols, L, generator=generator(cfg.seed, 7919, r, i))) for r in range(cfg.random_repeats)]
        baselines["random"] = {
            "quality_loss": float(sum(x["quality_loss"] for x in rand) / len(rand)),
            "quality_terms": _mean_dicts([x["quality_terms"] for x in rand]),
            "full_ratio": float(sum(x["full_ratio"] for x in rand) / len(rand)),
            "seconds_per_image": float(sum(x["seconds_per_image"] for x in rand) / len(rand)),
            "repeats": len(rand),
        }
        ev.images["random"] = ev.images["random#0"]
        comparison = {}
        for name, b in baselines.items():
            margin = b["quality_loss"] - reference["quality_loss"]
            comparison[name] = {"controller_quality_loss": reference["quality_loss"],
                                "baseline_quality_loss": b["quality_loss"], "margin": margin,
                                "relative_margin": margin / b["quality_loss"] if b["quality_loss"] > 0 else None,
                                "controller_beats": margin > 0}
    finally:
        ev.close()
    reference.update(quality_speed=cfg.reference_quality_speed, mode="threshold",
                     speedup_vs_teacher=teacher_t["seconds_per_image"] / reference["seconds_per_image"])
    metrics = {
        "teacher": teacher_t, "points": points, "reference": reference,
        "baselines": baselines, "comparison": comparison,
        "caption_check": caption_check(ev.rollouts, ev.images, ("controller", "all_student", "fixed_schedule", "random")),
        "eligible_layers": ev.eligible, "forced_full_layers": ev.forced, "layer_keys": layer_keys,
        "rollouts": len(ev.rollouts), "setting": store.setting,
    }
    return metrics, ev.images, ev.rollouts


def caption_check(rollouts: list[TeacherRollout], images: dict[str, list[torch.Tensor]],
                  policies: tuple[str, ...]) -> dict[str, Any] | None:
    """Where every eval prompt is a scene caption (the trained teacher's, ``flux2ttr scene-prompts``): the
    caption checker's pass rate (0..1, from pixels: background, each clause's colour and count in its cells) of
    the teacher's images and of each policy's, over the eval rollouts; ``None`` for any other prompts."""
    from flux2ttr.teachers.caption_check import check_image  # noqa: PLC0415
    from flux2ttr.teachers.scenes import is_scene_caption  # noqa: PLC0415

    if not rollouts or not all(is_scene_caption(ro.prompt) for ro in rollouts):
        return None
    sets = {"teacher": [ro.image for ro in rollouts], **{p: images[p] for p in policies if p in images}}
    out: dict[str, Any] = {"images": len(rollouts)}
    for name, imgs in sets.items():
        passed = [check_image(img.float().cpu().clamp(0, 1), ro.prompt).passed for img, ro in zip(imgs, rollouts)]
        out[name] = sum(passed) / len(passed)
    return out


# ------------------------------------------------------------------------------------------ outputs
def eval_metrics(details: dict[str, Any], seconds: float | None = None) -> dict[str, Any]:
    """The DVC metrics (numbers only, a few) from the :func:`evaluate` dict: the controller's
    ``quality_loss`` and ``full_ratio`` at the reference point (threshold mode), its ``speedup`` over the
    teacher there (seconds per image), ``margin.<baseline>``: how much lower its quality loss is than each
    fixed policy's, relative to that policy's (> 0: the controller is better), and the stage's wall
    ``seconds`` when given."""
    ref = details["reference"]
    out: dict[str, Any] = {"quality_loss": float(ref["quality_loss"]), "full_ratio": float(ref["full_ratio"]),
                           "speedup": float(details["teacher"]["seconds_per_image"] / ref["seconds_per_image"])}
    margin = {name: float(c["relative_margin"]) for name, c in details["comparison"].items()
              if c.get("relative_margin") is not None}
    if margin:
        out["margin"] = margin
    if details.get("caption_check"):  # scene captions: the controller's pass rate (the teacher's and the rest: details)
        out["caption_pass"] = float(details["caption_check"]["controller"])
    if seconds is not None:
        out["seconds"] = round(float(seconds), 1)
    return out


def quality_speed_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The quality-vs-speed table: one row per point, ``policy`` naming its series (``controller_<mode>``
    with one point per ``quality_speed``, each fixed policy and the teacher one point each)."""
    rows = []
    for mode in sorted({p["mode"] for p in metrics["points"]}):
        for p in sorted((p for p in metrics["points"] if p["mode"] == mode), key=lambda p: p["full_ratio"]):
            rows.append({"policy": f"controller_{mode}", "quality_speed": p["quality_speed"],
                         "full_ratio": p["full_ratio"], "quality_loss": p["quality_loss"],
                         "seconds_per_image": p["seconds_per_image"]})
    for name, b in metrics["baselines"].items():
        rows.append({"policy": name, "quality_speed": "", "full_ratio": b["full_ratio"],
                     "quality_loss": b["quality_loss"], "seconds_per_image": b["seconds_per_image"]})
    rows.append({"policy": "teacher", "quality_speed": "", "full_ratio": 1.0, "quality_loss": 0.0,
                 "seconds_per_image": metrics["teacher"]["seconds_per_image"]})
    return rows


def plot_quality_vs_speed(metrics: dict[str, Any], path: Path, table: Path | None = None) -> None:
    """Quality loss against full-attention ratio (lower-left is better): one line per controller mode
    (its ``quality_speed`` points), each fixed policy and the teacher a marker, every policy its own
    colour; ``table``: the same points as CSV (:func:`quality_speed_rows`)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = quality_speed_rows(metrics)
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    colours = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(p for p in policies if p != "teacher")}
    colours["teacher"] = "k"
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=100)
    for name in policies:
        pts = [r for r in rows if r["policy"] == name]
        xs, ys = [r["full_ratio"] for r in pts], [r["quality_loss"] for r in pts]
        if name.startswith("controller_"):
            ax.plot(xs, ys, marker="o", color=colours[name], label=f"controller ({name.split('_', 1)[1]})")
            for r in pts:
                ax.annotate(f"qs={r['quality_speed']:g}", (r["full_ratio"], r["quality_loss"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        else:
            ax.scatter(xs, ys, marker="*" if name == "teacher" else "x", s=90 if name == "teacher" else 60,
                       color=colours[name], label=name, zorder=3)
    ax.set_xlabel("full-attention ratio (eligible layers)")
    ax.set_ylabel("quality loss vs teacher")
    ax.set_title("flux2ttr: quality vs speed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    if table is not None:
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        atomic_write_bytes(table, out.getvalue().encode())


def image_grid(rollouts: list[TeacherRollout], images: dict[str, list[torch.Tensor]], names: list[str],
               path: Path, n: int) -> tuple[int, int]:
    """PNG grid: one row per rollout (first ``n``), columns teacher then each policy in ``names``; a label
    strip on top. Returns the image size ``(width, height)``."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    rows = rollouts[:n]
    cols = ["teacher"] + names
    _, H, W = rows[0].image.shape
    label_h = 14
    grid = Image.new("RGB", (W * len(cols), label_h + H * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(cols):
        draw.text((c * W + 2, 1), name[: max(4, W // 6)], fill="black")
    for r, ro in enumerate(rows):
        for c, name in enumerate(cols):
            img = ro.image if name == "teacher" else images[name][r]
            arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            grid.paste(Image.fromarray(arr), (c * W, label_h + r * H))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return grid.size
