"""`flux2ttr inspect`: summary text and JSON values, heatmap PNG and its attention against an fp64
reference, and clear errors for bad stores."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from flux2ttr.cli import main
from flux2ttr.students.hkr import HKRConfig
from flux2ttr.traces.inspect import attention_mass, heatmap_data, query_attention, summarize, tile_mask, window_mask
from flux2ttr.traces.store import TraceStore, TraceTuple, TraceWriter
from helpers.traces import make_store, make_tuple

N_COND, H_GRID, W_GRID = 6, 3, 4
N = N_COND + H_GRID * W_GRID
TEACHER = {"kind": "tiny", "seed": 3, "file": "t.safetensors", "sha256": "abcdef0123456789"}


def _tuple(gen, *, prompt, step, sigma, nq=5, heads=2, d=8):
    q = torch.randn(heads, N, d, generator=gen) * 2
    k = torch.randn(heads, N, d, generator=gen) * 2
    v = torch.randn(heads, N, d, generator=gen)
    q_idx = torch.tensor([2, 7, 10, 15, 17][:nq])  # one text query first, then image queries
    out = torch.softmax(q[:, q_idx] @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
    return TraceTuple(q[:, q_idx], q_idx, k, v, out, sigma=sigma, cfg=3.5, n_cond=N_COND, h=H_GRID, w=W_GRID,
                      prompt=prompt, step=step, seed=11)


@pytest.fixture()
def store_path(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sigmas = [1.0, 0.75, 0.5, 0.25]
    path = tmp_path / "capture.zarr"
    with TraceWriter(path, attrs={"teacher": TEACHER, "capture": {"queries": 5}},
                     budget_bytes=1 << 30, storage_dtype="float32", seed=0) as w:
        for prompt in range(2):
            for step, sigma in enumerate(sigmas):
                w.offer("single_blocks.0", _tuple(gen, prompt=prompt, step=step, sigma=sigma))
                if step % 2 == 0:
                    w.offer("single_blocks.3", _tuple(gen, prompt=prompt, step=step, sigma=sigma))
    return path


def test_summary_values(store_path):
    s = summarize(TraceStore.open(store_path))
    assert s["schema"] == 1 and s["storage_dtype"] == "float32"
    assert s["teacher"] == TEACHER
    assert (s["tuples"], s["offered"], s["kept"]) == (12, 12, 12)
    assert [(lay["layer"], lay["tuples"]) for lay in s["layers"]] == [("single_blocks.0", 8), ("single_blocks.3", 4)]
    g = s["layers"][0]["groups"][0]
    assert (g["n_tokens"], g["count"], g["heads"], g["queries"], g["head_dim"]) == (N, 8, 2, 5, 8)
    assert g["n_cond"] == [N_COND] and g["grid"] == ["3x4"]
    assert (s["sigma"]["min"], s["sigma"]["max"]) == (0.25, 1.0)
    # sigmas: 0.25 x2, 0.5 x4, 0.75 x2, 1.0 x4 (layer 3 only has steps 0 and 2)
    counts = s["sigma"]["histogram"]["counts"]
    assert sum(counts) == 12 and counts[0] == 2 and counts[-1] == 4
    assert s["steps"] == [0, 1, 2, 3] and s["prompts"] == 2
    files = [f for f in store_path.rglob("*") if f.is_file()]
    assert s["bytes_on_disk"] == sum(f.stat().st_size for f in files) and s["files"] == len(files)


def test_cli_text_and_json(store_path):
    runner = CliRunner()
    res = runner.invoke(main, ["inspect", str(store_path)])
    assert res.exit_code == 0, res.output
    assert "flux2ttr.traces schema 1, storage float32" in res.output
    assert "12 kept of 12 offered" in res.output
    assert "teacher      tiny  t.safetensors  sha256 abcdef012345\n" in res.output
    assert "sigma        0.2500 .. 1.0000" in res.output
    lines = res.output.splitlines()
    layer_line = next(line for line in lines if line.startswith("single_blocks.3"))
    assert layer_line.split()[1:3] == ["4", "4"] and f"{N}: 4 (2x5x8" in layer_line
    hist = [line for line in lines if line.startswith("  [")]
    assert len(hist) == 10 and hist[-1].endswith("#" * 40) and hist[0].split()[2] == "2"

    res = runner.invoke(main, ["inspect", str(store_path), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["tuples"] == 12 and data["offered_per_layer"] == {"single_blocks.0": 8, "single_blocks.3": 4}
    assert data["sigma"]["min"] == 0.25


def test_heatmap_png_and_attention_equals_fp64_reference(store_path, tmp_path):
    out = tmp_path / "plots" / "heat.png"
    res = CliRunner().invoke(main, ["inspect", str(store_path), "--heatmap", "single_blocks.0", "--out", str(out),
                                    "--queries", "3", "--json"])
    assert res.exit_code == 0, res.output
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 300
    drawn = json.loads(res.output)["heatmap"]["queries"]
    # image queries spread over the 3x4 grid: (0,1) nearest the centre, then (2,3) farthest from it, then (2,1)
    assert [q["token"] for q in drawn] == [7, 17, 15]
    assert [tuple(q["pos"]) for q in drawn] == [divmod(t - N_COND, W_GRID) for t in (7, 17, 15)]

    store = TraceStore.open(store_path)
    maps = heatmap_data(store, "single_blocks.0", queries=6)
    # the 4 distinct image positions first (spread), then repeats from other tuples; image queries only
    assert [m["token"] for m in maps[:4]] == [7, 17, 15, 10] and all(m["pos"] is not None for m in maps)
    for m in maps:
        t = store.read("single_blocks.0", N, [m["row"]])
        q = t["q_sub"][0].numpy().astype(np.float64)
        k = t["k"][0].numpy().astype(np.float64)
        logits = np.einsum("hqd,hnd->hqn", q, k) / np.sqrt(q.shape[-1])
        ref = np.exp(logits - logits.max(-1, keepdims=True))
        ref = (ref / ref.sum(-1, keepdims=True)).mean(0)  # [Nq, N], heads averaged
        j = t["q_idx"][0].tolist().index(m["token"])
        np.testing.assert_allclose(m["grid"], ref[j, N_COND:].reshape(H_GRID, W_GRID), rtol=1e-12, atol=1e-15)
        assert m["text_mass"] == pytest.approx(ref[j, :N_COND].sum(), rel=1e-12)
        assert m["grid"].sum() + m["text_mass"] == pytest.approx(1.0, abs=1e-12)
    # text queries fill up only when the looked-at tuples have too few image queries
    few = heatmap_data(store, "single_blocks.0", queries=6, max_rows=1)
    assert [m["token"] for m in few] == [7, 17, 15, 10, 2] and few[-1]["pos"] is None
    # a user can pick the prompt, step and query token
    one = store.read("single_blocks.0", N, [3])
    p3, s3 = int(one["prompt"][0]), int(one["step"][0])
    picked = heatmap_data(store, "single_blocks.0", queries=8, prompt=p3, step=s3, token=15)
    assert picked and all((m["prompt"], m["step"], m["token"]) == (p3, s3, 15) for m in picked)
    assert heatmap_data(store, "single_blocks.0", queries=3, prompt=999) == []
    t = store.read("single_blocks.0", N, [0])
    # the stored teacher output agrees with attention recomputed from the stored q_sub, k, v
    p = query_attention(t["q_sub"][0], t["k"][0])
    np.testing.assert_allclose((p @ t["v"][0].double()).numpy(), t["teacher_sub"][0].numpy(), rtol=1e-4, atol=1e-5)


def test_bad_inputs_give_click_errors(store_path, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["inspect", str(tmp_path / "nope.zarr")])
    assert res.exit_code != 0 and "no trace store here" in res.output and "nope.zarr" in res.output
    (tmp_path / "dir").mkdir()
    res = runner.invoke(main, ["inspect", str(tmp_path / "dir")])
    assert res.exit_code != 0 and "not a zarr v3 store" in res.output
    res = runner.invoke(main, ["inspect", str(store_path), "--heatmap", "single_blocks.0"])
    assert res.exit_code != 0 and "--heatmap needs --out" in res.output
    res = runner.invoke(main, ["inspect", str(store_path), "--heatmap", "single_blocks.9", "--out",
                               str(tmp_path / "x.png")])
    assert res.exit_code != 0 and "no layer 'single_blocks.9'" in res.output
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------------------------------
# attention mass: text / window / tile shares and restricted-softmax cosines

def _logit_tuple(logits, v, q_idx, *, n_cond, h, w, prompt=0, step=0):
    """A tuple whose scores ``q.k/sqrt(D)`` are exactly ``logits`` ``[H, Nq, N]``: k is the identity
    (D = N) and q = logits * sqrt(D); ``v`` ``[H, N, Dv]`` is zero-padded to D (cosines do not change). The
    teacher output is the exact fp64 softmax of those logits @ v."""
    heads, _, n = logits.shape
    k = torch.eye(n, dtype=torch.float64).expand(heads, n, n).clone()
    q = logits * math.sqrt(n)
    v_pad = torch.zeros(heads, n, n, dtype=torch.float64)
    v_pad[..., :v.shape[-1]] = v
    out = torch.softmax(logits, -1) @ v_pad
    return TraceTuple(q, torch.as_tensor(q_idx), k, v_pad, out, sigma=1.0, cfg=1.0, n_cond=n_cond, h=h, w=w,
                      prompt=prompt, step=step, seed=0)


def _write(path, layer_tuples, storage_dtype="float32"):
    with TraceWriter(path, attrs={"teacher": TEACHER}, budget_bytes=1 << 30, storage_dtype=storage_dtype, seed=0) as w:
        for layer, tuples in layer_tuples.items():
            for t in tuples:
                w.offer(layer, t)
    return path


def _window_ref(n_cond, h, w, token, radius):
    """Keys (token indices) of the radius window of an image query, by an explicit loop."""
    r, c = divmod(token - n_cond, w)
    return {n_cond + kr * w + kc for kr in range(h) for kc in range(w) if abs(kr - r) <= radius and abs(kc - c) <= radius}


def _tile_ref(n_cond, h, w, token, tile, radius):
    """Keys of the tile variant by an explicit loop: whole key tiles whose row span (and column span) meets the
    query tile's span widened by ``radius`` on both sides."""
    th, tw = tile
    r, c = divmod(token - n_cond, w)
    tr, tc = r // th, c // tw
    row_lo, row_hi = tr * th - radius, (tr + 1) * th - 1 + radius
    col_lo, col_hi = tc * tw - radius, (tc + 1) * tw - 1 + radius
    keys = set()
    for kr in range(h):
        for kc in range(w):
            ktr, ktc = kr // th, kc // tw
            if ktr * th <= row_hi and ktr * th + th - 1 >= row_lo and ktc * tw <= col_hi and ktc * tw + tw - 1 >= col_lo:
                keys.add(n_cond + kr * w + kc)
    return keys


