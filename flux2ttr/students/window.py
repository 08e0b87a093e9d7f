"""The window student: exact softmax where the teacher's mass is, kernel regression for the rest.

For query ``i`` with exact key set ``S_i`` and scores ``s_ij = q_i·k_j / sqrt(D)``::

    out_i = [sum_{j in S_i} e^{s_ij - m_i} v_j + gamma_h phi(q_i)^T (KV - KV_{S_i})]
            / [sum_{j in S_i} e^{s_ij - m_i} + gamma_h phi(q_i)^T (K - K_{S_i}) + denom_eps]

with ``m_i = max_{j in S_i} s_ij``, ``K = sum_j phi(k_j)`` ``[F]`` and ``KV = sum_j phi(k_j) v_j^T``
``[F, D]`` over all keys and ``K_{S_i}``, ``KV_{S_i}`` the same sums over ``S_i``: both terms share one
normaliser, so the student is exact softmax on ``S_i`` and linear-time on the rest.

``S_i`` (:func:`exact_key_mask`): every conditioning token; for an image query, the whole key tiles
(``window_key_tile`` latent tokens; ``[1, 1]``: single tokens) covering its tile (``window_tile``) grown by
``window_radius`` on the latent grid, so it sees at least its ``window_radius`` neighbourhood (all queries of a
tile share them, so a GPU reads contiguous rows of keys); optionally the
landmark grid (``window_landmarks``). A text query sees every key (``text_query_keys: all``: its row is
plain softmax) or the text tokens and landmarks plus the kernel term (``text_and_landmarks``).

The feature maps are the HKR student's (shared across heads); ``gamma`` is learned per head. The eager
forward here is the reference and the CPU path; on CUDA in bf16/fp16 inference the fused kernel of
:mod:`flux2ttr.students.window_fast` runs instead (when present). All math is fp32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flux2ttr.students.hkr import FeatureMLP, HKRConfig
from flux2ttr.students.landmarks import grid_points, landmark_count
from flux2ttr.students.layer import StudentLayer


def window_tile_ranges(pos: torch.Tensor, tile: int, radius: int, key_tile: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last key tile (inclusive) ``[..]`` along one grid axis for queries at ``pos`` ``[..]``
    (row or column in latent tokens): the key tiles (``key_tile`` tokens, default ``tile``) that cover
    ``[t*tile - radius, (t+1)*tile - 1 + radius]`` for the query's tile ``t`` (not clipped: callers
    compare against real tile indices)."""
    kt = tile if key_tile is None else key_tile
    t = torch.div(pos, tile, rounding_mode="floor")
    lo = torch.div(t * tile - radius, kt, rounding_mode="floor")
    hi = torch.div((t + 1) * tile - 1 + radius, kt, rounding_mode="floor")
    return lo, hi


def exact_key_mask(q_pos: torch.Tensor, n_cond: int, height: int, width: int, cfg: HKRConfig,
                   landmarks: torch.Tensor | None = None, radius: int | None = None) -> torch.Tensor:
    """``[..., Nq, N]`` bool: key ``j`` is in the exact set of the query at token position ``q_pos [..., Nq]``.

    ``landmarks [L]``: absolute token indices of image landmarks seen exactly by every query (``None``
    or empty: none). ``radius`` overrides ``cfg.window_radius`` (training and diagnostics)."""
    device = q_pos.device
    n = n_cond + height * width
    th, tw = (int(x) for x in cfg.window_tile)
    kh, kw = (int(x) for x in cfg.window_key_tile)
    radius = int(cfg.window_radius if radius is None else radius)
    key = torch.arange(n, device=device)
    key_img = (key - n_cond).clamp(min=0)
    key_tr = torch.div(torch.div(key_img, width, rounding_mode="floor"), kh, rounding_mode="floor")
    key_tc = torch.div(key_img % width, kw, rounding_mode="floor")
    is_text_key = key < n_cond

    q_img = (q_pos - n_cond).clamp(min=0)
    lo_r, hi_r = window_tile_ranges(torch.div(q_img, width, rounding_mode="floor"), th, radius, kh)
    lo_c, hi_c = window_tile_ranges(q_img % width, tw, radius, kw)
    win = ((key_tr >= lo_r[..., None]) & (key_tr <= hi_r[..., None])
           & (key_tc >= lo_c[..., None]) & (key_tc <= hi_c[..., None]))
    mask = win | is_text_key
    extra = torch.zeros(n, dtype=torch.bool, device=device)
    if landmarks is not None and landmarks.numel():
        extra[landmarks.to(device)] = True
        mask = mask | extra
    text_q = (q_pos < n_cond)[..., None]
    text_row = torch.ones_like(mask) if cfg.text_query_keys == "all" else (is_text_key | extra).expand_as(mask)
    return torch.where(text_q, text_row, mask)


