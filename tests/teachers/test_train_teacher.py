"""Training the tiny teacher on CPU: the loss falls on a fixed batch, a resumed run is the uninterrupted one,
guidance distillation aims at the EMA's guided velocity, and the exported fp16 file becomes the
``teacher.kind: trained`` folder the pipeline loads through ``from_single_file``, equal to the trained model."""

from __future__ import annotations

import copy
import dataclasses
import json
import multiprocessing
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from flux2ttr.atomic import file_sha256
from flux2ttr.config import ConfigError
from flux2ttr.teachers import scenes as sc
from flux2ttr.teachers import train_teacher as tt
from flux2ttr.teachers.teacher import (
    EXTRAS_FILE_NAME,
    IDENTITY_FILE_NAME,
    SINGLE_FILE_NAME,
    TeacherConfig,
    TeacherError,
    load_teacher,
)
from flux2ttr.teachers.trained import read_trained_file, sha256_path, write_trained_teacher

REPO = Path(__file__).resolve().parents[2]
SCENES = sc.SceneConfig()


def small(tmp: Path, **kw) -> tt.TrainTeacherConfig:
    """One head, 1 double + 1 single block, 128 px: a few steps take a second on one CPU thread."""
    base = dict(num_heads=1, num_double=1, num_single=1, context_dim=16, height=128, width=128, batch_size=4,
                steps=6, warmup_steps=2, lr=2e-3, checkpoint_every=3, log_every=2, eval_captions=0,
                checkpoint=str(tmp / "ckpt" / "state.safetensors"), out_file=str(tmp / "out" / "trained.safetensors"))
    base.update(kw)
    return tt.TrainTeacherConfig(**base)


