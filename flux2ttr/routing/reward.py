"""Reward, baseline and REINFORCE loss of controller training.

``reward = -quality_loss - lambda_eff * |full_ratio - (1 - target_ttr_ratio)| + lambda_entropy * entropy``

where ``full_ratio`` is the share of full-attention decisions and ``entropy`` the mean Bernoulli entropy
(nats) of the policy, both over *eligible* layers only (layers with a ready student). Non-ready layers are
forced to full attention and tracked apart; they never enter the ratio, the entropy or the log-prob.

Baseline: an EMA of rewards; the value fed into the EMA is ``max(reward, reward_baseline_quality_floor)``
so one catastrophic rollout cannot drag the baseline far down (the advantage of the next rollouts would be
inflated). The first update sets the baseline to that value; later ones ``b <- m*b + (1-m)*x``.

REINFORCE: ``loss = -(reward - baseline) * sum(log_prob of the logged actions over eligible layers)``.

Group baseline (``group_size`` K > 1 masks sampled per iteration on the same prompt and seed): sample k's
baseline is the leave-one-out mean of the other rewards of its group, ``b_k = (sum_j r_j - r_k) / (K - 1)``,
and the iteration's loss is the group mean ``(1/K) sum_k -(r_k - b_k) * log_prob_k``. Prompt/seed difficulty
cancels inside the group, so only the masks' effect is credited (much lower variance than the EMA). With
K = 1 the baseline is the clamped EMA above (which is updated with every reward either way).
"""

from __future__ import annotations

from typing import Any

import torch

from flux2ttr.routing.controller import entropy as bernoulli_entropy
from flux2ttr.routing.controller import log_prob


def split_eligible(layer_keys: list[str], ready: dict[str, bool]) -> tuple[list[str], list[str]]:
    """``(eligible, forced_full)`` in ``layer_keys`` order: ready students vs the rest (always full)."""
    eligible = [k for k in layer_keys if ready.get(k, False)]
    forced = [k for k in layer_keys if not ready.get(k, False)]
    return eligible, forced


def eligible_stats(logits: torch.Tensor, mask: torch.Tensor, eligible_cols: list[int]) -> dict[str, float]:
    """``logits, mask [S, L]`` -> ``full_ratio`` and mean ``entropy`` over the eligible columns, and
    ``full_ratio_all_layers`` (every column, forced ones included). No eligible column: ratio 1, entropy 0."""
    out = {"full_ratio_all_layers": float(mask.float().mean())}
    if not eligible_cols:
        return {**out, "full_ratio": 1.0, "entropy": 0.0}
    out["full_ratio"] = float(mask[:, eligible_cols].float().mean())
    out["entropy"] = float(bernoulli_entropy(logits[:, eligible_cols].detach().float()).mean())
    return out


def compute_reward(quality_loss: float, full_ratio: float, entropy: float, cfg: Any) -> float:
    """The reward of one rollout (``cfg`` has ``lambda_eff``, ``target_ttr_ratio``, ``lambda_entropy``)."""
    return (-float(quality_loss) - cfg.lambda_eff * abs(float(full_ratio) - (1.0 - cfg.target_ttr_ratio))
            + cfg.lambda_entropy * float(entropy))


class RewardBaseline:
    """EMA of clamped rewards with an update count; ``state_dict``/``load_state_dict`` are JSON-able."""

    def __init__(self, cfg: Any = None, *, momentum: float | None = None, floor: float | None = None) -> None:
        self.momentum = float(momentum if momentum is not None else cfg.baseline_momentum)
        self.floor = float(floor if floor is not None else cfg.reward_baseline_quality_floor)
        self.value = 0.0
        self.count = 0

    def update(self, reward: float) -> float:
        """Feed ``max(reward, floor)`` into the EMA; returns the new value."""
        x = max(float(reward), self.floor)
        self.value = x if self.count == 0 else self.momentum * self.value + (1.0 - self.momentum) * x
        self.count += 1
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "count": self.count, "momentum": self.momentum, "floor": self.floor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.count = float(state["value"]), int(state["count"])
        self.momentum, self.floor = float(state["momentum"]), float(state["floor"])


def group_baselines(rewards: list[float], ema_value: float) -> list[float]:
    """Per-sample baselines of one iteration's group: the EMA value when there is one sample, else the
    leave-one-out mean ``(sum(rewards) - r_k) / (K - 1)`` (see the module docstring)."""
    k = len(rewards)
    if k == 0:
        raise ValueError("group_baselines needs at least one reward")
    if k == 1:
        return [float(ema_value)]
    total = float(sum(float(r) for r in rewards))
    return [(total - float(r)) / (k - 1) for r in rewards]


def reinforce_loss(reward: float, baseline: float, log_prob_sum: torch.Tensor) -> torch.Tensor:
    """``-(reward - baseline) * log_prob_sum`` (scalar tensor with the grad of ``log_prob_sum``)."""
    return -(float(reward) - float(baseline)) * log_prob_sum


def recompute_log_prob(controller: torch.nn.Module, step_inputs: dict[str, torch.Tensor], actions: torch.Tensor,
                       eligible: list[int]) -> torch.Tensor:
    """Sum of log-probs of the logged ``actions [S, E]`` (bool, True = full; one row per step, columns =
    ``eligible`` column indices of the controller output) recomputed with gradients enabled, whatever the
    caller's grad mode. ``step_inputs``: ``sigma, cfg, height, width [S]`` (+ optional ``prompt_embedding``)."""
    with torch.enable_grad():
        logits = controller(step_inputs["sigma"], step_inputs["cfg"], step_inputs["height"], step_inputs["width"],
                            step_inputs.get("prompt_embedding"))
        if not eligible:
            return logits.sum() * 0.0
        if actions.shape != (logits.shape[0], len(eligible)):
            raise ValueError(f"actions must be [{logits.shape[0]}, {len(eligible)}], got {list(actions.shape)}")
        return log_prob(logits[:, eligible], actions.bool()).sum()
