"""Controller training: eligibility, reward/log-prob bookkeeping against hand formulas, records, resume."""

from __future__ import annotations

import json
import math
import zipfile

import pytest
import torch

from flux2ttr.routing.quality import QualityConfig, QualityLoss
from flux2ttr.routing.rollouts import RolloutConfig, RolloutStore, record_rollouts, write_store
from flux2ttr.routing.training import (
    ControllerTrainConfig,
    ControllerTrainer,
    eligibility,
    full_mask,
    read_records,
)
from flux2ttr.students.artifacts import load_students
from helpers.outputs import check_metrics_file, details_of
from helpers.rollouts import PROMPTS, TEACHER, make_students, make_teacher, write_params
from stages.train_controller import run_stage

ROLLOUT = dict(num_prompts=3, eval_prompts=1, steps=2, height=32, width=32, seed=3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ct")
    teacher = make_teacher(tmp / "teacher")
    keys = teacher.single_layer_keys  # 3 single blocks
    ready = {keys[0]: True, keys[1]: False, keys[2]: True}
    students = make_students(tmp / "students.safetensors", teacher, ready)
    rcfg = RolloutConfig(**ROLLOUT)
    rollouts, _ = record_rollouts(teacher, rcfg, PROMPTS, show_progress=False)
    store_path = write_store(tmp / "rollouts", rollouts, setting=rcfg.setting(), teacher=teacher.identity)
    return teacher, keys, students, store_path


def _trainer(setup, tmp_path, **kw):
    teacher, _, students, store_path = setup
    kw.setdefault("group_size", 1)  # one rollout per iteration (EMA baseline) unless a test asks for a group
    cfg = ControllerTrainConfig(checkpoint_dir=str(tmp_path / "ckpt"), **kw)
    return ControllerTrainer(cfg, teacher, load_students(students), RolloutStore(store_path),
                             QualityLoss(QualityConfig()), show_progress=False)


def test_eligibility_ready_only_and_forced_full(setup, tmp_path):
    _, keys, students, _ = setup
    elig, forced = eligibility(keys, load_students(students))
    assert elig == [keys[0], keys[2]] and forced == [keys[1]]
    m = full_mask(torch.tensor([[False, True], [False, False]]), [0, 2], 3)
    assert m.tolist() == [[False, True, True], [False, True, False]]

    tr = _trainer(setup, tmp_path, iterations=3, checkpoint_every=0, lr=0.0)
    with torch.no_grad():  # push the policy to the student side: eligible layers mostly off
        for p in tr.controller.parameters():
            p.zero_()
    recs = tr.train()
    for r in recs:
        assert all(row[1] == 1 for row in r["mask"])  # non-ready layer always full attention
        assert r["forced_full"] == [keys[1]] and r["eligible"] == [keys[0], keys[2]]
        elig_slots = [row[c] for row in r["mask"] for c in (0, 2)]
        assert r["full_ratio"] == pytest.approx(sum(elig_slots) / len(elig_slots))
        assert r["full_ratio_all_layers"] == pytest.approx(sum(map(sum, r["mask"])) / 6)


def test_reward_and_recomputed_log_prob_match_hand_formulas(setup, tmp_path):
    tr = _trainer(setup, tmp_path, iterations=1, checkpoint_every=0)
    before = {k: v.clone() for k, v in tr.controller.state_dict().items()}
    rec = tr.train()[0]
    cfg = tr.cfg
    # log-prob of the logged actions under the pre-update policy, fp64 Bernoulli by hand
    ref = type(tr.controller)(cfg, tr.layer_keys)
    ref.load_state_dict(before)
    with torch.no_grad():
        logits = ref(tr.inputs["sigma"], tr.inputs["cfg"], tr.inputs["height"], tr.inputs["width"]).double()
    mask = torch.tensor(rec["mask"], dtype=torch.float64)[:, tr.eligible_cols]
    lg = logits[:, tr.eligible_cols]
    lp = (mask * torch.nn.functional.logsigmoid(lg) + (1 - mask) * torch.nn.functional.logsigmoid(-lg)).sum()
    assert rec["log_prob_sum"] == pytest.approx(float(lp), rel=1e-5, abs=1e-6)
    p = torch.sigmoid(lg)
    ent = float((-(p * p.log() + (1 - p) * (1 - p).log())).mean())
    assert rec["entropy"] == pytest.approx(ent, rel=1e-5)
    want = (-rec["quality_loss"] - cfg.lambda_eff * abs(rec["full_ratio"] - (1 - cfg.target_ttr_ratio))
            + cfg.lambda_entropy * ent)
    assert rec["reward"] == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert rec["policy_loss"] == pytest.approx(-(rec["reward"] - rec["baseline"]) * rec["log_prob_sum"], rel=1e-5)
    assert any(not torch.equal(before[k], v) for k, v in tr.controller.state_dict().items())  # it learned


def _strip(records):
    return [{k: v for k, v in r.items() if k not in ("seconds",)} for r in records]


def test_resume_is_exact(setup, tmp_path):
    straight = _trainer(setup, tmp_path / "a", iterations=4, checkpoint_every=2)
    rec_a = straight.train()
    first = _trainer(setup, tmp_path / "b", iterations=2, checkpoint_every=2)
    first.train()
    resumed = _trainer(setup, tmp_path / "b", iterations=4, checkpoint_every=2)  # more iterations: resumes
    assert resumed.try_resume() and resumed.iteration == 2 and len(resumed.records) == 2
    rec_b = resumed.train()
    assert _strip(rec_a) == _strip(rec_b)
    for k, v in straight.controller.state_dict().items():
        assert torch.equal(v, resumed.controller.state_dict()[k]), k
    sa, sb = straight.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    for i in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(sa[i][name]), torch.as_tensor(sb[i][name]))
    assert straight.baseline.state_dict() == resumed.baseline.state_dict()
    assert resumed.baseline.count == 4


