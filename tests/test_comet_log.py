"""Comet logging: key normalisation, quantiles, no-op without a key, offline archive with the real client,
step filtering with force, and failures that warn instead of raising."""

from __future__ import annotations

import datetime
import json
import re
import zipfile

import numpy as np
import pytest

from flux2ttr.comet_log import CometConfig, CometLogger, experiment_key, normalize_key, quantiles
from flux2ttr.config import ConfigError

ALNUM = re.compile(r"^[A-Za-z0-9]{32,50}$")


def test_normalize_key_rule():
    assert normalize_key("a-b_c.d" * 10) == "abcd" * 10  # 40 alphanumerics: kept as they are
    short = normalize_key("run-1")
    assert ALNUM.match(short) and short.startswith("run1") and len(short) == 32
    assert normalize_key("run-1") == short  # deterministic padding
    long = normalize_key("x" * 80)
    assert long == "x" * 50
    ok = "A" * 40
    assert normalize_key(ok) == ok
    assert ALNUM.match(normalize_key("!!!"))


def test_experiment_key_has_hash_and_timestamp():
    key = experiment_key("train_controller", git_hash="ab12cd3", now=1795422097.5)
    assert ALNUM.match(key)
    stamp = datetime.datetime.fromtimestamp(1795422097.5, datetime.timezone.utc).strftime("%Y%m%d%H%M%S")
    assert key == f"traincontrollerab12cd3{stamp}500000"
    assert experiment_key("distill", git_hash="ab12cd3", now=1.0) != experiment_key("distill", git_hash="ab12cd3", now=2.0)
    assert ALNUM.match(experiment_key("a-very-long-stage-name-that-goes-on", git_hash="0123456789ab", now=5.25))


def test_quantiles_match_numpy():
    vals = [0.3, 0.1, 0.9, 0.4, 0.2, 0.7]
    q = quantiles(vals)
    ref = np.percentile(vals, [0, 25, 50, 75, 100])
    assert [q[k] for k in ("min", "p25", "p50", "p75", "max")] == pytest.approx(ref.tolist())
    assert quantiles([2.0]) == {"min": 2.0, "p25": 2.0, "p50": 2.0, "p75": 2.0, "max": 2.0}


def test_config_validation():
    with pytest.raises(ConfigError, match="comet.enabled"):
        CometConfig(enabled="yes")
    with pytest.raises(ConfigError, match="log_every"):
        CometConfig(log_every=0)


def test_no_key_is_a_noop(monkeypatch, tmp_path):
    monkeypatch.delenv("COMET_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    lg = CometLogger(CometConfig(), stage="distill", params={"a": 1})
    assert not lg.active
    lg.log_metrics({"x": 1.0}, step=0, force=True)
    lg.log_quantiles("q", [1.0, 2.0], step=0)
    lg.log_asset(tmp_path / "nothing")
    lg.end()
    with pytest.warns(UserWarning, match="no Comet API key"):
        assert not CometLogger(CometConfig(enabled=True), stage="distill").active
    off = CometLogger(CometConfig(enabled=False, offline=True, offline_directory=str(tmp_path / "o")), stage="d")
    assert not off.active and not (tmp_path / "o").exists()
    assert list(tmp_path.iterdir()) == []


def test_offline_archive_metrics_force_and_failures(tmp_path):
    cfg = CometConfig(offline=True, offline_directory=str(tmp_path / "comet"), log_every=2)
    lg = CometLogger(cfg, stage="train_controller", params={"controller": {"lr": 0.003}})
    assert lg.active and ALNUM.match(lg.key)
    lg.log_metrics({"reward": -0.5}, step=1, force=True)  # first step: forced
    lg.log_metrics({"reward": -0.4}, step=3)  # skipped (log_every 2)
    lg.log_metrics({"reward": -0.3}, step=4)
    lg.log_quantiles("cos_dist", [0.1, 0.2, 0.3, 0.4, 0.5], step=4)
    asset = tmp_path / "a.json"
    asset.write_text("{}")
    lg.log_asset(asset)
    with pytest.warns(UserWarning, match="comet log_metrics failed"):
        lg.log_metrics({"bad": "not-a-number"}, step=6)
    with pytest.warns(UserWarning, match="comet log_asset failed"):
        lg.log_asset(tmp_path / "missing.bin")
    lg.end()
    assert not lg.active
    lg.log_metrics({"after": 1.0}, step=8)  # after end: silently nothing
    archives = list((tmp_path / "comet").glob("*.zip"))
    assert [a.name for a in archives] == [f"{lg.key}.zip"]
    with zipfile.ZipFile(archives[0]) as z:
        msgs = [json.loads(line) for line in z.read("messages.json").decode().splitlines() if line.strip()]
        exp = json.loads(z.read("experiment.json"))
    metrics = {(m["payload"]["metric"]["metricName"], m["payload"]["metric"]["step"]): m["payload"]["metric"]["metricValue"]
               for m in msgs if m["type"] == "metric_msg"}
    assert metrics[("reward", 1)] == -0.5 and metrics[("reward", 4)] == -0.3
    assert ("reward", 3) not in metrics and not any(k[0] == "bad" for k in metrics)
    assert metrics[("cos_dist/p50", 4)] == 0.3 and metrics[("cos_dist/p25", 4)] == 0.2
    params = {m["payload"]["param"]["paramName"]: m["payload"]["param"]["paramValue"]
              for m in msgs if m["type"] == "parameter_msg"}
    assert params["controller.lr"] == 0.003
    assert lg.key in json.dumps(exp)
