"""dvc.yaml cannot drift from the code: each stage lists exactly the library files its stage module
reaches through imports (lazy ones inside functions included), so a change to any of them reruns the
stage and ``dvc repro`` never reports "up to date" over outputs of old code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
_TEMPLATE = re.compile(r"\$\{([\w.]+)\}")


def _resolve(value: str) -> str:
    """DVC's ``${section.key}`` templating from params.yaml."""
    def lookup(m: re.Match) -> str:
        node = PARAMS
        for part in m.group(1).split("."):
            node = node[part]
        return str(node)

    return _TEMPLATE.sub(lookup, value)


def _module_file(name: str) -> Path | None:
    """The source file of dotted module ``name`` inside this repo (package -> its __init__.py)."""
    base = REPO.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(path: Path) -> set[str]:
    """Every module name an import statement in ``path`` may load (``from a import b``: a and a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def reached_files(stage_module: str) -> set[str]:
    """Repo-relative files of ``flux2ttr`` and ``stages`` modules reached from ``stage_module``."""
    seen: set[str] = set()
    todo = [stage_module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        if parts[0] not in ("flux2ttr", "stages"):
            continue
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        for i in range(1, len(parts) + 1):
            f = _module_file(".".join(parts[:i]))
            if f is None:
                continue
            rel = str(f.relative_to(REPO))
            if rel not in seen:
                seen.add(rel)
                todo.extend(_imports(f))
    return seen


STAGES = sorted(DVC["stages"])


def test_every_stage_runs_a_stage_module():
    for name in STAGES:
        assert DVC["stages"][name]["cmd"] == f"python -m stages.{name}", name


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_exactly_what_the_stage_imports(stage):
    deps = {_resolve(d) for d in DVC["stages"][stage]["deps"]}
    code_deps = {d for d in deps if d.startswith(("flux2ttr/", "stages/"))}
    reached = reached_files(f"stages.{stage}")
    missing = sorted(reached - code_deps)
    extra = sorted(code_deps - reached)
    assert not missing, f"dvc.yaml stage {stage!r} runs these files but does not list them in deps: {missing}"
    assert not extra, f"dvc.yaml stage {stage!r} lists files it never imports: {extra}"


def test_the_walker_sees_lazy_imports():
    """The rollout stage loads the teacher inside a function body: the walk must still find it."""
    assert "flux2ttr/teachers/teacher.py" in reached_files("stages.rollout")
    assert "flux2ttr/atomic.py" in reached_files("stages.teacher")


@pytest.mark.parametrize("stage", STAGES)
def test_paths_come_from_params(stage):
    """Outs and data deps that params.yaml names are written as ${...}, so a changed path cannot split."""
    spec = DVC["stages"][stage]
    sections = [s for s in spec.get("params", [])]
    named = {str(v) for s in sections for v in PARAMS[s].values() if isinstance(v, str) and "/" in v}
    entries = list(spec.get("deps", [])) + [o if isinstance(o, str) else next(iter(o)) for o in
                                            spec.get("outs", []) + spec.get("metrics", []) + spec.get("plots", [])]
    literal = sorted(e for e in entries if "${" not in e and e in named)
    assert not literal, f"stage {stage!r}: write these params.yaml paths as ${{...}}: {literal}"


def test_cli_commands_are_the_dvc_stage_names():
    """One spelling everywhere: `flux2ttr <stage>` and `dvc repro <stage>` take the same names."""
    from flux2ttr import cli

    assert sorted(cli.STAGES) == STAGES
    assert all(cli.STAGES[name] == name for name in STAGES)