def test_checkpoint_of_another_setup_is_ignored(setup, tmp_path, monkeypatch):
    import flux2ttr.routing.training as ct

    _trainer(setup, tmp_path, iterations=1, checkpoint_every=1).train()
    other = _trainer(setup, tmp_path, iterations=2, lr=1e-2)  # other params: start over
    assert not other.try_resume() and other.iteration == 0
    same = _trainer(setup, tmp_path, iterations=2)
    assert same.try_resume() and same.iteration == 1
    real = ct.code_digest()
    monkeypatch.setattr(ct, "code_digest", lambda: real[::-1])  # the training code changed: start over
    assert not _trainer(setup, tmp_path, iterations=2).try_resume()


def test_prompt_embedding_input(setup, tmp_path):
    from flux2ttr.config import ConfigError
    from flux2ttr.routing.training import policy_logits, pooled_prompt_embedding, rollout_inputs

    teacher = setup[0]
    tr = _trainer(setup, tmp_path, iterations=1, use_prompt_embedding=True, prompt_dim=teacher.context_dim)
    emb = pooled_prompt_embedding(teacher, "a red fox")
    cond = teacher.encode_prompts(["a red fox"])[0]
    torch.testing.assert_close(emb, cond[-3:].mean(0))  # 3 real tokens, left-padded with zeros
    a, b = (policy_logits(tr.controller, rollout_inputs(tr.inputs, tr.controller, teacher, p)) for p in PROMPTS[:2])
    assert a.shape == (2, 3) and not torch.allclose(a, b)  # routing depends on the prompt
    rec = tr.train()[0]
    assert math.isfinite(rec["log_prob_sum"]) and rec["log_prob_sum"] < 0
    bad = _trainer(setup, tmp_path / "bad", iterations=1, use_prompt_embedding=True, prompt_dim=7)
    with pytest.raises(ConfigError, match="prompt_dim: 16"):
        bad.train()


