"""Prompt lists: ``data/prompts/*.json`` files holding a JSON array of non-empty strings."""

from __future__ import annotations

import json
from pathlib import Path

from flux2ttr.config import Flux2TTRError


class PromptFileError(ValueError, Flux2TTRError):
    """A prompt file is missing or is not a JSON array of non-empty strings (message names file and entry)."""


def load_prompts(path: str | Path) -> list[str]:
    """Read a prompt file: a JSON array of non-empty strings, returned in file order.

    Anything else is a :class:`PromptFileError` naming the file, and for a bad entry its index.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: prompt file not found; create it as a JSON array of strings")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not UTF-8 text ({e}); save it as UTF-8 JSON") from e
    except json.JSONDecodeError as e:
        raise PromptFileError(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}); "
            'expected a JSON array of strings like ["a cat", "a dog"]'
        ) from e
    if not isinstance(data, list):
        raise PromptFileError(
            f"{path}: top level is a JSON {type(data).__name__ if not isinstance(data, dict) else 'object'}, "
            'expected a JSON array of strings like ["a cat", "a dog"]'
        )
    if not data:
        raise PromptFileError(f"{path}: the prompt array is empty; add at least one prompt")
    for i, entry in enumerate(data):
        if not isinstance(entry, str):
            raise PromptFileError(
                f"{path}: entry {i} is {json.dumps(entry)[:60]} (a JSON {_json_type(entry)}), expected a string"
            )
        if not entry.strip():
            raise PromptFileError(f"{path}: entry {i} is an empty string; remove it or write a prompt")
    return list(data)


def _json_type(x: object) -> str:
    return {bool: "boolean", int: "number", float: "number", list: "array", dict: "object",
            type(None): "null"}.get(type(x), type(x).__name__)
