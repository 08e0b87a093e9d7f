"""``benchmarks/bench_pipeline_gpu.py`` end to end on the CPU (its smoke run): a tiny-shaped random FLUX.2
written as a single file and run by the real ComfyUI as the ``comfyui`` teacher through every stage, each a
child process, capturing one of the model's two heads per tuple (``capture.tuple_heads``); the report has
every stage and store figures that follow from the shapes."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import bench_pipeline_gpu as bench
from flux2ttr.students.artifacts import load_students
from helpers.comfy import comfyui_path

PROMPTS, STEPS, SIZE = 2, 2, 128
TOKENS = 512 + (SIZE // 16) ** 2   # text + image tokens of one tuple


@pytest.mark.slow
@pytest.mark.comfyui
def test_smoke_run_on_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COMFYUI_PATH", str(comfyui_path()))
    out = tmp_path / "result.json"
    res = bench.main(["--model", "tiny", "--device", "cpu", "--size", str(SIZE), "--prompts", str(PROMPTS),
                      "--steps", str(STEPS), "--distill-steps-per-layer", "3", "--swap-layers", "2",
                      "--rollout-prompts", "2", "--controller-iterations", "1", "--tuple-heads", "1",
                      "--work", str(tmp_path / "work"),
                      "--json", str(out)])
    captured = capsys.readouterr()
    text = captured.out
    assert json.loads(out.read_text())["stages"] == res["stages"]
    ran = [s["stage"] for s in res["stages"]]
    assert ran == ["write_model", *bench.STAGES]
    assert all(s["rc"] == 0 and s["wall_s"] > 0 and s["peak_rss_gib"] > 0.1 for s in res["stages"])
    # each stage's figures are printed (and saved in --json) when it ends, so a run cut short keeps them
    lines = captured.err.splitlines()
    for prefix in ("[plain] sampling", "[capture] sampling", "[read_floor] floor"):
        assert sum(line.startswith(prefix) for line in lines) == 1, prefix
    assert f"[distill] {res['distill_tuples_per_s']:.2f} tuples/s trained" in lines
    for stage in ran:  # one row per stage in the markdown table
        assert sum(line.startswith(f"| {stage} |") for line in text.splitlines()) == 1, stage
    work = tmp_path / "work"
    for f in ("artifacts/flux2_ttr.safetensors", "artifacts/flux2_ttr_controller.safetensors", "metrics/eval.json"):
        assert (work / f).is_file(), f

    shape = bench.bench_e2e_gpu.SHAPES["tiny"]
    store = res["store"]
    # every single block captured; the budget keeps every offered tuple: prompts x steps per layer
    assert store["tuples_per_layer"] == {f"single_blocks.{i}": PROMPTS * STEPS for i in range(shape.single)}
    assert shape.heads == 2 and store["heads_per_tuple"] == [1] and store["tuple_heads"] == 1
    # fp16 k, v [1, TOKENS, 128] and q_sub, teacher_sub [1, 64, 128]; q_idx int32 [64], 9 float64 scalars, heads
    # int32 [1]
    want = bench.tuple_formula(1, TOKENS, 64, 128, 2, subset=True)
    assert want == 1 * 128 * 2 * (2 * TOKENS + 2 * 64) + 4 * 64 + 72 + 4 == 328_012
    assert {g["bytes_per_tuple"] for g in store["groups"]} == {want}
    assert {g["tokens"] for g in store["groups"]} == {TOKENS}
    # capture's reservoir counted the same bytes
    assert res["capture"]["kept_mib"] * 2**20 == pytest.approx(want * store["tuples"])
    assert res["capture_over_plain"] > 0 and res["plain_seconds_sampling"] > 0
    assert res["read_floor"]["raw_read_tuples_per_s"] > 0 and res["read_floor"]["loader_tuples_per_s"] > 0
    assert res["distill_tuples_per_s"] > 0
    art = load_students(work / "artifacts" / "flux2_ttr.safetensors")  # the teacher's heads, from 1-head tuples
    assert art.header["num_heads"] == 2 and set(art.layers) == set(store["tuples_per_layer"])
    # the store went to disk once, through a temporary store: the peak growth covers at least the final store
    assert res["capture_disk_peak_bytes"] >= store["disk_bytes"] > 0
    assert {b["budget"].split(" ")[0] for b in res["budgets"]} == {"capture", "distill", "peak"}
    assert os.environ["COMFYUI_PATH"] == str(comfyui_path())
