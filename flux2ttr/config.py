"""Typed configuration: every tunable number lives in ``params.yaml``; each module owns a dataclass
for its section and builds it with :func:`load_section`.

Strict on purpose (a typo or a quoted number in ``params.yaml`` must not silently fall back to a
default or crash half-way through a stage):

* unknown keys, duplicate keys and values that do not match a field's type hint are a
  :class:`ConfigError` naming the file, ``section.key``, the value and what is allowed. Hints understood:
  ``int`` (not ``bool``), ``float`` (ints accepted), ``bool`` (only ``true``/``false``), ``str``, ``None``,
  unions (``float | None``, ``list[str] | str``), ``list[T]``, ``tuple[T, ...]``, ``dict[K, V]``,
  ``Literal[...]``, nested dataclasses, ``Any`` (anything);
* ranges are the dataclasses' own: their ``__post_init__`` calls :func:`check_range` / :func:`check_choice`
  (or raises :class:`ConfigError` / ``ValueError``, which :func:`from_dict` prefixes with the file name).

:class:`Flux2TTRError` is the mixin base of the project's config and input errors: a stage (``python -m
stages.<name>`` or ``flux2ttr <stage>``) prints those as one line ``<stage>: <message>`` and exits 1
(:func:`report_input_errors`); ``FLUX2TTR_DEBUG=1`` (or ``flux2ttr --debug``) keeps the traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_PARAMS = Path("params.yaml")
DEBUG_ENV = "FLUX2TTR_DEBUG"


class Flux2TTRError(Exception):
    """Mixin base of flux2ttr's own config and input errors (a bad params file, a missing or mismatched
    input file). Mixed in next to each error's usual base, e.g. ``class TeacherError(ValueError,
    Flux2TTRError)``, so ``except ValueError`` keeps working. A stage reports these in one line; anything
    else is a bug and keeps its traceback."""


class ConfigError(ValueError, Flux2TTRError):
    """A ``params.yaml`` section does not match its dataclass."""


def is_input_error(exc: BaseException) -> bool:
    """Whether ``exc`` is one of the project's config/input errors (not a bug)."""
    return isinstance(exc, Flux2TTRError)


def debug_requested() -> bool:
    """``FLUX2TTR_DEBUG`` is set to something other than empty, 0, false, no or off."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (inner line breaks become spaces)."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


@contextlib.contextmanager
def report_input_errors(stage: str, *, debug: bool = False) -> Iterator[None]:
    """Run a stage's body: a config/input error (:func:`is_input_error`) prints ``<stage>: <message>`` on
    stderr and exits 1; with ``debug`` or ``FLUX2TTR_DEBUG=1`` it propagates with its traceback, as every
    other exception always does."""
    try:
        yield
    except Exception as e:
        if debug or debug_requested() or not is_input_error(e):
            raise
        print(f"{stage}: {one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


# ------------------------------------------------------------------------------------------ YAML


def _strict_loader() -> type:
    """A ``yaml.SafeLoader`` that refuses duplicate mapping keys (plain PyYAML keeps the last one)."""
    import yaml  # noqa: PLC0415  (callers made sure pyyaml is there)

    class StrictLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; explicit keys override it
                continue
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                continue
            if first != line:
                raise ConfigError(f"{key_node.start_mark.name}: duplicate key {key!r} on line {line} "
                                  f"(first on line {first}); YAML keeps only one of them, remove the other")
        return loader.construct_mapping(node, deep=deep)

    StrictLoader.add_constructor("tag:yaml.org,2002:map", construct_mapping)
    return StrictLoader


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read a params file; a missing, non-YAML or non-mapping file, or a duplicate key, is a clear error."""
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
    try:
        with path.open(encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the params file ({e})") from None
    try:
        # yaml.load with a SafeLoader subclass: only plain YAML types are built, nothing is executed
        data = yaml.load(text, Loader=_strict_loader())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" on line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}: not valid YAML{where}: {' '.join(str(problem).split())}") from None
    except ConfigError as e:  # a duplicate key: name the file the way the user wrote it
        raise ConfigError(str(e).replace("<unicode string>", str(path), 1)) from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


# ------------------------------------------------------------------------------------------ type checks


def _split_where(where: str, cls: type) -> tuple[str, str]:
    """``"params.yaml:capture.inner"`` -> ``("params.yaml", "capture.inner")``; no file part -> ``("", where)``."""
    file, sep, dotted = where.rpartition(":")
    if sep and re.fullmatch(r"[\w.\-\[\]]+", dotted):
        return file, dotted
    return "", where or cls.__name__


def _prefix(file: str, msg: str) -> str:
    return msg if not file or msg.startswith(f"{file}:") else f"{file}: {msg}"


_TYPE_WORDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "booleans"),
               str: ("a string", "strings"), type(None): ("null", "nulls")}


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) is typing.Union or isinstance(hint, types.UnionType)


