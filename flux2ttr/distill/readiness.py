"""Fail-closed layer readiness with hysteresis.

A student layer may replace softmax attention only when it is *ready*:

* it has had at least ``min_updates`` optimiser updates, and
* its latest validation cosine distance is finite and below ``threshold``.

Once ready, a layer stays ready (also across a resume, the flag is checkpointed) until its
validation cosine distance rises above ``hysteresis * threshold``; this keeps a layer from flapping
in and out when its distance hovers around the threshold. Anything unknown (no validation yet, NaN)
means *not ready*.
"""

from __future__ import annotations

import math
from typing import Any


class Readiness:
    """Readiness flags of a set of layers (``update`` after each validation)."""

    def __init__(self, layers: list[str], *, threshold: float, hysteresis: float, min_updates: int) -> None:
        if not threshold > 0:
            raise ValueError(f"readiness threshold must be positive, got {threshold}")
        if hysteresis < 1.0:
            raise ValueError(f"readiness hysteresis factor must be >= 1, got {hysteresis}")
        if min_updates < 0:
            raise ValueError(f"min_updates must be >= 0, got {min_updates}")
        self.threshold = float(threshold)
        self.hysteresis = float(hysteresis)
        self.min_updates = int(min_updates)
        self.ready = {layer: False for layer in layers}

    @property
    def release_threshold(self) -> float:
        """A ready layer loses readiness above this cosine distance (``hysteresis * threshold``)."""
        return self.hysteresis * self.threshold

    def decide(self, was_ready: bool, cos_dist: float | None, updates: int) -> bool:
        """The readiness a layer gets from its previous flag, latest distance and update count."""
        if cos_dist is None or not math.isfinite(cos_dist) or updates < self.min_updates:
            return False
        if cos_dist < self.threshold:
            return True
        return bool(was_ready) and cos_dist <= self.release_threshold

    def update(self, layer: str, cos_dist: float | None, updates: int) -> bool:
        """Record a validation result of ``layer``; returns its new flag."""
        self.ready[layer] = self.decide(self.ready.get(layer, False), cos_dist, updates)
        return self.ready[layer]

    def state_dict(self) -> dict[str, Any]:
        return {"ready": dict(self.ready)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore flags (layers not in ``state`` start not ready; unknown layers are ignored)."""
        saved = state.get("ready", {})
        self.ready = {layer: bool(saved.get(layer, False)) for layer in self.ready}
