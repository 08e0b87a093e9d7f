"""The tiny teacher: single-file round trip, diffusers loading, attention shape, prompt encoder, errors."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from flux2ttr.config import ConfigError, from_dict
from flux2ttr.contract import FLUX2_COND_TOKENS
from flux2ttr.teachers.router import AttentionRouter
from flux2ttr.teachers.sampler import SamplerConfig, sample
from flux2ttr.teachers.teacher import (
    EXTRAS_FILE_NAME,
    IDENTITY_FILE_NAME,
    SINGLE_FILE_NAME,
    DiffusersDecoder,
    Teacher,
    TeacherConfig,
    TeacherError,
    build_tiny_transformer,
    diffusers_to_bfl,
    file_sha256,
    load_diffusers_vae,
    load_teacher,
    load_transformer,
    write_tiny_teacher,
)
from stages.teacher import run_stage


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The default tiny teacher written once to a temp folder: (cfg, folder)."""
    folder = tmp_path_factory.mktemp("teacher") / "tiny"
    cfg = TeacherConfig(kind="tiny", out_dir=str(folder))
    write_tiny_teacher(cfg)
    return cfg, folder


@pytest.fixture(scope="module")
def teacher(written) -> Teacher:
    return load_teacher(written[0])


def test_files_and_identity(written):
    cfg, folder = written
    for name in (SINGLE_FILE_NAME, EXTRAS_FILE_NAME, IDENTITY_FILE_NAME, "transformer/config.json"):
        assert (folder / name).is_file(), name
    ident = json.loads((folder / IDENTITY_FILE_NAME).read_text())
    assert ident["kind"] == "tiny"
    assert ident["sha256"] == file_sha256(folder / SINGLE_FILE_NAME)
    assert ident["config"]["seed"] == cfg.seed
    conf = json.loads((folder / "transformer" / "config.json").read_text())
    assert conf["attention_head_dim"] == 128 and conf["axes_dims_rope"] == [32, 32, 32, 32]
    assert conf["num_attention_heads"] == 2 and conf["num_single_layers"] == 4 and conf["num_layers"] == 1
    assert not list(folder.parent.glob(".tiny.tmp-*")), "temp folder left behind"


def test_single_file_layout_is_what_comfyui_detects(written):
    """The keys comfy/model_detection.py needs to detect FLUX.2 and derive its config."""
    from safetensors import safe_open

    with safe_open(str(written[1] / SINGLE_FILE_NAME), "pt") as f:
        keys = set(f.keys())
        img_in = f.get_slice("img_in.weight").get_shape()
        txt_in = f.get_slice("txt_in.weight").get_shape()
    assert "double_stream_modulation_img.lin.weight" in keys  # marks FLUX.2
    assert "double_blocks.0.img_attn.norm.key_norm.scale" in keys
    assert "guidance_in.in_layer.weight" in keys
    assert img_in == [256, 128] and txt_in == [256, 64]  # hidden = 2 heads x 128; ctx 64
    assert {k.split(".")[1] for k in keys if k.startswith("single_blocks.")} == {"0", "1", "2", "3"}
    assert not any(k.startswith(("transformer_blocks", "single_transformer_blocks", "x_embedder")) for k in keys)


def test_single_file_round_trip_equals_built_model(written, teacher):
    cfg, _ = written
    built = build_tiny_transformer(cfg).state_dict()
    loaded = teacher.transformer.state_dict()
    assert built.keys() == loaded.keys()
    for k in built:
        assert torch.equal(built[k], loaded[k]), k