def test_local_attention_gives_full_window_mass_and_cosine_one(tmp_path):
    n_cond, h, w, heads = 4, 6, 7, 2
    n = n_cond + h * w
    gen = torch.Generator().manual_seed(5)
    q_idx = [1, 3, n_cond + 0, n_cond + 2 * w + 3, n_cond + 5 * w + 6, n_cond + 3 * w + 1]
    logits = torch.full((heads, len(q_idx), n), -80.0, dtype=torch.float64)  # e^-80: nothing outside
    for j, tok in enumerate(q_idx):
        keep = sorted(range(n_cond)) if tok < n_cond else sorted(_window_ref(n_cond, h, w, tok, 2))
        logits[:, j, keep] = torch.randn(heads, len(keep), generator=gen, dtype=torch.float64)
    v = torch.randn(heads, n, 5, generator=gen, dtype=torch.float64)
    store = TraceStore.open(_write(tmp_path / "local.zarr", {"single_blocks.0": [
        _logit_tuple(logits, v, q_idx, n_cond=n_cond, h=h, w=w)]}))
    res = attention_mass(store, radii=(0, 1, 2, 3), tile=(2, 3), tile_radius=2)
    lay = res["layers"][0]
    assert (lay["image_queries"], lay["text_queries"], lay["tuples"], lay["heads"]) == (4, 2, 1, 2)
    assert lay["teacher_rel_err"]["max"] < 1e-5  # float32 storage of an exact fp64 teacher
    img, txt = lay["image"], lay["text"]
    assert img["text_mass"] == pytest.approx(0.0, abs=1e-20)
    win = {x["radius"]: x for x in img["windows"]}
    for r in (2, 3):
        assert win[r]["mass"] == pytest.approx(1.0, abs=1e-12) and win[r]["text_window_mass"] == pytest.approx(1.0, abs=1e-12)
        assert win[r]["cos"] == pytest.approx(1.0, abs=1e-6) and win[r]["cos_p10"] == pytest.approx(1.0, abs=1e-6)
    assert win[1]["mass"] < 0.95 and win[0]["mass"] < win[1]["mass"] and win[1]["cos"] < win[2]["cos"]
    # the tile set at radius 2 contains every radius-2 window
    assert img["tile"]["mass"] == pytest.approx(1.0, abs=1e-12) and img["tile"]["cos"] == pytest.approx(1.0, abs=1e-6)
    assert img["tile"]["tile"] == [2, 3] and img["tile"]["radius"] == 2
    assert txt["text_mass"] == pytest.approx(1.0, abs=1e-12) and txt["image_mass"] == pytest.approx(0.0, abs=1e-12)
    assert txt["cos"] == pytest.approx(1.0, abs=1e-6)


