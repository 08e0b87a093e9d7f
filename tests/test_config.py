"""Config loading: strict sections, nested dataclasses, type-checked values, duplicate keys, clear
errors naming the file, ``section.key``, the value and what is allowed."""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from flux2ttr.config import ConfigError, check_range, from_dict, load_params, load_section

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


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
    with pytest.raises(ConfigError, match=r"params.yaml: sec: unknown key.*typo"):
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


# ------------------------------------------------------------------------------------------ type checks


def _section_error(tmp_path, section: str, key: str, value) -> str:
    """The ConfigError message of loading ``section`` of the shipped params.yaml with ``key: value``."""
    from flux2ttr.sections import section_class

    params = yaml.safe_load(REPO_PARAMS.read_text())
    params[section][key] = value
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(ConfigError) as e:
        load_section(section_class(section), section, p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: "), msg  # names the file
    assert "\n" not in msg
    return msg[len(f"{p}: "):]


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        # strings where numbers are expected (the resume crash and the late capture crash of the issue)
        ("distill", "steps", "20", "distill.steps = '20' (a string): expected an integer; write 20 without quotes"),
        ("capture", "batch_size", "4", "capture.batch_size = '4' (a string): expected an integer; write 4 without quotes"),
        ("distill", "lr", "2e-3", "distill.lr = '2e-3' (a string): expected a number; YAML reads 2e-3 as a string, "
                                  "write 2.0e-3"),
        # bool where int expected, int where bool expected
        ("capture", "batch_size", True, "capture.batch_size = true: expected an integer"),
        ("distill", "resume", 1, "distill.resume = 1 (an integer): expected true or false"),
        ("sampler", "show_progress", 0, "sampler.show_progress = 0 (an integer): expected true or false"),
        ("distill", "progress", "yes", "distill.progress = 'yes' (a string): expected true or false; write true "
                                       "without quotes"),
        # a float where an int is expected
        ("distill", "steps", 20.5, "distill.steps = 20.5 (a number): expected an integer"),
        ("distill", "steps", 20.0, "distill.steps = 20.0 (a number): expected an integer; write 20"),
        # None where the field is not optional
        ("capture", "queries", None, "capture.queries = null: expected an integer"),
        ("hkr", "mode", None, "hkr.mode = null: expected a string"),
        ("sampler", "mu", "auto", "sampler.mu = 'auto' (a string): expected a number or null"),
        # list element types, lists in unions, tuples
        ("capture", "steps", [0, "1"], "capture.steps[1] = '1' (a string): expected an integer (in capture.steps: "
                                       "a list of integers or a string); write 1 without quotes"),
        ("capture", "layers", ["single_blocks.0", 3], "capture.layers[1] = 3 (an integer): expected a string "
                                                      "(in capture.layers: a list of strings or a string)"),
        ("capture", "layers", 3, "capture.layers = 3 (an integer): expected a list of strings or a string"),
        ("evaluate", "quality_speed", [0.5, "x"], "evaluate.quality_speed[1] = 'x' (a string): expected a number"),
        ("evaluate", "modes", "threshold", "evaluate.modes = 'threshold' (a string): expected a list of strings"),
        ("hkr", "window_tile", [4, True], "hkr.window_tile[1] = true: expected an integer"),
        ("teacher", "rope_bands", [1, "2"], "teacher.rope_bands[1] = '2' (a string): expected an integer; write 2 "
                                            "without quotes"),
        # ranges the dataclasses check (the ZeroDivisionError of the issue)
        ("teacher", "num_heads", 0, "teacher.num_heads = 0: must be >= 1"),
        ("teacher", "pos_fraction", 1.5, "teacher.pos_fraction = 1.5: must be in [0.0, 1.0]"),
        ("rollout", "height", 120, "rollout.height = 120: must be >= 16 and a multiple of 16"),
        ("capture", "seed", -1, "capture.seed = -1: must be >= 0"),
        ("quality", "lpips_net", "resnet", "quality.lpips_net = 'resnet': must be one of 'alex', 'vgg', 'squeeze'"),
        # a plain ValueError of a __post_init__ comes back as a ConfigError naming the file
        ("distill", "steps", 0, "distill.steps must be positive, got 0"),
    ],
)
def test_wrong_values_name_file_key_value_and_what_is_allowed(tmp_path, section, key, value, expected):
    assert _section_error(tmp_path, section, key, value) == expected


def test_numbers_accepted_where_they_fit(tmp_path):
    from flux2ttr.distill.trainer import DistillConfig
    from flux2ttr.teachers.sampler import SamplerConfig

    cfg = from_dict(DistillConfig, {"lr": 1, "steps": 5})  # an int is a float
    assert cfg.lr == 1 and cfg.steps == 5
    assert from_dict(SamplerConfig, {"mu": None}).mu is None and from_dict(SamplerConfig, {"mu": 1}).mu == 1


