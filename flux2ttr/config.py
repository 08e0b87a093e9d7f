"""Typed configuration: every tunable number lives in ``params.yaml``; each module owns a dataclass
for its section and builds it with :func:`load_section`.

Unknown keys are an error (a typo in ``params.yaml`` must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """A ``params.yaml`` section does not match its dataclass."""


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read a params file; a missing or non-mapping file is a clear error."""
    # pyyaml belongs to the pipeline extra: the ComfyUI runtime imports this module (ConfigError,
    # from_dict for artifact headers) but never reads a params file, so yaml is imported only here.
    try:
        import yaml  # noqa: PLC0415
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f'reading {path} needs pyyaml, part of the pipeline extra: '
                                  'pip install "flux2ttr[pipeline]"', name=e.name) from e
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the project root or pass --params)")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; nested dataclasses recurse; unknown keys raise."""
    data = dict(data or {})
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {unknown}; known keys are {sorted(names)}"
        )
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        hint = hints.get(f.name)
        sub = _dataclass_in(hint)
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, f"{where}.{f.name}" if where else f.name)
        elif isinstance(value, list) and typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def load_section(cls: type[T], name: str, path: str | Path = DEFAULT_PARAMS) -> T:
    """Load section ``name`` of the params file at ``path`` into dataclass ``cls``."""
    params = load_params(path)
    if name not in params:
        raise ConfigError(f"{path}: missing section '{name}'")
    return from_dict(cls, params[name], f"{path}:{name}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config dataclass (for artifact headers and logs)."""
    return dataclasses.asdict(cfg)
