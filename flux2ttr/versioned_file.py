"""One reader and writer for flux2ttr's safetensors files: tensors by name and a JSON header under one
metadata key that carries ``format`` and ``schema`` (no pickle anywhere). The student artifact, the
controller artifact and training checkpoints are each a :class:`VersionedFile` kind; every error names
the file and the fix, in the kind's own error type."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from flux2ttr.atomic import atomic_save_safetensors


@dataclass(frozen=True)
class VersionedFile:
    """A kind of flux2ttr safetensors file and how to read, check and write it."""

    what: str  # what a user calls it: "student artifact", "controller artifact", "checkpoint"
    metadata_key: str  # safetensors metadata key holding the JSON header
    format: str  # header "format"
    schema: int  # newest header "schema" this code reads and the one it writes
    error: type[Exception]  # raised for every problem with such a file
    not_found_fix: str  # what to do when the file is missing
    unreadable_fix: str  # what to do when it is truncated or corrupt
    no_header_hint: str = ""  # what a file without our header most likely is

    def write(self, path: str | Path, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> None:
        """Write ``tensors`` (moved to CPU, contiguous) and ``header`` (``format``/``schema`` set) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        full = {**header, "format": self.format, "schema": self.schema}
        clean = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
        atomic_save_safetensors(path, clean, {self.metadata_key: json.dumps(full, sort_keys=True)})

    def read_raw(self, path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(header, tensors)`` without the format/schema check (for migrations that look first)."""
        path = Path(path)
        if not path.is_file():
            raise self.error(f"{path}: {self.what} not found ({self.not_found_fix})")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise self.error(f"{path}: unreadable {self.what}, not a readable safetensors file (truncated or corrupt?): "
                             f"{e}; "
                             f"{self.unreadable_fix}") from None
        if self.metadata_key not in meta:
            hint = f"; {self.no_header_hint}" if self.no_header_hint else ""
            raise self.error(f"{path}: not a flux2ttr {self.what} (no '{self.metadata_key}' header in its "
                             f"safetensors metadata){hint}")
        try:
            header = json.loads(meta[self.metadata_key])
        except json.JSONDecodeError as e:
            raise self.error(f"{path}: {self.what} header is not valid JSON: {e}; {self.unreadable_fix}") from None
        if not isinstance(header, dict):
            raise self.error(f"{path}: {self.what} header must be a JSON object")
        return header, tensors

    def check(self, path: str | Path, header: dict[str, Any]) -> None:
        """Format and schema of ``header`` (read from ``path``) are ones this code reads."""
        fmt = header.get("format")
        if fmt != self.format:
            raise self.error(f"{path}: wrong format {fmt!r}, expected {self.format!r} (is this a {self.what}?)")
        schema = header.get("schema")
        if not isinstance(schema, int):
            raise self.error(f"{path}: header 'schema' must be an int, got {schema!r}")
        if schema > self.schema:
            raise self.error(f"{path}: {self.what} schema {schema} is newer than this flux2ttr supports "
                             f"({self.schema}); upgrade flux2ttr")

    def read(self, path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(header, tensors)`` of a checked file of this kind."""
        header, tensors = self.read_raw(path)
        self.check(path, header)
        return header, tensors