def test_restricted_cosine_equals_hand_computed_value(tmp_path):
    # text token 0, image grid 1x3 (tokens 1, 2, 3); D = N = 4, k = identity
    ln = math.log
    logits = torch.tensor([[[0.0, ln(2), 0.0, ln(4)],  # image query at col 0: p = [1, 2, 1, 4] / 8
                            [ln(3), 0.0, 0.0, 0.0]]], dtype=torch.float64)  # text query: p = [3, 1, 1, 1] / 6
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]]], dtype=torch.float64)
    store = TraceStore.open(_write(tmp_path / "hand.zarr", {"single_blocks.0": [
        _logit_tuple(logits, v, [1, 0], n_cond=1, h=1, w=3)]}))
    lay = attention_mass(store, radii=(1, 2), tile=(1, 2), tile_radius=0)["layers"][0]
    img, txt = lay["image"], lay["text"]
    assert img["text_mass"] == pytest.approx(1 / 8) and img["image_mass"] == pytest.approx(7 / 8)
    r1, r2 = img["windows"]
    # R = 1 sees text + cols 0, 1: output ([1,0] + 2 [0,1] + [1,1]) / 4 = [2, 3] / 4; teacher [-2, 11] / 8
    assert r1["mass"] == pytest.approx(3 / 8) and r1["text_window_mass"] == pytest.approx(4 / 8)
    assert r1["cos"] == pytest.approx(29 / math.sqrt(13 * 125), rel=1e-6)
    assert r1["keys"] == 3 and r2["keys"] == 4
    assert r2["mass"] == pytest.approx(7 / 8) and r2["cos"] == pytest.approx(1.0, abs=1e-7)
    # tile (1, 2) radius 0: the query's tile is cols 0..1, the same set as R = 1
    assert img["tile"]["mass"] == pytest.approx(3 / 8) and img["tile"]["cos"] == pytest.approx(r1["cos"], rel=1e-9)
    # text query: text only gives [1, 0]; teacher (3 [1,0] + [0,1] + [1,1] + [-1,2]) / 6 = [3, 4] / 6: cos 3/5
    assert txt["text_mass"] == pytest.approx(0.5) and txt["image_mass"] == pytest.approx(0.5)
    assert txt["cos"] == pytest.approx(0.6, rel=1e-6)


