"""DreamSim, HPSv2 and pyiqa's BIQA metrics on their real packages and model classes: random weights written
in each package's own file format (tests/helpers/quality_models.py), loaded through the real loading paths
of :mod:`flux2ttr.routing.quality`, scored on small image batches against values recomputed from the
models directly; DreamSim inside a process with ComfyUI's tree on ``sys.path`` (its ``utils`` collision);
one controller-training iteration with each term switched on."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flux2ttr.config import ConfigError
from flux2ttr.routing import quality as Q
from flux2ttr.routing.quality import QualityConfig, QualityDependencyError, QualityLoss, QualityWeightsError
from helpers import quality_models as QM
from helpers.comfy import comfyui_path

REPO = Path(__file__).resolve().parents[2]
HPS_MODEL = "ViT-S-32"  # a small architecture of HPS's model class (open_clip CLIP); HPS v2.1 itself is ViT-H-14
PROMPTS = ["a red fox in snow", "a lighthouse at dusk"]


def _imgs(b: int = 2, h: int = 32, w: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _perturbed(x: torch.Tensor, scale: float, seed: int = 1) -> torch.Tensor:
    return (x + scale * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Random-weight files of every model, written once for the module."""
    tmp = tmp_path_factory.mktemp("quality_models")
    QM.write_dreamsim_cache(tmp / "dreamsim", seed=0)
    QM.write_pyiqa_weights(tmp / "topiq_nr.pth", "topiq_nr", seed=1)
    QM.write_pyiqa_weights(tmp / "topiq_iaa_res50.pth", "topiq_iaa_res50", seed=2)
    QM.write_hps_checkpoint(tmp / "hps.pt", HPS_MODEL, seed=3)
    return {"dreamsim": tmp / "dreamsim", "biqa_quality": tmp / "topiq_nr.pth",
            "biqa_aesthetic": tmp / "topiq_iaa_res50.pth", "hps": tmp / "hps.pt"}


def _config(term: str, files: dict[str, Path], **kw) -> QualityConfig:
    """Defaults (RMSE + cosine at weight 1) plus ``term`` at weight 1, reading ``files``."""
    paths = {"dreamsim": {"dreamsim_cache_dir": str(files["dreamsim"])},
             "hps": {"hps_checkpoint": str(files["hps"]), "hps_model": HPS_MODEL},
             "biqa_quality": {"biqa_quality_weights": str(files["biqa_quality"])},
             "biqa_aesthetic": {"biqa_aesthetic_weights": str(files["biqa_aesthetic"])}}[term]
    return QualityConfig(**{f"{term}_weight": 1.0, **paths, **kw})


@pytest.fixture(scope="module")
def losses(files) -> dict[str, QualityLoss]:
    """One loss per term, each built through the real loader (shared by the metric and training tests)."""
    return {t: QualityLoss(_config(t, files)) for t in ("dreamsim", "hps", "biqa_quality", "biqa_aesthetic")}


