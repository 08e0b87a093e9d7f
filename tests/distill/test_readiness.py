"""Readiness: fail-closed rules (update count, finite distance under threshold) and hysteresis."""

from __future__ import annotations

import math

import pytest

from flux2ttr.distill.readiness import Readiness


def make(**kw) -> Readiness:
    args = dict(threshold=0.1, hysteresis=1.2, min_updates=10)
    args.update(kw)
    return Readiness(["a", "b"], **args)


def test_fail_closed():
    r = make()
    assert r.ready == {"a": False, "b": False}
    assert not r.update("a", 0.05, updates=9)  # too few updates
    assert r.update("a", 0.05, updates=10)
    for bad in (None, math.nan, math.inf):
        r2 = make()
        assert not r2.update("a", bad, updates=100)
    assert not r.update("a", math.nan, updates=100)  # a ready layer with a NaN distance is no longer ready
    assert not r.update("b", 0.1, updates=100)  # strictly below the threshold


def test_hysteresis_band():
    r = make()
    assert not r.update("a", 0.11, updates=50)  # never ready: inside the band is not enough
    assert r.update("a", 0.09, updates=50)
    assert r.update("a", 0.11, updates=51)  # stays ready inside (T, 1.2 T]
    assert r.update("a", 0.12, updates=52)  # 1.2 T itself still ready
    assert not r.update("a", 0.1201, updates=53)  # above 1.2 T: released
    assert not r.update("a", 0.11, updates=54)  # and must go below T again
    assert r.release_threshold == pytest.approx(0.12)


def test_state_round_trip_keeps_hysteresis():
    r = make()
    r.update("a", 0.05, updates=20)
    state = r.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.ready == {"a": True, "b": False}
    assert resumed.update("a", 0.115, updates=21)
    assert not resumed.update("b", 0.115, updates=21)


def test_bad_settings():
    with pytest.raises(ValueError, match="hysteresis"):
        make(hysteresis=0.9)
    with pytest.raises(ValueError, match="threshold"):
        make(threshold=0.0)
    with pytest.raises(ValueError, match="min_updates"):
        make(min_updates=-1)
