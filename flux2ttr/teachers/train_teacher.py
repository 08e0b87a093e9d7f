"""Train the tiny FLUX.2 teacher to draw its captions (``flux2ttr train-teacher``; the GPU does the real run).

Model: diffusers' ``Flux2Transformer2DModel`` with the tiny teacher's shapes (head_dim 128, 128 latent
channels, ``train_teacher.num_heads`` / ``num_double`` / ``num_single`` / ``context_dim``), the modulation and
output layers zero-initialised (every block starts as the identity, DiT's adaLN-zero), QK norms with
ComfyUI's epsilon (as the pipeline loads it), and a learned :class:`~flux2ttr.teachers.caption_encoder.CaptionEncoder`.

Data: procedural scenes (:mod:`flux2ttr.teachers.scenes`), training split only; batch ``s`` holds training
scenes ``s*B .. s*B+B-1``, drawn at 256 x 256 (``height`` / ``width``) and encoded by the exact latent map
(:mod:`flux2ttr.teachers.latent_map`) into ``x0 [B, h*w, 128]``.

Objective: flow matching on the FLUX.2 schedule. ``t ~ sigmoid(N(logit_mean, logit_std))`` shifted as the
sampler shifts it, ``sigma = e^mu / (e^mu + 1/t - 1)`` (``mu`` = FLUX.2's empirical fit for the training grid
at ``schedule_steps`` steps unless given), ``x_sigma = (1 - sigma) x0 + sigma noise``, target velocity
``noise - x0`` (the sampler's Euler step ``x += (sigma' - sigma) v``), mean squared error. Captions are
dropped (empty, all-zero conditioning) with ``caption_dropout``. Guidance embedding: the plain rows see
guidance 1; from ``distill_start`` (a fraction of ``steps``) a ``distill_fraction`` of every batch is trained at
a guidance ``g ~ U(guidance_min, guidance_max)`` towards the EMA model's classifier-free guided velocity
``v(x, empty, 1) + g (v(x, caption, 1) - v(x, empty, 1))``, so the guidance embedding does what FLUX.2 [dev]'s
does (guidance distillation). With ``distill_fraction`` 0 every row sees a random guidance and the plain target.

Every random draw of step ``s`` comes from seeds derived from ``(seed, s)``, so a resumed run is the run that
was not interrupted. State (weights, EMA, AdamW moments, loss log) is a safetensors checkpoint (no pickle)
written every ``checkpoint_every`` steps and when the run stops (``steps`` reached, ``--max-seconds`` or
``--stop-after``); the next run with the same training config resumes it. A run may instead start from an
exported file (``init_file``, a warm start: its weights become the model and the EMA, AdamW and the step
count start fresh, so the schedule is this run's; the file's arch, vocabulary and scene set must be this
config's); the export then records the file it started from and that file's own history. Each run exports the EMA weights
as the shipped fp16 file (:func:`flux2ttr.teachers.trained.write_trained_file`) with seed, steps, the commands
and the loss curve in its header, and optionally evaluates the caption checker on held-out captions.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import multiprocessing
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flux2ttr.atomic import file_sha256
from flux2ttr.checkpoint import load_checkpoint, optimizer_from_flat, optimizer_to_flat, save_checkpoint
from flux2ttr.config import ConfigError, check_choice, check_range, load_section, to_dict
from flux2ttr.seeds import derive_seed
from flux2ttr.teachers import caption_check, scenes
from flux2ttr.teachers.caption_encoder import CaptionEncoder, VocabPromptEncoder
from flux2ttr.teachers.latent_map import LatentMap
from flux2ttr.teachers.sampler import SamplerConfig, empirical_mu, sample
from flux2ttr.teachers.teacher import Teacher, diffusers_to_bfl, match_comfyui_qk_norm, tiny_model_config
from flux2ttr.teachers.trained import arch_config, read_trained_file, write_trained_file

# config fields that may change between a run and its resumption (how, not what, is trained)
RESUMABLE_CHANGES = ("out_file", "checkpoint", "log_every", "checkpoint_every", "device", "amp", "torch_threads",
                     "scene_workers", "compile",
                     "max_seconds", "eval_captions", "eval_steps", "eval_guidance", "eval_seed", "eval_batch")


@dataclass
class TrainTeacherConfig:
    """params.yaml section ``train_teacher``."""

    out_file: str = "data/teachers/flux2_trained_fp16.safetensors"  # the shipped file (+ .sha256)
    checkpoint: str = "checkpoints/train_teacher/state.safetensors"  # resumable state
    init_file: str = ""           # warm start: a trained file's weights (fresh AdamW, this run's schedule); "" = seeded init
    seed: int = 0                 # model init, noise, sigmas, dropout, guidance draws
    # architecture (head_dim 128, 128 latent channels, mlp 3, RoPE 32x4 are FLUX.2's)
    num_heads: int = 2            # hidden = 128 x heads
    num_double: int = 1
    num_single: int = 4
    context_dim: int = 64         # prompt-embedding width (joint_attention_dim)
    height: int = 256             # training image pixels (multiple of 16)
    width: int = 256
    # optimisation
    steps: int = 20000            # total optimiser steps of the run (resumed runs continue to it)
    batch_size: int = 256
    lr: float = 5.0e-4            # AdamW peak learning rate
    lr_min_ratio: float = 0.1     # cosine decay to lr x this at `steps`
    warmup_steps: int = 200       # linear warm-up
    weight_decay: float = 0.0
    grad_clip: float = 1.0        # max grad norm (0 = off)
    ema_decay: float = 0.999      # EMA of the weights (what is exported and distils guidance)
    # flow matching on the FLUX.2 schedule
    caption_dropout: float = 0.1  # share of plain rows trained on the empty caption
    logit_mean: float = 0.0       # t = sigmoid(N(logit_mean, logit_std)) before the FLUX.2 shift
    logit_std: float = 1.0
    schedule_steps: int = 6       # mu = FLUX.2 empirical_mu(training tokens, this many steps) when mu is null
    mu: float | None = None
    # guidance embedding
    guidance_min: float = 1.0
    guidance_max: float = 6.0
    distill_start: float = 0.5    # fraction of `steps` after which guidance distillation starts
    distill_fraction: float = 0.5  # share of a batch trained towards the EMA's guided velocity (0 = no distillation)
    # running
    checkpoint_every: int = 500
    log_every: int = 50
    device: str = "cpu"
    amp: str = "none"             # none | bf16 (autocast on CUDA)
    torch_threads: int = 1        # CPU threads (0 = torch's default)
    scene_workers: int = 0        # processes drawing the next batches' scenes (0: one thread of this process)
    compile: str = ""             # torch.compile backend of the training forwards ("" = eager; inductor on a GPU)
    max_seconds: float = 0.0      # stop, checkpoint and export after this wall time (0 = no limit)
    # evaluation on held-out captions (the caption checker, flux2ttr/teachers/caption_check.py)
    eval_captions: int = 64       # 0 = no evaluation at the end of a run
    eval_steps: int = 6           # the pipeline's sampler.steps
    eval_guidance: float = 2.0    # the pipeline's sampler.guidance
    eval_seed: int = 0            # noise seed of caption i: eval_seed + i
    eval_batch: int = 16

    def __post_init__(self) -> None:
        check_range("train_teacher", self, "seed", "eval_seed", "warmup_steps", "eval_captions", "torch_threads",
                    "scene_workers", ge=0)
        check_range("train_teacher", self, "num_heads", "context_dim", "steps", "batch_size", "schedule_steps",
                    "checkpoint_every", "log_every", "eval_steps", "eval_batch", ge=1)
        check_range("train_teacher", self, "num_double", "num_single", ge=0)
        check_range("train_teacher", self, "height", "width", ge=16, multiple_of=16)
        check_range("train_teacher", self, "lr", "logit_std", gt=0.0)
        check_range("train_teacher", self, "lr_min_ratio", "caption_dropout", "distill_start", "distill_fraction",
                    ge=0.0, le=1.0)
        check_range("train_teacher", self, "ema_decay", ge=0.0, lt=1.0)
        check_range("train_teacher", self, "weight_decay", "grad_clip", "max_seconds", "guidance_min", ge=0.0)
        check_choice("train_teacher", self, "amp", ("none", "bf16"))
        if self.compile:
            from torch._dynamo import list_backends  # noqa: PLC0415

            backends = list_backends(exclude_tags=())
            if self.compile not in backends:
                raise ConfigError(f"train_teacher.compile = {self.compile!r} is not a torch.compile backend: use \"\" "
                                  f"(eager), inductor (GPU) or one of {backends}")
        if self.guidance_max < self.guidance_min:
            raise ConfigError(f"train_teacher.guidance_max = {self.guidance_max} < guidance_min = {self.guidance_min}")
        if self.num_double + self.num_single < 1:
            raise ConfigError("train_teacher.num_double + num_single must be >= 1")

    @property
    def arch(self) -> dict[str, int]:
        return {"num_heads": self.num_heads, "num_double": self.num_double, "num_single": self.num_single,
                "context_dim": self.context_dim}

    def fingerprint(self) -> dict[str, Any]:
        """The fields a checkpoint must agree on to be resumed."""
        return {k: v for k, v in to_dict(self).items() if k not in RESUMABLE_CHANGES}


# ------------------------------------------------------------------------------------------ model
def build_model(cfg: TrainTeacherConfig) -> torch.nn.Module:
    """The tiny ``Flux2Transformer2DModel`` at its seeded init, modulations and output zeroed (fp32, CPU)."""
    from diffusers import Flux2Transformer2DModel  # noqa: PLC0415

    with torch.random.fork_rng(devices=[]):  # diffusers initialises from the global generator
        torch.manual_seed(derive_seed(cfg.seed, 1))
        model = Flux2Transformer2DModel(**tiny_model_config(arch_config(cfg.arch)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            # adaLN-zero: shift/scale/gate 0 -> every block is the identity at step 0; output 0
            if "modulation" in name or name.startswith(("norm_out", "proj_out")):
                p.zero_()
    return match_comfyui_qk_norm(model)


def can_grow(theirs: dict[str, int] | None, ours: dict[str, int]) -> bool:
    """Whether a model of arch ``theirs`` embeds in ``ours``: same heads and context width, no more blocks of
    either kind (a warm start then appends identity blocks, :func:`zero_new_block_outputs`)."""
    if not theirs or any(theirs.get(k) != ours[k] for k in ("num_heads", "context_dim")):
        return False
    return all(0 <= int(theirs.get(k, -1)) <= ours[k] for k in ("num_double", "num_single"))


# the output projections of each block kind: zeroed, the block adds nothing to its residual streams
_BLOCK_OUTPUTS = {"num_double": ("transformer_blocks", ("attn.to_out", "attn.to_add_out", "ff.linear_out",
                                                        "ff_context.linear_out")),
                  "num_single": ("single_transformer_blocks", ("attn.to_out",))}


def zero_new_block_outputs(model: torch.nn.Module, old_arch: dict[str, int]) -> list[str]:
    """Make the blocks past ``old_arch``'s counts the identity: zero their output projections (every block of
    FLUX.2 adds gated outputs to its residual streams, and its modulation is shared, so the gates cannot be
    zeroed per block). The grown model computes what the old one did; the zeroed projections still get
    gradients. Returns the names of the zeroed parameters."""
    zeroed = []
    with torch.no_grad():
        for key, (stack, outputs) in _BLOCK_OUTPUTS.items():
            blocks = getattr(model, stack)
            for i in range(int(old_arch[key]), len(blocks)):
                for out in outputs:
                    for name, p in blocks[i].get_submodule(out).named_parameters():
                        p.zero_()
                        zeroed.append(f"{stack}.{i}.{out}.{name}")
    return zeroed


def build_encoder(cfg: TrainTeacherConfig) -> CaptionEncoder:
    return CaptionEncoder(scenes.vocabulary(), cfg.context_dim, generator=torch.Generator().manual_seed(
        derive_seed(cfg.seed, 2)))


def training_mu(cfg: TrainTeacherConfig) -> float:
    tokens = (cfg.height // 16) * (cfg.width // 16)
    return float(cfg.mu) if cfg.mu is not None else empirical_mu(tokens, cfg.schedule_steps)


def lr_at(cfg: TrainTeacherConfig, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine to ``lr * lr_min_ratio`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _ids(h: int, w: int, n_txt: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return Teacher.image_ids(h, w).to(device), Teacher.text_ids(n_txt).to(device)


def velocity(model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, guidance: torch.Tensor,
             h: int, w: int) -> torch.Tensor:
    """One denoiser call as the pipeline makes it (:meth:`Teacher.denoise`): ``[B, h*w, 128]`` velocity."""
    img_ids, txt_ids = _ids(h, w, cond.shape[1], x.device)
    return model(hidden_states=x, encoder_hidden_states=cond, timestep=sigma, img_ids=img_ids, txt_ids=txt_ids,
                 guidance=guidance, return_dict=False)[0]


@dataclass
class Batch:
    """One training batch: clean latents, captions (empty = dropped), sigmas, noise, guidance, distilled rows."""

    x0: torch.Tensor  # [B, N, 128]
    captions: list[str]
    sigma: torch.Tensor  # [B]
    noise: torch.Tensor  # [B, N, 128]
    guidance: torch.Tensor  # [B]
    distill_rows: int  # the first rows train towards the guided velocity


def batch_scenes(cfg: TrainTeacherConfig, scfg: scenes.SceneConfig, step: int) -> list[scenes.Scene]:
    """The scenes of batch ``step``: training scenes ``step*B .. step*B+B-1``."""
    return [scenes.training_scene(scfg, step * cfg.batch_size + b) for b in range(cfg.batch_size)]


def make_batch(cfg: TrainTeacherConfig, scfg: scenes.SceneConfig, lmap: LatentMap, step: int,
               device: torch.device, drawn: list[scenes.Scene] | None = None) -> Batch:
    """Batch ``step`` (deterministic in ``(seed, step)``; ``drawn``: its :func:`batch_scenes` if already made)."""
    B = cfg.batch_size
    drawn = batch_scenes(cfg, scfg, step) if drawn is None else drawn
    x0 = lmap.encode(scenes.render(drawn, cfg.height, cfg.width, device))
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, 3, step))  # small draws on the CPU
    t = torch.sigmoid(torch.randn(B, generator=g) * cfg.logit_std + cfg.logit_mean)
    mu = training_mu(cfg)
    sigma = math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))
    drop = torch.rand(B, generator=g) < cfg.caption_dropout
    guid = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(B, generator=g)
    distilling = cfg.distill_fraction > 0 and step >= cfg.distill_start * cfg.steps
    k = int(round(cfg.distill_fraction * B)) if distilling else 0
    if cfg.distill_fraction > 0:
        guid[k:] = 1.0  # plain rows: guidance 1 (the guided target at 1 is the conditional velocity)
    captions = [("" if (bool(drop[b]) and b >= k) else s.caption) for b, s in enumerate(drawn)]
    dg = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, 4, step))
    noise = torch.randn(x0.shape, generator=dg, device=device)
    return Batch(x0, captions, sigma.to(device), noise, guid.to(device), k)


# ------------------------------------------------------------------------------------------ state
class Trainer:
    """Model, encoder, their EMA copies and AdamW; :meth:`step` runs one optimiser step."""

    def __init__(self, cfg: TrainTeacherConfig, scfg: scenes.SceneConfig) -> None:
        self.cfg, self.scfg = cfg, scfg
        self.device = torch.device(cfg.device)
        self.model = build_model(cfg).to(self.device).train()
        self.encoder = build_encoder(cfg).to(self.device)
        self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        # compiled callables over the same modules (their state dicts keep the plain keys)
        self.fwd, self.ema_fwd = self.model, self.ema_model
        if cfg.compile:
            self.fwd = torch.compile(self.model, backend=cfg.compile)
            self.ema_fwd = torch.compile(self.ema_model, backend=cfg.compile)
        self.ema_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.lmap = LatentMap.build(scfg.latent_seed, scfg.latent_scale)
        self.params = list(self.model.parameters()) + list(self.encoder.parameters())
        # fused on CUDA: one kernel for the whole update (the step is launch-bound at these sizes)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay,
                                     fused=self.device.type == "cuda")
        self.step_done = 0
        self.losses: list[list[float]] = []  # [step, mean loss over the log window]
        self.commands: list[str] = []
        self.wall_s = 0.0
        self.init: dict[str, Any] | None = None  # the warm start's file and its history
        self.h, self.w = cfg.height // 16, cfg.width // 16
        # the next batches' scenes (pure Python) are drawn while this step runs on the device: on a thread, or
        # in worker processes, which keep the GIL free for launching this step's kernels (spawned: CUDA-safe)
        if cfg.scene_workers:
            self._pool: Executor = ProcessPoolExecutor(cfg.scene_workers, mp_context=multiprocessing.get_context("spawn"))
        else:
            self._pool = ThreadPoolExecutor(max_workers=1)
        self._ahead: dict[int, Future] = {}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.amp == "bf16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss_on(self, batch: Batch) -> torch.Tensor:
        """The flow-matching loss of the current model on ``batch`` (with grad)."""
        s = batch.sigma.view(-1, 1, 1)
        x = (1 - s) * batch.x0 + s * batch.noise
        target = batch.noise - batch.x0
        k = batch.distill_rows
        if k:
            with torch.no_grad(), self._autocast():
                xk, sk = x[:k], batch.sigma[:k]
                cond_k = self.ema_encoder(batch.captions[:k])
                ones = torch.ones(k, device=self.device)
                v_c = velocity(self.ema_fwd, xk, sk, cond_k, ones, self.h, self.w).float()
                v_u = velocity(self.ema_fwd, xk, sk, torch.zeros_like(cond_k), ones, self.h, self.w).float()
            target = target.clone()
            target[:k] = v_u + batch.guidance[:k].view(-1, 1, 1) * (v_c - v_u)
        with self._autocast():
            cond = self.encoder(batch.captions)
            v = velocity(self.fwd, x, batch.sigma, cond, batch.guidance, self.h, self.w)
        return torch.nn.functional.mse_loss(v.float(), target)

    def step(self) -> float:
        """One optimiser step on batch ``step_done``; returns its loss."""
        cfg = self.cfg
        ahead = self._ahead.pop(self.step_done, None)
        drawn = batch_scenes(cfg, self.scfg, self.step_done) if ahead is None else ahead.result()
        for s in range(self.step_done + 1, self.step_done + 1 + max(1, cfg.scene_workers)):
            if s not in self._ahead:
                self._ahead[s] = self._pool.submit(batch_scenes, cfg, self.scfg, s)
        batch = make_batch(cfg, self.scfg, self.lmap, self.step_done, self.device, drawn)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(cfg, self.step_done)
        loss = self.loss_on(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        decay = min(cfg.ema_decay, (1 + self.step_done) / (10 + self.step_done))  # EMA warm-up
        with torch.no_grad():
            ema = list(self.ema_model.parameters()) + list(self.ema_encoder.parameters())
            torch._foreach_lerp_(ema, [p.detach() for p in self.params], 1.0 - decay)
        self.step_done += 1
        return float(loss.detach())

    def close(self) -> None:
        """Stop drawing scenes ahead (ends the worker processes)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._ahead.clear()

    def warm_start(self, path: str | Path) -> None:
        """Take model, EMA and encoders from the trained file at ``path`` (its EMA weights, fp16 -> fp32)."""
        from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers  # noqa: PLC0415

        header, bfl, codec = read_trained_file(path)
        theirs_arch = header.get("arch")
        grown = theirs_arch != self.cfg.arch and can_grow(theirs_arch, self.cfg.arch)
        for what, theirs, ours in (("arch", theirs_arch, self.cfg.arch),
                                   ("vocabulary", header.get("vocab"), self.encoder.tokenizer.vocab),
                                   ("scenes", header.get("scenes"), to_dict(self.scfg))):
            if theirs != ours and not (what == "arch" and grown):
                hint = (" (a file with fewer blocks of the same heads and context_dim is grown: its blocks come "
                        "first, the new ones start as the identity)") if what == "arch" else ""
                raise ConfigError(f"train_teacher.init_file: {path} was trained with another {what} ({theirs}, this "
                                  f"config: {ours}){hint}; set train_teacher.init_file to a file of this config, or \"\"")
        state = convert_flux2_transformer_checkpoint_to_diffusers({k: v.float() for k, v in bfl.items()})
        enc = {"token": codec["prompt_encoder.token"], "position": codec["prompt_encoder.position"]}
        with torch.no_grad():
            for module in (self.model, self.ema_model):
                own = module.state_dict()
                module.load_state_dict({**own, **{k: v.to(self.device) for k, v in state.items()}}, strict=True)
                if grown:
                    zero_new_block_outputs(module, theirs_arch)
            for module in (self.encoder, self.ema_encoder):
                module.load_state_dict({k: v.to(self.device) for k, v in enc.items()}, strict=True)
        self.init = {"file": Path(path).name, "sha256": file_sha256(path), "steps": header.get("steps"),
                     "commands": header.get("commands"), "eval": header.get("eval"), "init": header.get("init")}
        if grown:
            self.init["grown_from"] = theirs_arch

    # --- checkpoint -------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        out.update({f"encoder.{k}": v for k, v in self.encoder.state_dict().items()})
        out.update({f"ema_model.{k}": v for k, v in self.ema_model.state_dict().items()})
        out.update({f"ema_encoder.{k}": v for k, v in self.ema_encoder.state_dict().items()})
        return out

    def save(self, path: str | Path) -> None:
        opt_tensors, opt_meta = optimizer_to_flat(self.opt, "opt")
        header = {"step": self.step_done, "fingerprint": self.cfg.fingerprint(), "scenes": to_dict(self.scfg),
                  "losses": self.losses, "commands": self.commands, "wall_s": self.wall_s, "optimizer": opt_meta,
                  "init": self.init}
        save_checkpoint(path, {**self.state_tensors(), **opt_tensors}, header)

    def load(self, path: str | Path) -> None:
        from flux2ttr.checkpoint import CheckpointError  # noqa: PLC0415

        tensors, header = load_checkpoint(path)
        if header.get("fingerprint") != self.cfg.fingerprint() or header.get("scenes") != to_dict(self.scfg):
            raise CheckpointError(f"{path}: written for another training config or scene set; delete it to start "
                                  "over, or set train_teacher.checkpoint to a new path")
        for prefix, module in (("model.", self.model), ("encoder.", self.encoder), ("ema_model.", self.ema_model),
                               ("ema_encoder.", self.ema_encoder)):
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        optimizer_from_flat(self.opt, "opt", tensors, header["optimizer"])
        self.step_done = int(header["step"])
        self.losses = [list(x) for x in header.get("losses", [])]
        self.commands = list(header.get("commands", []))
        self.wall_s = float(header.get("wall_s", 0.0))
        self.init = header.get("init")

    # --- export -----------------------------------------------------------------------------------
    def teacher(self) -> Teacher:
        """The EMA model as a pipeline :class:`Teacher` (copies; fp32 on the training device)."""
        enc = self.ema_encoder.codec_tensors()
        encoder = VocabPromptEncoder(enc["prompt_encoder.token"], enc["prompt_encoder.position"],
                                     self.ema_encoder.tokenizer.vocab)
        model = copy.deepcopy(self.ema_model).float()
        return Teacher(model, {"kind": "trained", "step": self.step_done}, encoder=encoder, decoder=self.lmap,
                       device=str(self.device), dtype=torch.float32)

    def header(self, evaluation: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "arch": self.cfg.arch, "vocab": self.ema_encoder.tokenizer.vocab,
            "latent_map": {"seed": self.scfg.latent_seed, "scale": self.scfg.latent_scale,
                           "design": "YCbCr-like opponent colours, luma 2x2 / chroma 2x4 blocks, block DCT, "
                                     "signed Hadamard channel mix (flux2ttr/teachers/latent_map.py)"},
            "seed": self.cfg.seed, "steps": self.step_done, "steps_planned": self.cfg.steps, "init": self.init,
            "commands": self.commands, "train": to_dict(self.cfg), "scenes": to_dict(self.scfg),
            "loss_curve": self.losses, "wall_s": round(self.wall_s, 1), "torch": torch.__version__,
            "eval": evaluation,
        }

    def export(self, path: str | Path, evaluation: dict[str, Any] | None = None) -> str:
        """Write the shipped fp16 file of the EMA weights; returns its sha256."""
        bfl = diffusers_to_bfl({k: v.detach().cpu() for k, v in self.ema_model.state_dict().items()})
        codec = {**self.ema_encoder.codec_tensors(), **self.lmap.tensors()}
        return write_trained_file(path, bfl, codec, self.header(evaluation))


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(teacher: Teacher, scfg: scenes.SceneConfig, n: int, *, steps: int, guidance: float, seed: int,
             height: int = 256, width: int = 256, batch: int = 16, mu: float | None = None
             ) -> tuple[dict[str, Any], torch.Tensor, list[str]]:
    """Sample the first ``n`` held-out captions with the pipeline's sampler (schedule shift ``mu``; None: FLUX.2's
    empirical fit) and check them: ``(summary, images [n, 3, H, W], captions)``; the summary has
    :func:`caption_check.summarize`'s rates."""
    captions = [s.caption for s in scenes.held_out_scenes(scfg, n)]
    scfg_s = SamplerConfig(steps=steps, guidance=guidance, height=height, width=width, seed=seed, mu=mu)
    images = []
    for i in range(0, n, batch):
        chunk = captions[i:i + batch]
        lat = sample(teacher, chunk, scfg_s, seeds=[seed + i + j for j in range(len(chunk))])
        images.append(teacher.decode(lat, height // 16, width // 16).cpu())
    images_t = torch.cat(images) if images else torch.zeros(0, 3, height, width)
    summary = caption_check.summarize(caption_check.check_batch(images_t, captions))
    summary.update({"steps": steps, "guidance": guidance, "seed": seed, "height": height, "width": width})
    return summary, images_t, captions


def save_grid(images: torch.Tensor, path: str | Path, ncol: int = 8) -> None:
    """``images [n, 3, H, W]`` in [0, 1] as one PNG, ``ncol`` per row (Pillow)."""
    from PIL import Image  # noqa: PLC0415

    n, _, H, W = images.shape
    rows = max(1, math.ceil(n / ncol))
    canvas = torch.ones(3, rows * (H + 4), ncol * (W + 4))
    for i in range(n):
        r, c = divmod(i, ncol)
        canvas[:, r * (H + 4) + 2:r * (H + 4) + 2 + H, c * (W + 4) + 2:c * (W + 4) + 2 + W] = images[i]
    arr = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# ------------------------------------------------------------------------------------------ the run
@dataclass
class RunResult:
    steps: int
    losses: list[list[float]]
    sha256: str | None
    evaluation: dict[str, Any] | None


def train(cfg: TrainTeacherConfig, scfg: scenes.SceneConfig, *, command: str = "", stop_after: int | None = None,
          evaluate_at_end: bool = True, grid: str | Path | None = None,
          log: Callable[[str], None] = print) -> RunResult:
    """Train from ``cfg.checkpoint`` (if it exists and matches) to ``cfg.steps``, or until ``max_seconds`` /
    ``stop_after`` steps of this run; checkpoint, export ``cfg.out_file`` and (with ``evaluate_at_end``) evaluate
    the checker on ``eval_captions`` held-out captions (their sample grid to ``grid``)."""
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    trainer = Trainer(cfg, scfg)
    ckpt = Path(cfg.checkpoint)
    if ckpt.is_file():
        trainer.load(ckpt)
        log(f"resumed {ckpt} at step {trainer.step_done}")
    elif cfg.init_file:
        trainer.warm_start(cfg.init_file)
        log(f"warm start from {cfg.init_file} (trained {trainer.init['steps']} steps)")
    trainer.commands.append(command or shlex.join(sys.argv))
    start, t0, wall0 = trainer.step_done, time.monotonic(), trainer.wall_s
    window: list[float] = []
    try:
        while trainer.step_done < cfg.steps:
            window.append(trainer.step())
            done = trainer.step_done
            if done % cfg.log_every == 0 or done == cfg.steps:
                trainer.losses.append([done, sum(window) / len(window)])
                log(f"step {done}/{cfg.steps} loss {trainer.losses[-1][1]:.4f} lr {lr_at(cfg, done - 1):.2e} "
                    f"{(time.monotonic() - t0) / (done - start):.3f} s/step")
                window = []
            if done % cfg.checkpoint_every == 0:
                trainer.wall_s = wall0 + time.monotonic() - t0
                trainer.save(ckpt)
            if stop_after is not None and done - start >= stop_after:
                break
            if cfg.max_seconds and time.monotonic() - t0 >= cfg.max_seconds:
                log(f"stopping after {cfg.max_seconds:.0f} s at step {done}")
                break
    finally:
        trainer.close()
    if window:
        trainer.losses.append([trainer.step_done, sum(window) / len(window)])
    trainer.wall_s = wall0 + time.monotonic() - t0
    trainer.save(ckpt)
    evaluation = None
    if evaluate_at_end and cfg.eval_captions > 0:
        evaluation, images, captions = evaluate(trainer.teacher(), scfg, cfg.eval_captions, steps=cfg.eval_steps,
                                                guidance=cfg.eval_guidance, seed=cfg.eval_seed, height=cfg.height,
                                                width=cfg.width, batch=cfg.eval_batch)
        evaluation["at_step"] = trainer.step_done
        log(f"held-out captions: pass rate {evaluation['pass_rate']:.3f} ({evaluation['images']} images) "
            f"{json.dumps(evaluation, sort_keys=True)}")
        if grid:
            save_grid(images, grid)
    sha = trainer.export(cfg.out_file, evaluation)
    log(f"wrote {cfg.out_file} (sha256 {sha}, step {trainer.step_done})")
    return RunResult(trainer.step_done, trainer.losses, sha, evaluation)


def _set_field(cfg: TrainTeacherConfig, item: str) -> None:
    """``--set FIELD=VALUE``: VALUE parsed as YAML (as params.yaml would hold it)."""
    import yaml  # noqa: PLC0415

    name, sep, text = item.partition("=")
    fields = list(to_dict(cfg))
    if not sep or name not in fields:
        raise ConfigError(f"--set {item!r}: write FIELD=VALUE with FIELD one of train_teacher's fields: {fields}")
    setattr(cfg, name, yaml.safe_load(text))


def main(argv: list[str] | None = None) -> int:
    """``python -m flux2ttr.teachers.train_teacher [--params P] [--device D] [--amp A] [--max-seconds S] ...``"""
    p = argparse.ArgumentParser(prog="flux2ttr train-teacher", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="params.yaml", help="params file (sections train_teacher and scenes)")
    p.add_argument("--device", help="override train_teacher.device (e.g. cuda)")
    p.add_argument("--amp", choices=("none", "bf16"), help="override train_teacher.amp")
    p.add_argument("--batch-size", type=int, help="override train_teacher.batch_size (changes the run: no resume)")
    p.add_argument("--steps", type=int, help="override train_teacher.steps (changes the run: no resume)")
    p.add_argument("--max-seconds", type=float, help="override train_teacher.max_seconds")
    p.add_argument("--scene-workers", type=int, help="override train_teacher.scene_workers")
    p.add_argument("--compile", help="override train_teacher.compile (a torch.compile backend, e.g. inductor)")
    p.add_argument("--stop-after", type=int, help="stop after this many steps of this run")
    p.add_argument("--checkpoint", help="override train_teacher.checkpoint")
    p.add_argument("--out", help="override train_teacher.out_file")
    p.add_argument("--init-file", help="override train_teacher.init_file (warm start from a trained file)")
    p.add_argument("--lr", type=float, help="override train_teacher.lr (changes the run: no resume)")
    p.add_argument("--distill-start", type=float,
                   help="override train_teacher.distill_start (0 for a warm start from a guidance-distilled file)")
    p.add_argument("--eval-captions", type=int, help="override train_teacher.eval_captions (0: no evaluation)")
    p.add_argument("--eval-guidance", type=float, help="override train_teacher.eval_guidance (= sampler.guidance)")
    p.add_argument("--grid", help="PNG of the evaluation samples")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any train_teacher field (VALUE read as YAML), e.g. --set num_single=5; repeatable")
    args = p.parse_args(argv)
    cfg = load_section(TrainTeacherConfig, "train_teacher", args.params)
    scfg = load_section(scenes.SceneConfig, "scenes", args.params)
    for name, value in (("device", args.device), ("amp", args.amp), ("batch_size", args.batch_size),
                        ("steps", args.steps), ("max_seconds", args.max_seconds), ("scene_workers", args.scene_workers),
                        ("compile", args.compile), ("checkpoint", args.checkpoint),
                        ("out_file", args.out), ("init_file", args.init_file), ("lr", args.lr),
                        ("distill_start", args.distill_start), ("eval_captions", args.eval_captions),
                        ("eval_guidance", args.eval_guidance)):
        if value is not None:
            setattr(cfg, name, value)
    for item in args.set:
        _set_field(cfg, item)
    cfg.__post_init__()
    command = shlex.join(["flux2ttr", "train-teacher", *(sys.argv[1:] if argv is None else argv)])
    train(cfg, scfg, command=command, stop_after=args.stop_after, grid=args.grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
