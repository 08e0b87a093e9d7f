"""The window student's fused kernels (flux2ttr.students.window_fast / window_kernels): dispatch rules,
block geometry and weight caching on CPU, and the kernels' numerics under Triton's CPU interpreter
(``TRITON_INTERPRET=1``, in a child process: tests/students/window_kernels_interp.py) against an fp64
evaluation of the formula written here, with the exact sets built from their definition.

The interpreter's bf16 ``tl.dot`` is wrong in Triton 3.8, so the interpreter numerics use fp16 inputs;
bf16 runs on the GPU (tests/students/test_window_gpu.py, benchmarks/bench_gpu_window.py).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flux2ttr.students import window_fast
from flux2ttr.students.hkr import HKRConfig
from flux2ttr.students.window import WindowLayer, window_tile_ranges

# ------------------------------------------------------------------ the formula, from the definition


def floor_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


def exact_mask(n_cond: int, height: int, width: int, tile: tuple[int, int], radius: int, text_query_keys: str,
               landmarks: torch.Tensor, rows: torch.Tensor | None = None,
               key_tile: tuple[int, int] | None = None) -> torch.Tensor:
    """``[Nq, N]`` bool: key ``j`` in the exact set ``S_i`` of query ``i`` (``rows [Nq]``, default all tokens),
    straight from the definition: every conditioning key; for an image query at ``(r, c)`` in tile
    ``(tr, tc)``, the image keys whose key-tile row (key tiles ``kh x kw``, default the query tile) lies in
    ``[floor((tr*th - R)/kh), floor(((tr+1)*th - 1 + R)/kh)]`` and key-tile column likewise; the landmarks;
    a text query: every key (``all``) or conditioning + landmarks."""
    th, tw = tile
    kh, kw = tile if key_tile is None else key_tile
    n = n_cond + height * width
    dev = landmarks.device
    keys = torch.arange(n, device=dev)
    rows = keys if rows is None else rows.to(dev)
    ki = (keys - n_cond).clamp(min=0)
    k_tr, k_tc = floor_div(floor_div(ki, width), kh), floor_div(ki % width, kw)
    qi = (rows - n_cond).clamp(min=0)
    q_tr, q_tc = floor_div(floor_div(qi, width), th), floor_div(qi % width, tw)
    r_lo, r_hi = floor_div(q_tr * th - radius, kh), floor_div((q_tr + 1) * th - 1 + radius, kh)
    c_lo, c_hi = floor_div(q_tc * tw - radius, kw), floor_div((q_tc + 1) * tw - 1 + radius, kw)
    window = ((k_tr[None] >= r_lo[:, None]) & (k_tr[None] <= r_hi[:, None])
              & (k_tc[None] >= c_lo[:, None]) & (k_tc[None] <= c_hi[:, None]) & (keys >= n_cond)[None])
    is_text = (keys < n_cond)[None]
    is_lm = torch.zeros(n, dtype=torch.bool, device=dev)
    is_lm[landmarks] = True
    image_row = window | is_text | is_lm[None]
    if text_query_keys == "all":
        text_row = torch.ones_like(image_row)
    else:
        text_row = (is_text | is_lm[None]).expand_as(image_row)
    return torch.where((rows < n_cond)[:, None], text_row, image_row)


def formula(layer: WindowLayer, q, k, v, n_cond: int, height: int, width: int, *, landmarks: torch.Tensor,
            rows: torch.Tensor | None = None, explicit: bool = True, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The window student's output at query rows ``rows`` (default all) in ``dtype``:
    ``[sum_S e^{s-m} v + g phi_q^T (KV - KV_S)] / [sum_S e^{s-m} + g phi_q^T (K - K_S) + eps]``.

    ``explicit``: the complement sums as ``KV - KV_S`` per query (``[Nq, F, D]``, small problems);
    otherwise as ``phi_q^T KV - sum_{j in S} (phi_q·phi_k_j) v_j`` (the same sums, memory ``[Nq, N]``).
    The feature MLPs run in fp32 (as the layer computes them), the rest in ``dtype``."""
    c = layer.config
    mask = exact_mask(n_cond, height, width, tuple(c.window_tile), int(c.window_radius), c.text_query_keys,
                      landmarks.to(q.device), rows, tuple(c.window_key_tile))
    rows = torch.arange(q.shape[2], device=q.device) if rows is None else rows.to(q.device)
    phi_k = layer.phi_q if layer.phi_k is None else layer.phi_k
    with torch.no_grad():
        pq = layer.phi_q(q[:, :, rows].float()).to(dtype)
        pk = phi_k(k.float()).to(dtype)
    qd, kd, vd = q[:, :, rows].to(dtype), k.to(dtype), v.to(dtype)
    g = layer.log_gamma.detach().to(dtype).exp().reshape(-1)
    g = g.expand(q.shape[1]).view(1, -1, 1, 1)
    s = (qd @ kd.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    e = torch.exp(s - s.amax(-1, keepdim=True))
    k_all = pk.sum(2)  # [B, H, F]
    kv_all = pk.transpose(-1, -2) @ vd  # [B, H, F, D]
    md = mask.to(dtype)
    if explicit:
        k_s = torch.einsum("ij,bhjf->bhif", md, pk)
        kv_s = torch.einsum("ij,bhjf,bhjd->bhifd", md, pk, vd)
        lin_num = torch.einsum("bhif,bhifd->bhid", pq, kv_all[:, :, None] - kv_s)
        lin_den = (pq * (k_all[:, :, None] - k_s)).sum(-1, keepdim=True)
    else:
        w = (pq @ pk.transpose(-1, -2)) * md
        lin_num = pq @ kv_all - w @ vd
        lin_den = (pq * k_all[:, :, None]).sum(-1, keepdim=True) - w.sum(-1, keepdim=True)
    num = e @ vd + g * lin_num
    den = e.sum(-1, keepdim=True) + g * lin_den + c.denom_eps
    return num / den


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def window_cfg(**kw) -> HKRConfig:
    base = dict(mode="window", head_dim=32, feature_dim=12, window_tile=[2, 3], window_radius=1,
                landmark_fraction=0.1, landmark_min=2, landmark_max=0)
    base.update(kw)
    return HKRConfig(**base)


def make_layer(cfg: HKRConfig, *, heads: int = 2, seed: int = 0, log_gamma=(-3.0, -4.5),
               landmarks: list[int] | None = None) -> WindowLayer:
    """An eval-mode layer with per-head (or shared) gamma set; ``landmarks`` overrides the landmark list."""
    torch.manual_seed(seed)
    layer = WindowLayer(cfg, num_heads=heads).eval()
    with torch.no_grad():
        n = layer.log_gamma.numel()
        layer.log_gamma.copy_(torch.tensor(list(log_gamma) * heads)[:n])
    if landmarks is not None:
        fixed = torch.tensor(landmarks, dtype=torch.long)
        layer.landmarks = lambda n_cond, height, width: fixed
    return layer


# ------------------------------------------------------------------ the reference itself


@pytest.mark.parametrize("kw", [{}, {"text_query_keys": "text_and_landmarks", "window_landmarks": True},
                                {"window_tile": [4, 4], "window_radius": 3, "window_landmarks": True},
                                {"shared_qk": True, "per_head_gamma": False, "window_radius": 0}])
def test_reference_matches_the_eager_layer(kw):
    """The test's formula (both forms) and the lead's eager forward agree (fp32 inputs, CPU)."""
    layer = make_layer(window_cfg(**kw), log_gamma=(0.3, -0.5))
    g = torch.Generator().manual_seed(3)
    n_cond, h, w = 3, 5, 7
    q, k, v = (torch.randn(2, 2, n_cond + h * w, 32, generator=g) for _ in range(3))
    lm = layer.landmarks(n_cond, h, w)
    ref = formula(layer, q, k, v, n_cond, h, w, landmarks=lm)
    cheap = formula(layer, q, k, v, n_cond, h, w, landmarks=lm, explicit=False)
    with torch.no_grad():
        eager = layer(q, k, v, n_cond, 0.5, 3.0, height=h, width=w)
    assert rel(cheap, ref) < 1e-10
    assert rel(eager, ref) < 1e-5


def test_mask_is_the_lead_definition():
    """exact_mask's windows are the tiles window_tile_ranges gives (the lead's helper), clipped."""
    n_cond, h, w, tile, radius = 2, 9, 11, (2, 3), 2
    m = exact_mask(n_cond, h, w, tile, radius, "all", torch.zeros(0, dtype=torch.long))
    img = torch.arange(h * w)
    lo_r, hi_r = window_tile_ranges(img // w, tile[0], radius)
    lo_c, hi_c = window_tile_ranges(img % w, tile[1], radius)
    for i in range(h * w):
        kr, kc = (img // w) // tile[0], (img % w) // tile[1]
        want = (kr >= lo_r[i]) & (kr <= hi_r[i]) & (kc >= lo_c[i]) & (kc <= hi_c[i])
        assert torch.equal(m[n_cond + i, n_cond:], want)


# ------------------------------------------------------------------ block geometry (the kernel's, in Python)


def simulate_blocks(plan: window_fast.BlockPlan, height: int, width: int, bm: int):
    """Yield ``(rows, cols, valid)`` per block slot exactly as ``_block_rows`` computes them."""
    slots = torch.arange(bm)
    for blk in range(plan.n_blocks):
        ub, vb = divmod(blk, plan.n_blk_c)
        gr = ub // plan.cr
        r0 = gr * plan.pr + (ub % plan.cr) * plan.er
        r1 = min(r0 + plan.er, gr * plan.pr + plan.pr, height)
        gc = vb // plan.cc
        c0 = gc * plan.pc + (vb % plan.cc) * plan.ec
        c1 = min(c0 + plan.ec, gc * plan.pc + plan.pc, width)
        qr, qc = r0 + slots // plan.ec, c0 + slots % plan.ec
        ok = (slots < plan.er * plan.ec) & (qr < r1) & (qc < c1)
        yield qr[ok], qc[ok]


def kernel_span(first: int, last: int, radius: int, key: int, size: int) -> tuple[int, int]:
    """The kernel's ``_window_span``, in Python: key-tile-aligned ``[lo, hi)`` covering
    ``[first - radius, last + radius]``, clipped to ``[0, size)``."""
    return (max(first - radius, 0) // key) * key, min(((last + radius) // key + 1) * key, size)


@pytest.mark.parametrize("height, width", [(7, 9), (16, 16), (5, 33), (1, 1)])
@pytest.mark.parametrize("tile, radius", [((2, 3), 1), ((4, 4), 3), ((3, 8), 2), ((2, 20), 0), ((1, 1), 2),
                                          ((8, 16), 8), ((16, 16), 16), ((5, 5), 7), ((8, 16), 4)])
@pytest.mark.parametrize("key_tile", ["query", (1, 1), (2, 3)])
@pytest.mark.parametrize("bm", [16, 128])
def test_blocks_cover_every_image_query_once_in_whole_tiles(height, width, tile, radius, key_tile, bm):
    """Every image query lands in exactly one block slot, and the block's key rectangle as the kernel
    computes it equals the union of its queries' exact windows (from the lead's ``exact_key_mask``)."""
    kt = tile if key_tile == "query" else key_tile
    plan = window_fast.block_plan(height, width, tile[0], tile[1], radius, 8, 3, bm, kt[0], kt[1])
    assert plan.er * plan.ec <= bm
    cfg = HKRConfig(mode="window", window_tile=list(tile), window_radius=radius, window_key_tile=list(kt))
    from flux2ttr.students.window import exact_key_mask
    seen = torch.zeros(height, width, dtype=torch.int32)
    for qr, qc in simulate_blocks(plan, height, width, bm):
        seen[qr, qc] += 1
        if not qr.numel():
            continue
        tiles = set(zip((qr // tile[0]).tolist(), (qc // tile[1]).tolist()))
        assert (len(tiles) > 1) <= plan.multi  # several tiles in one block only when planned
        r0, r1, c0, c1 = int(qr.min()), int(qr.max()) + 1, int(qc.min()), int(qc.max()) + 1
        wr = kernel_span((r0 // tile[0]) * tile[0], ((r1 - 1) // tile[0]) * tile[0] + tile[0] - 1, radius, kt[0], height)
        wc = kernel_span((c0 // tile[1]) * tile[1], ((c1 - 1) // tile[1]) * tile[1] + tile[1] - 1, radius, kt[1], width)
        rect = torch.zeros(height, width, dtype=torch.bool)
        rect[wr[0]:wr[1], wc[0]:wc[1]] = True
        union = exact_key_mask(qr * width + qc, 0, height, width, cfg).any(0).view(height, width)
        assert torch.equal(rect, union)


@pytest.mark.parametrize("key_tile", ["query", 1, 3])
def test_window_extent_is_the_lead_window_ranges(key_tile):
    for tile in (1, 2, 3, 4, 8, 16):
        kt = tile if key_tile == "query" else key_tile
        for radius in range(0, 20):
            for n in (1, 2, 3):
                lo, _ = window_tile_ranges(torch.tensor(0), tile, radius, kt)
                _, hi = window_tile_ranges(torch.tensor(n * tile - 1), tile, radius, kt)
                assert window_fast.window_extent(n, tile, radius, kt) == (int(hi) - int(lo) + 1) * kt


def test_plan_prefers_wide_tile_groups_and_splits_large_tiles():
    p = window_fast.block_plan(64, 64, 4, 4, 4, 512, 0, 128)  # small tiles: grouped
    assert p.gr * p.gc == 8 and p.multi and p.ec >= p.er
    p = window_fast.block_plan(64, 64, 8, 16, 8, 512, 0, 128)  # one tile per block
    assert (p.gr, p.gc, p.er, p.ec, p.multi) == (1, 1, 8, 16, False)
    p = window_fast.block_plan(64, 64, 16, 16, 16, 512, 0, 128)  # half a tile per block
    assert (p.er, p.ec, p.cr, p.cc, p.multi) == (8, 16, 2, 1, False)


# ------------------------------------------------------------------ dispatch (no Triton needed)


def small_inputs(layer: WindowLayer, n_cond=5, height=7, width=9, dtype=torch.float16, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = n_cond + height * width
    d = layer.config.head_dim
    return [torch.randn(b, layer.num_heads, n, d, generator=g).to(dtype) for _ in range(3)]


def test_reasons_cover_every_rule(monkeypatch):
    layer = make_layer(window_cfg())
    q, k, v = small_inputs(layer)
    reason = window_fast.fast_path_reason
    with torch.no_grad():
        assert reason(layer, q, k, v) == "inputs are not on a CUDA device"
        layer.train()
        assert "training" in reason(layer, q, k, v)
        layer.eval()
        layer.config.fast_path = False
        assert "hkr.fast_path" in reason(layer, q, k, v)
        layer.config.fast_path = True
        monkeypatch.setenv(window_fast.ENV_SWITCH, "0")
        assert window_fast.ENV_SWITCH in reason(layer, q, k, v)
        monkeypatch.delenv(window_fast.ENV_SWITCH)
    assert "autograd" in reason(layer, q, k, v)  # parameters require grad and grad mode is on

    monkeypatch.setattr(window_fast, "ALLOW_CPU_INTERPRETER", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with torch.no_grad():
        assert reason(layer, q, k, v) is None
        assert "bf16/fp16" in reason(layer, q.float(), k.float(), v.float())
        assert "bf16/fp16" in reason(layer, q, k.bfloat16(), v)
        assert "q_idx" in reason(layer, q[:, :, :10], k, v)
        qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert "contiguous" in reason(layer, qt, k, v)
        odd = make_layer(window_cfg(head_dim=24))
        assert "power of two" in reason(odd, *[t[..., :24] for t in (q, k, v)])
        wide = make_layer(window_cfg(feature_dim=2 * window_fast.MAX_FEATURES))
        assert "exceed" in reason(wide, q, k, v)
        many = make_layer(window_cfg(), heads=3)
        assert "log_gamma" in reason(many, q, k, v)
    with torch.inference_mode():  # ComfyUI: inference tensors everywhere
        assert reason(layer, q, k, v) is None


def test_cpu_layer_never_dispatches(monkeypatch):
    """On CPU the lead's forward runs the eager path whatever the flag (the kernels are never asked)."""
    called = []
    monkeypatch.setattr(window_fast, "fast_forward", lambda *a, **kw: called.append(1))
    layer = make_layer(window_cfg())
    q, k, v = small_inputs(layer, dtype=torch.float32)
    with torch.no_grad():
        a = layer(q, k, v, 5, 0.5, 3.0, height=7, width=9)
        layer.config.fast_path = False
        b = layer(q, k, v, 5, 0.5, 3.0, height=7, width=9)
    assert torch.equal(a, b) and not called


def test_prepared_weights_follow_updates_without_reading_inference_versions():
    layer = make_layer(window_cfg(feature_dim=12))
    cpu = torch.device("cpu")
    p1 = window_fast.prepared(layer, torch.float16, cpu)
    assert window_fast.prepared(layer, torch.float16, cpu) is p1
    w = layer.phi_q.net[0].weight
    assert torch.equal(p1.phi_q[0][:, : w.shape[0]], w.detach().t().half())
    assert p1.fp == 16 and torch.all(p1.phi_q[4][:, 12:] == 0) and torch.all(p1.phi_q[5][12:] == 0)
    assert torch.allclose(p1.gamma, layer.log_gamma.detach().exp())
    with torch.no_grad():
        w.add_(1.0)  # in place: same storage, new _version
    p2 = window_fast.prepared(layer, torch.float16, cpu)
    assert p2 is not p1 and torch.equal(p2.phi_q[0][:, : w.shape[0]], w.detach().t().half())
    with torch.no_grad():
        layer.log_gamma.fill_(0.7)
    assert torch.allclose(window_fast.prepared(layer, torch.float16, cpu).gamma, torch.tensor(0.7).exp())

    with torch.inference_mode():
        inf = make_layer(window_cfg(feature_dim=12), seed=3)  # inference-tensor parameters
        assert all(p.is_inference() for p in inf.parameters())
        q1 = window_fast.prepared(inf, torch.float16, cpu)  # must not read _version
        assert window_fast.prepared(inf, torch.float16, cpu) is q1
        inf.load_state_dict(make_layer(window_cfg(feature_dim=12), seed=4).state_dict())  # in place, no version
        q2 = window_fast.prepared(inf, torch.float16, cpu)
        assert q2 is not q1
        object.__setattr__(inf, "weights_version", 1)  # an explicit counter bumped by the layer
        assert window_fast.prepared(inf, torch.float16, cpu) is not q2
    assert window_fast.prepared(inf, torch.bfloat16, cpu).phi_q[0].dtype == torch.bfloat16
    window_fast.invalidate(inf)
    assert "_window_fast_cache" not in inf.__dict__


def test_shared_qk_prepares_one_mlp():
    layer = make_layer(window_cfg(shared_qk=True))
    prep = window_fast.prepared(layer, torch.float16, torch.device("cpu"))
    assert prep.phi_k is prep.phi_q


def test_landmarks_cached_and_checked():
    layer = make_layer(window_cfg(), landmarks=[5 + 3, 5 + 40])
    a = window_fast._landmarks(layer, 5, 7, 9, torch.device("cpu"))
    assert a.dtype == torch.int32 and a.tolist() == [8, 45]
    assert window_fast._landmarks(layer, 5, 7, 9, torch.device("cpu")) is a  # unchanged list: same tensor
    bad = make_layer(window_cfg(), landmarks=[2])  # a conditioning token
    with pytest.raises(ValueError, match="image tokens"):
        window_fast._landmarks(bad, 5, 7, 9, torch.device("cpu"))
    unsorted = make_layer(window_cfg(), landmarks=[20, 10])
    with pytest.raises(ValueError, match="sorted"):
        window_fast._landmarks(unsorted, 5, 7, 9, torch.device("cpu"))


def test_out_of_resources_falls_back_to_eager(monkeypatch):
    class OutOfResources(Exception):  # what Triton raises when shared memory or registers run out
        pass

    def no_room(*a, **kw):
        raise OutOfResources("shared memory, Required: 425984, Hardware limit: 232448")

    pytest.importorskip("triton")
    monkeypatch.setattr(window_fast, "_launch", no_room)
    monkeypatch.setattr(window_fast, "UNAVAILABLE", {})
    layer = make_layer(window_cfg())
    q, k, v = small_inputs(layer)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="do not fit"):
        assert window_fast.fast_forward(layer, q, k, v, 5, 0.5, 3.0, height=7, width=9) is None
    monkeypatch.setattr(window_fast, "ALLOW_CPU_INTERPRETER", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with torch.no_grad():
        assert "do not fit" in window_fast.fast_path_reason(layer, q, k, v)  # remembered: no retry per call


# ------------------------------------------------------------------ kernels under the interpreter


@pytest.mark.slow
def test_kernels_under_the_interpreter_in_a_fresh_process():
    """The kernel numerics (tests/students/window_kernels_interp.py) in a child pytest with TRITON_INTERPRET=1
    set from the start (once Triton is imported without it, interpreted kernels do not run)."""
    here = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=--import-mode=importlib",
         str(here / "window_kernels_interp.py")],
        cwd=here.parents[1], env=env, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    m = re.search(r"(\d+) passed", out)
    assert m and int(m.group(1)) >= 12 and "skipped" not in out and "failed" not in out, out