def _check_total(total: torch.Tensor, terms: dict[str, float], term: str) -> None:
    assert set(terms) == {"rmse", "cosine", term}
    assert math.isfinite(terms[term]) and terms[term] >= 0
    assert float(total) == pytest.approx(terms["rmse"] + terms["cosine"] + terms[term], rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------------------------------ DreamSim
def test_dreamsim_real_model_loads_the_files(losses, files):
    import dreamsim
    from peft import PeftModel
    from safetensors.torch import load_file

    model, _ = losses["dreamsim"].dreamsim
    assert isinstance(model, PeftModel)
    base = model.get_base_model()
    assert isinstance(base, dreamsim.PerceptualModel) and base.model_list == ["dino_vitb16", "clip_vitb16",
                                                                              "open_clip_vitb16"]
    # the base models come from the folder's files (DINO through torch.hub's cache) ...
    dino = torch.load(files["dreamsim"] / "checkpoints" / QM.DINO_CHECKPOINT, weights_only=True)
    clip = torch.load(files["dreamsim"] / "clip_vitb16_pretrain.pth.tar", weights_only=True)["state_dict"]
    ext = base.extractor_list
    assert torch.equal(ext[0].model.blocks[3].mlp.fc1.weight, dino["blocks.3.mlp.fc1.weight"])
    assert torch.equal(ext[1].model.pos_drop.weight, clip["pos_drop.weight"])
    assert torch.equal(ext[1].proj, clip["proj"])
    # ... and the LoRA adapter from its safetensors file (non-zero lora_B: it changes the distances)
    lora = load_file(str(files["dreamsim"] / "ensemble_lora" / "adapter_model.safetensors"))
    key = next(k for k in lora if "extractor_list.2" in k and "blocks.5" in k and "lora_B" in k)
    loaded = dict(model.named_parameters())
    mine = next(v for k, v in loaded.items() if k.replace(".default", "") == key)
    assert lora[key].abs().sum() > 0 and torch.equal(mine, lora[key])


def test_dreamsim_distance_shape_direction_and_formula(losses):
    ql = losses["dreamsim"]
    model, _ = ql.dreamsim
    t = _imgs(2, 32, 32, seed=3)
    near, far = _perturbed(t, 0.05), _perturbed(t, 0.4)
    rows = ql._dreamsim(far, t)
    assert rows.shape == (2,) and rows.dtype == torch.float64 and torch.isfinite(rows).all()
    same = ql(t, t)[1]["dreamsim"]
    _, t_near = ql(near, t)
    total, t_far = ql(far, t)
    assert same == pytest.approx(0.0, abs=1e-6)
    assert 0 < t_near["dreamsim"] < t_far["dreamsim"]
    _check_total(total, t_far, "dreamsim")
    # DreamSim's distance recomputed from the model's embeddings: 1 - cos at its 224-pixel input
    base = model.get_base_model()
    with torch.no_grad():
        ea, eb = (base.embed(F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False).clamp(0, 1))
                  for x in (far, t))
    want = 1 - (ea.double() * eb.double()).sum(-1) / (ea.double().norm(dim=-1) * eb.double().norm(dim=-1))
    assert t_far["dreamsim"] == pytest.approx(float(want.mean()), rel=1e-4, abs=1e-7)
    assert rows.tolist() == pytest.approx(want.tolist(), rel=1e-4, abs=1e-7)


def test_dreamsim_missing_checkpoint_file_is_named(files, tmp_path):
    import shutil

    cache = tmp_path / "dreamsim"
    shutil.copytree(files["dreamsim"], cache, ignore=shutil.ignore_patterns("checkpoints"))
    with pytest.raises(QualityWeightsError, match=r"lacks checkpoints/dino_vitbase16_pretrain.pth.*dreamsim_cache_dir"):
        QualityLoss(QualityConfig(dreamsim_weight=1.0, dreamsim_cache_dir=str(cache)))
    with pytest.raises(ConfigError, match="dreamsim_type"):
        QualityConfig(dreamsim_type="nonesuch")


