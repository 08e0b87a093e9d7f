"""Pure logic of the pack's four utility nodes (no ComfyUI here: ``comfy_nodes/nodes.py`` wraps it).

- :func:`random_seed_batch`: ``count`` seeds from a base seed (SplitMix64, so the same base seed
  always gives the same list, on every machine).
- :func:`load_prompt_list`: a strict JSON array of non-empty strings from a file inside one folder
  (ComfyUI's input folder); errors never quote the file's content.
- :func:`clocked_sweep`: one sweep value per clock entry, the values held over equal contiguous
  segments of the clock (the last segment takes the remainder).
- :func:`combinations`: up to four value lists expanded so that, read position by position, the
  outputs enumerate their Cartesian product.

Every bad input raises :class:`UtilityInputError` naming the input and the fix.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

from flux2ttr.config import Flux2TTRError

MASK64 = (1 << 64) - 1
# SplitMix64 constants (Steele, Lea, Flood 2014): the golden-ratio increment and the two mix multipliers.
_SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
_SPLITMIX_M1 = 0xBF58476D1CE4E5B9
_SPLITMIX_M2 = 0x94D049BB133111EB

MAX_SEED_COUNT = 4096     # a batch larger than this is almost surely a typo
MAX_COMBINATIONS = 65536  # Cartesian products beyond this would stall a ComfyUI queue
SEED_MAX = MASK64         # ComfyUI seeds are unsigned 64-bit


class UtilityInputError(ValueError, Flux2TTRError):
    """Bad input to a utility node; the message names the input and the fix."""


def splitmix64(state: int) -> tuple[int, int]:
    """One SplitMix64 step: ``(next_state, output)``, both unsigned 64-bit integers."""
    state = (state + _SPLITMIX_GAMMA) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * _SPLITMIX_M1) & MASK64
    z = ((z ^ (z >> 27)) * _SPLITMIX_M2) & MASK64
    return state, z ^ (z >> 31)


def random_seed_batch(base_seed: int, count: int) -> list[int]:
    """``count`` distinct seeds in ``[0, 2**64)`` from ``base_seed``: the first ``count`` SplitMix64
    outputs of state ``base_seed`` (distinct because the mix is a bijection of distinct states)."""
    if isinstance(base_seed, bool) or not isinstance(base_seed, int) or not 0 <= base_seed <= SEED_MAX:
        raise UtilityInputError(f"RandomSeedBatch: base_seed must be an integer in [0, 2**64), got {base_seed!r}")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_SEED_COUNT:
        raise UtilityInputError(f"RandomSeedBatch: count must be an integer in [1, {MAX_SEED_COUNT}], got {count!r}")
    seeds, state = [], base_seed
    for _ in range(count):
        state, out = splitmix64(state)
        seeds.append(out)
    return seeds


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def load_prompt_list(path: str | Path, base_dir: str | Path) -> list[str]:
    """Read a JSON file holding exactly an array of non-empty strings, from inside ``base_dir`` only
    (ComfyUI's input folder in the node).

    ``path`` is relative to ``base_dir``, or absolute inside it; after resolving ``..`` and symlinks it
    must still lie inside ``base_dir``, else it is refused before anything is read (so the node cannot
    read, or probe for, other files of the machine). Error messages name the path, the item index and its
    type, never the file's content."""
    raw = str(path).strip()
    if not raw:
        raise UtilityInputError("LoadPromptListFromJSON: json_path is empty; give the path of a .json file "
                                "in ComfyUI's input folder holding an array of prompt strings")
    try:
        base = Path(base_dir).resolve()
        given = Path(raw)
        p = (given if given.is_absolute() else base / given).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte, ...
        raise UtilityInputError(f"LoadPromptListFromJSON: json_path {raw!r} cannot be resolved; give a file "
                                f"in ComfyUI's input folder ({base_dir})") from None
    if not _inside(p, base):
        raise UtilityInputError(f"LoadPromptListFromJSON: json_path {raw!r} lies outside ComfyUI's input folder; "
                                f"put the file in {base} and give its path relative to that folder")
    shown = p.relative_to(base).as_posix() or "."
    if not p.is_file():
        raise UtilityInputError(f"LoadPromptListFromJSON: {shown} not found in ComfyUI's input folder ({base})")
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise UtilityInputError(f"LoadPromptListFromJSON: {shown} cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UtilityInputError(f"LoadPromptListFromJSON: {shown} is not UTF-8 text (bad byte at offset {e.start}); "
                                "save it as UTF-8 JSON") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # e.msg is the parser's description ("Expecting value"), never the text itself
        raise UtilityInputError(f"LoadPromptListFromJSON: {shown} is not valid JSON ({e.msg} at line {e.lineno}, "
                                f"column {e.colno})") from None
    if not isinstance(data, list):
        raise UtilityInputError(f"LoadPromptListFromJSON: {shown} must hold a JSON array of strings, "
                                f"found {_json_kind(data)}")
    if not data:
        raise UtilityInputError(f"LoadPromptListFromJSON: {shown} holds an empty array; add at least one prompt")
    for i, item in enumerate(data):
        if not isinstance(item, str):
            raise UtilityInputError(f"LoadPromptListFromJSON: {shown} item {i} is {_json_kind(item)}; every item "
                                    "must be a string")
        if not item.strip():
            raise UtilityInputError(f"LoadPromptListFromJSON: {shown} item {i} is an empty string")
    return list(data)


def _json_kind(value: object) -> str:
    """The JSON type of a parsed value, with its article ("an object", "a number", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return "a string" if isinstance(value, str) else f"a {type(value).__name__}"


_SPLIT = re.compile(r"[,\s]+")


def parse_float_list(text: str | Sequence[float], name: str) -> list[float]:
    """Parse a JSON array of numbers or comma/space-separated numbers (a list passes through);
    ``''`` gives ``[]``. Non-finite or non-numeric entries are errors naming ``name``."""
    if isinstance(text, (list, tuple)):
        items: list = list(text)
    else:
        s = str(text).strip()
        if not s:
            return []
        if s.startswith("["):
            try:
                items = json.loads(s)
            except json.JSONDecodeError as e:
                raise UtilityInputError(f"{name}: not a valid JSON array ({e}): {s!r}") from e
            if not isinstance(items, list):
                raise UtilityInputError(f"{name}: expected a JSON array of numbers, got {s!r}")
        else:
            items = [t for t in _SPLIT.split(s) if t]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, bool):
            raise UtilityInputError(f"{name}: item {i} is a boolean ({item!r}); expected a number")
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise UtilityInputError(f"{name}: item {i} ({item!r}) is not a number; write numbers separated by "
                                    "commas or spaces, or a JSON array") from None
        if not math.isfinite(value):
            raise UtilityInputError(f"{name}: item {i} ({item!r}) is not finite")
        out.append(value)
    return out


def parse_clock(text: str | Sequence[float]) -> list[float]:
    """A clock list; a single integer string ``"N"`` (N >= 1) means ``[1, 2, ..., N]``."""
    if isinstance(text, str) and re.fullmatch(r"\s*\d+\s*", text):
        n = int(text)
        if n < 1:
            raise UtilityInputError(f"ClockedSweepValues: clock {text!r} must be at least 1")
        return [float(i) for i in range(1, n + 1)]
    return parse_float_list(text, "ClockedSweepValues: clock")


def clocked_sweep(clock: str | Sequence[float], values: str | Sequence[float]) -> list[float]:
    """One value per clock entry: ``values`` held over equal contiguous segments of the clock.

    With ``L`` clock entries and ``m`` values each segment is ``L // m`` entries long and the last one
    takes the remainder (clock 100, values ``[1, 2, 3]`` -> 33 x 1, 33 x 2, 34 x 3). An empty clock
    means ``L = m`` (each value once). The clock's own numbers only set its length.
    """
    vals = parse_float_list(values, "ClockedSweepValues: values")
    if not vals:
        raise UtilityInputError("ClockedSweepValues: values is empty; give at least one value to sweep")
    clk = parse_clock(clock)
    length = len(clk) if clk else len(vals)
    if length < len(vals):
        raise UtilityInputError(f"ClockedSweepValues: the clock has {length} entries, fewer than the "
                                f"{len(vals)} values; lengthen the clock or drop values")
    seg = length // len(vals)
    return [vals[min(i // seg, len(vals) - 1)] for i in range(length)]


def combinations(*lists: str | Sequence[float]) -> list[list[float]]:
    """Expand up to four value lists over their Cartesian product.

    Returns one list per input, all of length ``prod(len)`` over the non-empty inputs, in
    ``itertools.product`` order (the first list varies slowest): position ``i`` of the outputs is
    combination ``i``. An empty input takes no part and its output is ``[]``.
    """
    if len(lists) > 4:
        raise UtilityInputError(f"Combinations: at most four lists, got {len(lists)}")
    names = "ABCD"
    parsed = [parse_float_list(x, f"Combinations: list {names[i]}") for i, x in enumerate(lists)]
    used = [i for i, p in enumerate(parsed) if p]
    if not used:
        raise UtilityInputError("Combinations: all lists are empty; give at least list A")
    total = math.prod(len(parsed[i]) for i in used)
    if total > MAX_COMBINATIONS:
        raise UtilityInputError(f"Combinations: {total} combinations exceed {MAX_COMBINATIONS}; shorten the lists")
    outs: list[list[float]] = [[] for _ in parsed]
    for combo in itertools.product(*(parsed[i] for i in used)):
        for i, value in zip(used, combo):
            outs[i].append(value)
    return outs