class WindowLayer(StudentLayer):
    """Window student for one attention layer (``hkr.mode: window``).

    Parameters: ``phi_q`` (and ``phi_k`` unless ``shared_qk``) and ``log_gamma`` ``[H]`` (``[1]`` when
    not ``per_head_gamma``).
    """

    mode = "window"

    def __init__(self, cfg: HKRConfig, *, num_heads: int) -> None:
        super().__init__()
        if num_heads <= 0:
            raise ValueError(f"num_heads must be positive, got {num_heads}")
        self.config = cfg
        self.num_heads = int(num_heads)
        d, f, hid = cfg.head_dim, cfg.feature_dim, cfg.hidden_dim
        self.phi_q = FeatureMLP(d, hid, f, cfg.feature_eps)
        self.phi_k = None if cfg.shared_qk else FeatureMLP(d, hid, f, cfg.feature_eps)
        self.log_gamma = nn.Parameter(torch.full((num_heads if cfg.per_head_gamma else 1,), float(cfg.gamma_init)))

    def landmarks(self, n_cond: int, height: int, width: int) -> torch.Tensor:
        """Absolute token indices ``[L]`` of the exact image landmarks (empty unless ``window_landmarks``)."""
        if not self.config.window_landmarks:
            return torch.zeros(0, dtype=torch.long)
        return grid_points(height, width, landmark_count(height * width, self.config)) + n_cond

    def gamma(self) -> torch.Tensor:
        """``[H or 1]`` fp32 balance of the kernel term (``exp(log_gamma)``)."""
        return self.log_gamma.float().exp()

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        n_cond: int,
        sigma: float | torch.Tensor,
        cfg: float | torch.Tensor,
        *,
        height: int,
        width: int,
        q_idx: torch.Tensor | None = None,
        radius: int | None = None,
        heads: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Student attention output ``[B, H, Nq or N, D]`` in ``q.dtype``.

        ``q [B,H,N,D]`` (or ``[B,H,Nq,D]``, the queries at token positions ``q_idx`` ``[Nq]`` or
        ``[B, Nq]``), ``k, v [B,H,N,D]`` with ``N = n_cond + height * width``. ``sigma``/``cfg`` are part
        of the call contract; this mode does not condition on them. ``radius`` (latent tokens) overrides
        the configured window radius: distill trains at smaller windows so the kernel term learns what a
        window at a higher resolution leaves to it. ``heads``: the teacher heads of the rows of a head subset
        (:class:`~flux2ttr.students.layer.StudentLayer`); ``gamma`` is indexed by them.
        """
        self._check(q, k, v, n_cond, height, width, q_idx)
        heads = self._check_heads(heads, q.shape[0], q.shape[1])
        if self.config.fast_path and q_idx is None and radius is None and heads is None:
            out = _fast(self, q, k, v, n_cond, sigma, cfg, height, width)
            if out is not None:
                return out
        dtype = q.dtype
        b, h, nq, d = q.shape
        pos = torch.arange(nq, device=q.device) if q_idx is None else q_idx.to(q.device)
        lm = self.landmarks(n_cond, height, width)
        phi_k = self.phi_q if self.phi_k is None else self.phi_k
        gamma = self.gamma()
        if heads is not None and gamma.numel() > 1:  # per-head balance: the rows' own heads
            gamma = gamma[heads.to(gamma.device)]
        gamma = gamma.view(-1, h, 1, 1) if gamma.dim() == 2 else gamma.view(1, -1, 1, 1)
        step = self.config.q_chunk
        outs = []
        with torch.autocast(device_type=q.device.type, enabled=False):
            kf, vf = k.float(), v.float()
            pk = phi_k(kf)  # [B,H,N,F]
            for s in range(0, nq, step):
                qc = q[:, :, s:s + step].float()
                mask = exact_key_mask(pos[..., s:s + step], n_cond, height, width, self.config, lm, radius)
                mask = mask[None, None] if mask.dim() == 2 else mask[:, None]  # [B|1, 1, c, N]
                scores = (qc @ kf.transpose(-1, -2)) / math.sqrt(d)  # [B,H,c,N]
                scores = scores.masked_fill(~mask, float("-inf"))
                w = torch.exp(scores - scores.amax(-1, keepdim=True))  # exact part, 0 outside S_i
                kern = (self.phi_q(qc) @ pk.transpose(-1, -2)) * (~mask)  # phi(q)^T phi(k) outside S_i
                num = w @ vf + gamma * (kern @ vf)
                den = w.sum(-1, keepdim=True) + gamma * kern.sum(-1, keepdim=True) + self.config.denom_eps
                outs.append(num / den)
        return torch.cat(outs, dim=2).to(dtype)

    def balance_parameters(self) -> list[nn.Parameter]:
        return [self.log_gamma]

    def report(self) -> dict[str, float]:
        """The kernel balance: mean, min and max of gamma over heads."""
        with torch.no_grad():
            g = self.gamma()
        return {"gamma_mean": float(g.mean()), "gamma_min": float(g.min()), "gamma_max": float(g.max())}


def _fast(layer: WindowLayer, q, k, v, n_cond, sigma, cfg, height, width) -> torch.Tensor | None:
    """The fused CUDA kernel's output, or None where it does not apply (CPU, fp32, training, no Triton)."""
    if q.device.type != "cuda":
        return None
    try:
        from flux2ttr.students import window_fast  # noqa: PLC0415 - optional: Triton is only on CUDA machines
    except ImportError:
        return None
    if window_fast.fast_path_reason(layer, q, k, v) is not None:
        return None
    return window_fast.fast_forward(layer, q, k, v, n_cond, sigma, cfg, height=height, width=width)