def randomize_ema(trainer: tt.Trainer, seed: int = 0) -> None:
    """Give every EMA weight a seeded perturbation, so a file written after a few steps exercises every layer
    (the zero-initialised modulations and output would otherwise make the model output 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(trainer.ema_model.parameters()) + list(trainer.ema_encoder.parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_loss_goes_down_on_a_fixed_batch(tmp_path):
    cfg = small(tmp_path, lr=3e-3, warmup_steps=1)
    trainer = tt.Trainer(cfg, SCENES)
    batch = tt.make_batch(cfg, SCENES, trainer.lmap, 0, trainer.device)
    losses = []
    for _ in range(25):
        loss = trainer.loss_on(batch)
        trainer.opt.zero_grad()
        loss.backward()
        trainer.opt.step()
        losses.append(float(loss.detach()))
    # zero-initialised output: the first loss is E|noise - x0|^2 ~ 1 + E|x0|^2 (latents ~unit RMS)
    assert 1.5 < losses[0] < 2.8
    assert losses[-1] < 0.6 * losses[0], losses
    assert sum(losses[-5:]) < sum(losses[:5])


def test_batches_are_deterministic_and_follow_the_schedule(tmp_path):
    cfg = small(tmp_path, batch_size=64)
    lmap = tt.Trainer(cfg, SCENES).lmap
    a, b = (tt.make_batch(cfg, SCENES, lmap, 1, torch.device("cpu")) for _ in range(2))
    assert a.captions == b.captions and torch.equal(a.x0, b.x0) and torch.equal(a.noise, b.noise)
    assert torch.equal(a.sigma, b.sigma)
    c = tt.make_batch(cfg, SCENES, lmap, 2, torch.device("cpu"))
    assert c.captions != a.captions and not torch.equal(c.noise, a.noise)
    assert a.x0.shape == (64, 64, 128) and a.sigma.min() > 0 and a.sigma.max() < 1
    assert float(a.sigma.median()) > 0.6  # FLUX.2's shift (mu ~1.7 at 64 tokens): training leans to high noise
    assert 0 < sum(c == "" for c in a.captions) < 20  # ~10% caption dropout
    assert all(not sc.is_held_out(cap, SCENES.holdout_percent) for cap in a.captions if cap)
    assert a.distill_rows == 0 and bool((a.guidance == 1.0).all())  # before distill_start: guidance 1
    late = tt.make_batch(cfg, SCENES, lmap, cfg.steps - 1, torch.device("cpu"))
    k = late.distill_rows
    assert k == 32 and all(late.captions[:k]) and bool((late.guidance[k:] == 1.0).all())
    assert float(late.guidance[:k].min()) >= cfg.guidance_min and float(late.guidance[:k].max()) <= cfg.guidance_max
    plain = tt.make_batch(dataclasses.replace(cfg, distill_fraction=0.0), SCENES, lmap, cfg.steps - 1,
                          torch.device("cpu"))
    assert plain.distill_rows == 0 and float(plain.guidance.std()) > 0.5  # no distillation: random guidance


def test_lr_schedule(tmp_path):
    cfg = small(tmp_path, steps=100, warmup_steps=10, lr=1e-3, lr_min_ratio=0.1)
    assert tt.lr_at(cfg, 0) == pytest.approx(1e-4) and tt.lr_at(cfg, 9) == pytest.approx(1e-3)
    assert tt.lr_at(cfg, 10) == pytest.approx(1e-3) and tt.lr_at(cfg, 100) == pytest.approx(1e-4)


def test_guidance_distillation_aims_at_the_ema_guided_velocity(tmp_path):
    cfg = small(tmp_path, batch_size=4, distill_start=0.0, distill_fraction=0.5)
    trainer = tt.Trainer(cfg, SCENES)
    randomize_ema(trainer)
    batch = tt.make_batch(cfg, SCENES, trainer.lmap, 2, trainer.device)
    assert batch.distill_rows == 2
    loss = trainer.loss_on(batch)
    # by hand: rows 0-1 towards v_u + g (v_c - v_u) of the EMA at guidance 1, rows 2-3 towards noise - x0
    s = batch.sigma.view(-1, 1, 1)
    x = (1 - s) * batch.x0 + s * batch.noise
    with torch.no_grad():
        cond = trainer.ema_encoder(batch.captions[:2])
        ones = torch.ones(2)
        v_c = tt.velocity(trainer.ema_model, x[:2], batch.sigma[:2], cond, ones, 8, 8)
        v_u = tt.velocity(trainer.ema_model, x[:2], batch.sigma[:2], torch.zeros_like(cond), ones, 8, 8)
        target = torch.cat([v_u + batch.guidance[:2].view(-1, 1, 1) * (v_c - v_u), (batch.noise - batch.x0)[2:]])
        v = tt.velocity(trainer.model, x, batch.sigma, trainer.encoder(batch.captions), batch.guidance, 8, 8)
    assert float((v_c - v_u).abs().mean()) > 1e-3  # the caption matters to the perturbed EMA
    torch.testing.assert_close(loss.detach(), torch.nn.functional.mse_loss(v, target), rtol=1e-5, atol=1e-7)


def test_resume_is_the_uninterrupted_run(tmp_path):
    whole = small(tmp_path / "a", steps=5, checkpoint_every=100)
    tt.train(whole, SCENES, command="whole", log=lambda _: None)
    parts = small(tmp_path / "b", steps=5, checkpoint_every=100)
    first = tt.train(parts, SCENES, command="part 1", stop_after=2, log=lambda _: None)
    assert first.steps == 2
    second = tt.train(parts, SCENES, command="part 2", log=lambda _: None)
    assert second.steps == 5
    with safe_open(whole.checkpoint, "pt") as fa, safe_open(parts.checkpoint, "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        for k in fa.keys():
            assert torch.equal(fa.get_tensor(k), fb.get_tensor(k)), k  # weights, EMA, AdamW moments
    header, _, _ = read_trained_file(parts.out_file)
    assert header["commands"] == ["part 1", "part 2"] and header["steps"] == 5
    # a checkpoint of another config is refused, not resumed
    from flux2ttr.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="another training config"):
        tt.train(dataclasses.replace(parts, lr=1e-4, steps=6), SCENES, log=lambda _: None)


def test_warm_start_takes_a_trained_files_weights_and_records_it(tmp_path):
    """train_teacher.init_file: a run starts from an exported file's weights (fp16, as shipped) in model, EMA
    and encoders, with fresh AdamW and its own schedule; its export records that file and its history, a
    resumed warm-started run is the uninterrupted one, and a file of another arch or scene set is refused."""
    first = small(tmp_path / "a", steps=2)
    trainer = tt.Trainer(first, SCENES)
    trainer.step()
    trainer.step()
    trainer.commands.append("first run")
    randomize_ema(trainer)
    sha = trainer.export(first.out_file)

    warm = small(tmp_path / "b", steps=3, checkpoint_every=100, init_file=first.out_file)
    started = tt.Trainer(warm, SCENES)
    started.warm_start(warm.init_file)
    want = {k: v.half().float() for k, v in trainer.ema_model.state_dict().items()}
    for module in (started.model, started.ema_model):
        got = module.state_dict()
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
    for enc in (started.encoder, started.ema_encoder):
        assert torch.equal(enc.token, trainer.ema_encoder.token) and torch.equal(enc.position,
                                                                                 trainer.ema_encoder.position)
    assert started.step_done == 0 and not started.opt.state  # fresh AdamW
    started.close()

    whole = tt.train(warm, SCENES, command="warm", log=lambda _: None)
    header, _, _ = read_trained_file(warm.out_file)
    assert header["steps"] == 3 and header["commands"] == ["warm"]
    assert header["init"] == {"file": "trained.safetensors", "sha256": sha, "steps": 2, "commands": ["first run"],
                              "eval": None, "init": None}
    # resumed from its checkpoint (not warm-started again): the same run
    parts = dataclasses.replace(warm, checkpoint=str(tmp_path / "c" / "state.safetensors"),
                                out_file=str(tmp_path / "c" / "trained.safetensors"))
    tt.train(parts, SCENES, command="warm 1", stop_after=1, log=lambda _: None)
    again = tt.train(parts, SCENES, command="warm 2", log=lambda _: None)
    assert again.steps == whole.steps == 3 and again.losses[-1] == whole.losses[-1]
    with safe_open(warm.checkpoint, "pt") as fa, safe_open(parts.checkpoint, "pt") as fb:
        for k in fa.keys():
            assert torch.equal(fa.get_tensor(k), fb.get_tensor(k)), k
    assert read_trained_file(parts.out_file)[0]["init"]["sha256"] == sha

    other_arch = small(tmp_path / "d", num_heads=2, init_file=first.out_file)
    with pytest.raises(ConfigError, match="another arch"):
        tt.train(other_arch, SCENES, log=lambda _: None)
    with pytest.raises(ConfigError, match="another scenes"):
        tt.train(small(tmp_path / "e", init_file=first.out_file), dataclasses.replace(SCENES, stripe_prob=0.5),
                 log=lambda _: None)


@pytest.mark.parametrize("grow", [{"num_single": 2}, {"num_double": 2, "num_single": 3}])
def test_warm_start_grows_a_smaller_file_into_the_same_function(tmp_path, grow):
    """A file with fewer blocks (same heads and context width) warm-starts a deeper model: its blocks first,
    the new ones with zeroed output projections, so the grown model's velocity is the file's (to fp32
    rounding); the new blocks still learn (their zeroed projections get gradients) and the header says what
    it grew from. A shallower model than the file is refused."""
    first = small(tmp_path / "a", steps=1)
    trainer = tt.Trainer(first, SCENES)
    randomize_ema(trainer)
    trainer.export(first.out_file)
    source = copy.deepcopy(trainer.ema_model)  # the exported weights, as the file holds them (fp16)
    with torch.no_grad():
        for p in source.parameters():
            p.copy_(p.half().float())
    trainer.close()

    grown_cfg = small(tmp_path / "b", steps=1, init_file=first.out_file, **grow)
    grown = tt.Trainer(grown_cfg, SCENES)
    grown.warm_start(first.out_file)
    assert grown.init["grown_from"] == first.arch
    batch = tt.make_batch(grown_cfg, SCENES, grown.lmap, 0, torch.device("cpu"))
    s = batch.sigma.view(-1, 1, 1)
    x = (1 - s) * batch.x0 + s * batch.noise
    cond = grown.ema_encoder(batch.captions)
    h, w = grown.h, grown.w
    with torch.no_grad():
        want = tt.velocity(source, x, batch.sigma, cond, batch.guidance, h, w)
        for module in (grown.model, grown.ema_model):
            got = tt.velocity(module, x, batch.sigma, cond, batch.guidance, h, w)
            assert want.abs().max() > 0.1
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    new_single = f"single_transformer_blocks.{grow['num_single'] - 1}.attn.to_out.weight"
    assert float(dict(grown.model.named_parameters())[new_single].detach().abs().max()) == 0.0
    grown.step()
    assert float(dict(grown.model.named_parameters())[new_single].detach().abs().max()) > 0.0
    grown.close()

    deeper = small(tmp_path / "c", steps=1, num_single=3)
    tt.train(deeper, SCENES, log=lambda _: None)
    shallower = tt.Trainer(small(tmp_path / "d", num_single=2), SCENES)
    with pytest.raises(ConfigError, match="another arch"):
        shallower.warm_start(deeper.out_file)
    shallower.close()


def test_zero_new_block_outputs_names_the_projections():
    model = tt.build_model(tt.TrainTeacherConfig(num_heads=1, num_double=2, num_single=2, context_dim=16))
    zeroed = tt.zero_new_block_outputs(model, {"num_heads": 1, "num_double": 1, "num_single": 1, "context_dim": 16})
    assert zeroed == ["transformer_blocks.1.attn.to_out.0.weight", "transformer_blocks.1.attn.to_add_out.weight",
                      "transformer_blocks.1.ff.linear_out.weight", "transformer_blocks.1.ff_context.linear_out.weight",
                      "single_transformer_blocks.1.attn.to_out.weight"]
    assert tt.can_grow({"num_heads": 1, "num_double": 1, "num_single": 1, "context_dim": 16},
                       {"num_heads": 1, "num_double": 1, "num_single": 3, "context_dim": 16})
    assert not tt.can_grow({"num_heads": 1, "num_double": 1, "num_single": 1, "context_dim": 16},
                           {"num_heads": 2, "num_double": 1, "num_single": 3, "context_dim": 16})


def test_scene_worker_processes_train_the_same_run(tmp_path):
    """scene_workers draws the batches ahead in spawned processes (the GIL stays free for launching kernels):
    the run, weights and EMA and AdamW moments, is the one the in-process thread trains; the workers end with it."""
    thread = small(tmp_path / "t", steps=3, checkpoint_every=100)
    procs = small(tmp_path / "p", steps=3, checkpoint_every=100, scene_workers=2)
    a = tt.train(thread, SCENES, log=lambda _: None)
    b = tt.train(procs, SCENES, log=lambda _: None)
    assert a.losses == b.losses
    with safe_open(thread.checkpoint, "pt") as fa, safe_open(procs.checkpoint, "pt") as fb:
        for k in fa.keys():
            assert torch.equal(fa.get_tensor(k), fb.get_tensor(k)), k
    assert not multiprocessing.active_children()


def test_compiled_forwards_train_the_same_run(tmp_path):
    """train_teacher.compile: the training and distillation forwards go through torch.compile (aot_eager here:
    the graph capture and autograd of the GPU's inductor, without a C++ toolchain); the losses and weights match
    the eager run to float32 rounding, and the checkpoint keeps the plain keys."""
    eager = small(tmp_path / "e", steps=4, checkpoint_every=100, distill_start=0.5)
    comp = small(tmp_path / "c", steps=4, checkpoint_every=100, distill_start=0.5, compile="aot_eager")
    from torch._dynamo.utils import counters

    a = tt.train(eager, SCENES, log=lambda _: None)
    counters.clear()
    b = tt.train(comp, SCENES, log=lambda _: None)
    assert counters["stats"]["unique_graphs"] >= 2  # the model's and the EMA's (distillation) forwards compiled
    assert [s for s, _ in a.losses] == [s for s, _ in b.losses]
    assert max(abs(x - y) for (_, x), (_, y) in zip(a.losses, b.losses)) < 1e-4
    with safe_open(eager.checkpoint, "pt") as fa, safe_open(comp.checkpoint, "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        worst = max(float((fa.get_tensor(k) - fb.get_tensor(k)).abs().max()) for k in fa.keys())
    assert worst < 1e-4


def test_exported_file_is_the_trained_teacher(tmp_path):
    cfg = small(tmp_path, steps=2)
    trainer = tt.Trainer(cfg, SCENES)
    trainer.step()
    trainer.commands.append("flux2ttr train-teacher --test")
    randomize_ema(trainer)
    sha = trainer.export(cfg.out_file, {"pass_rate": 0.0})
    out = Path(cfg.out_file)
    assert sha == file_sha256(out) and sha256_path(out).read_text().split() == [sha, out.name]
    header, bfl, codec = read_trained_file(out)
    assert header["kind"] == "trained" and header["seed"] == cfg.seed and header["steps"] == 1
    assert header["commands"] == ["flux2ttr train-teacher --test"] and header["arch"] == cfg.arch
    assert header["vocab"][0] == "<unk>" and header["eval"] == {"pass_rate": 0.0}
    assert "double_stream_modulation_img.lin.weight" in bfl and {v.dtype for v in bfl.values()} == {torch.float16}
    assert {v.dtype for v in codec.values()} == {torch.float32}

    # the teacher stage: kind trained unpacks it into the folder layout the pipeline and ComfyUI read
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["teacher"].update(kind="trained", trained_file=str(out), out_dir=str(tmp_path / "teacher"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    from stages.teacher import run_stage

    run_stage(tmp_path / "params.yaml")
    tcfg = TeacherConfig(kind="trained", trained_file=str(out), out_dir=str(tmp_path / "teacher"))
    ident = json.loads((tmp_path / "teacher" / IDENTITY_FILE_NAME).read_text())
    assert ident["kind"] == "trained" and ident["source_sha256"] == sha
    assert ident["sha256"] == file_sha256(tmp_path / "teacher" / SINGLE_FILE_NAME)
    teacher = load_teacher(tcfg)
    assert (teacher.num_heads, teacher.context_dim) == (1, 16) and teacher.layer_keys == ["double_blocks.0",
                                                                                          "single_blocks.0"]

    # equal to the trained EMA model with its weights rounded to fp16 (the shipped precision)
    ref = tt.build_model(cfg)
    ref.load_state_dict({k: v.half().float() for k, v in trainer.ema_model.state_dict().items()})
    prompts = ["two small red circles top left, on grey", "a blue stripe across the bottom, on black"]
    cond = teacher.encode_prompts(prompts)
    assert torch.equal(cond, trainer.ema_encoder(prompts))
    x = torch.randn(2, 64, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = teacher.denoise(x, 0.6, cond, 4.0, 8, 8)
        want = tt.velocity(ref, x, torch.full((2,), 0.6), cond, torch.full((2,), 4.0), 8, 8)
    assert float(want.abs().mean()) > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # its decoder is the exact latent map (clamped for display)
    z = trainer.lmap.encode(sc.render([sc.training_scene(SCENES, 0)], 128, 128))
    torch.testing.assert_close(teacher.decode(z, 8, 8), trainer.lmap.project(
        sc.render([sc.training_scene(SCENES, 0)], 128, 128)).clamp(0, 1))
    # and the ComfyUI nodes (Flux2TTRTinyTextEncode / Flux2TTRTinyDecode) read its codec the same way
    from flux2ttr.comfy import tiny_nodes

    codec = tiny_nodes.load_codec(tmp_path / "teacher" / EXTRAS_FILE_NAME)
    assert torch.equal(tiny_nodes.encode(codec, prompts[0], 4.0)[0][0], cond[:1])
    latent = z.transpose(1, 2).reshape(1, 128, 8, 8)
    torch.testing.assert_close(tiny_nodes.decode(codec, latent), teacher.decode(z, 8, 8).permute(0, 2, 3, 1))


def test_a_changed_or_unpinned_file_is_refused(tmp_path):
    cfg = small(tmp_path)
    tt.Trainer(cfg, SCENES).export(cfg.out_file)
    tcfg = TeacherConfig(kind="trained", trained_file=cfg.out_file, out_dir=str(tmp_path / "teacher"))
    pin = sha256_path(cfg.out_file)
    pin.write_text("0" * 64 + "  trained.safetensors\n")
    with pytest.raises(TeacherError, match="sha256"):
        write_trained_teacher(tcfg)
    pin.unlink()
    with pytest.raises(TeacherError, match="sha256 pin"):
        write_trained_teacher(tcfg)
    with pytest.raises(TeacherError, match="not found"):
        write_trained_teacher(dataclasses.replace(tcfg, trained_file=str(tmp_path / "missing.safetensors")))
    with pytest.raises(TeacherError, match="flux2ttr teacher"):
        load_teacher(dataclasses.replace(tcfg, out_dir=str(tmp_path / "nothing")))


def test_command_line(tmp_path, capsys):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train_teacher"].update({k: v for k, v in dataclasses.asdict(small(tmp_path, steps=2)).items()})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert tt.main(["--params", str(tmp_path / "params.yaml"), "--eval-captions", "1", "--grid",
                    str(tmp_path / "grid.png")]) == 0
    header, _, _ = read_trained_file(tmp_path / "out" / "trained.safetensors")
    assert header["commands"][0].startswith("flux2ttr train-teacher --params")
    assert header["eval"]["images"] == 1 and 0.0 <= header["eval"]["pass_rate"] <= 1.0
    assert (tmp_path / "grid.png").is_file()
    assert "held-out captions: pass rate" in capsys.readouterr().out
    # the same through `flux2ttr train-teacher` (resumes: already at its 2 steps, writes the file again)
    from click.testing import CliRunner

    from flux2ttr.cli import main as cli

    res = CliRunner().invoke(cli, ["train-teacher", "--params", str(tmp_path / "params.yaml"), "--eval-captions", "0"])
    assert res.exit_code == 0, res.output
    header, _, _ = read_trained_file(tmp_path / "out" / "trained.safetensors")
    assert len(header["commands"]) == 2 and header["steps"] == 2 and header["eval"] is None
    # the schedule's overrides: another run (no resume), recorded in its header and evaluated at that guidance
    assert tt.main(["--params", str(tmp_path / "params.yaml"), "--lr", "1e-4", "--distill-start", "0",
                    "--eval-captions", "1", "--eval-guidance", "2.5", "--checkpoint", str(tmp_path / "b.safetensors"),
                    "--out", str(tmp_path / "b" / "trained.safetensors")]) == 0
    header, _, _ = read_trained_file(tmp_path / "b" / "trained.safetensors")
    assert (header["train"]["lr"], header["train"]["distill_start"], header["eval"]["guidance"]) == (1e-4, 0.0, 2.5)
    assert len(header["commands"]) == 1 and header["steps"] == 2
    # --set: any field, its value read as YAML
    assert tt.main(["--params", str(tmp_path / "params.yaml"), "--set", "logit_mean=-0.5", "--set", "mu=null",
                    "--eval-captions", "0", "--checkpoint", str(tmp_path / "c.safetensors"),
                    "--out", str(tmp_path / "c" / "trained.safetensors")]) == 0
    header, _, _ = read_trained_file(tmp_path / "c" / "trained.safetensors")
    assert (header["train"]["logit_mean"], header["train"]["mu"]) == (-0.5, None)
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        tt.main(["--params", str(tmp_path / "params.yaml"), "--set", "no_such_field=1"])


def test_config_checks():
    with pytest.raises(ConfigError, match="guidance_max"):
        tt.TrainTeacherConfig(guidance_min=5.0, guidance_max=2.0)
    with pytest.raises(ConfigError, match="amp"):
        tt.TrainTeacherConfig(amp="fp8")
    with pytest.raises(ConfigError, match="height"):
        tt.TrainTeacherConfig(height=100)
    with pytest.raises(ConfigError, match="train_teacher.compile = 'inductr' is not a torch.compile backend"):
        tt.TrainTeacherConfig(compile="inductr")
    with pytest.raises(ConfigError, match="scene_workers"):
        tt.TrainTeacherConfig(scene_workers=-1)
