"""One way to derive seeds: a base seed and integer parts (step, iteration, layer, draw index) folded
into one 63-bit seed, so every random stream of the project is reproducible from its params."""

from __future__ import annotations

import torch

SEED_MIX = 1_000_003  # prime multiplier: distinct small parts give distinct seeds
SEED_MOD = 2**63  # torch generators take seeds below 2**64; 63 bits keep them positive int64


def derive_seed(seed: int, *parts: int) -> int:
    """``((seed * SEED_MIX + p0) * SEED_MIX + p1 ...) mod 2**63``."""
    s = int(seed)
    for p in parts:
        s = s * SEED_MIX + int(p)
    return s % SEED_MOD


def generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``seed`` and ``parts``."""
    return torch.Generator().manual_seed(derive_seed(seed, *parts))
