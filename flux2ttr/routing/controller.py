"""The routing controller: per denoising step, one logit per routed layer (high = full attention).

Inputs per batch row: ``sigma [B]`` (flow-matching noise level in [0, 1]), ``cfg [B]`` (guidance value),
latent ``height [B]`` and ``width [B]`` in tokens, and optionally a pooled prompt embedding ``[B, P]``
(off by default). sigma and cfg get sinusoidal embeddings; width and height get sinusoidal features that a
learned linear layer turns into a resolution embedding; a 3-layer MLP maps the concatenation to ``[B, L]``
logits, one per routed layer in ``layer_keys`` order.

Policy: each layer is an independent Bernoulli with ``p_full = sigmoid(logit)``.

``quality_speed`` in [0, 1] (0 = best quality, 1 = fastest) shifts the policy: the effective probability is
``sigmoid(logit - logit(quality_speed))``, so 0.5 is the trained policy, 0 is always full attention and 1
never. The deterministic *threshold* mode is the same rule without noise: a layer runs full attention
iff ``sigmoid(logit) >= quality_speed`` (:func:`threshold_for` returns that probability cutoff).

Artifact: a safetensors file of the weights with a JSON header under metadata key
``flux2ttr.routing.controller`` (format, schema, layer order, student artifact sha256, model config, teacher
identity, and whatever the trainer adds). Checkpoints (weights, AdamW state, reward baseline, count) use
:mod:`flux2ttr.checkpoint` (safetensors + JSON, no pickle).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from flux2ttr.config import ConfigError, Flux2TTRError
from flux2ttr.versioned_file import VersionedFile

FORMAT = "flux2ttr.controller"
SCHEMA_VERSION = 1
METADATA_KEY = "flux2ttr.controller"


class ControllerArtifactError(ValueError, Flux2TTRError):
    """A controller artifact is missing, corrupt, or does not match what the caller expects."""


class NonFiniteControllerError(ControllerArtifactError):
    """A controller artifact holds a NaN or inf weight."""


@dataclass
class ControllerConfig:
    """Model and reward fields of params section ``controller`` (the training loop adds its own)."""

    sigma_dim: int = 64  # sinusoidal sigma embedding width (even)
    cfg_dim: int = 32  # sinusoidal guidance embedding width (even)
    res_freq_dim: int = 32  # sinusoidal features per axis (width, height), even
    res_dim: int = 32  # learned resolution embedding width
    hidden: int = 128  # MLP hidden width (3 linear layers)
    max_period: float = 10000.0  # longest sinusoid period
    sigma_scale: float = 1000.0  # sigma in [0, 1] -> timestep-like range before the sinusoids
    cfg_scale: float = 100.0  # guidance (~1..10) -> a range the sinusoids resolve
    res_scale: float = 1.0  # latent tokens per axis (~16..256) used as-is
    use_prompt_embedding: bool = False  # extra pooled prompt embedding input (routing may depend on the prompt)
    prompt_dim: int = 0  # its width (needed when use_prompt_embedding)
    init_logit: float = 0.0  # output bias at init (0 = p_full 0.5 everywhere)
    # reward (flux2ttr/routing/reward.py)
    target_ttr_ratio: float = 0.5  # wanted share of student (TTR) decisions over eligible layers
    lambda_eff: float = 0.5  # weight of |full_ratio - (1 - target_ttr_ratio)|
    lambda_entropy: float = 0.01  # entropy bonus (keeps exploring)
    reward_baseline_quality_floor: float = -0.3  # rewards below this enter the baseline EMA as this value
    baseline_momentum: float = 0.9  # EMA: b <- m*b + (1-m)*max(reward, floor)

    def __post_init__(self) -> None:
        for name in ("sigma_dim", "cfg_dim", "res_freq_dim"):
            v = getattr(self, name)
            if v < 2 or v % 2:
                raise ConfigError(f"controller.{name} must be an even number >= 2, got {v}")
        if self.res_dim < 1 or self.hidden < 1:
            raise ConfigError("controller.res_dim and controller.hidden must be >= 1")
        if self.use_prompt_embedding and self.prompt_dim < 1:
            raise ConfigError("controller.use_prompt_embedding needs controller.prompt_dim >= 1")
        if not 0.0 <= self.target_ttr_ratio <= 1.0:
            raise ConfigError(f"controller.target_ttr_ratio must be in [0, 1], got {self.target_ttr_ratio}")
        if not 0.0 <= self.baseline_momentum < 1.0:
            raise ConfigError(f"controller.baseline_momentum must be in [0, 1), got {self.baseline_momentum}")


def model_config(cfg: ControllerConfig) -> ControllerConfig:
    """Only the :class:`ControllerConfig` fields of ``cfg`` (a subclass config may carry training fields)."""
    names = {f.name for f in dataclasses.fields(ControllerConfig)}
    return ControllerConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names})


def sinusoidal(x: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    """``x [B]`` -> ``[B, dim]``: ``[cos(x f_i), sin(x f_i)]`` with ``f_i = max_period^(-i/(dim/2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TTRController(nn.Module):
    """``forward(sigma, cfg, height, width, prompt_embedding=None) -> logits [B, L]`` (high = full)."""

    def __init__(self, cfg: ControllerConfig, layer_keys: list[str]) -> None:
        super().__init__()
        if not layer_keys:
            raise ValueError("TTRController needs at least one routed layer")
        self.cfg = model_config(cfg)
        self.layer_keys = list(layer_keys)
        c = self.cfg
        self.res_embed = nn.Sequential(nn.Linear(2 * c.res_freq_dim, c.res_dim), nn.SiLU())
        width_in = c.sigma_dim + c.cfg_dim + c.res_dim + (c.prompt_dim if c.use_prompt_embedding else 0)
        # registered last so the output layer is the module tree's last Linear
        self.head = nn.Sequential(nn.Linear(width_in, c.hidden), nn.SiLU(), nn.Linear(c.hidden, c.hidden),
                                  nn.SiLU(), nn.Linear(c.hidden, len(self.layer_keys)))
        with torch.no_grad():
            self.head[-1].bias.fill_(c.init_logit)

    @property
    def num_layers(self) -> int:
        return len(self.layer_keys)

    def forward(self, sigma: torch.Tensor, cfg: torch.Tensor, height: torch.Tensor, width: torch.Tensor,
                prompt_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """``sigma, cfg, height, width [B]`` (height/width in latent tokens), ``prompt_embedding [B, P]``
        -> logits ``[B, L]``."""
        c = self.cfg
        dev = self.head[0].weight.device
        sigma, cfg, height, width = (torch.as_tensor(t, dtype=torch.float32, device=dev).reshape(-1)
                                     for t in (sigma, cfg, height, width))
        res = torch.cat([sinusoidal(width * c.res_scale, c.res_freq_dim, c.max_period),
                         sinusoidal(height * c.res_scale, c.res_freq_dim, c.max_period)], dim=-1)
        parts = [sinusoidal(sigma * c.sigma_scale, c.sigma_dim, c.max_period),
                 sinusoidal(cfg * c.cfg_scale, c.cfg_dim, c.max_period), self.res_embed(res)]
        if c.use_prompt_embedding:
            if prompt_embedding is None:
                raise ValueError("this controller was built with use_prompt_embedding: pass prompt_embedding [B, P]")
            if prompt_embedding.shape != (sigma.shape[0], c.prompt_dim):
                raise ValueError(f"prompt_embedding must be [{sigma.shape[0]}, {c.prompt_dim}], "
                                 f"got {list(prompt_embedding.shape)}")
            parts.append(prompt_embedding.float().to(dev))
        elif prompt_embedding is not None:
            raise ValueError("prompt_embedding given but controller.use_prompt_embedding is false")
        return self.head(torch.cat(parts, dim=-1))


# ------------------------------------------------------------------------------------------ policy
def probs_full(logits: torch.Tensor) -> torch.Tensor:
    """``p_full = sigmoid(logits)``, same shape."""
    return torch.sigmoid(logits)


def _shift(quality_speed: float | None) -> float:
    if quality_speed is None:
        return 0.0
    qs = float(quality_speed)
    if not 0.0 <= qs <= 1.0:
        raise ValueError(f"quality_speed must be in [0, 1], got {qs}")
    if qs == 0.0:
        return -math.inf
    if qs == 1.0:
        return math.inf
    return math.log(qs / (1.0 - qs))


def sample_mask(logits: torch.Tensor, generator: torch.Generator | None = None,
                quality_speed: float | None = None) -> torch.Tensor:
    """One Bernoulli draw per entry: bool mask, True = full attention. With ``quality_speed`` the
    probability is ``sigmoid(logit - logit(quality_speed))`` (0.5 = the policy itself)."""
    p = torch.sigmoid(logits.detach().float() - _shift(quality_speed))
    u = torch.rand(p.shape, generator=generator, dtype=torch.float32, device=p.device)
    return u < p


def threshold_for(quality_speed: float) -> float:
    """The deterministic cutoff: full attention iff ``sigmoid(logit) >= threshold_for(quality_speed)``.
    The mapping is the identity ``quality_speed -> probability cutoff`` (0 = always full, 0.5 = the policy's
    most likely action, 1 = full only where the policy is certain)."""
    qs = float(quality_speed)
    if not 0.0 <= qs <= 1.0:
        raise ValueError(f"quality_speed must be in [0, 1], got {qs}")
    return qs


def threshold_mask(logits: torch.Tensor, quality_speed: float) -> torch.Tensor:
    """Bool mask of the threshold mode (True = full attention)."""
    return torch.sigmoid(logits.detach().float()) >= threshold_for(quality_speed)


def log_prob(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Elementwise Bernoulli log-probability of ``mask`` (True = full) under ``logits``, same shape."""
    m = mask.to(logits.dtype)
    return m * F.logsigmoid(logits) + (1.0 - m) * F.logsigmoid(-logits)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Elementwise Bernoulli entropy in nats: ``softplus(l) - l * sigmoid(l)``."""
    return F.softplus(logits) - logits * torch.sigmoid(logits)


# ------------------------------------------------------------------------------------------ artifact
def save_controller(path: str | Path, model: TTRController, *, student_sha256: str,
                    layer_order: list[str] | None = None, config: dict[str, Any] | None = None,
                    teacher: dict[str, Any] | None = None, layer_keys: list[str] | None = None,
                    eligible: list[str] | None = None, train_config: dict[str, Any] | None = None,
                    metrics: dict[str, Any] | None = None) -> None:
    """Write the controller artifact atomically. ``layer_order`` (alias ``layer_keys``) must equal the
    model's; ``config``/``train_config`` is the training config recorded as-is; ``teacher`` its identity."""
    order = list(layer_order if layer_order is not None else (layer_keys if layer_keys is not None else model.layer_keys))
    if order != model.layer_keys:
        raise ControllerArtifactError(f"save_controller: layer order {order} differs from the model's {model.layer_keys}")
    header = {
        "layer_order": order, "student_sha256": str(student_sha256),
        "model_config": dataclasses.asdict(model.cfg),
        "config": config if config is not None else (train_config or {}),
        "teacher": teacher or {}, "eligible": list(eligible) if eligible is not None else None,
        "metrics": metrics or {},
    }
    CONTROLLER_FILE.write(path, model.state_dict(), header)


def read_controller_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a controller artifact (checks format and schema)."""
    return _open(Path(path))[1]


CONTROLLER_FILE = VersionedFile(
    what="controller artifact", metadata_key=METADATA_KEY, format=FORMAT, schema=SCHEMA_VERSION,
    error=ControllerArtifactError,
    not_found_fix="run `dvc repro train_controller` or point the path at flux2_ttr_controller.safetensors",
    unreadable_fix="re-export or re-train it",
    no_header_hint="is this the student artifact?",
)


def _open(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    header, tensors = CONTROLLER_FILE.read(path)
    return tensors, header


def _check_finite_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A NaN/inf weight makes every logit NaN, and a NaN logit routes every layer to its student: refuse it."""
    for name in sorted(tensors):
        t = tensors[name]
        if not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t)
        n_bad = int(bad.sum())
        if n_bad:
            n_nan = int(torch.isnan(t).sum())
            raise NonFiniteControllerError(
                f"{path}: controller weight {name!r} has {n_bad} of {t.numel()} values non-finite (NaN {n_nan}, "
                f"inf {n_bad - n_nan}); the controller artifact is corrupt (a diverged or damaged training run): "
                "retrain it (dvc repro train_controller)")


def load_controller(path: str | Path, *, expect_layers: list[str] | None = None,
                    expect_student_sha256: str | None = None, student_sha256: str | None = None,
                    device: str | torch.device = "cpu") -> tuple[TTRController, list[str]]:
    """Load a controller artifact -> ``(model, layer_keys)``; the full header is ``model.header``.

    ``expect_layers``: the routed layer order the caller will use; ``expect_student_sha256`` (alias
    ``student_sha256``): sha256 of the student artifact in use. Each mismatch is its own clear error; a
    non-finite (NaN/inf) weight is refused, naming the tensor."""
    path = Path(path)
    tensors, header = _open(path)
    _check_finite_weights(path, tensors)
    order = list(header.get("layer_order") or [])
    if expect_layers is not None and list(expect_layers) != order:
        raise ControllerArtifactError(f"{path}: controller was trained for layers {order} but the routed layers "
                                      f"are {list(expect_layers)}; retrain the controller for these layers")
    want_sha = expect_student_sha256 if expect_student_sha256 is not None else student_sha256
    if want_sha is not None and header.get("student_sha256") != want_sha:
        raise ControllerArtifactError(f"{path}: controller was trained with student artifact sha256 "
                                      f"{header.get('student_sha256')} but the students in use have {want_sha}; "
                                      "retrain the controller (dvc repro train_controller) or load the matching students")
    try:
        from flux2ttr.config import from_dict  # noqa: PLC0415

        cfg = from_dict(ControllerConfig, header.get("model_config") or {}, f"{path}:model_config")
        model = TTRController(cfg, order)
        model.load_state_dict(tensors, strict=True)
    except (ConfigError, RuntimeError, ValueError) as e:
        raise ControllerArtifactError(f"{path}: weights do not match the recorded model config: {e}") from None
    model.header = header
    return model.to(device).eval(), order


# ------------------------------------------------------------------------------------------ checkpoint
def save_controller_checkpoint(path: str | Path, model: TTRController, optimizer: torch.optim.Optimizer,
                               baseline: Any, *, iteration: int, extra: dict[str, Any] | None = None) -> None:
    """Weights, optimiser state (flattened to tensors + JSON), reward baseline and iteration count, atomically."""
    from flux2ttr.checkpoint import optimizer_to_flat, save_checkpoint  # noqa: PLC0415

    tensors = {f"controller.{k}": v for k, v in model.state_dict().items()}
    opt_t, opt_meta = optimizer_to_flat(optimizer, "optimizer")
    tensors.update(opt_t)
    header = {"kind": "controller", "iteration": int(iteration), "optimizer": opt_meta,
              "baseline": baseline.state_dict(), "layer_order": model.layer_keys,
              "model_config": dataclasses.asdict(model.cfg), "extra": extra or {}}
    save_checkpoint(path, tensors, header)


def load_controller_checkpoint(path: str | Path, model: TTRController, optimizer: torch.optim.Optimizer,
                               baseline: Any) -> dict[str, Any]:
    """Restore what :func:`save_controller_checkpoint` wrote into the given objects; returns the header."""
    from flux2ttr.checkpoint import CheckpointError, load_checkpoint, optimizer_from_flat  # noqa: PLC0415

    tensors, header = load_checkpoint(path)
    if header.get("kind") != "controller":
        raise CheckpointError(f"{path}: not a controller checkpoint")
    if header.get("layer_order") != model.layer_keys:
        raise CheckpointError(f"{path}: checkpoint layers {header.get('layer_order')} differ from the model's "
                              f"{model.layer_keys}; delete the checkpoint to start over")
    sd = {k[len("controller."):]: v for k, v in tensors.items() if k.startswith("controller.")}
    model.load_state_dict(sd, strict=True)
    optimizer_from_flat(optimizer, "optimizer", tensors, header["optimizer"])
    baseline.load_state_dict(header["baseline"])
    return header