def test_tile_mask_rule():
    # 6x6 grid, 4x4 tiles: query (1, 1) at radius 1 reaches tile rows/cols [floor(-1/4), floor(4/4)] = [-1, 1]
    rows, cols = torch.tensor([1, 0, 5]), torch.tensor([1, 0, 2])
    assert tile_mask(rows, cols, 6, 6, (4, 4), 1)[0].all()
    m = tile_mask(rows, cols, 6, 6, (4, 4), 0).reshape(3, 6, 6)
    assert m[1, :4, :4].all() and m[1].sum() == 16  # its own tile only
    assert m[2, 4:, :4].all() and m[2].sum() == 8  # the partial last tile row (rows 4..5), cols 0..3
    for h, w, tile, radius in ((5, 7, (2, 3), 1), (6, 6, (4, 4), 3), (4, 9, (3, 2), 0)):
        rr, cc = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rr, cc = rr.reshape(-1), cc.reshape(-1)
        got = tile_mask(rr, cc, h, w, tile, radius)
        win = window_mask(rr, cc, h, w, radius)
        for i in range(h * w):
            ref = _tile_ref(0, h, w, i, tile, radius)
            assert set(torch.nonzero(got[i]).reshape(-1).tolist()) == ref
            assert set(torch.nonzero(win[i]).reshape(-1).tolist()) == _window_ref(0, h, w, i, radius)
        assert (got | ~win).all()  # tiles at radius R contain the radius-R window