@dataclass
class Choices:
    kind: Literal["tiny", "diffusers"] = "tiny"
    net: str = field(default="alex", metadata={"choices": ("alex", "vgg")})
    pair: tuple[int, str] = (1, "a")
    table: dict[str, int] = field(default_factory=dict)


def test_literal_and_declared_choices():
    assert from_dict(Choices, {"kind": "diffusers", "net": "vgg"}).kind == "diffusers"
    with pytest.raises(ConfigError, match=r"^p.yaml: sec.kind = 'huge' \(a string\): expected one of 'tiny', 'diffusers'$"):
        from_dict(Choices, {"kind": "huge"}, "p.yaml:sec")
    with pytest.raises(ConfigError, match=r"^p.yaml: sec.net = 'squeeze' \(a string\): expected one of 'alex', 'vgg'$"):
        from_dict(Choices, {"net": "squeeze"}, "p.yaml:sec")
    assert from_dict(Choices, {"pair": [2, "b"]}).pair == (2, "b")
    with pytest.raises(ConfigError, match=r"sec.pair = \[2\] \(a list\): expected a list of 2 values \(an integer, a "
                                          r"string\) \(1 given\)"):
        from_dict(Choices, {"pair": [2]}, "p.yaml:sec")
    with pytest.raises(ConfigError, match=r"sec.table.b = 'x' \(a string\): expected an integer"):
        from_dict(Choices, {"table": {"a": 1, "b": "x"}}, "p.yaml:sec")


def test_nested_dataclass_values_are_checked(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("sec:\n  x: 1\n  inner:\n    a: '3'\n")
    with pytest.raises(ConfigError) as e:
        load_section(Outer, "sec", p)
    assert str(e.value) == f"{p}: sec.inner.a = '3' (a string): expected an integer; write 3 without quotes"
    p.write_text("sec:\n  inner:\n    b: [1, x]\n")
    with pytest.raises(ConfigError, match=re.escape(f"{p}: sec.inner.b[1] = 'x' (a string): expected an integer")):
        load_section(Outer, "sec", p)
    p.write_text("sec:\n  inner: 3\n")
    with pytest.raises(ConfigError, match=re.escape(f"{p}: sec.inner = 3 (an integer): expected a mapping of Inner keys")):
        load_section(Outer, "sec", p)
    p.write_text("sec:\n  inner:\n    typo: 1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{p}: sec.inner: unknown key(s) ['typo']")):
        load_section(Outer, "sec", p)
    p.write_text("sec: [1, 2]\n")
    with pytest.raises(ConfigError, match=re.escape(f"{p}: sec = [1, 2] (a list): expected a mapping of Outer keys")):
        load_section(Outer, "sec", p)


def test_duplicate_yaml_keys_are_refused(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("distill:\n  steps: 300\n  lr: 0.1\n  steps: 20\n")
    with pytest.raises(ConfigError) as e:
        load_params(p)
    assert str(e.value) == (f"{p}: duplicate key 'steps' on line 4 (first on line 2); YAML keeps only one of them, "
                            "remove the other")
    p.write_text("a: {x: 1}\nb: 2\na: {y: 1}\n")  # a whole section twice
    with pytest.raises(ConfigError, match=re.escape(f"{p}: duplicate key 'a' on line 3 (first on line 1)")):
        load_params(p)
    # merge keys are not duplicates: an explicit key overrides the merged one
    p.write_text("base: &b {x: 1, y: 2}\nsec:\n  <<: *b\n  y: 3\n")
    assert load_params(p)["sec"] == {"x": 1, "y": 3}


def test_invalid_yaml_is_one_line_naming_file_and_line(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("sec:\n  x: [1, 2\n  y: 3\n")
    with pytest.raises(ConfigError) as e:
        load_params(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: not valid YAML on line ") and "\n" not in msg, msg


def test_check_range_messages():
    @dataclass
    class C:
        n: int = 0
        f: float = 2.0

    with pytest.raises(ConfigError, match=r"^s.n = 0: must be >= 1$"):
        check_range("s", C(), "n", ge=1)
    with pytest.raises(ConfigError, match=r"^s.f = 2.0: must be in \(0, 1\]$"):
        check_range("s", C(), "f", gt=0, le=1)
    with pytest.raises(ConfigError, match=r"^s.n = 3: must be a multiple of 2$"):
        check_range("s", C(n=3), "n", multiple_of=2)
    check_range("s", C(n="x"), "n", ge=1)  # a wrong type is the type check's job, not a crash here
