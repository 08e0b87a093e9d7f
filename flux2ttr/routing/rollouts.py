"""The ``rollout`` stage: teacher rollouts for the controller prompts, sampled once and cached.

For every controller prompt (and ``seeds_per_prompt`` seeds) the teacher is sampled with one fixed setting
(steps, guidance, resolution, schedule shift) and the final latents ``[h*w, 128]`` and decoded image
``[3, 16h, 16w]`` (fp32 in [0, 1]) are stored. The controller stage and the evaluate stage compare their
student rollouts (same prompt, seed and setting, so the same initial noise) against these.

Store layout (a folder, written to a temporary sibling and renamed when complete)::

    <out_dir>/rollouts.safetensors   "latents.{i}" [h*w, 128] fp32, "images.{i}" [3, 16h, 16w] fp32
    <out_dir>/index.json             format, schema, setting, teacher identity, entries
                                     [{index, prompt, prompt_index, seed, split, key}]

``split`` is ``train`` (controller training) or ``eval`` (held out for the evaluate stage: the last
``eval_prompts`` prompts). A rerun reuses every entry whose cache key (teacher hash, setting, prompt,
seed) is already in the old store, so the teacher is sampled once per prompt and setting.

Under ``torchrun --nproc-per-node N -m stages.rollout`` the ranks split the sampler batches (batch ``j`` of
the ones a single process samples goes to rank ``j mod N``), every rank receives every result, and rank 0
writes the store: the same latents and images as one process.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from flux2ttr.atomic import building_dir
from flux2ttr.config import ConfigError, Flux2TTRError, check_range
from flux2ttr.distributed import Dist
from flux2ttr.teachers.sampler import SamplerConfig, sample

FORMAT = "flux2ttr.rollouts"
SCHEMA_VERSION = 1
INDEX_FILE = "index.json"
TENSOR_FILE = "rollouts.safetensors"
SPLITS = ("train", "eval")


class RolloutStoreError(ValueError, Flux2TTRError):
    """A rollout store is missing or does not match what the caller needs (message names path and fix)."""


@dataclass
class RolloutConfig:
    """params.yaml section ``rollout``."""

    prompts: str = "data/prompts/scenes_controller.json"  # JSON array of prompts
    num_prompts: int = 0  # use the first N prompts of the file (0 = all)
    eval_prompts: int = 2  # the last N of those are held out for the evaluate stage
    seeds_per_prompt: int = 1  # rollouts per prompt; seed = seed + prompt_index * seeds_per_prompt + j
    seed: int = 1000
    steps: int = 6  # denoising steps
    guidance: float = 2.0  # FLUX.2 guidance embedding value
    cfg: float = 1.0  # true CFG scale (comfyui teacher: cond and uncond batched); 1 = the conditional pass alone
    negative_prompt: str = ""  # the unconditional prompt when cfg != 1
    height: int = 256  # pixels (multiple of 16)
    width: int = 256  # pixels (multiple of 16)
    mu: float | None = None  # schedule shift; None = FLUX.2's empirical fit
    batch_size: int = 1  # prompts per teacher call; 1 matches the batch-1 student rollouts bit for bit
    out_dir: str = "rollouts/teacher"

    def __post_init__(self) -> None:
        if self.num_prompts < 0 or self.eval_prompts < 0 or self.seeds_per_prompt < 1 or self.batch_size < 1:
            raise ConfigError("rollout: num_prompts, eval_prompts >= 0 and seeds_per_prompt, batch_size >= 1 "
                              f"(got {self.num_prompts}, {self.eval_prompts}, {self.seeds_per_prompt}, "
                              f"{self.batch_size})")
        check_range("rollout", self, "steps", ge=1)
        check_range("rollout", self, "height", "width", ge=16, multiple_of=16)  # pixels: 16 per latent token
        check_range("rollout", self, "seed", ge=0)
        self.sampler_config()  # validates steps and resolution

    def sampler_config(self) -> SamplerConfig:
        return SamplerConfig(steps=self.steps, guidance=self.guidance, cfg=self.cfg,
                             negative_prompt=self.negative_prompt, height=self.height, width=self.width,
                             seed=self.seed, mu=self.mu)

    def setting(self) -> dict[str, Any]:
        """What makes two rollouts of one prompt and seed comparable (the CFG scale and negative prompt only
        where CFG runs: a setting without them is a guidance-only one, as stores before them recorded)."""
        setting = {"steps": self.steps, "guidance": float(self.guidance), "height": self.height,
                   "width": self.width, "mu": self.mu}
        if self.sampler_config().true_cfg:
            setting.update(cfg=float(self.cfg), negative_prompt=self.negative_prompt)
        return setting


@dataclass
class TeacherRollout:
    """One stored teacher rollout: ``latents [h*w, 128]``, ``image [3, 16h, 16w]`` in [0, 1]."""

    index: int
    prompt: str
    prompt_index: int
    seed: int
    split: str
    latents: torch.Tensor
    image: torch.Tensor


def _cache_key(teacher_sha: str, setting: dict[str, Any], prompt: str, seed: int) -> str:
    blob = json.dumps({"teacher": teacher_sha, "setting": setting, "prompt": prompt, "seed": int(seed)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class RolloutStore:
    """Read a rollout store folder (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / INDEX_FILE
        tensors = self.path / TENSOR_FILE
        if not index.is_file() or not tensors.is_file():
            raise RolloutStoreError(f"{self.path}: not a rollout store ({INDEX_FILE} or {TENSOR_FILE} missing); "
                                    "run `flux2ttr rollout` (or `dvc repro rollout`) first")
        try:
            self.meta = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise RolloutStoreError(f"{index}: invalid JSON ({e}); delete {self.path} and rerun the rollout stage")
        if self.meta.get("format") != FORMAT:
            raise RolloutStoreError(f"{index}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        if int(self.meta.get("schema", -1)) > SCHEMA_VERSION:
            raise RolloutStoreError(f"{index}: schema {self.meta.get('schema')} is newer than this flux2ttr")
        self._tensor_path = tensors
        self.setting: dict[str, Any] = dict(self.meta["setting"])
        self.teacher: dict[str, Any] = dict(self.meta.get("teacher") or {})
        self.entries_meta: list[dict[str, Any]] = list(self.meta["entries"])

    def check_teacher(self, teacher: Any) -> RolloutStore:
        """This store, after checking it was sampled by ``teacher`` (same weights' sha256)."""
        if self.teacher.get("sha256") != teacher.identity.get("sha256"):
            raise RolloutStoreError(f"{self.path}: rollouts were made with another teacher; rerun the rollout stage")
        return self

    def __len__(self) -> int:
        return len(self.entries_meta)

    def sampler_config(self) -> SamplerConfig:
        """The sampler setting every rollout of this store was made with."""
        s = self.setting
        return SamplerConfig(steps=int(s["steps"]), guidance=float(s["guidance"]), cfg=float(s.get("cfg", 1.0)),
                             negative_prompt=str(s.get("negative_prompt", "")), height=int(s["height"]),
                             width=int(s["width"]), mu=s.get("mu"))

    def entries(self, split: str | None = None) -> list[TeacherRollout]:
        """All rollouts (or those of ``split``), in store order, tensors loaded."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        chosen = [e for e in self.entries_meta if split is None or e["split"] == split]
        if split is not None and not chosen:
            raise RolloutStoreError(f"{self.path}: no '{split}' rollouts; raise rollout.num_prompts or "
                                    "change rollout.eval_prompts and rerun the rollout stage")
        out = []
        with safe_open(str(self._tensor_path), framework="pt") as f:
            for e in chosen:
                i = int(e["index"])
                out.append(TeacherRollout(index=i, prompt=e["prompt"], prompt_index=int(e["prompt_index"]),
                                          seed=int(e["seed"]), split=e["split"],
                                          latents=f.get_tensor(f"latents.{i}"), image=f.get_tensor(f"images.{i}")))
        return out

    def cached(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{cache key: (latents, image)}`` of every entry (for reuse by a rerun)."""
        with safe_open(str(self._tensor_path), framework="pt") as f:
            return {e["key"]: (f.get_tensor(f"latents.{e['index']}"), f.get_tensor(f"images.{e['index']}"))
                    for e in self.entries_meta}


def write_store(path: str | Path, rollouts: list[TeacherRollout], *, setting: dict[str, Any],
                teacher: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write ``rollouts`` as a store at ``path``: a temporary sibling folder named by this pid (a killed
    writer's is removed by the next write), renamed when complete (an old store is moved aside first and
    removed after)."""
    path = Path(path)
    with building_dir(path) as tmp:
        tensors: dict[str, torch.Tensor] = {}
        entries = []
        sha = str(teacher.get("sha256", ""))
        for r in rollouts:
            tensors[f"latents.{r.index}"] = r.latents.detach().float().cpu().contiguous()
            tensors[f"images.{r.index}"] = r.image.detach().float().cpu().contiguous()
            entries.append({"index": r.index, "prompt": r.prompt, "prompt_index": r.prompt_index, "seed": r.seed,
                            "split": r.split, "key": _cache_key(sha, setting, r.prompt, r.seed)})
        save_file(tensors, str(tmp / TENSOR_FILE))
        meta = {"format": FORMAT, "schema": SCHEMA_VERSION, "setting": setting, "teacher": teacher,
                "entries": entries, **(extra or {})}
        (tmp / INDEX_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def plan(cfg: RolloutConfig, prompts: list[str]) -> list[tuple[int, str, int, str]]:
    """``[(prompt_index, prompt, seed, split)]`` of every rollout the config asks for."""
    if cfg.num_prompts:
        prompts = prompts[: cfg.num_prompts]
    n = len(prompts)
    if cfg.eval_prompts >= n:
        raise ConfigError(f"rollout.eval_prompts = {cfg.eval_prompts} leaves no training prompt out of {n} "
                          f"(rollout.num_prompts = {cfg.num_prompts}, file {cfg.prompts})")
    out = []
    for p, prompt in enumerate(prompts):
        split = "eval" if p >= n - cfg.eval_prompts else "train"
        for j in range(cfg.seeds_per_prompt):
            out.append((p, prompt, cfg.seed + p * cfg.seeds_per_prompt + j, split))
    return out


def record_rollouts(teacher, cfg: RolloutConfig, prompts: list[str], *,
                    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                    show_progress: bool = True, dist: Dist | None = None) -> tuple[list[TeacherRollout], dict[str, Any]]:
    """Sample the teacher for every planned rollout (batched), reusing ``cache`` hits.

    Returns the rollouts and stats ``{sampled, reused, seconds_per_image}`` (teacher sampling + decode,
    summed over ranks, per image). ``dist``: the torchrun ranks splitting the batches (module doc); a
    collective then, every rank passes the same arguments and gets every rollout.
    """
    dist = dist if dist is not None else Dist()
    setting = cfg.setting()
    sha = str(teacher.identity.get("sha256", ""))
    items = plan(cfg, prompts)
    scfg = cfg.sampler_config()
    h, w = scfg.latent_height, scfg.latent_width
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    todo = []
    for i, (_, prompt, seed, _) in enumerate(items):
        hit = (cache or {}).get(_cache_key(sha, setting, prompt, seed))
        if hit is not None:
            results[i] = hit
        else:
            todo.append(i)
    seconds = 0.0
    batches = [todo[s: s + cfg.batch_size] for s in range(0, len(todo), cfg.batch_size)]
    mine = [j for j in range(len(batches)) if j % dist.world == dist.rank]
    sampled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # batch -> (latents [B, hw, C], images [B, 3, H, W])
    for j in tqdm(mine, desc="teacher rollouts", disable=not show_progress or not dist.is_main):
        batch = batches[j]
        t0 = time.perf_counter()
        lat = sample(teacher, [items[i][1] for i in batch], scfg, seeds=[items[i][2] for i in batch],
                     prompt_indices=[items[i][0] for i in batch])
        img = teacher.decode(lat, h, w)
        seconds += time.perf_counter() - t0
        sampled[j] = (lat.float().cpu(), img.float().cpu())
    if dist.world > 1:  # every batch from its rank to all: shapes first (JSON), then the tensors
        shapes = {}
        for part in dist.all_gather_json({str(j): [list(t.shape) for t in pair] for j, pair in sampled.items()}):
            shapes.update({int(j): s for j, s in part.items()})
        for j in range(len(batches)):
            pair = sampled.get(j) or tuple(torch.empty(s, dtype=torch.float32) for s in shapes[j])
            sampled[j] = tuple(dist.broadcast_tensor(t, src=j % dist.world) for t in pair)
        seconds = sum(dist.all_gather_json(seconds))
    for j, batch in enumerate(batches):
        lat, img = sampled[j]
        for b, i in enumerate(batch):
            results[i] = (lat[b], img[b])
    rollouts = [TeacherRollout(index=i, prompt=prompt, prompt_index=p, seed=seed, split=split,
                               latents=results[i][0], image=results[i][1])
                for i, (p, prompt, seed, split) in enumerate(items)]
    stats = {"sampled": len(todo), "reused": len(items) - len(todo),
             "seconds_per_image": seconds / len(todo) if todo else None}
    return rollouts, stats
