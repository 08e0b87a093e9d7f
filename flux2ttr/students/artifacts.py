"""Student artifacts: a set of HKR layers in one safetensors file with a JSON header (no pickle).

File layout::

    tensors   "{layer_key}.{param}"  fp32, e.g. "single_blocks.3.phi_q.net.0.weight"
    metadata  {"flux2ttr": "<JSON header>"}

Header (JSON)::

    format        "flux2ttr.students"
    schema        int (this code writes and reads up to SCHEMA_VERSION)
    feature_dim, head_dim, num_heads
    alpha_format  "logit" (the stored alpha parameter is the pre-sigmoid logit)
    hkr           the HKRConfig (dict) the layers were built with
    layers        {layer_key: {"ready": bool, "metrics": {name: number}}}
    train_config  dict, teacher  dict (identity of the distilled teacher)

**Legacy files.** A header without ``alpha_format`` comes from before the logit convention: its
alpha tensor (``{layer}.alpha`` or ``{layer}.alpha_logit``) holds the raw alpha in ``(0, alpha_max)``.
:func:`load_students` converts it in memory; :func:`migrate_legacy_file` rewrites the file once
(atomically) and writes ``alpha_format = "logit"``, so running it again changes nothing.

**Finite values only.** Every tensor must be finite: :func:`save_students` refuses a layer with a NaN or
inf value (nothing is written), and :func:`load_students` / :func:`migrate_legacy_file` refuse a file holding
one, naming the layer and the tensor. A NaN student would otherwise sample a NaN image with no error.

Every problem raises :class:`ArtifactError` naming the file and what does not match.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flux2ttr.atomic import file_sha256  # noqa: F401 - file_sha256 is public here
from flux2ttr.config import ConfigError, Flux2TTRError, from_dict, to_dict
from flux2ttr.contract import layer_sort_key
from flux2ttr.students.build import build_student
from flux2ttr.students.hkr import HKRConfig
from flux2ttr.students.layer import StudentLayer
from flux2ttr.versioned_file import VersionedFile

FORMAT = "flux2ttr.students"
SCHEMA_VERSION = 1
METADATA_KEY = "flux2ttr"
ALPHA_FORMAT = "logit"
ALPHA_PARAM = "alpha_logit"
LEGACY_ALPHA_PARAMS = ("alpha", "alpha_logit")


class ArtifactError(ValueError, Flux2TTRError):
    """A student (or controller) artifact is missing, corrupt or does not match what is expected."""


class NonFiniteArtifactError(ArtifactError):
    """A student artifact (or layers about to be saved as one) holds a NaN or inf value."""


STUDENT_FILE = VersionedFile(
    what="student artifact", metadata_key=METADATA_KEY, format=FORMAT, schema=SCHEMA_VERSION, error=ArtifactError,
    not_found_fix="run the distill stage or pass the right path",
    unreadable_fix="rerun the distill stage to write it again",
)


@dataclass
class StudentArtifact:
    """A loaded student file: its header, the HKR config, layers by key, readiness and metrics."""

    path: Path
    header: dict[str, Any]
    cfg: HKRConfig
    layers: dict[str, StudentLayer]
    ready: dict[str, bool] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    migrated: bool = False  # True when a legacy raw-alpha file was converted while loading

    @property
    def num_heads(self) -> int:
        return int(self.header["num_heads"])


DISTILL_FIX = "re-run distill (`dvc repro distill`) to write the student artifact again"


def nonfinite_summary(t: torch.Tensor) -> str | None:
    """``None`` when every value of ``t`` is finite, else how many are not (``"3 of 64 values non-finite
    (NaN 2, inf 1)"``). Non-float tensors are always finite."""
    if not (t.is_floating_point() or t.is_complex()):
        return None
    bad = ~torch.isfinite(t)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    n_nan = int(torch.isnan(t).sum())
    return f"{n_bad} of {t.numel()} values non-finite (NaN {n_nan}, inf {n_bad - n_nan})"


def _check_finite(path: Path, tensors: dict[str, torch.Tensor], layer_keys: Any) -> None:
    """Refuse a file holding a NaN/inf value in a tensor of one of its layers (the error names the layer
    and the tensor; the first bad one in header layer order, tensor names sorted)."""
    for layer in layer_keys:
        for name in sorted(n for n in tensors if n.startswith(f"{layer}.")):
            what = nonfinite_summary(tensors[name])
            if what is not None:
                raise NonFiniteArtifactError(f"{path}: layer {layer}: tensor {name!r} has {what}; the student "
                                             f"artifact is corrupt (a diverged or damaged distill run): "
                                             f"{DISTILL_FIX}")


def _atomic_save(tensors: dict[str, torch.Tensor], header: dict[str, Any], path: Path) -> None:
    STUDENT_FILE.write(path, tensors, header)


def _json_clean(obj: Any, where: str) -> Any:
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{where} is not JSON-serialisable: {e}") from None


def save_students(
    path: str | Path,
    layers: dict[str, StudentLayer],
    cfg: HKRConfig,
    *,
    num_heads: int,
    ready: dict[str, bool],
    metrics: dict[str, dict[str, Any]],
    train_config: dict[str, Any],
    teacher: dict[str, Any],
) -> None:
    """Write ``layers`` to ``path`` (atomic: temporary file in the same folder, then rename); a layer
    with a NaN or inf value is refused and nothing is written."""
    path = Path(path)
    if not layers:
        raise ArtifactError(f"{path}: no layers to save")
    tensors: dict[str, torch.Tensor] = {}
    for key, layer in layers.items():
        try:
            layer_sort_key(key)
        except ValueError:
            raise ArtifactError(f"{path}: {key!r} is not a layer key (expected 'single_blocks.N' or "
                                "'double_blocks.N'; map diffusers names with flux2ttr.contract.layer_key)") from None
        if layer.config != cfg:
            raise ArtifactError(f"{path}: layer {key} was built with a different HKRConfig than the one saved")
        if layer.num_heads != num_heads:
            raise ArtifactError(f"{path}: layer {key} has num_heads={layer.num_heads}, header says {num_heads}")
        for name, t in layer.export_tensors().items():
            full = f"{key}.{name}"
            what = nonfinite_summary(t)
            if what is not None:  # never write a NaN artifact
                raise NonFiniteArtifactError(f"{path}: refusing to save layer {key}: tensor {full!r} has {what} "
                                             "(the student diverged in training); nothing was written: re-run "
                                             "distill (with a lower distill.lr if it diverges again)")
            tensors[full] = t
    modes = sorted({layer.mode for layer in layers.values()})
    if len(modes) != 1:
        raise ArtifactError(f"{path}: layers of several student modes {modes}; one artifact holds one mode")
    mode = modes[0]  # what the layers are decides, whatever mode the config would build by default
    missing_ready = sorted(set(layers) - set(ready))
    if missing_ready:
        raise ArtifactError(f"{path}: no readiness given for layer(s) {missing_ready}")
    header = {
        "format": FORMAT,
        "schema": SCHEMA_VERSION,
        "feature_dim": cfg.feature_dim,
        "head_dim": cfg.head_dim,
        "num_heads": int(num_heads),
        "mode": mode,
        "alpha_format": ALPHA_FORMAT,
        "hkr": {**to_dict(cfg), "mode": mode},
        "layers": {k: {"ready": bool(ready[k]), "metrics": _json_clean(metrics.get(k, {}), f"metrics[{k}]")}
                   for k in layers},
        "train_config": _json_clean(train_config, "train_config"),
        "teacher": _json_clean(teacher, "teacher"),
    }
    _atomic_save(tensors, header, path)


def _read_raw(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Header dict and all tensors of a file; any read problem is an :class:`ArtifactError`."""
    return STUDENT_FILE.read_raw(path)


def _check_header(path: Path, header: dict[str, Any]) -> None:
    STUDENT_FILE.check(path, header)
    for k in ("feature_dim", "head_dim", "num_heads", "hkr", "layers"):
        if k not in header:
            raise ArtifactError(f"{path}: header lacks '{k}'")
    for k in ("feature_dim", "head_dim", "num_heads"):
        v = header[k]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ArtifactError(f"{path}: header {k} = {v!r} must be a positive integer; the file is damaged or was "
                                "not written by flux2ttr: rerun the distill stage")
    if not isinstance(header["hkr"], dict) or not isinstance(header["layers"], dict):
        raise ArtifactError(f"{path}: header 'hkr' and 'layers' must be JSON objects; rerun the distill stage")
    af = header.get("alpha_format")
    if af is not None and af != ALPHA_FORMAT:
        raise ArtifactError(f"{path}: unknown alpha_format {af!r}, expected {ALPHA_FORMAT!r}")


def _cfg_from_header(path: Path, header: dict[str, Any]) -> HKRConfig:
    try:
        # files from before student modes hold HKR students (the default mode may be another)
        saved = dict(header["hkr"])
        if "window_key_tile" not in saved and "window_tile" in saved:
            # files from before window_key_tile: windows were whole query tiles
            saved["window_key_tile"] = list(saved["window_tile"])
        cfg = from_dict(HKRConfig, {"mode": header.get("mode", "hkr"), **saved}, f"{path}:hkr")
    except (ConfigError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: header 'hkr' config is invalid: {e}") from None
    if header.get("mode", cfg.mode) != cfg.mode:
        raise ArtifactError(f"{path}: header mode {header.get('mode')!r} disagrees with its hkr config ({cfg.mode!r})")
    for k in ("feature_dim", "head_dim"):
        if int(header[k]) != getattr(cfg, k):
            raise ArtifactError(f"{path}: header {k}={header[k]} disagrees with its hkr config ({getattr(cfg, k)})")
    return cfg


def _raw_alpha_to_logit(alpha: torch.Tensor, alpha_max: float) -> torch.Tensor:
    # p = alpha/alpha_max in (0, 1); clip away from 0/1 so the logit is finite.
    tiny = 1e-6
    p = (alpha.double() / alpha_max).clamp(tiny, 1.0 - tiny)
    return torch.log(p / (1.0 - p)).float()


def _migrate_tensors(header: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Legacy raw alpha -> logit, for every layer; returns the new tensor dict."""
    alpha_max = float(header.get("hkr", {}).get("alpha_max", HKRConfig.alpha_max))
    out = dict(tensors)
    for key in header["layers"]:
        src = next((f"{key}.{n}" for n in LEGACY_ALPHA_PARAMS if f"{key}.{n}" in tensors), None)
        if src is None:
            raise ArtifactError(f"{path}: legacy file has no alpha tensor for layer {key} "
                                f"(looked for {[f'{key}.{n}' for n in LEGACY_ALPHA_PARAMS]})")
        raw = out.pop(src)
        if not bool(((raw > 0) & (raw < alpha_max)).all()):
            raise ArtifactError(f"{path}: legacy alpha {src}={raw.tolist()} is outside (0, alpha_max={alpha_max})")
        out[f"{key}.{ALPHA_PARAM}"] = _raw_alpha_to_logit(raw, alpha_max)
    return out


def migrate_legacy_file(path: str | Path) -> bool:
    """Rewrite a legacy raw-alpha file to ``alpha_format = "logit"`` in place (atomic).

    Returns True when the file was migrated, False when it already is in logit format (idempotent:
    the format marker is written with the converted tensors, so a file is never migrated twice).
    """
    path = Path(path)
    header, tensors = _read_raw(path)
    _check_header(path, header)
    if header.get("alpha_format") == ALPHA_FORMAT:
        return False
    _check_finite(path, tensors, header["layers"])  # never write a NaN artifact, migrated or not
    tensors = _migrate_tensors(header, tensors, path)
    header = dict(header, alpha_format=ALPHA_FORMAT)
    _atomic_save(tensors, header, path)
    return True


def read_header(path: str | Path) -> dict[str, Any]:
    """The validated JSON header of a student artifact (format and schema checked)."""
    path = Path(path)
    header, _ = _read_raw(path)
    _check_header(path, header)
    return header


def load_students(
    path: str | Path,
    *,
    expect_feature_dim: int | None = None,
    expect_head_dim: int | None = None,
    expect_num_heads: int | None = None,
    expect_layers: list[str] | tuple[str, ...] | None = None,
    teacher: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> StudentArtifact:
    """Load and validate a student artifact; layers come back in eval mode on ``device``.

    Checks: format, schema, the header's dims against ``expect_*``, that every ``expect_layers`` key
    is present, that every tensor has the shape the config requires and only finite values (a NaN or inf
    names the layer and the tensor), and (when given) that the header's teacher identity agrees with
    ``teacher`` on every key of ``teacher``.
    """
    path = Path(path)
    header, tensors = _read_raw(path)
    _check_header(path, header)
    for name, want in (("feature_dim", expect_feature_dim), ("head_dim", expect_head_dim),
                       ("num_heads", expect_num_heads)):
        if want is not None and int(header[name]) != int(want):
            raise ArtifactError(f"{path}: {name} mismatch: file has {header[name]}, expected {want}")
    layer_meta = header["layers"]
    if expect_layers is not None:
        missing = [k for k in expect_layers if k not in layer_meta]
        if missing:
            raise ArtifactError(f"{path}: missing layer(s) {missing}; file has {sorted(layer_meta)}")
    if teacher is not None:
        have = header.get("teacher") or {}
        diff = {k: (have.get(k), v) for k, v in teacher.items() if have.get(k) != v}
        if diff:
            raise ArtifactError(
                f"{path}: teacher mismatch (key: file vs expected): "
                + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in sorted(diff.items()))
            )
    cfg = _cfg_from_header(path, header)
    _check_finite(path, tensors, layer_meta)
    migrated = False
    if header.get("alpha_format") is None and cfg.mode == "hkr":
        tensors = _migrate_tensors(header, tensors, path)
        header = dict(header, alpha_format=ALPHA_FORMAT)
        migrated = True
    num_heads = int(header["num_heads"])
    layers: dict[str, StudentLayer] = {}
    used: set[str] = set()
    for key in layer_meta:
        layer = build_student(cfg, num_heads=num_heads)
        want = layer.expected_shapes()
        mine: dict[str, torch.Tensor] = {}
        for name, shape in want.items():
            full = f"{key}.{name}"
            if full not in tensors:
                raise ArtifactError(f"{path}: missing tensor {full!r} for layer {key}")
            if tuple(tensors[full].shape) != shape:
                raise ArtifactError(
                    f"{path}: tensor {full!r} has shape {tuple(tensors[full].shape)}, expected {shape} "
                    f"(feature_dim={cfg.feature_dim}, head_dim={cfg.head_dim})"
                )
            if not tensors[full].is_floating_point():
                raise ArtifactError(f"{path}: tensor {full!r} has dtype {tensors[full].dtype}, expected float")
            mine[name] = tensors[full].float()
            used.add(full)
        layer.import_tensors(mine)
        layers[key] = layer.to(device).eval()
    extra = sorted(set(tensors) - used)
    if extra:
        raise ArtifactError(f"{path}: unexpected tensor(s) not belonging to any listed layer: {extra[:5]}")
    ready = {k: bool(m.get("ready", False)) for k, m in layer_meta.items()}
    metrics = {k: dict(m.get("metrics", {})) for k, m in layer_meta.items()}
    return StudentArtifact(path=path, header=header, cfg=cfg, layers=layers, ready=ready, metrics=metrics,
                           migrated=migrated)


def layer_tensor_names(cfg: HKRConfig, num_heads: int = 1) -> list[str]:
    """The per-layer parameter names a file built with ``cfg`` holds (handy for tools and tests)."""
    return sorted(build_student(cfg, num_heads=num_heads).expected_shapes())