def _describe(hint: Any, plural: bool = False) -> str:
    """What values ``hint`` allows, in words ("an integer", "a list of strings or a string", ...)."""
    if hint is Any or hint is None:
        return "anything"
    if hint in _TYPE_WORDS:
        return _TYPE_WORDS[hint][plural]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_union(hint):
        return " or ".join(_describe(a, plural) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(_show(a) for a in args)
    if origin in (list, tuple, set, frozenset):
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
        inner = _describe(args[0], plural=True) if args else "values"
        return f"lists of {inner}" if plural else f"a list of {inner}"
    if origin is dict:
        return "mappings" if plural else "a mapping"
    if dataclasses.is_dataclass(hint):
        return f"mappings ({hint.__name__})" if plural else f"a mapping of {hint.__name__} keys"
    name = getattr(hint, "__name__", str(hint))
    return f"{name} values" if plural else f"a {name}"


def _kind(value: Any) -> str:
    """The YAML-ish kind of a value, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    for t, word in ((int, "an integer"), (float, "a number"), (str, "a string"), (list, "a list"),
                    (tuple, "a list"), (dict, "a mapping")):
        if isinstance(value, t):
            return word
    return f"a {type(value).__name__}"


def _fix_hint(value: Any, hint: Any) -> str:
    """A hint for a quoted number/boolean in YAML (``"20"`` where an integer is expected)."""
    if _is_union(hint):
        return next((h for h in (_fix_hint(value, a) for a in typing.get_args(hint)) if h), "")
    if hint is int and isinstance(value, float) and value.is_integer():
        return f"; write {int(value)}"
    if not isinstance(value, str):
        return ""
    s = value.strip()
    if hint is int and re.fullmatch(r"[+-]?\d+", s):
        return f"; write {s} without quotes"
    m = re.fullmatch(r"([+-]?\d+)([eE][+-]?\d+)", s)
    if hint is float and m:  # PyYAML (YAML 1.1) reads 1e-6 as a string: exponent floats need a dot
        return f"; YAML reads {s} as a string, write {m.group(1)}.0{m.group(2)}"
    if hint is float:
        try:
            if math.isfinite(float(s)):
                return f"; write {s} without quotes"
        except ValueError:
            pass
    if hint is bool and s.lower() in ("true", "false", "yes", "no", "on", "off"):
        return f"; write {'true' if s.lower() in ('true', 'yes', 'on') else 'false'} without quotes"
    return ""


class _Mismatch(Exception):
    """A value does not match a hint: ``key`` (dotted, with [i]) and the message tail."""

    def __init__(self, key: str, value: Any, hint: Any, extra: str = "") -> None:
        super().__init__(key)
        self.key, self.value, self.hint, self.extra = key, value, hint, extra


def _check(value: Any, hint: Any, key: str, file: str) -> Any:
    """``value`` if it matches ``hint`` (lists become tuples for tuple hints, mappings become nested
    dataclasses), else :class:`_Mismatch`."""
    if hint is Any or hint is None or isinstance(hint, (str, typing.TypeVar)):
        return value
    if hint is type(None):
        if value is None:
            return value
        raise _Mismatch(key, value, hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(key, value, hint)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch(key, value, hint)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        raise _Mismatch(key, value, hint)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch(key, value, hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_union(hint):
        return _check_union(value, hint, args, key, file)
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch(key, value, hint)
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple):
        return _check_sequence(value, hint, origin or hint, args, key, file)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _Mismatch(key, value, hint)
        if len(args) == 2:
            return {_check(k, args[0], f"{key} key {k!r}", file): _check(v, args[1], f"{key}.{k}", file)
                    for k, v in value.items()}
        return value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return from_dict(hint, value, f"{file}:{key}" if file else key)
        raise _Mismatch(key, value, hint)
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Mismatch(key, value, hint)
    return value  # a hint this checker does not know: accepted as before


def _check_union(value: Any, hint: Any, args: tuple, key: str, file: str) -> Any:
    mismatches: list[_Mismatch] = []
    for arm in args:
        try:
            return _check(value, arm, key, file)
        except _Mismatch as m:
            mismatches.append(m)
    # a list or mapping that went wrong inside: report the arm of its own kind (element errors name [i])
    for arm, m in zip(args, mismatches):
        arm_origin = typing.get_origin(arm) or arm
        same_kind = ((isinstance(value, (list, tuple)) and arm_origin in (list, tuple, set, frozenset))
                     or (isinstance(value, dict) and (arm_origin is dict or dataclasses.is_dataclass(arm))))
        if same_kind and m.key != key:
            raise _Mismatch(m.key, m.value, m.hint, m.extra or f" (in {key}: {_describe(hint)})")
    raise _Mismatch(key, value, hint)


def _check_sequence(value: Any, hint: Any, origin: Any, args: tuple, key: str, file: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise _Mismatch(key, value, hint)
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise _Mismatch(key, value, hint, f" ({len(value)} given)")
        return tuple(_check(v, a, f"{key}[{i}]", file) for i, (v, a) in enumerate(zip(value, args)))
    inner = args[0] if args else Any
    items = [_check(v, inner, f"{key}[{i}]", file) for i, v in enumerate(value)]
    if origin is tuple:
        return tuple(items)
    if origin in (set, frozenset):
        return origin(items)
    return items


def _show(value: Any) -> str:
    """A value as the params file spells it (``null``, ``true``; strings quoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _mismatch_error(m: _Mismatch, file: str) -> ConfigError:
    kind = "" if m.value is None or isinstance(m.value, bool) else f" ({_kind(m.value)})"
    return ConfigError(_prefix(file, f"{m.key} = {_show(m.value)}{kind}: expected {_describe(m.hint)}"
                                     f"{m.extra}{_fix_hint(m.value, m.hint)}"))


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, checking every value against its field's type hint;
    nested dataclasses recurse; unknown keys raise.

    ``where`` names the source for messages: ``"<file>:<section>"`` (what :func:`load_section` passes),
    or just a section name. Errors of ``cls.__post_init__`` (``ConfigError`` or ``ValueError``) come back
    as :class:`ConfigError` prefixed with the file."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    file, section = _split_where(where, cls)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(_prefix(file, f"{section} = {_show(data)} ({_kind(data)}): expected a mapping of "
                                        f"{cls.__name__} keys"))
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    unknown = sorted(str(k) for k in set(data) - names)
    if unknown:
        raise ConfigError(_prefix(file, f"{section}: unknown key(s) {unknown}; known keys are {sorted(names)}"))
    kwargs: dict[str, Any] = {}
    for f in fields:
        if f.name not in data:
            continue
        hint = hints.get(f.name, Any)
        choices = f.metadata.get("choices") if f.metadata else None
        if choices is not None:
            hint = typing.Literal[tuple(choices)]
        try:
            kwargs[f.name] = _check(data[f.name], hint, f"{section}.{f.name}", file)
        except _Mismatch as m:
            raise _mismatch_error(m, file) from None
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(_prefix(file, str(e))) from None
    except ValueError as e:  # a __post_init__ range check that raises plain ValueError
        raise ConfigError(_prefix(file, str(e))) from e