_COMFY_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    comfy_root, cache = sys.argv[1], sys.argv[2]
    sys.path.insert(0, comfy_root)  # as inside ComfyUI: its tree first on sys.path
    from flux2ttr.routing.quality import QualityConfig, QualityLoss

    cfg = QualityConfig(rmse_weight=0.0, cosine_weight=0.0, dreamsim_weight=1.0, dreamsim_cache_dir=cache)
    hub_dir = torch.hub.get_dir()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = (x + 0.3 * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    out = {}
    # 1. ComfyUI's utils not imported yet: the hub repo's utils must not stay behind in its place
    out["before"] = QualityLoss(cfg)(y, x)[1]["dreamsim"]
    import utils.json_util  # ComfyUI's utils package (main.py imports utils.extra_config)
    out["utils_after_build"] = sys.modules["utils"].__file__
    # 2. ComfyUI's utils imported (a running ComfyUI): DINO's "from utils import trunc_normal_" must find its own
    out["with_comfy_utils"] = QualityLoss(cfg)(y, x)[1]["dreamsim"]
    out["utils_kept"] = sys.modules["utils"].__file__
    out["hub_dir_kept"] = torch.hub.get_dir() == hub_dir
    # 3. the collision itself: DreamSim's own constructor, without the guard, in the same process
    import dreamsim
    try:
        dreamsim.dreamsim(pretrained=True, device="cpu", cache_dir=cache)
        out["unguarded"] = "built"
    except ImportError as e:
        out["unguarded"] = str(e)
    print("RESULT " + json.dumps(out))
''')


@pytest.mark.slow
def test_dreamsim_inside_comfyui_tree_utils_collision(files, tmp_path):
    root = comfyui_path()
    script = tmp_path / "dreamsim_in_comfy.py"
    script.write_text(_COMFY_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), str(root), str(files["dreamsim"])], capture_output=True,
                          text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    comfy_utils = str(root / "utils" / "__init__.py")
    assert out["utils_after_build"] == comfy_utils and out["utils_kept"] == comfy_utils
    assert out["hub_dir_kept"]
    assert out["before"] > 0 and out["with_comfy_utils"] == pytest.approx(out["before"], rel=1e-6)
    assert "trunc_normal_" in out["unguarded"] and "utils" in out["unguarded"]  # the collision is real


# ------------------------------------------------------------------------------------------ HPSv2
def _hps_reference(model, tokenizer, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """HPS score per row through the CLIP model's own forward (normalised image and text features)."""
    from torchvision.transforms.functional import normalize

    x = F.interpolate(images, size=(224, 224), mode="bicubic", align_corners=False).clamp(0, 1)
    x = normalize(x, list(model.visual.image_mean), list(model.visual.image_std))
    with torch.no_grad():
        img, txt, _ = model(x, tokenizer(prompts))
    return (img.double() * txt.double()).sum(-1)


def test_hps_real_model_loads_the_checkpoint(losses, files):
    from hpsv2.src.open_clip import CLIP

    model, _ = losses["hps"].hps
    assert isinstance(model, CLIP) and not model.training
    sd = torch.load(files["hps"], weights_only=True)["state_dict"]
    assert torch.equal(model.visual.proj, sd["visual.proj"])
    assert torch.equal(model.token_embedding.weight, sd["token_embedding.weight"])


def test_hps_penalty_is_relu_teacher_minus_student(losses):
    ql = losses["hps"]
    model, tokenizer = ql.hps
    t = _imgs(2, 32, 32, seed=4)
    s = _perturbed(t, 0.5, seed=5)
    assert ql(t, t, prompts=PROMPTS)[1]["hps"] == 0.0
    total, terms = ql(s, t, prompts=PROMPTS)
    _check_total(total, terms, "hps")
    ts, ss = _hps_reference(model, tokenizer, t, PROMPTS), _hps_reference(model, tokenizer, s, PROMPTS)
    assert ts.shape == (2,) and torch.isfinite(ts).all() and not torch.allclose(ts, ss)
    assert terms["hps"] == pytest.approx(float(F.relu(ts - ss).mean()), rel=1e-5, abs=1e-8)
    # swapped roles: the other side of the relu; the two add up to the mean absolute score gap
    back = ql(t, s, prompts=PROMPTS)[1]["hps"]
    assert back == pytest.approx(float(F.relu(ss - ts).mean()), rel=1e-5, abs=1e-8)
    assert terms["hps"] + back == pytest.approx(float((ts - ss).abs().mean()), rel=1e-5)
    with pytest.raises(ValueError, match="prompts"):
        ql(s, t)


def test_hps_wrong_checkpoint_and_missing_vocab_are_named(files, tmp_path, monkeypatch):
    with pytest.raises(QualityWeightsError, match=rf"{files['biqa_quality']}: not an HPS checkpoint of {HPS_MODEL}"):
        QualityLoss(QualityConfig(hps_weight=1.0, hps_checkpoint=str(files["biqa_quality"]), hps_model=HPS_MODEL))
    with pytest.raises(ConfigError, match="hps_model"):
        QualityLoss(QualityConfig(hps_weight=1.0, hps_checkpoint=str(files["hps"]), hps_model="ViT-Nonesuch"))
    # hpsv2's wheel ships without its BPE vocabulary: the error names the fix, which copies open_clip's
    target, source = Q._hps_vocab_paths()
    assert target.is_file() and source is not None and target.read_bytes() == source.read_bytes()
    fake = tmp_path / "open_clip" / Q.HPS_VOCAB
    fake.parent.mkdir()
    monkeypatch.setattr(Q, "_hps_vocab_paths", lambda: (fake, source))
    with pytest.raises(QualityDependencyError, match="install-hps-vocab"):
        QualityLoss(QualityConfig(hps_weight=1.0, hps_checkpoint=str(files["hps"]), hps_model=HPS_MODEL))
    assert Q.install_hps_vocab() == fake and fake.read_bytes() == source.read_bytes()


# ------------------------------------------------------------------------------------------ BIQA (pyiqa)
@pytest.mark.parametrize("term,metric", [("biqa_quality", "topiq_nr"), ("biqa_aesthetic", "topiq_iaa_res50")])
def test_biqa_real_metric_loads_the_file_and_penalises_relu(losses, files, term, metric):
    from pyiqa.models.inference_model import InferenceModel

    ql = losses[term]
    m = getattr(ql, term)
    assert isinstance(m, InferenceModel) and m.metric_name == metric and type(m.net).__name__ == "CFANet"
    sd = torch.load(files[term], weights_only=True)["params"]
    for k in ("semantic_model.conv1.weight", "score_linear.1.weight"):  # backbone and head both from the file
        assert torch.equal(m.net.state_dict()[k], sd[k]), k
    assert not m.lower_better  # higher = better: the penalty is relu(teacher - student)
    t = _imgs(2, 32, 32, seed=6)
    s = _perturbed(t, 0.5, seed=7)
    assert ql(t, t)[1][term] == 0.0
    total, terms = ql(s, t)
    _check_total(total, terms, term)
    with torch.no_grad():
        ts, ss = m(t).reshape(-1).double(), m(s).reshape(-1).double()
    assert ts.shape == (2,) and torch.isfinite(ts).all() and not torch.allclose(ts, ss)
    assert terms[term] == pytest.approx(float(F.relu(ts - ss).mean()), rel=1e-6, abs=1e-9)
    back = ql(t, s)[1][term]
    assert terms[term] + back == pytest.approx(float((ts - ss).abs().mean()), rel=1e-6)


def test_biqa_bad_files_and_metrics_are_named(files, tmp_path):
    no_params = tmp_path / "plain.pth"
    torch.save({"weights": {}}, no_params)
    with pytest.raises(QualityWeightsError, match=rf"{no_params}: no 'params'.*quality.biqa_quality_weights"):
        QualityLoss(QualityConfig(biqa_quality_weight=1.0, biqa_quality_weights=str(no_params)))
    with pytest.raises(QualityWeightsError, match=r"not a 'topiq_iaa_res50' checkpoint.*biqa_aesthetic_weights"):
        QualityLoss(QualityConfig(biqa_aesthetic_weight=1.0, biqa_aesthetic_weights=str(files["biqa_quality"])))
    with pytest.raises(ConfigError, match="not a no-reference pyiqa metric"):
        QualityLoss(QualityConfig(biqa_quality_weight=1.0, biqa_quality_metric="lpips",
                                  biqa_quality_weights=str(files["biqa_quality"])))


# ------------------------------------------------------------------------------------------ controller training
@pytest.fixture(scope="module")
def training_setup(tmp_path_factory):
    from flux2ttr.routing.rollouts import RolloutConfig, record_rollouts, write_store
    from helpers.rollouts import PROMPTS as RPROMPTS
    from helpers.rollouts import make_students, make_teacher

    tmp = tmp_path_factory.mktemp("ct_quality")
    teacher = make_teacher(tmp / "teacher")
    keys = teacher.single_layer_keys
    students = make_students(tmp / "students.safetensors", teacher, {k: True for k in keys})
    rcfg = RolloutConfig(num_prompts=2, eval_prompts=1, steps=2, height=32, width=32, seed=3)
    rollouts, _ = record_rollouts(teacher, rcfg, RPROMPTS, show_progress=False)
    store = write_store(tmp / "rollouts", rollouts, setting=rcfg.setting(), teacher=teacher.identity)
    return teacher, students, store


@pytest.mark.parametrize("term", ["dreamsim", "hps", "biqa_quality", "biqa_aesthetic"])
def test_one_controller_iteration_with_the_term_on(training_setup, losses, tmp_path, term):
    from flux2ttr.routing.rollouts import RolloutStore
    from flux2ttr.routing.training import ControllerTrainConfig, ControllerTrainer
    from flux2ttr.students.artifacts import load_students

    teacher, students, store = training_setup
    cfg = ControllerTrainConfig(checkpoint_dir=str(tmp_path / "ckpt"), iterations=1, group_size=2, checkpoint_every=0)
    tr = ControllerTrainer(cfg, teacher, load_students(students), RolloutStore(store), losses[term], show_progress=False)
    before = {k: v.clone() for k, v in tr.controller.state_dict().items()}
    recs = tr.train()
    assert len(recs) == 2
    for rec in recs:
        q = rec["quality_terms"]
        assert set(q) == {"rmse", "cosine", term} and math.isfinite(q[term]) and q[term] >= 0
        assert rec["quality_loss"] == pytest.approx(q["rmse"] + q["cosine"] + q[term], rel=1e-9, abs=1e-12)
        want = (-rec["quality_loss"] - cfg.lambda_eff * abs(rec["full_ratio"] - (1 - cfg.target_ttr_ratio))
                + cfg.lambda_entropy * rec["entropy"])
        assert rec["reward"] == pytest.approx(want, rel=1e-6, abs=1e-9)
    # the term reached the update: the group's rewards differ, so the policy moved
    assert recs[0]["reward"] != recs[1]["reward"]
    assert any(not torch.equal(before[k], v) for k, v in tr.controller.state_dict().items())
