"""Kendall distillation loss: values against the formula in float64, initial weights, learned optimum."""

from __future__ import annotations

import math

import pytest
import torch

from flux2ttr.students.hkr import HKRConfig
from flux2ttr.students.losses import KendallDistillLoss


def reference(student, teacher, beta, s_h, s_c):
    """The issue's formula written out elementwise in float64."""
    s, t = student.double(), teacher.double()
    diff = (s - t).abs()
    huber = torch.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta).mean()
    cos_tok = (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
    cos = 1.0 - cos_tok.mean()
    total = huber / (2 * math.exp(s_h)) + s_h / 2 + cos / (2 * math.exp(s_c)) + s_c / 2
    return total.item(), huber.item(), cos.item()


def test_initial_log_variances():
    loss = KendallDistillLoss.from_config(HKRConfig())
    assert loss.s_h.item() == 0.0 and loss.s_c.item() == -1.0
    assert loss.huber_beta == HKRConfig().huber_beta


@pytest.mark.parametrize("beta", [0.05, 1.0])
@pytest.mark.parametrize("s_h,s_c", [(0.0, -1.0), (0.7, 0.3), (-2.0, 1.5)])
def test_loss_matches_formula(beta, s_h, s_c):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 3, 10, 16, generator=g)
    student = teacher + 0.3 * torch.randn(2, 3, 10, 16, generator=g)  # mix of |diff| < and > beta
    fn = KendallDistillLoss(huber_beta=beta, s_h_init=s_h, s_c_init=s_c)
    total, parts = fn(student, teacher)
    ref_total, ref_huber, ref_cos = reference(student, teacher, beta, s_h, s_c)
    assert parts["huber"].item() == pytest.approx(ref_huber, rel=1e-5)
    assert parts["cos"].item() == pytest.approx(ref_cos, rel=1e-4, abs=1e-6)
    assert total.item() == pytest.approx(ref_total, rel=1e-5, abs=1e-6)
    assert parts["s_h"].item() == pytest.approx(s_h) and parts["s_c"].item() == pytest.approx(s_c)


def test_known_values():
    # Identical tensors: huber = 0, cos = 0, loss = (s_h + s_c) / 2 = -0.5 at init.
    x = torch.randn(1, 2, 4, 8)
    total, parts = KendallDistillLoss()(x, x.clone())
    assert parts["huber"].item() == 0.0 and abs(parts["cos"].item()) < 1e-6
    assert total.item() == pytest.approx(-0.5, abs=1e-6)
    # Opposite tensors: cos = 2 exactly; with beta=1 and |diff| = 2: huber = 2 - 0.5 = 1.5.
    ones = torch.ones(1, 1, 3, 4)
    total, parts = KendallDistillLoss(huber_beta=1.0)(ones, -ones)
    assert parts["huber"].item() == pytest.approx(1.5)
    assert parts["cos"].item() == pytest.approx(2.0)
    assert total.item() == pytest.approx(1.5 / 2 + 0 + 2.0 / (2 * math.exp(-1.0)) - 0.5)


def test_log_variances_learn_their_optimum():
    """d loss / d s = -term / (2 e^s) + 1/2 vanishes at s = log(term): s_h -> log(huber), s_c -> log(cos)."""
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(2, 2, 16, 8, generator=g)
    student = teacher + 0.5 * torch.randn(2, 2, 16, 8, generator=g)
    fn = KendallDistillLoss(huber_beta=0.1)
    total, parts = fn(student, teacher)
    total.backward()
    assert fn.s_h.grad.item() == pytest.approx(-parts["huber"].item() / 2 + 0.5, rel=1e-5)
    assert fn.s_c.grad.item() == pytest.approx(-parts["cos"].item() / (2 * math.exp(-1.0)) + 0.5, rel=1e-5)
    opt = torch.optim.Adam(fn.parameters(), lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        fn(student, teacher)[0].backward()
        opt.step()
    assert fn.s_h.item() == pytest.approx(math.log(parts["huber"].item()), abs=1e-2)
    assert fn.s_c.item() == pytest.approx(math.log(parts["cos"].item()), abs=1e-2)


def test_low_precision_inputs_use_fp32_and_shape_errors():
    t = torch.randn(1, 2, 5, 8)
    s = t + 0.1
    total32, _ = KendallDistillLoss()(s, t)
    total16, _ = KendallDistillLoss()(s.bfloat16(), t.bfloat16())
    assert total16.dtype == torch.float32
    assert total16.item() == pytest.approx(total32.item(), abs=2e-2)
    with pytest.raises(ValueError, match="shapes differ"):
        KendallDistillLoss()(s[..., :4], t)
    with pytest.raises(ValueError, match="huber_beta"):
        KendallDistillLoss(huber_beta=0.0)