def test_attention_mass_equals_bruteforce_reference_on_random_store(tmp_path):
    path = make_store(tmp_path / "rand.zarr", layers=("single_blocks.0", "single_blocks.2"), prompts=3, steps=2,
                      heads=2, n_cond=5, hgrid=5, wgrid=7, nq=14, d=16, qk_scale=1.5)
    store = TraceStore.open(path)
    radii, tile, tile_r = (0, 1, 2), (2, 3), 1
    res = attention_mass(store, radii=radii, tile=tile, tile_radius=tile_r, max_tuples=4)
    assert res["radii"] == [0, 1, 2] and res["tile"] == [2, 3] and res["tile_radius"] == 1
    assert [lay["layer"] for lay in res["layers"]] == ["single_blocks.0", "single_blocks.2"]
    n_cond, h, w = 5, 5, 7
    for lay in res["layers"]:
        assert (lay["tuples"], lay["stored"]) == (4, 6)
        rows = [0, 2, 3, 5]  # 4 of 6 rows, evenly spread
        t = store.read(lay["layer"], n_cond + h * w, rows)
        img_text, txt_text, txt_cos, errs, img_ent = [], [], [], [], []
        heads_ref = {hh: {"entropy": [], "text": [], "win": {r: [] for r in radii}} for hh in range(2)}
        sets = {i: {"mass": [], "cos": [], "tw": [], "keys": []} for i in range(len(radii) + 1)}
        n_img = n_txt = 0
        for b in range(len(rows)):
            q, k = t["q_sub"][b].numpy().astype(np.float64), t["k"][b].numpy().astype(np.float64)
            v, ts = t["v"][b].numpy().astype(np.float64), t["teacher_sub"][b].numpy().astype(np.float64)
            for j, tok in enumerate(t["q_idx"][b].tolist()):
                n_img += tok >= n_cond
                n_txt += tok < n_cond
                for hh in range(q.shape[0]):
                    s = k[hh] @ q[hh, j] / math.sqrt(q.shape[-1])
                    p = np.exp(s - s.max())
                    p /= p.sum()
                    errs.append(np.linalg.norm(p @ v[hh] - ts[hh, j]) / np.linalg.norm(ts[hh, j]))

                    def cos_on(keys, s=s, hh=hh, j=j, v=v, ts=ts):
                        keys = sorted(keys)
                        e = np.exp(s[keys] - s[keys].max())
                        o = (e / e.sum()) @ v[hh][keys]
                        return o @ ts[hh, j] / (np.linalg.norm(o) * np.linalg.norm(ts[hh, j]))

                    if tok < n_cond:
                        txt_text.append(p[:n_cond].sum())
                        txt_cos.append(cos_on(range(n_cond)))
                        continue
                    img_text.append(p[:n_cond].sum())
                    img_ent.append(-(p * np.log(p)).sum())
                    keysets = [_window_ref(n_cond, h, w, tok, r) for r in radii] + [_tile_ref(n_cond, h, w, tok, tile, tile_r)]
                    heads_ref[hh]["entropy"].append(img_ent[-1])
                    heads_ref[hh]["text"].append(p[:n_cond].sum())
                    for r, ks in zip(radii, keysets):
                        heads_ref[hh]["win"][r].append(p[sorted(ks)].sum())
                    for i, ks in enumerate(keysets):
                        m = p[sorted(ks)].sum()
                        sets[i]["mass"].append(m)
                        sets[i]["tw"].append(m + p[:n_cond].sum())
                        sets[i]["cos"].append(cos_on(set(range(n_cond)) | ks))
                        sets[i]["keys"].append(n_cond + len(ks))
        assert (lay["image_queries"], lay["text_queries"]) == (n_img, n_txt) and n_img > 0 and n_txt > 0
        assert lay["teacher_rel_err"]["max"] == pytest.approx(max(errs), rel=1e-6, abs=1e-9)
        img = lay["image"]
        assert img["text_mass"] == pytest.approx(np.mean(img_text), rel=1e-9)
        assert img["text_mass"] + img["image_mass"] == pytest.approx(1.0, abs=1e-12)
        assert img["entropy"] == pytest.approx(np.mean(img_ent), rel=1e-9)
        assert [hd["head"] for hd in img["heads"]] == [0, 1]
        for hd in img["heads"]:
            ref = heads_ref[hd["head"]]
            assert hd["queries"] == len(ref["entropy"]) == n_img
            assert hd["entropy"] == pytest.approx(np.mean(ref["entropy"]), rel=1e-9)
            assert hd["text_mass"] == pytest.approx(np.mean(ref["text"]), rel=1e-9)
            assert hd["window_mass"] == pytest.approx({str(r): np.mean(ref["win"][r]) for r in radii}, rel=1e-9)
        got = [*img["windows"], img["tile"]]
        for i, g in enumerate(got):
            assert g["mass"] == pytest.approx(np.mean(sets[i]["mass"]), rel=1e-9)
            assert g["text_window_mass"] == pytest.approx(np.mean(sets[i]["tw"]), rel=1e-9)
            assert g["text_window_mass_p10"] == pytest.approx(np.quantile(sets[i]["tw"], 0.1), rel=1e-9)
            assert g["cos"] == pytest.approx(np.mean(sets[i]["cos"]), rel=1e-6)
            assert g["cos_p10"] == pytest.approx(np.quantile(sets[i]["cos"], 0.1), rel=1e-6, abs=1e-9)
            assert g["keys"] == pytest.approx(np.mean(sets[i]["keys"]))
        masses = [g["text_window_mass"] for g in img["windows"]]
        assert masses == sorted(masses) and masses[-1] <= 1.0 + 1e-12
        assert img["tile"]["mass"] >= img["windows"][1]["mass"] - 1e-12  # tiles at R=1 hold the R=1 window
        txt = lay["text"]
        assert txt["text_mass"] == pytest.approx(np.mean(txt_text), rel=1e-9)
        assert txt["text_mass"] + txt["image_mass"] == pytest.approx(1.0, abs=1e-12)
        assert txt["cos"] == pytest.approx(np.mean(txt_cos), rel=1e-6)


