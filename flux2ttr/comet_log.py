"""Comet logging shared by distill and controller training.

Off without an API key (``COMET_API_KEY`` or Comet's own config file) unless ``offline`` is asked, in which
case :class:`comet_ml.OfflineExperiment` writes one zip archive into ``offline_directory`` (upload later
with ``comet upload``). Every logging call is guarded: a failure is warned about, never raised, so logging
never stops training. Experiment keys follow Comet's rule (alphanumeric, 32..50 characters) and are built
from the stage name, the git short hash and a UTC timestamp.
"""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from flux2ttr.config import ConfigError, load_section

log = logging.getLogger("flux2ttr.comet")

KEY_MIN, KEY_MAX = 32, 50  # Comet's experiment key length rule
QUANTILES = (("min", 0.0), ("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("max", 1.0))


@dataclass
class CometConfig:
    """params.yaml section ``comet``."""

    enabled: Any = "auto"  # "auto" (on when an API key is found or offline is asked) | true | false
    offline: bool = False  # write a local archive instead of talking to Comet
    offline_directory: str = "comet_offline"  # where offline archives go
    project_name: str = "flux2ttr"
    workspace: str = ""  # "" = the API key's default workspace
    log_every: int = 1  # log metrics every N steps (force=True always logs)

    def __post_init__(self) -> None:
        if self.enabled not in ("auto", True, False):
            raise ConfigError(f"comet.enabled must be auto, true or false, got {self.enabled!r}")
        if self.log_every < 1:
            raise ConfigError(f"comet.log_every must be >= 1, got {self.log_every}")


def normalize_key(raw: str) -> str:
    """A Comet experiment key from ``raw``: alphanumerics only, padded (with a hash of ``raw``) to at least
    32 characters and cut to at most 50."""
    key = re.sub(r"[^A-Za-z0-9]", "", raw)
    if len(key) < KEY_MIN:
        key += hashlib.sha256(raw.encode()).hexdigest()[: KEY_MIN - len(key)]
    return key[:KEY_MAX]


def git_short_hash(cwd: str | Path | None = None) -> str:
    """``git rev-parse --short HEAD`` or ``nogit`` outside a repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout.strip() or "nogit"
    except Exception:
        return "nogit"


def experiment_key(stage: str, *, git_hash: str | None = None, now: float | None = None) -> str:
    """``<stage><git short hash><UTC yyyymmddHHMMSS><microseconds>`` normalised by :func:`normalize_key`."""
    t = time.time() if now is None else now
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(t)) + f"{int((t % 1) * 1e6):06d}"
    # the timestamp must survive the cut to 50 characters, so the stage part is bounded
    return normalize_key(f"{re.sub(r'[^A-Za-z0-9]', '', stage)[:16]}{git_hash or git_short_hash()}{stamp}")


def quantiles(values: Iterable[float]) -> dict[str, float]:
    """min/p25/p50/p75/max with linear interpolation (numpy's default)."""
    vals = sorted(float(v) for v in values)
    if not vals:
        raise ValueError("quantiles of an empty list")
    out = {}
    for name, q in QUANTILES:
        pos = q * (len(vals) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(vals) - 1)
        out[name] = vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


class CometLogger:
    """One Comet experiment (online or offline) or a no-op. Methods never raise."""

    def __init__(self, cfg: CometConfig, *, stage: str, params: dict[str, Any] | None = None,
                 api_key: str | None = None) -> None:
        self.cfg = cfg
        self.experiment = None
        self.key = experiment_key(stage)
        self.archive_dir: Path | None = None
        if cfg.enabled is False:
            return
        try:
            import comet_ml  # noqa: PLC0415
            from comet_ml import config as comet_config  # noqa: PLC0415

            key = api_key or comet_config.get_api_key(None, comet_config.get_config())
            common = dict(project_name=cfg.project_name, workspace=cfg.workspace or None, log_code=False,
                          log_graph=False, auto_param_logging=False, auto_metric_logging=False, parse_args=False,
                          auto_output_logging=None, log_git_metadata=False, log_git_patch=False,
                          log_env_details=False, log_env_gpu=False, log_env_host=False, log_env_cpu=False,
                          log_env_network=False, log_env_disk=False, display_summary_level=0,
                          experiment_key=self.key)
            if cfg.offline:
                self.archive_dir = Path(cfg.offline_directory)
                self.archive_dir.mkdir(parents=True, exist_ok=True)
                self.experiment = comet_ml.OfflineExperiment(offline_directory=str(self.archive_dir), **common)
            elif key:
                self.experiment = comet_ml.Experiment(api_key=key, **common)
            else:
                if cfg.enabled is True:
                    warnings.warn("comet.enabled is true but no Comet API key was found (set COMET_API_KEY or "
                                  "comet.offline: true); logging is off", stacklevel=2)
                return
            self.experiment.set_name(f"{stage}-{self.key[-20:]}")
            if params:
                self.experiment.log_parameters(_flatten(params))
        except Exception as e:
            self._warn("start", e)
            self.experiment = None

    @property
    def active(self) -> bool:
        return self.experiment is not None

    def _warn(self, what: str, e: BaseException) -> None:
        warnings.warn(f"comet {what} failed ({type(e).__name__}: {e}); training continues", stacklevel=3)

    def log_metrics(self, metrics: dict[str, Any], step: int, force: bool = False) -> None:
        """Log a flat ``{name: number}`` at ``step`` (every ``log_every`` steps, or always with ``force``)."""
        if self.experiment is None or (not force and step % self.cfg.log_every):
            return
        try:
            self.experiment.log_metrics({k: float(v) for k, v in metrics.items() if v is not None}, step=step)
        except Exception as e:
            self._warn("log_metrics", e)

    def log_quantiles(self, name: str, values: Iterable[float], step: int, force: bool = False) -> None:
        """``name/min, name/p25, name/p50, name/p75, name/max`` over ``values`` (e.g. across layers)."""
        if self.experiment is None:
            return
        try:
            self.log_metrics({f"{name}/{q}": v for q, v in quantiles(values).items()}, step=step, force=force)
        except Exception as e:
            self._warn("log_quantiles", e)

    def log_asset(self, path: str | Path) -> None:
        if self.experiment is None:
            return
        try:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: no such file")
            self.experiment.log_asset(str(path))
        except Exception as e:
            self._warn("log_asset", e)

    def end(self) -> None:
        """Close the experiment (offline: writes the zip archive)."""
        if self.experiment is None:
            return
        try:
            self.experiment.end()
        except Exception as e:
            self._warn("end", e)
        finally:
            self.experiment = None


class GuardedComet:
    """A :class:`CometLogger` built from the params file's ``comet`` section for stage ``stage``, with
    every call guarded: a missing section, comet trouble or a failing call never stops a stage.
    ``params_path=None`` (or a failed start) gives a logger that does nothing."""

    def __init__(self, params_path: Path | None, stage: str, params: dict[str, Any]) -> None:
        self.stage = stage
        self.logger: CometLogger | None = None
        if params_path is None:
            return
        try:
            self.logger = CometLogger(load_section(CometConfig, "comet", params_path), stage=stage, params=params)
        except Exception as e:  # missing module, bad section, comet trouble: run anyway
            print(f"{stage}: comet logging off ({type(e).__name__}: {e})", file=sys.stderr)

    def call(self, name: str, *args: Any, **kw: Any) -> None:
        """``logger.<name>(*args, **kw)`` if logging is on; a failure is printed and swallowed."""
        if self.logger is None:
            return
        try:
            getattr(self.logger, name)(*args, **kw)
        except Exception as e:
            print(f"{self.stage}: comet {name} failed ({type(e).__name__}: {e}); continuing", file=sys.stderr)