def test_run_stage_outputs(setup, tmp_path, monkeypatch):
    teacher, keys, students, store_path = setup
    monkeypatch.chdir(tmp_path)
    import shutil

    shutil.copytree(teacher.folder, tmp_path / "teacher")
    sections = {
        "teacher": dict(out_dir="teacher", **TEACHER),
        "controller": dict(students=str(students), rollouts=str(store_path), iterations=3, checkpoint_every=2,
                           group_size=1),
        "quality": {},
        "comet": dict(offline=True, offline_directory="comet", log_every=5),
    }
    run_stage(write_params(tmp_path / "params.yaml", sections))
    recs = read_records(tmp_path / "rollouts" / "controller_records.jsonl")
    assert [r["iteration"] for r in recs] == [0, 1, 2]
    assert {"mask", "reward", "quality_terms", "full_ratio", "quality_loss", "entropy"} <= set(recs[0])
    small = check_metrics_file(tmp_path / "metrics" / "controller.json")
    metrics = details_of(tmp_path / "metrics" / "controller.json")
    assert metrics["iterations"] == 3 and metrics["eligible_layers"] == 2 and metrics["forced_full"] == [keys[1]]
    assert math.isfinite(metrics["reward_last"])
    assert set(small) == {"reward", "quality_loss", "full_ratio", "seconds"}
    assert (small["reward"], small["quality_loss"], small["full_ratio"]) == (
        metrics["reward_last"], metrics["quality_loss_last"], metrics["full_ratio_last"])
    assert small["seconds"] == round(metrics["train_seconds"], 1)
    from flux2ttr.routing.controller import load_controller
    from flux2ttr.students.artifacts import file_sha256

    ctrl, layer_keys = load_controller(tmp_path / "artifacts" / "flux2_ttr_controller.safetensors",
                                       student_sha256=file_sha256(students))
    assert layer_keys == keys and ctrl.header["eligible"] == [keys[0], keys[2]]

    # resumed run with more iterations: its first iteration (3) is logged although log_every is 5
    sections["controller"]["iterations"] = 5
    run_stage(write_params(tmp_path / "params.yaml", sections))
    assert [r["iteration"] for r in read_records(tmp_path / "rollouts" / "controller_records.jsonl")] == list(range(5))
    logged = []
    for archive in sorted((tmp_path / "comet").glob("*.zip")):
        with zipfile.ZipFile(archive) as z:
            msgs = [json.loads(x) for x in z.read("messages.json").decode().splitlines() if x.strip()]
        logged.append(sorted({m["payload"]["metric"]["step"] for m in msgs if m["type"] == "metric_msg"
                              and m["payload"]["metric"]["metricName"] == "reward"}))
    assert logged == [[0], [3]]


def test_group_samples_leave_one_out_loss_and_resume(setup, tmp_path):
    tr = _trainer(setup, tmp_path / "g", iterations=1, checkpoint_every=0, group_size=3)
    before = {k: v.clone() for k, v in tr.controller.state_dict().items()}
    recs = tr.train()
    assert [r["sample"] for r in recs] == [0, 1, 2] and {r["iteration"] for r in recs} == {0}
    assert len({r["prompt_index"] for r in recs}) == 1  # one prompt/seed per group
    rewards = [r["reward"] for r in recs]
    for k, r in enumerate(recs):
        others = [x for j, x in enumerate(rewards) if j != k]
        assert r["baseline"] == pytest.approx(sum(others) / 2, rel=1e-9, abs=1e-12)
        assert r["policy_loss"] == pytest.approx(-(r["reward"] - r["baseline"]) * r["log_prob_sum"] / 3, rel=1e-5)
    # the update equals one AdamW step on the summed group loss, recomputed by hand
    ref = type(tr.controller)(tr.cfg, tr.layer_keys)
    ref.load_state_dict(before)
    opt = torch.optim.AdamW(ref.parameters(), lr=tr.cfg.lr, weight_decay=tr.cfg.weight_decay)
    logits = ref(tr.inputs["sigma"], tr.inputs["cfg"], tr.inputs["height"], tr.inputs["width"])[:, tr.eligible_cols]
    loss = 0.0
    for r in recs:
        a = torch.tensor(r["mask"], dtype=torch.float32)[:, tr.eligible_cols]
        lp = (a * torch.nn.functional.logsigmoid(logits) + (1 - a) * torch.nn.functional.logsigmoid(-logits)).sum()
        loss = loss - (r["reward"] - r["baseline"]) * lp / 3
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), tr.cfg.grad_clip)
    opt.step()
    for k, v in ref.state_dict().items():
        assert torch.allclose(v, tr.controller.state_dict()[k], atol=1e-6), k
    assert tr.baseline.count == 3  # the EMA saw every reward
    # resume with groups is exact too
    straight = _trainer(setup, tmp_path / "a", iterations=2, checkpoint_every=1, group_size=2)
    rec_a = straight.train()
    _trainer(setup, tmp_path / "b", iterations=1, checkpoint_every=1, group_size=2).train()
    resumed = _trainer(setup, tmp_path / "b", iterations=2, checkpoint_every=1, group_size=2)
    assert resumed.try_resume() and resumed.iteration == 1 and len(resumed.records) == 2
    assert _strip(rec_a) == _strip(resumed.train())
    for k, v in straight.controller.state_dict().items():
        assert torch.equal(v, resumed.controller.state_dict()[k]), k
