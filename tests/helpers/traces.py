"""Small synthetic trace stores (teacher_sub = exact softmax attention of q_sub against k, v), shared by
the loader and distill tests."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from flux2ttr.traces.store import TraceTuple, TraceWriter

TEACHER = {"name": "unit-teacher", "sha256": "abc123"}


def make_tuple(gen: torch.Generator, *, heads: int, n_cond: int, hgrid: int, wgrid: int, nq: int, d: int,
               prompt: int, step: int, seed: int, qk_scale: float, focus: float = 0.0) -> TraceTuple:
    """Random q, k, v; ``focus > 0`` adds a shared query direction per head (fixed by the generator's
    first draws of a store), so attention leans on the keys' projection onto it: learnable structure."""
    n = n_cond + hgrid * wgrid
    q = torch.randn(heads, n, d, generator=gen, dtype=torch.float64) * qk_scale
    if focus:
        u = torch.randn(heads, 1, d, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
        q = q + focus * u / u.norm(dim=-1, keepdim=True) * math.sqrt(d)
    k = torch.randn(heads, n, d, generator=gen, dtype=torch.float64) * qk_scale
    v = torch.randn(heads, n, d, generator=gen, dtype=torch.float64)
    q_idx = torch.randperm(n, generator=gen)[:nq]
    att = torch.softmax(q[:, q_idx] @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return TraceTuple(q_sub=q[:, q_idx], q_idx=q_idx, k=k, v=v, teacher_sub=att @ v, sigma=1.0 - 0.1 * step,
                      cfg=4.0, n_cond=n_cond, h=hgrid, w=wgrid, prompt=prompt, step=step, seed=seed)


def poison(t: TraceTuple, field: str) -> None:
    """Put a NaN (an inf for ``teacher_sub``) into one element of ``field`` of ``t`` (in place); the other
    values, and every later draw of the generator, stay as they were."""
    getattr(t, field).view(-1)[3] = float("inf") if field == "teacher_sub" else float("nan")


def make_store(path: Path, *, layers=("single_blocks.0", "single_blocks.1"), prompts=5, steps=4, heads=2,
               n_cond=4, hgrid=4, wgrid=4, nq=6, d=16, qk_scale=0.5, teacher=None, seed=0,
               extra_groups: dict | None = None, focus: float = 0.0,
               nonfinite: dict[tuple[str, int, int], str] | None = None) -> Path:
    """A store with one tuple per (layer, prompt, step); ``extra_groups={layer: (hgrid, wgrid)}`` adds a
    second token count for that layer (one tuple per prompt). ``nonfinite={(layer, prompt, step): field}``
    poisons those tuples (:func:`poison`); all other data equals the store made without it."""
    gen = torch.Generator().manual_seed(seed)
    bad = dict(nonfinite or {})
    with TraceWriter(path, attrs={"teacher": dict(teacher or TEACHER)}, budget_bytes=1 << 30,
                     storage_dtype="float32", seed=seed) as w:
        for layer in layers:
            for p in range(prompts):
                for s in range(steps):
                    t = make_tuple(gen, heads=heads, n_cond=n_cond, hgrid=hgrid, wgrid=wgrid, nq=nq, d=d, prompt=p,
                                   step=s, seed=100 + p, qk_scale=qk_scale, focus=focus)
                    if (layer, p, s) in bad:
                        poison(t, bad.pop((layer, p, s)))
                    w.offer(layer, t)
        if bad:
            raise ValueError(f"nonfinite names tuples the store does not have: {sorted(bad)}")
        for layer, (hg, wg) in (extra_groups or {}).items():
            for p in range(prompts):
                w.offer(layer, make_tuple(gen, heads=heads, n_cond=n_cond, hgrid=hg, wgrid=wg, nq=nq, d=d,
                                          prompt=p, step=0, seed=100 + p, qk_scale=qk_scale, focus=focus))
    return path
