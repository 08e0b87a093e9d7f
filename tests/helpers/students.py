"""Small HKR students and inputs shared by the fast-path tests and the interpreter kernel checks."""

from __future__ import annotations

import torch

from flux2ttr.students.hkr import HKRConfig, HKRLayer

D = 32


def small_cfg(**kw) -> HKRConfig:
    # feature_dim 12 is padded to 16 inside the kernels; hidden = max(32, 24) = 32.
    base = dict(head_dim=D, feature_dim=12, cond_hidden=6, landmark_fraction=0.25, landmark_min=2, landmark_max=0)
    base.update(kw)
    return HKRConfig(**base)


def make_layer(cfg: HKRConfig, seed: int = 0, heads: int = 2) -> HKRLayer:
    """A layer whose conditioner and alpha are off their identity init, so every blend term matters."""
    torch.manual_seed(seed)
    layer = HKRLayer(cfg, num_heads=heads).eval()
    with torch.no_grad():
        layer.cond.net[2].weight.normal_(0.0, 0.2)
        layer.cond.net[2].bias.normal_(0.0, 0.2)
        layer.alpha_logit.fill_(0.8)
        layer.alpha_gamma.fill_(3.0)
    return layer


def qkv(b=2, h=2, n_cond=8, height=6, width=5, seed=1, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    n = n_cond + height * width
    return [torch.randn(b, h, n, D, generator=g).to(dtype) for _ in range(3)]


def eager(layer: HKRLayer, q, k, v, *args, **kw) -> torch.Tensor:
    """The fp32 eager student on the same (upcast) values: the reference."""
    c = layer.config
    old, c.fast_path = c.fast_path, False
    try:
        with torch.no_grad():
            return layer(q.float(), k.float(), v.float(), *args, **kw)
    finally:
        c.fast_path = old


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())
