"""Reward formula, clamped baseline EMA, eligibility, REINFORCE loss and log-prob recompute."""

from __future__ import annotations

import pytest
import torch

from flux2ttr.routing.controller import ControllerConfig, TTRController, log_prob, sample_mask
from flux2ttr.routing.reward import (
    RewardBaseline,
    compute_reward,
    eligible_stats,
    recompute_log_prob,
    reinforce_loss,
    split_eligible,
)

KEYS = ["single_blocks.0", "single_blocks.1", "single_blocks.2", "single_blocks.3"]


def test_reward_formula_values():
    cfg = ControllerConfig(lambda_eff=0.5, target_ttr_ratio=0.75, lambda_entropy=0.1)
    # -0.2 - 0.5*|0.5 - 0.25| + 0.1*0.6 = -0.2 - 0.125 + 0.06
    assert compute_reward(0.2, 0.5, 0.6, cfg) == pytest.approx(-0.265, abs=1e-12)
    # on target, no entropy: reward = -quality
    assert compute_reward(0.3, 0.25, 0.0, cfg) == pytest.approx(-0.3, abs=1e-12)
    # too few full layers is penalised the same as too many
    assert compute_reward(0.0, 0.0, 0.0, cfg) == pytest.approx(compute_reward(0.0, 0.5, 0.0, cfg))
    assert compute_reward(0.0, 0.0, 0.0, cfg) == pytest.approx(-0.125)


def test_baseline_clamp_ema_and_state():
    b = RewardBaseline(ControllerConfig(baseline_momentum=0.9, reward_baseline_quality_floor=-0.3))
    assert b.value == 0.0 and b.count == 0
    assert b.update(-0.1) == pytest.approx(-0.1)  # first update sets the value
    assert b.update(-5.0) == pytest.approx(0.9 * -0.1 + 0.1 * -0.3)  # clamped at the floor
    assert b.update(0.4) == pytest.approx(0.9 * (0.9 * -0.1 + 0.1 * -0.3) + 0.1 * 0.4)  # no upper clamp
    assert b.count == 3
    b2 = RewardBaseline(momentum=0.5, floor=-1.0)
    b2.load_state_dict(b.state_dict())
    assert b2.state_dict() == b.state_dict()
    first = RewardBaseline(momentum=0.9, floor=-0.3)
    first.update(-10.0)
    assert first.value == pytest.approx(-0.3)  # a catastrophic first reward enters clamped too


def test_eligibility_and_stats():
    ready = {KEYS[0]: True, KEYS[1]: False, KEYS[3]: True}  # KEYS[2] missing = not ready
    elig, forced = split_eligible(KEYS, ready)
    assert elig == [KEYS[0], KEYS[3]] and forced == [KEYS[1], KEYS[2]]
    logits = torch.tensor([[0.0, 5.0, 5.0, 2.0], [1.0, -5.0, -5.0, -1.0]])
    mask = torch.tensor([[False, True, True, True], [True, True, True, False]])
    st = eligible_stats(logits, mask, [0, 3])
    assert st["full_ratio"] == pytest.approx(0.5)  # forced columns do not count
    assert st["full_ratio_all_layers"] == pytest.approx(6 / 8)
    p = torch.sigmoid(logits[:, [0, 3]].double())
    h = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
    assert st["entropy"] == pytest.approx(float(h), rel=1e-6)
    assert eligible_stats(logits, mask, []) == {"full_ratio_all_layers": 0.75, "full_ratio": 1.0, "entropy": 0.0}


def test_reinforce_loss_and_recompute_matches_sampling_time():
    torch.manual_seed(0)
    ctrl = TTRController(ControllerConfig(sigma_dim=8, cfg_dim=4, res_freq_dim=4, res_dim=4, hidden=16), KEYS)
    S = 4
    inputs = {"sigma": torch.linspace(1.0, 0.1, S), "cfg": torch.full((S,), 4.0),
              "height": torch.full((S,), 16.0), "width": torch.full((S,), 16.0)}
    eligible = [0, 2, 3]
    with torch.no_grad():  # sampling time: no graph
        logits = ctrl(*inputs.values())
        actions = sample_mask(logits[:, eligible], torch.Generator().manual_seed(4))
        lp_sampled = log_prob(logits[:, eligible], actions).sum()
        # recompute works even when the caller is in no_grad
        lp = recompute_log_prob(ctrl, inputs, actions, eligible)
    assert lp.requires_grad
    assert torch.allclose(lp.detach(), lp_sampled, atol=1e-6)
    # reference in fp64 from the same logits
    l64 = logits[:, eligible].double()
    ref = torch.where(actions, torch.nn.functional.logsigmoid(l64), torch.nn.functional.logsigmoid(-l64)).sum()
    assert float(lp.detach()) == pytest.approx(float(ref), rel=1e-5)

    loss = reinforce_loss(-0.2, -0.5, lp)
    assert float(loss.detach()) == pytest.approx(-0.3 * float(lp.detach()), rel=1e-6)
    loss.backward()
    grads = [p.grad for p in ctrl.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # the forced column (1) gets no gradient at the output layer
    assert ctrl.head[-1].bias.grad[1] == 0 and (ctrl.head[-1].bias.grad[eligible] != 0).all()
    # gradient sign: positive advantage raises the log-prob of the taken actions
    with torch.no_grad():
        for p in ctrl.parameters():
            p -= 1e-2 * p.grad
    assert float(recompute_log_prob(ctrl, inputs, actions, eligible).detach()) > float(lp.detach())
    with pytest.raises(ValueError, match="actions must be"):
        recompute_log_prob(ctrl, inputs, actions[:, :2], eligible)
    assert float(recompute_log_prob(ctrl, inputs, actions[:, :0], []).detach()) == 0.0


def test_group_baselines_leave_one_out_and_ema_fallback():
    from flux2ttr.routing.reward import group_baselines

    assert group_baselines([-0.2], ema_value=-0.05) == [-0.05]  # one sample: the EMA baseline
    r = [-0.1, -0.3, 0.2, 0.0]
    b = group_baselines(r, ema_value=123.0)  # the EMA plays no part in a group
    assert b == pytest.approx([(-0.3 + 0.2 + 0.0) / 3, (-0.1 + 0.2 + 0.0) / 3, (-0.1 - 0.3 + 0.0) / 3,
                               (-0.1 - 0.3 + 0.2) / 3])
    adv = [x - y for x, y in zip(r, b)]
    # leave-one-out advantages are K/(K-1) times the deviation from the group mean, so they sum to zero
    mean = sum(r) / 4
    assert adv == pytest.approx([(x - mean) * 4 / 3 for x in r])
    with pytest.raises(ValueError):
        group_baselines([], 0.0)
