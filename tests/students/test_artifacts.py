"""Student artifacts: exact round trip, one clear error per bad file, legacy alpha migration (once)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flux2ttr.students.artifacts import (
    METADATA_KEY,
    SCHEMA_VERSION,
    ArtifactError,
    NonFiniteArtifactError,
    file_sha256,
    load_students,
    migrate_legacy_file,
    read_header,
    save_students,
)
from flux2ttr.students.hkr import HKRConfig, HKRLayer

KEYS = ["single_blocks.0", "single_blocks.2"]
TEACHER = {"kind": "tiny", "seed": 0, "sha256": "ab" * 32}


def cfg_(**kw) -> HKRConfig:
    return HKRConfig(**{**dict(mode="hkr", head_dim=16, feature_dim=8, cond_hidden=8, landmark_min=2), **kw})


def make_layers(cfg: HKRConfig, seed: int = 0) -> dict[str, HKRLayer]:
    torch.manual_seed(seed)
    layers = {k: HKRLayer(cfg, num_heads=2) for k in KEYS}
    with torch.no_grad():  # non-trivial conditioner and alpha, so the round trip checks real values
        for i, layer in enumerate(layers.values()):
            layer.cond.net[2].weight.normal_()
            layer.alpha_logit.fill_(-0.3 * (i + 1))
    return layers


def save(path: Path, cfg: HKRConfig | None = None, layers=None) -> dict[str, HKRLayer]:
    cfg = cfg or cfg_()
    layers = layers or make_layers(cfg)
    save_students(
        path, layers, cfg, num_heads=2,
        ready={KEYS[0]: True, KEYS[1]: False},
        metrics={KEYS[0]: {"val_cos": 0.93, "val_huber": 0.01}, KEYS[1]: {"val_cos": 0.41}},
        train_config={"steps": 300, "lr": 3e-3}, teacher=TEACHER,
    )
    return layers


def rewrite(path: Path, edit_header=None, edit_tensors=None) -> None:
    """Re-save a file with its header and/or tensors edited (to build bad files)."""
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(header)})


def test_round_trip_is_exact(tmp_path):
    path = tmp_path / "flux2_ttr.safetensors"
    cfg = cfg_(adaptive_alpha=True, feature_dim=12)
    layers = save(path, cfg, make_layers(cfg))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # atomic write leaves no temp file
    art = load_students(path, expect_feature_dim=12, expect_head_dim=16, expect_num_heads=2,
                        expect_layers=KEYS, teacher={"kind": "tiny"})
    assert art.cfg == cfg and art.num_heads == 2 and not art.migrated
    assert art.ready == {KEYS[0]: True, KEYS[1]: False}
    assert art.metrics[KEYS[0]] == {"val_cos": 0.93, "val_huber": 0.01}
    h = art.header
    assert (h["format"], h["schema"], h["alpha_format"]) == ("flux2ttr.students", SCHEMA_VERSION, "logit")
    assert (h["feature_dim"], h["head_dim"], h["num_heads"]) == (12, 16, 2)
    assert h["teacher"] == TEACHER and h["train_config"] == {"steps": 300, "lr": 3e-3}
    for k in KEYS:
        a, b = layers[k].export_tensors(), art.layers[k].export_tensors()
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name
    # Same parameters -> bit-identical outputs.
    g = torch.Generator().manual_seed(0)
    q, k_, v = (torch.randn(1, 2, 3 + 16, 16, generator=g) for _ in range(3))
    for k in KEYS:
        torch.testing.assert_close(layers[k](q, k_, v, 3, 0.3, 2.0, height=4, width=4),
                                   art.layers[k](q, k_, v, 3, 0.3, 2.0, height=4, width=4), rtol=0, atol=0)
    # Tensor names are "{layer_key}.{param}".
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
    assert f"{KEYS[0]}.alpha_logit" in names and f"{KEYS[1]}.phi_k.net.4.weight" in names
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_shared_qk_round_trip(tmp_path):
    path = tmp_path / "s.safetensors"
    cfg = cfg_(shared_qk=True)
    save(path, cfg, make_layers(cfg))
    art = load_students(path)
    assert art.layers[KEYS[0]].phi_k is None


def err(path, match, **kw):
    with pytest.raises(ArtifactError, match=match) as e:
        load_students(path, **kw)
    assert str(path) in str(e.value)  # every error names the file
    assert isinstance(e.value, ValueError)


def test_wrong_format(tmp_path):
    p = tmp_path / "a.safetensors"
    save(p)
    rewrite(p, edit_header=lambda h: h.update(format="flux2ttr.controller"))
    err(p, "wrong format 'flux2ttr.controller'")


def test_no_header(tmp_path):
    p = tmp_path / "a.safetensors"
    save_file({"x": torch.zeros(2)}, str(p))
    err(p, "no 'flux2ttr' header")


def test_newer_schema(tmp_path):
    p = tmp_path / "a.safetensors"
    save(p)
    rewrite(p, edit_header=lambda h: h.update(schema=SCHEMA_VERSION + 1))
    err(p, f"schema {SCHEMA_VERSION + 1} is newer")


def test_feature_dim_mismatch(tmp_path):
    p = tmp_path / "a.safetensors"
    save(p)
    err(p, "feature_dim mismatch: file has 8, expected 64", expect_feature_dim=64)
    err(p, "num_heads mismatch: file has 2, expected 24", expect_num_heads=24)
    err(p, "head_dim mismatch", expect_head_dim=128)
    rewrite(p, edit_header=lambda h: h.update(feature_dim=32))  # header disagrees with its own config
    err(p, "feature_dim=32 disagrees")


def test_missing_layer(tmp_path):
    p = tmp_path / "a.safetensors"
    save(p)
    err(p, r"missing layer\(s\) \['single_blocks.5'\]", expect_layers=KEYS + ["single_blocks.5"])


def test_missing_tensor(tmp_path):
    p = tmp_path / "a.safetensors"
    save(p)
    rewrite(p, edit_tensors=lambda t: t.pop(f"{KEYS[1]}.phi_q.net.2.bias"))
    err(p, "missing tensor 'single_blocks.2.phi_q.net.2.bias'")


def test_wrong_shapes(tmp_path):
    p = tmp_path / "a.safetensors"
    save(p)
    rewrite(p, edit_tensors=lambda t: t.update({f"{KEYS[0]}.phi_q.net.4.weight": torch.zeros(9, 16)}))
    err(p, r"'single_blocks.0.phi_q.net.4.weight' has shape \(9, 16\), expected \(8, 16\)")


def test_unexpected_tensor(tmp_path):
    p = tmp_path / "a.safetensors"
    save(p)
    rewrite(p, edit_tensors=lambda t: t.update({"single_blocks.9.alpha_logit": torch.zeros(())}))
    err(p, "unexpected tensor")


def test_teacher_mismatch(tmp_path):
    p = tmp_path / "a.safetensors"
    save(p)
    err(p, "teacher mismatch.*seed: 0 vs 1", teacher={"kind": "tiny", "seed": 1})


@pytest.mark.parametrize("cut", [0.5, 0.99, 10])
def test_truncated_file(tmp_path, cut):
    p = tmp_path / "a.safetensors"
    save(p)
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * cut)] if cut < 1 else data[:cut])
    err(p, "truncated or corrupt")


def test_garbage_and_missing_file(tmp_path):
    p = tmp_path / "a.safetensors"
    p.write_bytes(b"\x00" * 64 + b"not a safetensors file")
    err(p, "truncated or corrupt")
    err(tmp_path / "nope.safetensors", "not found")


def test_save_is_atomic_on_error(tmp_path):
    p = tmp_path / "a.safetensors"
    save(p)
    before = p.read_bytes()
    with pytest.raises(ArtifactError, match="not JSON-serialisable"):
        save_students(p, make_layers(cfg_()), cfg_(), num_heads=2, ready={k: True for k in KEYS},
                      metrics={}, train_config={"bad": object()}, teacher={})
    assert p.read_bytes() == before and [x.name for x in tmp_path.iterdir()] == ["a.safetensors"]


def test_save_rejects_bad_layer_keys_and_mismatched_layers(tmp_path):
    cfg = cfg_()
    layer = HKRLayer(cfg, num_heads=2)
    kw = dict(num_heads=2, metrics={}, train_config={}, teacher={})
    with pytest.raises(ArtifactError, match="not a layer key"):
        save_students(tmp_path / "a.safetensors", {"single_transformer_blocks.0": layer}, cfg,
                      ready={"single_transformer_blocks.0": True}, **kw)
    with pytest.raises(ArtifactError, match="different HKRConfig"):
        save_students(tmp_path / "a.safetensors", {"single_blocks.0": layer}, cfg_(feature_dim=4),
                      ready={"single_blocks.0": True}, **kw)
    with pytest.raises(ArtifactError, match="no readiness"):
        save_students(tmp_path / "a.safetensors", {"single_blocks.0": layer}, cfg, ready={}, **kw)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ legacy raw alpha


def make_legacy(path: Path, raw=(0.05, 0.15), key_name="alpha") -> dict[str, HKRLayer]:
    """A pre-logit file: no alpha_format in the header, raw alpha values in '{layer}.alpha'."""
    layers = save(path)

    def edit_tensors(t):
        for k, a in zip(KEYS, raw):
            t.pop(f"{k}.alpha_logit")
            t[f"{k}.{key_name}"] = torch.tensor(a)

    rewrite(path, edit_header=lambda h: h.pop("alpha_format"), edit_tensors=edit_tensors)
    return layers


@pytest.mark.parametrize("key_name", ["alpha", "alpha_logit"])
def test_legacy_file_is_migrated_on_load(tmp_path, key_name):
    p = tmp_path / "old.safetensors"
    make_legacy(p, key_name=key_name)
    art = load_students(p)
    assert art.migrated and art.header["alpha_format"] == "logit"
    for k, raw in zip(KEYS, (0.05, 0.15)):
        logit = art.layers[k].alpha_logit.item()
        assert logit == pytest.approx(math.log((raw / 0.2) / (1 - raw / 0.2)), abs=1e-6)
        a = art.layers[k].fusion_alpha(torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16))
        assert a.item() == pytest.approx(raw, rel=1e-6)  # the layer reproduces the stored raw alpha
    assert read_header(p).get("alpha_format") is None  # loading does not touch the file


def test_migrate_in_place_exactly_once(tmp_path):
    p = tmp_path / "old.safetensors"
    make_legacy(p)
    assert migrate_legacy_file(p) is True
    once = p.read_bytes()
    assert read_header(p)["alpha_format"] == "logit"
    art = load_students(p)
    assert not art.migrated
    assert art.layers[KEYS[0]].alpha_logit.item() == pytest.approx(math.log(0.25 / 0.75), abs=1e-6)
    # A second migration is a no-op: same bytes, logits not re-converted.
    assert migrate_legacy_file(p) is False
    assert p.read_bytes() == once
    # A current file is never migrated.
    q = tmp_path / "new.safetensors"
    save(q)
    before = q.read_bytes()
    assert migrate_legacy_file(q) is False and q.read_bytes() == before


def test_legacy_alpha_out_of_range(tmp_path):
    p = tmp_path / "old.safetensors"
    make_legacy(p, raw=(0.05, 0.7))
    err(p, "outside")


# ------------------------------------------------------------------ non-finite values


def _poison(value: float, name: str = "phi_q.net.0.weight", key: str = KEYS[0]):
    def edit(t):
        bad = t[f"{key}.{name}"].clone()
        bad.view(-1)[:3] = value
        t[f"{key}.{name}"] = bad
    return edit


@pytest.mark.parametrize("value, counts", [(float("nan"), r"NaN 3, inf 0"), (float("inf"), r"NaN 0, inf 3"),
                                           (float("-inf"), r"NaN 0, inf 3")])
def test_non_finite_tensor_is_refused_naming_layer_and_tensor(tmp_path, value, counts):
    p = tmp_path / "a.safetensors"
    save(p)
    rewrite(p, edit_tensors=_poison(value))
    err(p, rf"layer single_blocks\.0: tensor 'single_blocks\.0\.phi_q\.net\.0\.weight' has 3 of \d+ values "
           rf"non-finite \({counts}\); the student artifact is corrupt .*re-run distill \(`dvc repro distill`\)")
    with pytest.raises(NonFiniteArtifactError, match="single_blocks.0.phi_q.net.0.weight"):  # its own type
        load_students(p, expect_head_dim=16, expect_num_heads=2, expect_layers=KEYS)


def test_non_finite_scalar_of_second_layer(tmp_path):
    p = tmp_path / "a.safetensors"
    save(p)
    rewrite(p, edit_tensors=lambda t: t.update({f"{KEYS[1]}.alpha_logit": torch.tensor(float("nan"))}))
    err(p, r"layer single_blocks\.2: tensor 'single_blocks\.2\.alpha_logit' has 1 of 1 values non-finite")


def test_legacy_file_with_nan_is_refused_not_migrated(tmp_path):
    p = tmp_path / "old.safetensors"
    make_legacy(p)
    rewrite(p, edit_tensors=lambda t: t.update({f"{KEYS[0]}.alpha": torch.tensor(float("nan"))}))
    before = p.read_bytes()
    err(p, r"layer single_blocks\.0: tensor 'single_blocks\.0\.alpha' has 1 of 1 values non-finite")
    with pytest.raises(ArtifactError, match=r"single_blocks\.0\.alpha.*non-finite"):
        migrate_legacy_file(p)
    assert p.read_bytes() == before  # never written


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_save_refuses_non_finite_layers(tmp_path, value):
    p = tmp_path / "a.safetensors"
    save(p)
    before = p.read_bytes()
    layers = make_layers(cfg_())
    with torch.no_grad():
        layers[KEYS[1]].phi_k.net[2].bias[1] = value
    with pytest.raises(ArtifactError, match=r"refusing to save layer single_blocks\.2: tensor "
                                            r"'single_blocks\.2\.phi_k\.net\.2\.bias' has 1 of \d+ values non-finite"
                                            r".*nothing was written: re-run distill") as e:
        save(p, layers=layers)
    assert str(p) in str(e.value)
    assert p.read_bytes() == before and [x.name for x in tmp_path.iterdir()] == ["a.safetensors"]
    with pytest.raises(ArtifactError, match="refusing to save"):
        save(tmp_path / "new.safetensors", layers=layers)
    assert not (tmp_path / "new.safetensors").exists()


@pytest.mark.parametrize("key, value", [("head_dim", "16"), ("num_heads", 0), ("feature_dim", True),
                                        ("num_heads", 2.5)])
def test_header_integers_are_checked(tmp_path, key, value):
    """A damaged header names the key and value (a string head_dim used to be a raw ValueError)."""
    p = tmp_path / "a.safetensors"
    save(p)
    rewrite(p, edit_header=lambda h: h.update({key: value}))
    err(p, rf"header {key} = {value!r} must be a positive integer".replace("(", r"\(").replace(")", r"\)"))


def test_window_file_without_key_tile_keeps_whole_tile_windows(tmp_path):
    """A window artifact written before ``window_key_tile`` existed: its windows were whole query tiles, so
    loading sets the key tile to the query tile (the same exact sets the student was trained with)."""
    from flux2ttr.students.window import WindowLayer, exact_key_mask

    cfg = cfg_(mode="window", window_tile=[2, 3], window_radius=1, window_key_tile=[2, 3])
    torch.manual_seed(0)
    layers = {k: WindowLayer(cfg, num_heads=2) for k in KEYS}
    p = tmp_path / "old_window.safetensors"
    save(p, cfg, layers)
    rewrite(p, edit_header=lambda h: h["hkr"].pop("window_key_tile"))
    art = load_students(p)
    assert art.cfg.window_key_tile == [2, 3]
    pos = torch.arange(4 + 6 * 7)
    got = exact_key_mask(pos, 4, 6, 7, art.cfg)
    new_default = exact_key_mask(pos, 4, 6, 7, cfg_(mode="window", window_tile=[2, 3], window_radius=1))
    assert torch.equal(got, exact_key_mask(pos, 4, 6, 7, cfg))
    assert not torch.equal(got, new_default)  # token-granular windows would differ: the migration matters
