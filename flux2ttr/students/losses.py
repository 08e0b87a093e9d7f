"""Distillation loss: Kendall uncertainty weighting of a Huber term and a cosine term.

    huber = SmoothL1(student, teacher; beta)                   (mean over all elements)
    cos   = 1 - cos_sim(student, teacher, dim=-1).mean()       (over D, per token and head)
    loss  = huber / (2 e^{s_h}) + s_h / 2 + cos / (2 e^{s_c}) + s_c / 2

``s_h`` and ``s_c`` are learned log-variances (init 0.0 and -1.0 by default, from
:class:`flux2ttr.students.hkr.HKRConfig`). All math is fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flux2ttr.students.hkr import HKRConfig


class KendallDistillLoss(nn.Module):
    """``forward(student, teacher) -> (total, parts)`` for ``[..., D]`` tensors of equal shape.

    ``parts`` holds detached fp32 scalars ``huber``, ``cos``, ``s_h``, ``s_c``, ``total``.
    """

    def __init__(self, huber_beta: float = 0.05, s_h_init: float = 0.0, s_c_init: float = -1.0,
                 cos_eps: float = 1e-8) -> None:
        super().__init__()
        if huber_beta <= 0:
            raise ValueError(f"huber_beta must be positive, got {huber_beta}")
        self.huber_beta = float(huber_beta)
        self.cos_eps = float(cos_eps)
        self.s_h = nn.Parameter(torch.tensor(float(s_h_init)))
        self.s_c = nn.Parameter(torch.tensor(float(s_c_init)))

    @classmethod
    def from_config(cls, cfg: HKRConfig) -> "KendallDistillLoss":
        """The loss with ``huber_beta``, ``loss_s_h_init`` and ``loss_s_c_init`` of ``cfg``."""
        return cls(cfg.huber_beta, cfg.loss_s_h_init, cfg.loss_s_c_init)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if student.shape != teacher.shape:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
        s, t = student.float(), teacher.float()
        huber = F.smooth_l1_loss(s, t, beta=self.huber_beta)
        cos = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=self.cos_eps).mean()
        s_h, s_c = self.s_h.float(), self.s_c.float()
        total = huber / (2.0 * torch.exp(s_h)) + s_h / 2.0 + cos / (2.0 * torch.exp(s_c)) + s_c / 2.0
        parts = {"huber": huber.detach(), "cos": cos.detach(), "s_h": s_h.detach(), "s_c": s_c.detach(),
                 "total": total.detach()}
        return total, parts