def load_section(cls: type[T], name: str, path: str | Path = DEFAULT_PARAMS) -> T:
    """Load section ``name`` of the params file at ``path`` into dataclass ``cls``."""
    params = load_params(path)
    if name not in params:
        raise ConfigError(f"{path}: missing section '{name}'")
    return from_dict(cls, params[name], f"{path}:{name}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config dataclass (for artifact headers and logs)."""
    return dataclasses.asdict(cfg)


# ------------------------------------------------------------------------------------------ range checks


def _bounds_text(ge: float | None, gt: float | None, le: float | None, lt: float | None) -> str:
    low = f"[{ge}" if ge is not None else (f"({gt}" if gt is not None else None)
    high = f"{le}]" if le is not None else (f"{lt})" if lt is not None else None)
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f">= {ge}" if ge is not None else f"> {gt}"
    if high:
        return f"<= {le}" if le is not None else f"< {lt}"
    return ""


def check_range(section: str, cfg: Any, *names: str, ge: float | None = None, gt: float | None = None,
                le: float | None = None, lt: float | None = None, multiple_of: int | None = None) -> None:
    """For a dataclass ``__post_init__``: every field ``names`` of ``cfg`` must lie in the given bounds
    (and be a multiple of ``multiple_of``); else a :class:`ConfigError` ``section.name = value: must be ...``.
    Values of a wrong type are left to :func:`from_dict`'s type check (reported there, not here)."""
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        ok = ((ge is None or v >= ge) and (gt is None or v > gt) and (le is None or v <= le)
              and (lt is None or v < lt) and (multiple_of is None or v % multiple_of == 0))
        if not ok:
            bounds = _bounds_text(ge, gt, le, lt)
            need = " and ".join(x for x in (bounds, f"a multiple of {multiple_of}" if multiple_of else "") if x)
            raise ConfigError(f"{section}.{name} = {_show(v)}: must be {need}")


def check_choice(section: str, cfg: Any, name: str, choices: typing.Iterable[Any]) -> None:
    """For a dataclass ``__post_init__``: field ``name`` of ``cfg`` must be one of ``choices``."""
    choices = tuple(choices)
    v = getattr(cfg, name)
    if v not in choices:
        raise ConfigError(f"{section}.{name} = {_show(v)}: must be one of {', '.join(_show(c) for c in choices)}")
