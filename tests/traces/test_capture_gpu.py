"""Capture with the teacher on CUDA (``pytest -m gpu``): with a budget of 2.5 tuples, the planned cut builds
only the 2 tuples it keeps (the refused ones never leave the GPU), the kept tuples are the CPU capture's (same
prompt, step, layer, seed and query positions) with the same tensors to fp32 rounding, and every stored tuple is
the softmax attention of its stored q_sub, k, v (fp64 reference). Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from traces.test_capture import PROMPTS, N, count_builds, fp64_attention, sampler_cfg

from flux2ttr.traces.capture import CaptureConfig, capture
from flux2ttr.traces.store import SCALAR_FIELDS, TraceStore

pytestmark = pytest.mark.gpu

FIELDS = ("q_sub", "k", "v", "teacher_sub")


def _store_tuples(path) -> dict[tuple, dict[str, torch.Tensor]]:
    store = TraceStore.open(path)
    out = {}
    for layer in store.layers:
        for n, count in store.groups(layer):
            batch = store.read(layer, n, list(range(count)))
            for i in range(count):
                key = (layer, int(batch["prompt"][i]), int(batch["step"][i]), int(batch["seed"][i]))
                out[key] = {f: batch[f][i].float() for f in (*FIELDS, "q_idx")}
    return out


def test_cuda_capture_keeps_the_cpu_captures_tuples_and_builds_only_those(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from flux2ttr.teachers.teacher import TeacherConfig, load_tiny_teacher, write_tiny_teacher

    built = count_builds(monkeypatch)
    heads, d = 2, 128
    per_tuple = 2 * heads * N * d * 4 + 2 * heads * 8 * d * 4 + 8 * 4 + 8 * len(SCALAR_FIELDS)
    stores, stats, builds = {}, {}, {}
    for device in ("cpu", "cuda"):
        tcfg = TeacherConfig(kind="tiny", num_single=2, out_dir=str(tmp_path / f"tiny_{device}"), device=device)
        write_tiny_teacher(tcfg)  # the same seeded weights; the folder's identity names the device
        teacher = load_tiny_teacher(tcfg)
        assert teacher.num_heads == heads and teacher.head_dim == d
        cfg = CaptureConfig(store=str(tmp_path / f"{device}.zarr"), queries=8, storage_dtype="float32",
                            budget_mib=2.5 * per_tuple / 2**20, batch_size=3, rollouts=2)
        built["n"] = 0
        stats[device] = capture(teacher, PROMPTS, cfg, sampler_cfg(steps=2), progress=False)
        builds[device] = built["n"]
        stores[device] = _store_tuples(tmp_path / f"{device}.zarr")
    assert stats["cuda"]["offered"] == stats["cpu"]["offered"] == 2 * 3 * 2 * 2
    assert stats["cuda"]["kept"] == stats["cpu"]["kept"] == 2 == builds["cuda"] == builds["cpu"]
    assert sorted(stores["cuda"]) == sorted(stores["cpu"])
    for key, got in stores["cuda"].items():
        ref = stores["cpu"][key]
        assert torch.equal(got["q_idx"], ref["q_idx"]), key
        for f in FIELDS:
            scale = ref[f].abs().max()
            assert (got[f] - ref[f]).abs().max() <= 1e-3 * scale, (key, f)
        exact = fp64_attention(got["q_sub"], got["k"], got["v"])
        assert np.abs(got["teacher_sub"].numpy() - exact).max() <= 1e-5 * np.abs(exact).max(), key
