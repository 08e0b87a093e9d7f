"""Controller model, policy helpers against hand formulas, artifact round trip and errors, checkpoint resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from flux2ttr.checkpoint import CheckpointError
from flux2ttr.config import ConfigError
from flux2ttr.routing.controller import (
    METADATA_KEY,
    ControllerArtifactError,
    ControllerConfig,
    TTRController,
    entropy,
    load_controller,
    load_controller_checkpoint,
    log_prob,
    probs_full,
    read_controller_header,
    sample_mask,
    save_controller,
    save_controller_checkpoint,
    sinusoidal,
    threshold_for,
    threshold_mask,
)
from flux2ttr.routing.reward import RewardBaseline

KEYS = ["single_blocks.0", "single_blocks.1", "single_blocks.3"]
SMALL = dict(sigma_dim=8, cfg_dim=4, res_freq_dim=4, res_dim=4, hidden=16)


def _inputs(n=5):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(n, generator=g), torch.full((n,), 4.0), torch.full((n,), 16.0), torch.full((n,), 24.0))


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return TTRController(ControllerConfig(**{**SMALL, **kw}), KEYS)


def test_sinusoidal_matches_formula():
    x = torch.tensor([0.0, 0.3, 7.0])
    emb = sinusoidal(x, 6, 100.0)
    f = [100.0 ** (-i / 3) for i in range(3)]
    want = [[math.cos(v * fi) for fi in f] + [math.sin(v * fi) for fi in f] for v in x.tolist()]
    assert torch.allclose(emb, torch.tensor(want), atol=1e-6)


def test_forward_shape_depends_on_every_input():
    m = _model()
    s, c, h, w = _inputs()
    out = m(s, c, h, w)
    assert out.shape == (5, 3)
    assert not torch.allclose(out, m(s.flip(0), c, h, w))
    assert not torch.allclose(out, m(s, c + 1, h, w))
    assert not torch.allclose(out, m(s, c, h * 2, w))
    assert not torch.allclose(out, m(s, c, h, w * 2))
    assert not torch.allclose(m(s, c, h, w * 2), m(s, c, h * 2, w))  # width and height are not symmetric


def test_init_logit_and_prompt_embedding_switch():
    m = _model(init_logit=2.0)
    with torch.no_grad():
        m.head[-1].weight.zero_()
    assert torch.allclose(m(*_inputs()), torch.full((5, 3), 2.0))
    with pytest.raises(ValueError, match="use_prompt_embedding is false"):
        m(*_inputs(), prompt_embedding=torch.zeros(5, 2))
    with pytest.raises(ConfigError, match="prompt_dim"):
        ControllerConfig(use_prompt_embedding=True, prompt_dim=0)
    mp = _model(use_prompt_embedding=True, prompt_dim=6)
    pe = torch.randn(5, 6)
    a, b = mp(*_inputs(), prompt_embedding=pe), mp(*_inputs(), prompt_embedding=pe * 2)
    assert a.shape == (5, 3) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="pass prompt_embedding"):
        mp(*_inputs())


def test_policy_helpers_match_bernoulli_formulas():
    logits = torch.tensor([[-2.0, 0.0, 3.0]], dtype=torch.float64)
    p = 1 / (1 + torch.exp(-logits))
    assert torch.allclose(probs_full(logits), p)
    mask = torch.tensor([[True, False, True]])
    want_lp = torch.where(mask, torch.log(p), torch.log(1 - p))
    assert torch.allclose(log_prob(logits, mask), want_lp)
    want_h = -(p * torch.log(p) + (1 - p) * torch.log(1 - p))
    assert torch.allclose(entropy(logits), want_h)
    assert entropy(torch.tensor(0.0)).item() == pytest.approx(math.log(2))


def test_sample_mask_frequencies_and_quality_speed_shift():
    logits = torch.tensor([-1.0, 0.0, 2.0]).expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    freq = sample_mask(logits, g).float().mean(0)
    assert torch.allclose(freq, torch.sigmoid(logits[0]), atol=0.015)
    # generator makes it reproducible
    assert torch.equal(sample_mask(logits, torch.Generator().manual_seed(3)),
                       sample_mask(logits, torch.Generator().manual_seed(3)))
    # quality_speed 0.5 = the policy; 0.8 shifts by logit(0.8); 0 -> all full; 1 -> none
    q = 0.8
    freq_q = sample_mask(logits, torch.Generator().manual_seed(1), quality_speed=q).float().mean(0)
    assert torch.allclose(freq_q, torch.sigmoid(logits[0] - math.log(q / (1 - q))), atol=0.015)
    assert sample_mask(logits, g, quality_speed=0.0).all()
    assert not sample_mask(logits, g, quality_speed=1.0).any()
    with pytest.raises(ValueError, match="quality_speed"):
        sample_mask(logits, g, quality_speed=1.5)


def test_threshold_mode_mapping():
    logits = torch.tensor([-1.0, 0.0, 2.0])
    assert threshold_for(0.3) == 0.3
    assert threshold_mask(logits, 0.0).all()
    assert threshold_mask(logits, 0.5).tolist() == [False, True, True]
    assert threshold_mask(logits, 0.9).tolist() == [False, False, False]
    assert threshold_mask(logits, 0.85).tolist() == [False, False, True]  # sigmoid(2) = 0.881
    # monotone: a higher quality_speed never turns a layer back to full attention
    prev = threshold_mask(logits, 0.0)
    for qs in torch.linspace(0, 1, 11).tolist():
        cur = threshold_mask(logits, qs)
        assert not (cur & ~prev).any()
        prev = cur


# ------------------------------------------------------------------------------------------ artifact
def test_artifact_round_trip(tmp_path):
    m = _model(seed=3)
    path = tmp_path / "a" / "ctrl.safetensors"
    save_controller(path, m, layer_order=KEYS, student_sha256="ab" * 32, config={"lr": 1e-3},
                    teacher={"sha256": "t1"})
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left
    loaded, order = load_controller(path, expect_layers=KEYS, expect_student_sha256="ab" * 32)
    assert order == KEYS and loaded.layer_keys == KEYS
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert torch.equal(m(*_inputs()), loaded(*_inputs()))
    h = read_controller_header(path)
    assert h["format"] == "flux2ttr.controller" and h["schema"] == 1 and h["layer_order"] == KEYS
    assert h["student_sha256"] == "ab" * 32 and h["config"] == {"lr": 1e-3} and h["teacher"] == {"sha256": "t1"}
    assert h["model_config"]["hidden"] == 16 and loaded.header == h


def _rewrite_header(src, dst, **changes):
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        header = json.loads(f.metadata()[METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header.update(changes)
    save_file(tensors, str(dst), metadata={METADATA_KEY: json.dumps(header)})


def test_artifact_mismatch_errors(tmp_path):
    m = _model()
    path = tmp_path / "ctrl.safetensors"
    save_controller(path, m, layer_order=KEYS, student_sha256="s1", config={}, teacher={})
    with pytest.raises(ControllerArtifactError, match="trained for layers"):
        load_controller(path, expect_layers=KEYS[:2])
    with pytest.raises(ControllerArtifactError, match="student artifact sha256 s1 but the students in use have s2"):
        load_controller(path, expect_student_sha256="s2")
    with pytest.raises(ControllerArtifactError, match="student artifact sha256"):
        load_controller(path, student_sha256="s2")
    bad = tmp_path / "fmt.safetensors"
    _rewrite_header(path, bad, format="flux2ttr.students")
    with pytest.raises(ControllerArtifactError, match="wrong format 'flux2ttr.students'"):
        load_controller(bad)
    _rewrite_header(path, bad, schema=99)
    with pytest.raises(ControllerArtifactError, match="schema 99 is newer"):
        load_controller(bad)
    raw = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) - 40])
    with pytest.raises(ControllerArtifactError, match="truncated or corrupt"):
        load_controller(tmp_path / "trunc.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ControllerArtifactError, match="not a flux2ttr controller"):
        load_controller(tmp_path / "plain.safetensors")
    with pytest.raises(ControllerArtifactError, match="not found"):
        load_controller(tmp_path / "missing.safetensors")
    with pytest.raises(ControllerArtifactError, match="differs from the model"):
        save_controller(tmp_path / "x.safetensors", m, layer_order=KEYS[::-1], student_sha256="s", config={})



@pytest.mark.parametrize("value, counts", [(float("nan"), "NaN 1, inf 0"), (float("inf"), "NaN 0, inf 1")])
def test_non_finite_weights_are_refused(tmp_path, value, counts):
    """A NaN weight makes every logit NaN, and a NaN logit is 'not full': every layer would run its student."""
    m = _model()
    path = tmp_path / "ctrl.safetensors"
    save_controller(path, m, layer_order=KEYS, student_sha256="s1", config={}, teacher={})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["head.2.weight"] = tensors["head.2.weight"].clone()
    tensors["head.2.weight"][0, 0] = value
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ControllerArtifactError) as e:
        load_controller(path, expect_layers=KEYS, expect_student_sha256="s1")
    msg = str(e.value)
    assert str(path) in msg and "controller weight 'head.2.weight'" in msg
    assert f"non-finite ({counts})" in msg and "retrain it (dvc repro train_controller)" in msg


# ------------------------------------------------------------------------------------------ checkpoint
def _train(model, opt, steps, g):
    s, c, h, w = _inputs()
    for _ in range(steps):
        mask = sample_mask(model(s, c, h, w), g)
        loss = -(log_prob(model(s, c, h, w), mask).sum() * torch.rand((), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    cfg = ControllerConfig(**SMALL)
    straight = _model(seed=5)
    opt = torch.optim.AdamW(straight.parameters(), lr=1e-2, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    _train(straight, opt, 6, g)

    first = _model(seed=5)
    opt1 = torch.optim.AdamW(first.parameters(), lr=1e-2, weight_decay=0.01)
    g1 = torch.Generator().manual_seed(0)
    _train(first, opt1, 3, g1)
    base = RewardBaseline(cfg)
    base.update(-0.1)
    base.update(-2.0)
    save_controller_checkpoint(tmp_path / "ck.safetensors", first, opt1, base, iteration=3)

    resumed = _model(seed=99)  # different init: everything must come from the file
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2, weight_decay=0.01)
    base2 = RewardBaseline(cfg)
    header = load_controller_checkpoint(tmp_path / "ck.safetensors", resumed, opt2, base2)
    assert header["iteration"] == 3
    assert base2.state_dict() == base.state_dict() and base2.count == 2
    _train(resumed, opt2, 3, g1)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    with pytest.raises(CheckpointError, match="differ from the model"):
        load_controller_checkpoint(tmp_path / "ck.safetensors", TTRController(cfg, KEYS[:2]),
                                   opt2, base2)