def test_teacher_deviation_is_reported_and_bf16_store_decodes(tmp_path):
    gen = torch.Generator().manual_seed(2)
    tuples = []
    for i in range(3):
        t = make_tuple(gen, heads=2, n_cond=3, hgrid=3, wgrid=3, nq=5, d=8, prompt=i, step=0, seed=0, qk_scale=1.0)
        t.teacher_sub = t.teacher_sub * 1.01  # the stored output is 1 % off the recomputed attention
        tuples.append(t)
    store = TraceStore.open(_write(tmp_path / "off.zarr", {"single_blocks.1": tuples}))
    err = attention_mass(store)["layers"][0]["teacher_rel_err"]
    assert err["max"] == pytest.approx(0.01 / 1.01, rel=1e-4) and err["mean"] == pytest.approx(0.01 / 1.01, rel=1e-4)
    # bf16 storage: read through the store's decode, the deviation is at bf16 rounding, not garbage
    path = make_store(tmp_path / "bf16src.zarr", layers=("single_blocks.0",), prompts=2, steps=1)
    src = TraceStore.open(path)
    t = src.read("single_blocks.0", 20, [0, 1])
    bf = [TraceTuple(t["q_sub"][b], t["q_idx"][b], t["k"][b], t["v"][b], t["teacher_sub"][b], sigma=1.0, cfg=1.0,
                     n_cond=4, h=4, w=4, prompt=b, step=0, seed=0) for b in range(2)]
    lay = attention_mass(TraceStore.open(_write(tmp_path / "bf16.zarr", {"single_blocks.0": bf}, "bfloat16")))["layers"][0]
    assert 1e-4 < lay["teacher_rel_err"]["max"] < 5e-2
    assert lay["image"]["windows"][-1]["cos"] > 0.99  # R=8 covers the 4x4 grid: restricted = full softmax


