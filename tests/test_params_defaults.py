"""Every config dataclass default equals the shipped params.yaml, so code run without the params file
(tests, notebooks, the ComfyUI node) behaves as the pipeline does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from flux2ttr.sections import SECTIONS, section_class

PARAMS = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())


def _plain(x):
    return [_plain(v) for v in x] if isinstance(x, (list, tuple)) else x


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def test_sections_cover_params_yaml():
    assert set(SECTIONS) == set(PARAMS)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_defaults_equal_params_yaml(section):
    cls = section_class(section)
    values = PARAMS[section]
    wrong = {}
    for f in dataclasses.fields(cls):
        default = _default(f)
        if default is dataclasses.MISSING:
            continue  # no default in code: params.yaml alone decides
        if f.name not in values:
            wrong[f.name] = (default, "<missing from params.yaml>")
        elif _plain(default) != _plain(values[f.name]):
            wrong[f.name] = (default, values[f.name])
    assert not wrong, f"{cls.__name__} defaults (code, params.yaml) differ: {wrong}"