def test_bfl_conversion_is_diffusers_inverse(written):
    """diffusers' own converter maps our single-file dict back to the diffusers state dict exactly."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    built = build_tiny_transformer(TeacherConfig(num_single=1, seed=3)).state_dict()
    back = convert_flux2_transformer_checkpoint_to_diffusers(diffusers_to_bfl(built))
    assert back.keys() == built.keys()
    for k in built:
        assert torch.equal(back[k], built[k]), k
    with pytest.raises(TeacherError, match="cannot map"):
        diffusers_to_bfl({"mystery.weight": torch.zeros(1)})


def test_denoise_matches_direct_transformer_call(teacher):
    """ids (0,row,col,0) / (0,0,0,i), timestep = sigma, guidance = g, as ComfyUI feeds FLUX.2."""
    h, w = 3, 4
    assert Teacher.image_ids(h, w)[5].tolist() == [0, 1, 1, 0]
    assert Teacher.text_ids(6)[5].tolist() == [0, 0, 0, 5]
    x = torch.randn(2, h * w, 128, generator=torch.Generator().manual_seed(1))
    cond = teacher.encode_prompts(["a fox", "a city"])
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.zeros(h * w), rows.flatten(), cols.flatten(), torch.zeros(h * w)], -1)
    txt_ids = torch.stack([torch.zeros(512), torch.zeros(512), torch.zeros(512), torch.arange(512.0)], -1)
    with torch.no_grad():
        ref = teacher.transformer(hidden_states=x, encoder_hidden_states=cond, timestep=torch.tensor([0.6, 0.6]),
                                  img_ids=img_ids, txt_ids=txt_ids, guidance=torch.tensor([3.5, 3.5]),
                                  return_dict=False)[0]
        out = teacher.denoise(x, 0.6, cond, 3.5, h, w)
    assert out.shape == (2, h * w, 128)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="height"):
        teacher.denoise(x, 0.6, cond, 3.5, h, w + 1)


def test_teacher_attributes(teacher, written):
    assert teacher.num_heads == 2 and teacher.head_dim == 128 and teacher.cond_tokens == 512
    assert teacher.single_layer_keys == [f"single_blocks.{i}" for i in range(4)]
    assert teacher.identity["kind"] == "tiny"
    assert teacher.identity["sha256"] == file_sha256(written[1] / SINGLE_FILE_NAME)


def test_prompt_encoder_deterministic_left_padded(teacher, written):
    a = teacher.encode_prompts(["A red fox, in the snow", "a city at night"])
    b = teacher.encode_prompts(["A red fox, in the snow"])
    again = load_teacher(written[0]).encode_prompts(["A red fox, in the snow"])
    assert a.shape == (2, FLUX2_COND_TOKENS, 64)
    assert torch.equal(a[:1], b) and torch.equal(b, again)
    n = 7  # a, red, fox, ",", in, the, snow
    assert torch.count_nonzero(a[0, : FLUX2_COND_TOKENS - n]) == 0
    assert (a[0, FLUX2_COND_TOKENS - n:].abs().sum(-1) > 0).all()
    assert not torch.allclose(a[0, -4:], a[1, -4:])  # different prompts differ
    assert not torch.equal(teacher.encode_prompts(["fox red"]), teacher.encode_prompts(["red fox"]))  # order
    assert torch.count_nonzero(teacher.encode_prompts([""])) == 0


def test_decoder_range_shape_and_determinism(teacher):
    lat = torch.randn(2, 6, 128, generator=torch.Generator().manual_seed(0))
    img = teacher.decode(lat, 2, 3)
    assert img.shape == (2, 3, 32, 48)
    assert img.min() >= 0.0 and img.max() <= 1.0 and img.std() > 0.05
    assert torch.equal(img, teacher.decode(lat, 2, 3))
    # token (row 1, col 2) decodes to its own 16x16 patch
    lat2 = lat.clone()
    lat2[0, 1 * 3 + 2] += 1.0
    diff = (teacher.decode(lat2, 2, 3) - img)[0].abs().sum(0)
    assert diff[16:32, 32:48].min() >= 0 and diff[16:32, 32:48].sum() > 0
    diff[16:32, 32:48] = 0
    assert diff.sum() == 0


def _attention_stats(teacher: Teacher, h: int, w: int, steps: int = 2):
    """Per single layer: mean entropy of image-query rows, mean mass within radius 2 on the grid (image
    keys), mean text mass; fp64 softmax from the observed post-RoPE q, k."""
    stats = {}
    rows = torch.arange(h * w) // w
    cols = torch.arange(h * w) % w
    dist = ((rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2).double().sqrt()

    def observe(key, q, k, v, out, n_cond, state):
        p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        ref = p @ v.double()
        assert torch.allclose(out.double(), ref, atol=1e-4, rtol=1e-4)
        p_img = p[:, :, n_cond:]  # image queries [B, H, hw, N]
        ent = -(p_img * p_img.clamp_min(1e-300).log()).sum(-1).mean().item()
        local = (p_img[..., n_cond:] * (dist <= 2)).sum(-1).mean().item()
        text = p_img[..., :n_cond].sum(-1).mean().item()
        stats.setdefault(key, []).append((ent, local, text))

    router = AttentionRouter()
    router.add_observer(observe, layers=teacher.single_layer_keys)
    sample(teacher, ["a red fox in the snow", "a lighthouse on a cliff at dusk"],
           SamplerConfig(steps=steps, height=16 * h, width=16 * w), router=router)
    return {key: tuple(sum(x) / len(x) for x in zip(*vals)) for key, vals in stats.items()}


def test_tiny_attention_is_peaked_local_with_text_mass(teacher):
    h = w = 16
    stats = _attention_stats(teacher, h, w)
    log_n = math.log(FLUX2_COND_TOKENS + h * w)
    assert set(stats) == set(teacher.single_layer_keys)
    for key, (ent, local, text) in stats.items():
        assert ent < 0.5 * log_n, (key, ent, log_n)  # far from uniform (measured ~2.2 of 6.64 nats)
        assert ent > 0.5, (key, ent)  # and not one-hot
        assert local > 0.6, (key, local)  # mostly within radius 2 of the query (measured ~0.8)
        assert 0.005 < text < 0.5, (key, text)  # some text mass (measured ~0.02-0.07)


def test_random_weights_are_near_uniform_by_contrast():
    """The same architecture without the shaping has near-uniform attention: the test above can fail."""
    cfg = TeacherConfig(num_single=1, qk_norm_scale=1.0, pos_fraction=0.0)
    model = build_tiny_transformer(cfg)
    t = Teacher(model, {"kind": "tiny"}, encoder=lambda p: torch.randn(len(p), 512, 64), decoder=None)
    stats = _attention_stats(t, 8, 8, steps=1)
    ent, local, _ = stats["single_blocks.0"]
    assert ent > 0.75 * math.log(512 + 64)
    assert local < 0.3


def test_diffusers_folder_loading(tmp_path, teacher):
    """The diffusers kind's loader on the tiny config saved in diffusers' own folder format."""
    repo = tmp_path / "flux2-tiny-diffusers"
    teacher.transformer.save_pretrained(str(repo / "transformer"))
    for path in (repo, repo / "transformer"):
        model = load_transformer(path)
        ref = teacher.transformer.state_dict()
        for k, v in model.state_dict().items():
            assert torch.equal(v, ref[k]), k
    with pytest.raises(TeacherError, match="without config.json"):
        load_transformer(tmp_path)


def test_diffusers_vae_loading_and_decode(tmp_path):
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=32,
                             norm_num_groups=4)
    vae.save_pretrained(str(tmp_path / "vae"))
    loaded = load_diffusers_vae(tmp_path)
    dec = DiffusersDecoder(loaded.eval())
    img = dec(torch.randn(1, 4 * 5, 128), 4, 5)
    # 2x2 unpatchify then the VAE's 2x upsampling (two blocks)
    assert img.shape == (1, 3, 16, 20)
    assert img.min() >= 0 and img.max() <= 1
    with pytest.raises(TeacherError, match="teacher.vae"):
        load_diffusers_vae(tmp_path / "nothing")


def test_missing_paths_give_clear_errors(tmp_path, written):
    with pytest.raises(TeacherError, match=r"teacher\.transformer is empty"):
        load_teacher(TeacherConfig(kind="diffusers"))
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(TeacherError, match=r"teacher\.transformer: .*nope\.safetensors does not exist"):
        load_teacher(TeacherConfig(kind="diffusers", transformer=str(missing)))
    single = str(written[1] / SINGLE_FILE_NAME)
    with pytest.raises(TeacherError, match=r"teacher\.transformer_config"):
        load_teacher(TeacherConfig(kind="diffusers", transformer=single))
    with pytest.raises(TeacherError, match=r"teacher\.text_encoder: .*te does not exist"):
        load_teacher(TeacherConfig(kind="diffusers", transformer=single, transformer_config=str(written[1]),
                                   text_encoder=str(tmp_path / "te"), vae=str(tmp_path)))
    with pytest.raises(TeacherError, match=r"teacher\.out_dir: .*flux2ttr teacher"):
        load_teacher(TeacherConfig(out_dir=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="kind"):
        from_dict(TeacherConfig, {"kind": "huge"})


def test_run_stage_diffusers_writes_identity(tmp_path, written):
    te = tmp_path / "te"
    te.mkdir()
    params = tmp_path / "params.yaml"
    out = tmp_path / "teachers" / "real"
    params.write_text(json.dumps({"teacher": {
        "kind": "diffusers", "out_dir": str(out), "transformer": str(written[1] / SINGLE_FILE_NAME),
        "transformer_config": str(written[1]), "text_encoder": str(te), "vae": str(tmp_path)}}))
    run_stage(params)
    ident = json.loads((out / IDENTITY_FILE_NAME).read_text())
    assert ident["kind"] == "diffusers" and ident["sha256"] == file_sha256(written[1] / SINGLE_FILE_NAME)


def test_write_is_atomic(tmp_path, monkeypatch):
    """A failing rewrite leaves the previous teacher folder intact and no temp folder."""
    import flux2ttr.teachers.teacher as teacher_mod

    cfg = TeacherConfig(out_dir=str(tmp_path / "tiny"), num_single=1)
    write_tiny_teacher(cfg)
    before = file_sha256(tmp_path / "tiny" / SINGLE_FILE_NAME)

    def boom(_cfg):
        raise RuntimeError("disk full")

    monkeypatch.setattr(teacher_mod, "build_tiny_codec", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_tiny_teacher(TeacherConfig(out_dir=str(tmp_path / "tiny"), num_single=1, seed=9))
    assert file_sha256(tmp_path / "tiny" / SINGLE_FILE_NAME) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    monkeypatch.undo()
    # a writer killed mid-way (a dead pid's temp folder) is cleaned up by the next write; a live one's is kept
    (tmp_path / ".tiny.tmp-999999999-x").mkdir()
    (tmp_path / f".tiny.tmp-{os.getppid()}-y").mkdir()
    write_tiny_teacher(TeacherConfig(out_dir=str(tmp_path / "tiny"), num_single=1, seed=9))
    assert file_sha256(tmp_path / "tiny" / SINGLE_FILE_NAME) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".tiny.tmp-{os.getppid()}-y", "tiny"]


def test_comfyui_detects_and_runs_the_file(comfy, written, teacher):
    """Real ComfyUI: detection says FLUX.2 with the tiny shapes, and its denoiser agrees with diffusers'."""
    import comfy.model_detection
    import comfy.sd
    import comfy.utils

    path = str(written[1] / SINGLE_FILE_NAME)
    conf = comfy.model_detection.detect_unet_config(comfy.utils.load_torch_file(path), "")
    assert conf["image_model"] == "flux2"
    assert (conf["num_heads"], conf["hidden_size"], conf["context_in_dim"]) == (2, 256, 64)
    assert (conf["depth"], conf["depth_single_blocks"], conf["in_channels"]) == (1, 4, 128)
    dm = comfy.sd.load_diffusion_model(path).model.diffusion_model
    h, w = 4, 4
    x = torch.randn(2, 128, h, w, generator=torch.Generator().manual_seed(0))
    cond = teacher.encode_prompts(["a red fox", "two cats"])
    with torch.no_grad():
        ref = dm(x, torch.tensor([0.7, 0.7]), cond, guidance=torch.tensor([4.0, 4.0])).flatten(2).transpose(1, 2)
        out = teacher.denoise(x.flatten(2).transpose(1, 2), 0.7, cond, 4.0, h, w)
    # the loader gives the QK norms ComfyUI's epsilon, so the two agree to float32 rounding
    assert ((out - ref).norm() / ref.norm()).item() < 2e-6


def test_loading_prints_no_empty_float32_warning(written):
    """from_single_file casts with to(dtype) and diffusers then warns about an empty list of float32
    modules on every load (four times a dvc repro); the loader keeps that noise out, nothing else."""
    import logging

    from flux2ttr.teachers.teacher import load_tiny_teacher

    seen: list[str] = []

    class Record(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    log = logging.getLogger("diffusers.models.modeling_utils")
    handler = Record()
    log.addHandler(handler)
    try:
        cfg, folder = written
        load_tiny_teacher(cfg, folder)
        log.warning("another diffusers warning")  # still passes: the filter is scoped and specific
    finally:
        log.removeHandler(handler)
    assert not [m for m in seen if "should be kept in float32" in m]
    assert "another diffusers warning" in seen


def test_a_folder_of_another_kind_is_refused_with_the_fix(written):
    """teacher.kind changed without rerunning the teacher stage: the folder's identity names what it holds."""
    cfg, folder = written
    trained = TeacherConfig(kind="trained", out_dir=str(folder))
    with pytest.raises(TeacherError, match=r"holds the tiny teacher, but teacher.kind is trained; run `flux2ttr "
                                           r"teacher` .* or set teacher.kind: tiny"):
        load_teacher(trained)