def test_max_tuples_bounds_the_work_and_bad_arguments(tmp_path):
    path = make_store(tmp_path / "many.zarr", layers=("single_blocks.0",), prompts=5, steps=4)  # 20 tuples
    store = TraceStore.open(path)
    lay = attention_mass(store, max_tuples=5)["layers"][0]
    assert (lay["tuples"], lay["stored"]) == (5, 20) and lay["image_queries"] + lay["text_queries"] == 5 * 6
    assert attention_mass(store, max_tuples=100)["layers"][0]["tuples"] == 20
    with pytest.raises(ValueError, match="max_tuples"):
        attention_mass(store, max_tuples=0)
    with pytest.raises(ValueError, match="tile"):
        attention_mass(store, tile=(0, 4))
    with pytest.raises(ValueError, match="radii"):
        attention_mass(store, radii=(-1,))


def test_cli_mass_table_json_and_png(store_path, tmp_path, monkeypatch):
    runner = CliRunner()
    # the window column defaults to the project's students: hkr of ./params.yaml, else the shipped defaults
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(main, ["inspect", str(store_path)])
    assert res.exit_code == 0, res.output
    head = next(line for line in res.output.splitlines() if "R=1" in line)
    hkr = HKRConfig()
    assert head.split()[-1] == f"tile{hkr.window_tile[0]}x{hkr.window_tile[1]}r{hkr.window_radius}"
    (tmp_path / "params.yaml").write_text("hkr:\n  window_tile: [4, 4]\n  window_radius: 4\n")
    res = runner.invoke(main, ["inspect", str(store_path)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert any(line.startswith("attention mass  teacher softmax") for line in lines)
    head = next(line for line in lines if "R=1" in line)
    assert head.split() == ["R=1", "R=2", "R=3", "R=4", "R=6", "R=8", "tile4x4r4"]
    for label in ("keys", "window mass", "text+window", "cos"):
        row = next(line for line in lines if line.startswith(f"    {label} "))
        assert len(row.split()) == len(label.split()) + 7
    assert sum(line.startswith("single_blocks.0  8 of 8 tuples x 2 heads") for line in lines) == 1
    assert any(line.startswith("  text queries: text mass") for line in lines)

    png = tmp_path / "out" / "mass.png"
    res = runner.invoke(main, ["inspect", str(store_path), "--json", "--tile", "2", "2", "--radius", "1",
                               "--mass-tuples", "3", "--mass-plot", str(png)])
    assert res.exit_code == 0, res.output
    mass = json.loads(res.stdout)["attention_mass"]
    assert mass["tile"] == [2, 2] and mass["tile_radius"] == 1 and mass["max_tuples"] == 3
    assert mass["plot"] == str(png) and [lay["tuples"] for lay in mass["layers"]] == [3, 3]
    direct = attention_mass(TraceStore.open(store_path), tile=(2, 2), tile_radius=1, max_tuples=3)
    assert mass["layers"] == json.loads(json.dumps(direct["layers"]))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 500
    assert not [p for p in png.parent.iterdir() if p.name != "mass.png"]  # no temp file left behind

    res = runner.invoke(main, ["inspect", str(store_path), "--json", "--mass-tuples", "0"])
    assert res.exit_code == 0 and "attention_mass" not in json.loads(res.stdout)
    res = runner.invoke(main, ["inspect", str(store_path), "--mass-tuples", "0", "--mass-plot", str(png)])
    assert res.exit_code != 0 and "--mass-plot needs the mass report" in res.output
    res = runner.invoke(main, ["inspect", str(store_path), "--tile", "0", "4"])
    assert res.exit_code != 0 and "--tile needs two sizes" in res.output


def test_head_chunking_does_not_change_the_result(tmp_path, monkeypatch):
    import flux2ttr.traces.inspect as inspect_mod

    path = make_store(tmp_path / "h.zarr", layers=("single_blocks.0",), prompts=2, steps=2, heads=3)
    store = TraceStore.open(path)
    whole = attention_mass(store, radii=(1, 2))
    monkeypatch.setattr(inspect_mod, "MASS_CHUNK_ELEMS", 1)  # one head at a time
    split = attention_mass(store, radii=(1, 2))

    def leaves(x, key=""):
        if isinstance(x, dict):
            return [leaf for k in sorted(x) for leaf in leaves(x[k], f"{key}.{k}")]
        if isinstance(x, list):
            return [leaf for i, v in enumerate(x) for leaf in leaves(v, f"{key}[{i}]")]
        return [(key, x)]

    a, b = leaves(whole), leaves(split)
    assert [k for k, _ in a] == [k for k, _ in b] and len(a) > 40
    for (key, x), (_, y) in zip(a, b):
        assert (x == y) if not isinstance(x, float) else y == pytest.approx(x, rel=1e-12, abs=1e-15), key


def test_inspect_says_the_tuples_hold_a_head_subset(tmp_path, store_path):
    """A head-subset store (capture.tuple_heads): the summary names the subset and the teacher's head count;
    an all-heads store says nothing of subsets."""
    gen = torch.Generator().manual_seed(1)
    path = tmp_path / "sub.zarr"
    with TraceWriter(path, attrs={"teacher": TEACHER, "capture": {"queries": 5, "tuple_heads": 2, "num_heads": 6}},
                     budget_bytes=1 << 30, storage_dtype="float32", seed=0) as w:
        for p, heads in enumerate(([0, 4], [1, 5], [2, 3])):
            t = _tuple(gen, prompt=p, step=0, sigma=1.0)
            t.heads = torch.tensor(heads)
            w.offer("single_blocks.0", t)
    s = summarize(TraceStore.open(path))
    assert s["head_subset"] is True and s["teacher_heads"] == 6
    assert s["layers"][0]["groups"][0]["head_subset"] is True and s["layers"][0]["groups"][0]["heads"] == 2
    out = CliRunner().invoke(main, ["inspect", str(path)])
    assert out.exit_code == 0, out.output
    assert "each tuple holds a head subset: 2 of the teacher's 6 heads" in out.output
    full = CliRunner().invoke(main, ["inspect", str(store_path)])
    assert full.exit_code == 0 and "head subset" not in full.output
    assert summarize(TraceStore.open(store_path))["head_subset"] is False
    # the per-head report names the teacher's heads the tuples hold, each with that head's rows only
    store = TraceStore.open(path)
    heads = {hd["head"]: hd for hd in attention_mass(store, radii=(1,))["layers"][0]["image"]["heads"]}
    assert sorted(heads) == [0, 1, 2, 3, 4, 5]
    t = store.read("single_blocks.0", store.groups("single_blocks.0")[0][0], [0, 1, 2])  # prompts 0, 1, 2
    for row in range(3):
        image_queries = int((t["q_idx"][row] >= t["n_cond"][row]).sum())
        for head in t["heads"][row].tolist():
            assert heads[head]["queries"] == image_queries  # that tuple's queries alone
