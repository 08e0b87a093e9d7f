"""The README's layout table names every library module and subpackage that exists, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _layout_rows() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    table = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        m = re.match(r"^\| `([^`]+)` \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_layout_table_matches_the_tree():
    rows = _layout_rows()
    packages = sorted(f"flux2ttr/{p.name}/" for p in (REPO / "flux2ttr").iterdir()
                      if p.is_dir() and (p / "__init__.py").is_file())
    for pkg in packages:
        assert pkg in rows, f"README layout table lacks {pkg}"
        modules = sorted(m.name for m in (REPO / pkg).glob("*.py") if m.name != "__init__.py")
        named = set(re.findall(r"`([\w]+\.py)`", rows[pkg]))
        assert named == set(modules), f"README row {pkg}: names {sorted(named)}, the tree has {modules}"
    top = {m.name for m in (REPO / "flux2ttr").glob("*.py") if m.name != "__init__.py"}
    assert set(re.findall(r"`([\w]+\.py)`", rows["flux2ttr/*.py"])) == top
    for path in rows:
        if "*" not in path:
            assert (REPO / path).exists(), f"README layout names {path}, which does not exist"
