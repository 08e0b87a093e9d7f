"""The DVC pipeline as a user runs it: `dvc repro capture` in a temporary copy of the repository,
then a second `dvc repro` that does nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # dvc.yaml calls `python`: make it this interpreter (the test venv) whatever PATH says.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("COMET_API_KEY", "")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture()
def repo_copy(tmp_path: Path) -> Path:
    """A fresh git+DVC checkout of the tracked files, with a smaller capture so the test stays fast."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    dst = tmp_path / "repo"
    for rel in files.stdout.splitlines():
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["sampler"]["steps"] = 2
    params["capture"]["budget_mib"] = 8
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prompts = json.loads((dst / "data/prompts/capture.json").read_text())[:2]
    (dst / "data/prompts/capture.json").write_text(json.dumps(prompts))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True)
    return dst


@pytest.mark.slow
def test_dvc_repro_capture_then_noop(repo_copy: Path):
    from flux2ttr.traces.store import TraceStore

    _run([sys.executable, "-m", "dvc", "repro", "capture"], repo_copy)
    store = TraceStore.open(repo_copy / "traces/capture.zarr")
    assert store.layers == ["single_blocks.0", "single_blocks.1", "single_blocks.2", "single_blocks.3"]
    assert store.count() > 0
    assert store.attrs["teacher"]["kind"] == "tiny"
    metrics = json.loads((repo_copy / "metrics/capture.json").read_text())
    assert metrics["kept"] == store.count()
    assert (repo_copy / "dvc.lock").is_file()

    second = _run([sys.executable, "-m", "dvc", "repro", "capture"], repo_copy)
    text = second.stdout + second.stderr
    assert "didn't change" in text and "Running stage" not in text, text
    status = _run([sys.executable, "-m", "dvc", "status", "capture"], repo_copy)
    assert "up to date" in (status.stdout + status.stderr).lower()
