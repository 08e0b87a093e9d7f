"""The HKR student layer: a cheap stand-in for the softmax attention of one FLUX.2 attention layer.

It takes the attention-call contract (``q, k, v [B, H, N, D]`` after QK-norm and RoPE, ``n_cond``
conditioning tokens first, then ``height * width`` image tokens in row-major order, the run state
``sigma`` and ``cfg``) and returns ``[B, H, N, D]``. Two branches are mixed:

* **Kernel regression** (linear in ``N``): positive feature maps ``phi_q``, ``phi_k`` (3-layer MLPs
  ``head_dim -> hidden -> hidden -> feature_dim``, two SiLU, softplus output) and the normalised
  Nadaraya–Watson estimate ``out = phi(q)^T (sum_j phi(k_j) v_j^T) / phi(q)^T (sum_j phi(k_j))``.
  The statistics ``Ksum [B,H,F]`` and ``KV [B,H,F,D]`` are accumulated in fp32 over key chunks; queries
  are evaluated in chunks, so memory is ``O(chunk * F)`` and chunking never changes the result.
* **Landmark softmax** (exact softmax to a subset): every query attends, with ordinary scaled softmax,
  to all conditioning tokens plus an evenly spread grid of image tokens (:func:`landmark_indices`).

A sigma/cfg *conditioner* (small MLP, initialised to exact identity) rescales and shifts each branch
per channel, and the branches are fused as ``out = out_kernel + alpha * (out_land - out_kernel)``
with ``alpha = alpha_max * sigmoid(logit)``; the logit is a learned scalar, optionally made per token
by the cosine disagreement of the two branches (``adaptive_alpha``).

The feature MLPs act on ``head_dim`` and are shared across heads, so one student serves any head
count; ``num_heads`` is recorded for artifact checks only. All math runs in fp32 whatever the input
dtype (fp32, bf16, fp16); the output has the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from flux2ttr.students import fast_path
from flux2ttr.students.landmarks import landmark_indices
from flux2ttr.students.layer import StudentLayer

STUDENT_MODES = ("hkr", "window")
TEXT_QUERY_KEYS = ("all", "text_and_landmarks")


@dataclass
class HKRConfig:
    """Shape and behaviour of a student layer, either mode (``params.yaml`` section ``hkr``)."""

    mode: str = "window"  # window (exact text + window, kernel rest) | hkr (kernel + landmark softmax, convex blend)
    head_dim: int = 128  # D of the teacher's attention (FLUX.2: 128)
    feature_dim: int = 64  # F, kernel feature size; cost is O(N * F * D)
    shared_qk: bool = False  # one feature MLP for queries and keys instead of two
    feature_eps: float = 1e-6  # added to the softplus features so every feature is strictly positive
    denom_eps: float = 1e-6  # added to the Nadaraya–Watson denominator
    landmark_fraction: float = 0.1  # image landmarks as a fraction of image tokens
    landmark_min: int = 16  # at least this many image landmarks (capped by the image token count)
    landmark_max: int = 256  # at most this many image landmarks (bounds the softmax branch); 0 = unlimited
    alpha_max: float = 0.2  # fusion weight alpha lies in (0, alpha_max)
    alpha_logit_init: float = 0.0  # initial base logit (alpha = alpha_max / 2)
    alpha_logit_clamp: float = 15.0  # |logit| bound so alpha stays strictly inside (0, alpha_max) in fp32
    adaptive_alpha: bool = False  # per-token alpha from the branches' cosine disagreement
    alpha_gamma_init: float = 4.0  # initial gamma (learned) of the adaptive logit
    cond_hidden: int = 32  # hidden width of the sigma/cfg conditioner MLP
    kv_chunk: int = 1024  # keys/values per chunk when accumulating Ksum and KV
    q_chunk: int = 1024  # queries per chunk in both branches
    huber_beta: float = 0.05  # SmoothL1 beta of the distillation loss (flux2ttr.students.losses)
    loss_s_h_init: float = 0.0  # initial Kendall log-variance of the huber term
    loss_s_c_init: float = -1.0  # initial Kendall log-variance of the cosine term
    fast_path: bool = True  # CUDA bf16/fp16 inference runs the fused Triton kernels (flux2ttr.students.fast_path)
    # window mode (flux2ttr.students.window); sizes in latent tokens
    window_tile: list[int] = field(default_factory=lambda: [8, 16])  # [rows, cols] of a tile: queries of a tile share keys
    window_radius: int = 4  # every image query sees at least its (2R+1)^2 neighbourhood (as whole key tiles)
    # [rows, cols] granularity of the window's keys: a query tile sees the whole key tiles covering the tile
    # grown by the radius ([1, 1]: exactly that rectangle; = window_tile: whole query tiles, the layout of
    # artifacts written before this field existed)
    window_key_tile: list[int] = field(default_factory=lambda: [1, 1])
    window_landmarks: bool = False  # also the landmark grid above as exact keys for every query
    text_query_keys: str = "all"  # text queries: all (exact softmax over every key) | text_and_landmarks (+ kernel)
    gamma_init: float = 0.0  # initial log of the kernel-term balance gamma
    per_head_gamma: bool = True  # one gamma per head (else one per layer)

    def __post_init__(self) -> None:
        if self.mode not in STUDENT_MODES:
            raise ValueError(f"hkr.mode must be one of {STUDENT_MODES}, got {self.mode!r}")
        if len(self.window_tile) != 2 or min(int(x) for x in self.window_tile) <= 0:
            raise ValueError(f"hkr.window_tile must be [rows, cols] of positive ints, got {self.window_tile!r}")
        if len(self.window_key_tile) != 2 or min(int(x) for x in self.window_key_tile) <= 0:
            raise ValueError(f"hkr.window_key_tile must be [rows, cols] of positive ints, got {self.window_key_tile!r}")
        if int(self.window_radius) < 0:
            raise ValueError(f"hkr.window_radius must be >= 0, got {self.window_radius}")
        if self.text_query_keys not in TEXT_QUERY_KEYS:
            raise ValueError(f"hkr.text_query_keys must be one of {TEXT_QUERY_KEYS}, got {self.text_query_keys!r}")
        for name in ("head_dim", "feature_dim", "cond_hidden", "kv_chunk", "q_chunk"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"hkr.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.landmark_fraction <= 1.0:
            raise ValueError(f"hkr.landmark_fraction must be in [0, 1], got {self.landmark_fraction}")
        if self.landmark_min < 0 or self.landmark_max < 0:
            raise ValueError("hkr.landmark_min and hkr.landmark_max must be >= 0 (landmark_max 0 = unlimited)")
        if self.landmark_max and self.landmark_max < self.landmark_min:
            raise ValueError(
                f"hkr.landmark_max ({self.landmark_max}) < landmark_min ({self.landmark_min}); "
                "raise landmark_max or set it to 0 (unlimited)"
            )
        if not 0.0 < self.alpha_max <= 1.0:
            raise ValueError(f"hkr.alpha_max must be in (0, 1], got {self.alpha_max}")
        if self.alpha_logit_clamp <= 0:
            raise ValueError("hkr.alpha_logit_clamp must be positive")

    @property
    def hidden_dim(self) -> int:
        """Hidden width of the feature MLPs: ``max(head_dim, 2 * feature_dim)``."""
        return max(self.head_dim, 2 * self.feature_dim)


# ------------------------------------------------------------------------------------------ modules


class FeatureMLP(nn.Module):
    """``[..., head_dim] -> [..., feature_dim]`` strictly positive features (fp32 math)."""

    def __init__(self, head_dim: int, hidden: int, feature_dim: int, eps: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(head_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, feature_dim),
        )
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        for mod in self.net:
            if isinstance(mod, nn.Linear):
                # Parameters may have been cast by a caller; the math stays fp32 either way.
                h = F.linear(h, mod.weight.float(), mod.bias.float())
            else:
                h = mod(h)
        return F.softplus(h) + self.eps


class Conditioner(nn.Module):
    """sigma/cfg -> per-branch, per-channel scale and bias; exact identity at initialisation.

    Input features ``[sigma, log1p(cfg)]``; output ``(scale_k, bias_k, scale_l, bias_l)`` each
    ``[B, D]`` with ``scale = 1 + s``; the last layer starts at zero, so ``scale = 1, bias = 0``.
    """

    def __init__(self, head_dim: int, hidden: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, 4 * head_dim))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, sigma: torch.Tensor, cfg: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = torch.stack([sigma, torch.log1p(cfg.clamp_min(0.0))], dim=-1)  # [B, 2]
        h = F.silu(F.linear(x, self.net[0].weight.float(), self.net[0].bias.float()))
        o = F.linear(h, self.net[2].weight.float(), self.net[2].bias.float())  # [B, 4D]
        s_k, b_k, s_l, b_l = o.split(self.head_dim, dim=-1)
        return 1.0 + s_k, b_k, 1.0 + s_l, b_l


def _as_batch(x: float | torch.Tensor, batch: int, device: torch.device, name: str) -> torch.Tensor:
    """A float or ``[B]``/``[]``/``[1]`` tensor -> fp32 ``[B]`` on ``device``."""
    t = torch.as_tensor(x, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() == 1:
        return t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"{name} must be a float or a [B={batch}] tensor, got shape {tuple(t.shape)}")
    return t


class HKRLayer(StudentLayer):
    """HKR student for one attention layer.

    ``forward(q, k, v, n_cond, sigma, cfg, *, height, width, q_idx=None, heads=None) -> [B, H, Nq or N, D]``.
    Parameters: ``phi_q`` (and ``phi_k`` unless ``shared_qk``), ``cond`` (conditioner),
    ``alpha_logit`` (scalar) and ``alpha_gamma`` (scalar, used only when ``adaptive_alpha``).
    """

    mode = "hkr"

    def __init__(self, cfg: HKRConfig, *, num_heads: int) -> None:
        super().__init__()
        if num_heads <= 0:
            raise ValueError(f"num_heads must be positive, got {num_heads}")
        self.config = cfg
        self.num_heads = int(num_heads)
        d, f, hid = cfg.head_dim, cfg.feature_dim, cfg.hidden_dim
        self.phi_q = FeatureMLP(d, hid, f, cfg.feature_eps)
        self.phi_k = None if cfg.shared_qk else FeatureMLP(d, hid, f, cfg.feature_eps)
        self.cond = Conditioner(d, cfg.cond_hidden)
        self.alpha_logit = nn.Parameter(torch.tensor(float(cfg.alpha_logit_init)))
        self.alpha_gamma = nn.Parameter(torch.tensor(float(cfg.alpha_gamma_init)))

    # ---------------------------------------------------------------- branches

    def _key_features(self, k: torch.Tensor) -> torch.Tensor:
        return (self.phi_q if self.phi_k is None else self.phi_k)(k)

    def kernel_stats(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stream keys/values in ``kv_chunk`` chunks: ``Ksum [B,H,F]`` and ``KV [B,H,F,D]`` in fp32."""
        b, h, n, d = v.shape
        f = self.config.feature_dim
        ksum = torch.zeros(b, h, f, dtype=torch.float32, device=k.device)
        kv = torch.zeros(b, h, f, d, dtype=torch.float32, device=k.device)
        step = self.config.kv_chunk
        for s in range(0, n, step):
            pk = self._key_features(k[:, :, s:s + step])  # [B,H,c,F]
            ksum = ksum + pk.sum(dim=2)
            kv = kv + pk.transpose(-1, -2) @ v[:, :, s:s + step].float()
        return ksum, kv

    def kernel_branch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Nadaraya–Watson ``[B,H,Nq,D]`` fp32: ``phi(q) KV / (phi(q) Ksum + eps)``, chunked."""
        ksum, kv = self.kernel_stats(k, v)
        outs = []
        step = self.config.q_chunk
        for s in range(0, q.shape[2], step):
            pq = self.phi_q(q[:, :, s:s + step])  # [B,H,c,F]
            num = pq @ kv
            den = (pq * ksum.unsqueeze(2)).sum(-1, keepdim=True) + self.config.denom_eps
            outs.append(num / den)
        return torch.cat(outs, dim=2)

    def landmark_branch(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor
    ) -> torch.Tensor:
        """Exact scaled softmax from each query to the keys at ``idx`` ``[L]``; ``[B,H,Nq,D]`` fp32."""
        idx = idx.to(k.device)
        kl = k.index_select(2, idx).float()
        vl = v.index_select(2, idx).float()
        outs = []
        step = self.config.q_chunk
        for s in range(0, q.shape[2], step):
            # fp32 SDPA is the exact scaled softmax (scale 1/sqrt(D)) with the fastest available kernel.
            outs.append(F.scaled_dot_product_attention(q[:, :, s:s + step].float(), kl, vl))
        return torch.cat(outs, dim=2)

    def fusion_alpha(self, out_kernel: torch.Tensor, out_land: torch.Tensor) -> torch.Tensor:
        """alpha in ``(0, alpha_max)``: a scalar ``[]`` tensor, or ``[B,H,Nq,1]`` when adaptive.

        Adaptive: ``logit = base + gamma * (d - 0.5)`` with ``d = 1 - cos(out_kernel, out_land)``
        over ``D``. The logit is clamped to ``±alpha_logit_clamp`` so fp32 sigmoid never hits 0 or 1.
        """
        c = self.config
        logit = self.alpha_logit.float()
        if c.adaptive_alpha:
            d = 1.0 - F.cosine_similarity(out_kernel, out_land, dim=-1, eps=c.denom_eps).unsqueeze(-1)
            logit = logit + self.alpha_gamma.float() * (d - 0.5)
        logit = logit.clamp(-c.alpha_logit_clamp, c.alpha_logit_clamp)
        return c.alpha_max * torch.sigmoid(logit)

    def base_alpha(self) -> float:
        """The non-adaptive fusion weight ``alpha_max * sigmoid(alpha_logit)`` (for logs and reports)."""
        c = self.config
        with torch.no_grad():
            return float(c.alpha_max * torch.sigmoid(self.alpha_logit.float().clamp(-c.alpha_logit_clamp,
                                                                                   c.alpha_logit_clamp)))

    # ---------------------------------------------------------------- forward

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
        heads: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Student attention output ``[B, H, Nq or N, D]`` in ``q.dtype``.

        ``q [B,H,N,D]`` (or ``[B,H,Nq,D]``, the queries at token positions ``q_idx [Nq]``), ``k, v
        [B,H,N,D]`` with ``N = n_cond + height * width``; ``sigma``, ``cfg``: float or ``[B]``. ``heads``: the
        teacher heads of a head subset's rows, checked only: every parameter of this mode is shared across heads.
        """
        self._check(q, k, v, n_cond, height, width, q_idx)
        self._check_heads(heads, q.shape[0], q.shape[1])
        if self.config.fast_path:

            if fast_path.fast_path_reason(self, q, k, v) is None:
                out = fast_path.fast_forward(self, q, k, v, n_cond, sigma, cfg, height=height, width=width)
                if out is not None:  # None: the kernels do not fit this device
                    return out
        dtype = q.dtype
        b = q.shape[0]
        with torch.autocast(device_type=q.device.type, enabled=False):
            out_k = self.kernel_branch(q, k, v)
            idx = landmark_indices(n_cond, height, width, self.config)
            out_l = self.landmark_branch(q, k, v, idx)
            s_k, b_k, s_l, b_l = self.cond(
                _as_batch(sigma, b, q.device, "sigma"), _as_batch(cfg, b, q.device, "cfg")
            )
            out_k = out_k * s_k[:, None, None, :] + b_k[:, None, None, :]
            out_l = out_l * s_l[:, None, None, :] + b_l[:, None, None, :]
            alpha = self.fusion_alpha(out_k, out_l)
            out = out_k + alpha * (out_l - out_k)
        return out.to(dtype)

    def balance_parameters(self) -> list[nn.Parameter]:
        return [self.alpha_logit, self.alpha_gamma]

    def report(self) -> dict[str, float]:
        """Scalars for logs and the artifact header: the fusion weight."""
        return {"alpha": self.base_alpha(),
                "alpha_sigmoid": float(torch.sigmoid(self.alpha_logit.detach().float()))}
