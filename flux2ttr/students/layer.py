"""What every student layer shares: the attention-call contract checks and the flat tensor export used
by artifacts and checkpoints. The two modes (:mod:`flux2ttr.students.hkr`, :mod:`flux2ttr.students.window`)
subclass :class:`StudentLayer`."""

from __future__ import annotations

import torch
from torch import nn


class StudentLayer(nn.Module):
    """A student for one attention layer: ``forward(q, k, v, n_cond, sigma, cfg, *, height, width,
    q_idx=None, heads=None) -> [B, H, Nq or N, D]``; ``config`` (``HKRConfig``) and ``num_heads`` are set by the
    mode. ``heads`` (``[H]`` or ``[B, H]``): the teacher's head index of each of the ``H`` head rows when the
    call holds a subset of the ``num_heads`` heads (a head-subset trace store); per-head parameters are
    indexed by it, everything else is shared across heads. ``None``: all ``num_heads`` heads, in order."""

    config: object
    num_heads: int

    def _check(self, q, k, v, n_cond, height, width, q_idx) -> None:
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"q, k, v must be [B,H,N,D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        if k.shape != v.shape:
            raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
        b, h, n, d = k.shape
        if d != self.config.head_dim:
            raise ValueError(f"head_dim {d} does not match the student's hkr.head_dim {self.config.head_dim}")
        if q.shape[0] != b or q.shape[1] != h or q.shape[3] != d:
            raise ValueError(f"q {tuple(q.shape)} does not match k {tuple(k.shape)} in B, H or D")
        if n != n_cond + height * width:
            raise ValueError(
                f"sequence length {n} != n_cond ({n_cond}) + height*width ({height}*{width}={height * width})"
            )
        if q_idx is None:
            if q.shape[2] != n:
                raise ValueError(f"q has {q.shape[2]} tokens but k has {n}; pass q_idx for a query subset")
        else:
            if q_idx.shape not in ((q.shape[2],), (b, q.shape[2])):
                raise ValueError(f"q_idx must be [Nq={q.shape[2]}] or [B={b}, Nq], got shape {tuple(q_idx.shape)}")
            if q_idx.numel() and (int(q_idx.min()) < 0 or int(q_idx.max()) >= n):
                raise ValueError(f"q_idx out of range [0, {n})")

    def _check_heads(self, heads: torch.Tensor | None, b: int, h: int) -> torch.Tensor | None:
        """``heads`` as int64 on its device, checked against ``B = b`` rows of ``H = h`` heads (``None`` stays)."""
        if heads is None:
            return None
        heads = torch.as_tensor(heads).long()
        if heads.shape not in ((h,), (b, h)):
            raise ValueError(f"heads must be [H={h}] or [B={b}, H], got shape {tuple(heads.shape)}")
        if heads.numel() and (int(heads.min()) < 0 or int(heads.max()) >= self.num_heads):
            raise ValueError(f"heads out of range [0, {self.num_heads})")
        return heads

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """The layer's state as a flat ``{param_name: tensor}`` dict (fp32, CPU, contiguous copies)."""
        return {k: t.detach().to("cpu", torch.float32).contiguous().clone() for k, t in self.state_dict().items()}

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{param_name: shape}`` this layer's configuration requires."""
        return {k: tuple(t.shape) for k, t in self.state_dict().items()}

    def import_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load a flat dict from :meth:`export_tensors`; every key must be present with its exact shape."""
        want = self.expected_shapes()
        missing = sorted(set(want) - set(tensors))
        unexpected = sorted(set(tensors) - set(want))
        bad = sorted(f"{k}: {tuple(tensors[k].shape)} != {want[k]}" for k in want
                     if k in tensors and tuple(tensors[k].shape) != want[k])
        if missing or unexpected or bad:
            raise ValueError(f"student tensors do not match: missing={missing} unexpected={unexpected} shapes={bad}")
        self.load_state_dict({k: t for k, t in tensors.items()}, strict=True)

    def report(self) -> dict[str, float]:
        """Scalars worth logging for this layer (mode-specific)."""
        return {}

    def balance_parameters(self) -> list[torch.nn.Parameter]:
        """The few scalars that balance the branches; distill trains them at their own lr, no decay."""
        return []
