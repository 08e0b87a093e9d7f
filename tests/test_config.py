"""Config loading: strict sections, nested dataclasses, clear errors naming the file."""

from dataclasses import dataclass, field

import pytest

from flux2ttr.config import ConfigError, from_dict, load_params, load_section


@dataclass
class Inner:
    a: int = 1
    b: tuple[int, ...] = (1, 2)


@dataclass
class Outer:
    x: float = 0.5
    inner: Inner = field(default_factory=Inner)


def test_from_dict_nested_and_tuples():
    cfg = from_dict(Outer, {"x": 2.0, "inner": {"a": 3, "b": [4, 5, 6]}})
    assert cfg.x == 2.0 and cfg.inner.a == 3 and cfg.inner.b == (4, 5, 6)
    assert from_dict(Outer, None) == Outer()


def test_unknown_key_names_section_and_key(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("sec:\n  x: 1.0\n  typo: 3\n")
    with pytest.raises(ConfigError, match=r"params.yaml:sec.*typo"):
        load_section(Outer, "sec", p)


def test_missing_file_and_section(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    p = tmp_path / "params.yaml"
    p.write_text("other: {}\n")
    with pytest.raises(ConfigError, match="missing section 'sec'"):
        load_section(Outer, "sec", p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(p)


def test_repo_params_sections_all_load():
    """Every section of the shipped params.yaml builds its dataclass (no typos, no stale keys)."""
    from pathlib import Path

    from flux2ttr.sections import SECTIONS, section_class

    params_path = Path(__file__).resolve().parents[1] / "params.yaml"
    params = load_params(params_path)
    assert set(SECTIONS) == set(params), "params.yaml sections and their owners differ"
    for name in SECTIONS:
        load_section(section_class(name), name, params_path)

def test_yaml_is_imported_only_to_read_a_params_file():
    """The ComfyUI runtime imports flux2ttr.config (artifact headers) but must not need pyyaml."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import flux2ttr.config as c\n"
            "assert 'yaml' not in sys.modules, 'flux2ttr.config imported yaml at module level'\n"
            "sys.modules['yaml'] = None  # as if pyyaml were not installed\n"
            "try:\n"
            "    c.load_params('params.yaml')\n"
            "except ModuleNotFoundError as e:\n"
            "    print(e.name, '|', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("yaml | ") and 'pip install "flux2ttr[pipeline]"' in out, out
