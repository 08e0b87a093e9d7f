"""Quality loss between student and teacher outputs (lower = closer to the teacher).

``total = rmse_weight*RMSE + cosine_weight*cosine_distance + lpips_weight*LPIPS + dreamsim_weight*DreamSim
+ hps_weight*HPS_penalty + biqa_quality_weight*BIQA_quality + biqa_aesthetic_weight*BIQA_aesthetic
+ gemini_similarity_weight*Gemini_similarity + gemini_quality_weight*Gemini_quality``

- RMSE and cosine distance ``1 - cos`` compare the final latents ``[B, N, C]`` (per row, flattened) when
  given and ``latent_space`` is on, else the images.
- LPIPS and DreamSim are perceptual distances of the images ``[B, 3, H, W]`` in [0, 1].
- HPS and BIQA are no-reference scores: only ``relu(teacher_score - student_score)`` is penalised (a student
  better than its teacher is not rewarded), in the score's own units.
- Gemini rates the teacher/student PNG pair: ``{"similarity": s, "quality": q}`` on 1..10, penalty
  ``clamp((10 - score) / 9, 0, 1)``. Any failure (HTTP, bad JSON, out of range) skips both Gemini terms for
  that call with a logged warning (:attr:`QualityLoss.skipped` names them).

Each model is loaded only when its weight is > 0 (at construction, so a missing package or weights file is
reported before training starts); the error names the pip extra or the params key and file. Each loads
through its package's own loader from local files only (nothing is fetched):

- DreamSim (``dreamsim``): the checkpoint folder ``dreamsim_cache_dir`` as DreamSim's first online run leaves
  it (base models, LoRA folder, and for DINO types torch.hub's ``facebookresearch_dino_main`` repo and
  ``checkpoints/``). DINO's hub code imports a top-level ``utils`` that ComfyUI's ``utils`` package shadows
  inside ComfyUI; :func:`dreamsim_hub_guard` lets the hub repo's own one load.
- HPSv2 (``hpsv2``): its open_clip fork builds ``hps_model`` and loads the whole HPS checkpoint
  (``{"state_dict": ...}``) strictly. hpsv2 1.2.0's wheel lacks its BPE vocabulary file;
  :func:`install_hps_vocab` copies open_clip's identical one into place.
- BIQA (``pyiqa``): the metric's network is built without pretrained weights (no backbone fetch) and
  ``InferenceModel.load_weights`` loads the whole network from ``{"params": state_dict}`` strictly.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from flux2ttr.config import Flux2TTRError

log = logging.getLogger("flux2ttr.routing.quality")

GEMINI_INSTRUCTION = (
    "You compare two renderings of the same prompt and seed. Image 1 is the reference (teacher), image 2 the "
    "approximation (student). Rate (a) how similar image 2 is to image 1 in content, layout and detail and "
    "(b) the visual quality of image 2 on its own. Answer only with JSON "
    '{"similarity": <1-10>, "quality": <1-10>}, 10 = identical / flawless.'
)
GEMINI_SCORE_MIN, GEMINI_SCORE_MAX = 1.0, 10.0
TERMS = ("rmse", "cosine", "lpips", "dreamsim", "hps", "biqa_quality", "biqa_aesthetic", "gemini_similarity",
         "gemini_quality")


class QualityDependencyError(ImportError, Flux2TTRError):
    """A quality term with a non-zero weight needs a package that is not installed."""


class QualityWeightsError(FileNotFoundError, Flux2TTRError):
    """A quality term with a non-zero weight needs a weights file that is not there."""


@dataclass
class QualityConfig:
    """params.yaml section ``quality``."""

    rmse_weight: float = 1.0
    cosine_weight: float = 1.0
    lpips_weight: float = 0.0
    dreamsim_weight: float = 0.0
    hps_weight: float = 0.0
    biqa_quality_weight: float = 0.0
    biqa_aesthetic_weight: float = 0.0
    gemini_similarity_weight: float = 0.0
    gemini_quality_weight: float = 0.0
    latent_space: bool = True  # RMSE/cosine on latents when given (else on images)
    device: str = "cpu"
    # LPIPS (extra lpips)
    lpips_net: str = "alex"  # alex | vgg | squeeze
    lpips_backbone: str = ""  # torchvision-layout backbone weights (.safetensors, features.*); "" = random backbone
    lpips_linear: str = ""  # LPIPS linear-layer weights; "" = the lpips package's bundled v0.1 file
    lpips_seed: int = 0  # seed of the random backbone (used when lpips_backbone is "")
    lpips_min_size: int = 64  # images smaller than this (pixels) are upsampled first (AlexNet needs >= ~32)
    # DreamSim (extra dreamsim)
    dreamsim_cache_dir: str = ""  # folder holding dreamsim's downloaded checkpoints (and torch.hub's DINO repo)
    dreamsim_type: str = "ensemble"  # ensemble | dino_vitb16 | clip_vitb32 | open_clip_vitb32
    # HPSv2 (extra hps): needs the prompt of each row
    hps_checkpoint: str = ""  # HPS_v2.1 checkpoint file (every weight of the model)
    hps_model: str = "ViT-H-14"  # the open_clip architecture the checkpoint is of
    hps_size: int = 224  # CLIP input size
    # pyiqa BIQA (extra pyiqa): no-reference metrics whose checkpoint holds the whole network
    biqa_quality_metric: str = "topiq_nr"
    biqa_quality_weights: str = ""  # its weights file (pyiqa's {"params": ...} .pth)
    biqa_aesthetic_metric: str = "topiq_iaa_res50"
    biqa_aesthetic_weights: str = ""
    # Gemini (extra gemini)
    gemini_api_key: str = ""  # "" = read the env var below
    gemini_api_key_env: str = "GEMINI_API_KEY"
    gemini_model: str = "gemini-3-flash-preview"
    gemini_base_url: str = ""  # "" = Google's endpoint
    gemini_timeout_s: float = 60.0
    gemini_attempts: int = 1  # HTTP attempts per call (1 = no retry)

    def __post_init__(self) -> None:
        from flux2ttr.config import ConfigError, check_choice, check_range  # noqa: PLC0415

        for t in TERMS:
            if getattr(self, f"{t}_weight") < 0:
                raise ConfigError(f"quality.{t}_weight must be >= 0")
        if self.gemini_attempts < 1:
            raise ConfigError("quality.gemini_attempts must be >= 1")
        check_choice("quality", self, "lpips_net", ("alex", "vgg", "squeeze"))
        check_choice("quality", self, "dreamsim_type", tuple(DREAMSIM_FILES))
        check_range("quality", self, "lpips_min_size", "hps_size", ge=1)
        check_range("quality", self, "gemini_timeout_s", gt=0.0)


def _require(module: str, extra: str, term: str) -> Any:
    import importlib  # noqa: PLC0415

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise QualityDependencyError(
            f"quality.{term}_weight > 0 needs the '{module}' package ({e}); install it with "
            f'pip install "flux2ttr[{extra}]" or set quality.{term}_weight: 0') from None


def _require_file(path: str, key: str, what: str) -> Path:
    if not path:
        raise QualityWeightsError(f"quality.{key} is empty: {what} is needed; put the file path in params.yaml")
    p = Path(path)
    if not p.exists():
        raise QualityWeightsError(f"{p}: {what} not found (params quality.{key}); download it there or fix the path")
    return p


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file with the restricted (weights-only) loader."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


# ------------------------------------------------------------------------------------------ loaders
def _load_lpips(cfg: QualityConfig) -> torch.nn.Module:
    lpips = _require("lpips", "lpips", "lpips")
    backbone = _require_file(cfg.lpips_backbone, "lpips_backbone", "LPIPS backbone weights") if cfg.lpips_backbone else None
    if cfg.lpips_linear:
        linear = str(_require_file(cfg.lpips_linear, "lpips_linear", "LPIPS linear-layer weights"))
    else:
        bundled = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{cfg.lpips_net}.pth"
        if not bundled.is_file():
            raise QualityWeightsError(f"{bundled}: the lpips package's bundled linear weights are missing; "
                                      "reinstall lpips or set quality.lpips_linear")
        linear = str(bundled)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.lpips_seed)
        # pnet_rand: never download the torchvision backbone; real weights come from lpips_backbone below
        model = lpips.LPIPS(net=cfg.lpips_net, pretrained=True, pnet_rand=True, model_path=linear, verbose=False)
    if backbone is not None:
        src = _load_tensors(backbone)
        own = model.net.state_dict()
        mapped = {}
        for key in own:  # lpips keeps torchvision's indices: slice2.3.weight <- features.3.weight
            _, idx_name = key.split(".", 1)
            src_key = f"features.{idx_name}"
            if src_key not in src:
                raise QualityWeightsError(f"{cfg.lpips_backbone}: no tensor '{src_key}' (expected a torchvision "
                                          f"{cfg.lpips_net} state dict)")
            mapped[key] = src[src_key]
        model.net.load_state_dict(mapped)
    return model.eval().requires_grad_(False).to(cfg.device)


# What each DreamSim type reads from its checkpoint folder (DreamSim downloads these on a first online run:
# the base models and LoRA folder from its release zip; DINO's hub repo and weights through torch.hub).
_DINO_HUB = ("facebookresearch_dino_main/hubconf.py", "checkpoints/dino_vitbase16_pretrain.pth")
DREAMSIM_FILES: dict[str, tuple[str, ...]] = {
    "ensemble": ("dino_vitb16_pretrain.pth", "clip_vitb16_pretrain.pth.tar", "open_clip_vitb16_pretrain.pth.tar",
                 "ensemble_lora/adapter_config.json", *_DINO_HUB),
    "dino_vitb16": ("dino_vitb16_pretrain.pth", "dino_vitb16_single_lora/adapter_config.json", *_DINO_HUB),
    "clip_vitb32": ("clip_vitb32_pretrain.pth.tar", "clip_vitb32_single_lora/adapter_config.json"),
    "open_clip_vitb32": ("open_clip_vitb32_pretrain.pth.tar", "open_clip_vitb32_single_lora/adapter_config.json"),
}
# top-level module names of DINO's hub repo that other trees on sys.path also use (ComfyUI has a utils package)
_HUB_MODULES = ("utils", "vision_transformer", "hubconf")


@contextmanager
def dreamsim_hub_guard() -> Iterator[None]:
    """Run DreamSim's model construction (which calls ``torch.hub.load`` for DINO) so that the hub repo's
    top-level ``utils``/``vision_transformer`` are its own: modules already imported under those names (inside
    ComfyUI, ComfyUI's ``utils`` package, whose missing ``trunc_normal_`` otherwise fails the import) are set
    aside and put back after, the hub repo's ones dropped, and torch.hub's directory (DreamSim points it at
    its checkpoint folder) restored."""
    def ours(name: str) -> bool:
        return name.split(".", 1)[0] in _HUB_MODULES

    saved = {n: m for n, m in sys.modules.items() if ours(n)}
    for n in saved:
        del sys.modules[n]
    import torch.hub  # noqa: PLC0415

    old_dir = torch.hub.get_dir()
    try:
        yield
    finally:
        for n in [n for n in sys.modules if ours(n)]:
            del sys.modules[n]
        sys.modules.update(saved)
        torch.hub.set_dir(old_dir)


def _load_dreamsim(cfg: QualityConfig) -> tuple[torch.nn.Module, Any]:
    """``(model, preprocess)`` from ``dreamsim.dreamsim`` on the checkpoint folder; ``model(a, b) -> [B]`` distance
    of ``[B, 3, 224, 224]`` images in [0, 1]."""
    mod = _require("dreamsim", "dreamsim", "dreamsim")
    cache = _require_file(cfg.dreamsim_cache_dir, "dreamsim_cache_dir", "the DreamSim checkpoint folder")
    missing = [f for f in DREAMSIM_FILES[cfg.dreamsim_type] if not (cache / f).is_file()]
    if missing:  # DreamSim itself would try to download them
        raise QualityWeightsError(f"{cache}: the DreamSim '{cfg.dreamsim_type}' checkpoint folder lacks "
                                  f"{', '.join(missing)} (params quality.dreamsim_cache_dir); copy the folder a first "
                                  "online DreamSim run leaves, or fix the path")
    with dreamsim_hub_guard():
        model, preprocess = mod.dreamsim(pretrained=True, device=cfg.device, cache_dir=str(cache),
                                         dreamsim_type=cfg.dreamsim_type)
    return model, preprocess


# ------------------------------------------------------------------------------------------ HPSv2
HPS_VOCAB = "bpe_simple_vocab_16e6.txt.gz"  # CLIP's BPE vocabulary, read when hpsv2's tokenizer module loads


def _hps_vocab_paths() -> tuple[Path, Path | None]:
    """``(where hpsv2's open_clip fork reads its vocabulary, open_clip's own copy or None)``, found without
    importing either (importing hpsv2's fork without the file fails)."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.find_spec("hpsv2")
    if spec is None or not spec.submodule_search_locations:
        raise QualityDependencyError('the hpsv2 package is not installed; pip install "flux2ttr[hps]"')
    target = Path(list(spec.submodule_search_locations)[0]) / "src" / "open_clip" / HPS_VOCAB
    oc = importlib.util.find_spec("open_clip")
    source = Path(list(oc.submodule_search_locations)[0]) / HPS_VOCAB if oc and oc.submodule_search_locations else None
    return target, source if source is not None and source.is_file() else None


def install_hps_vocab() -> Path:
    """Copy open_clip's BPE vocabulary (the same CLIP file) to where hpsv2 reads it (its 1.2.0 wheel ships
    without it); returns the path. A no-op when it is there."""
    import shutil  # noqa: PLC0415

    target, source = _hps_vocab_paths()
    if not target.is_file():
        if source is None:
            raise QualityDependencyError(f"{target} is missing and open_clip (its source) is not installed: "
                                         "pip install open-clip-torch, then run this again")
        shutil.copyfile(source, target)
    return target


def _load_hps(cfg: QualityConfig) -> tuple[torch.nn.Module, Callable[[list[str]], torch.Tensor]]:
    """``(CLIP model, tokenizer)`` of hpsv2's open_clip fork with the HPS checkpoint loaded; the tokenizer maps
    prompts to ``[B, 77]`` token ids."""
    _require("hpsv2", "hps", "hps")
    vocab, _ = _hps_vocab_paths()
    if not vocab.is_file():
        raise QualityDependencyError(f"{vocab}: hpsv2's wheel ships without its tokenizer vocabulary; run "
                                     "python -m flux2ttr.routing.quality install-hps-vocab (copies open_clip's)")
    oc = _require("hpsv2.src.open_clip", "hps", "hps")
    ckpt = _require_file(cfg.hps_checkpoint, "hps_checkpoint", "the HPS v2.1 checkpoint")
    if oc.get_model_config(cfg.hps_model) is None:
        from flux2ttr.config import ConfigError  # noqa: PLC0415

        raise ConfigError(f"quality.hps_model = {cfg.hps_model!r} is not an open_clip architecture hpsv2 knows "
                          f"(HPS v2/v2.1 are ViT-H-14)")
    try:  # hpsv2's own loader: torch file, "state_dict" key, strict
        model = oc.create_model(cfg.hps_model, pretrained=str(ckpt), device=cfg.device)
    except (RuntimeError, KeyError) as e:
        raise QualityWeightsError(f"{ckpt}: not an HPS checkpoint of {cfg.hps_model} (params quality.hps_checkpoint): "
                                  f"{str(e)[:400]}") from None
    return model.eval().requires_grad_(False), oc.get_tokenizer(cfg.hps_model)


# ------------------------------------------------------------------------------------------ pyiqa
def _pyiqa_arch(arch: str) -> type:
    """pyiqa's network class ``arch`` (its module imported the way pyiqa's ``build_network`` does)."""
    from pyiqa import archs  # noqa: PLC0415
    from pyiqa.utils.registry import ARCH_REGISTRY  # noqa: PLC0415

    lazy = getattr(archs, "_lazy_import_arch", None)  # pyiqa >= 0.1.15 imports arch modules on demand
    if arch not in ARCH_REGISTRY and lazy is not None:
        lazy(arch)
    return ARCH_REGISTRY.get(arch)


def _load_pyiqa(cfg: QualityConfig, metric: str, weights: str, term: str) -> torch.nn.Module:
    """pyiqa's ``InferenceModel`` for no-reference ``metric`` with ``weights`` loaded: ``[B, 3, H, W]`` in [0, 1]
    -> ``[B, 1]`` score in the metric's own units (``lower_better`` says which way it reads)."""
    import inspect  # noqa: PLC0415

    from flux2ttr.config import ConfigError  # noqa: PLC0415

    pyiqa = _require("pyiqa", "pyiqa", term)
    path = _require_file(weights, f"{term}_weights", f"pyiqa '{metric}' weights")
    from pyiqa.default_model_configs import DEFAULT_CONFIGS  # noqa: PLC0415

    if metric not in DEFAULT_CONFIGS or DEFAULT_CONFIGS[metric].get("metric_mode") != "NR":
        raise ConfigError(f"quality.{term}_metric = {metric!r}: not a no-reference pyiqa metric "
                          "(pyiqa.list_models('NR') lists them)")
    arch = DEFAULT_CONFIGS[metric]["metric_opts"]["type"]
    try:
        cls = _pyiqa_arch(arch)
    except KeyError as e:  # pyiqa swallows the ImportError of an arch module and reports an unknown name
        raise QualityDependencyError(f"quality.{term}_weight > 0: pyiqa cannot build '{metric}' ({e}): its network "
                                     "module failed to import (for TOPIQ, python -c 'import pyiqa.archs.topiq_arch' "
                                     "names the missing package)") from None
    params = inspect.signature(cls).parameters
    if "pretrained" not in params:
        raise ConfigError(f"quality.{term}_metric = {metric!r}: pyiqa's {arch} has no switch to skip its download")
    # no pretrained weights at build (pyiqa would fetch them, and timm the ImageNet backbone): the file has them all
    off = {k: False for k in ("pretrained", "backbone_pretrain") if k in params}
    model = pyiqa.create_metric(metric, device=cfg.device, as_loss=False, **off)
    try:
        model.load_weights(str(path), weight_keys="params")  # pyiqa's loader: strict
    except KeyError:
        raise QualityWeightsError(f"{path}: no 'params' state dict (pyiqa's checkpoint layout; params "
                                  f"quality.{term}_weights)") from None
    except RuntimeError as e:
        raise QualityWeightsError(f"{path}: not a '{metric}' checkpoint (params quality.{term}_weights): "
                                  f"{str(e)[:400]}") from None
    return model.eval().requires_grad_(False)


def _gemini_client(cfg: QualityConfig) -> Any:
    genai = _require("google.genai", "gemini", "gemini_similarity")
    from google.genai import types  # noqa: PLC0415

    key = cfg.gemini_api_key or os.environ.get(cfg.gemini_api_key_env, "")
    if not key:
        from flux2ttr.config import ConfigError  # noqa: PLC0415

        raise ConfigError(f"Gemini terms are on but no API key: set quality.gemini_api_key or the "
                                     f"{cfg.gemini_api_key_env} environment variable")
    opts = types.HttpOptions(base_url=cfg.gemini_base_url or None, timeout=int(cfg.gemini_timeout_s * 1000),
                             retry_options=types.HttpRetryOptions(attempts=cfg.gemini_attempts))
    return genai.Client(api_key=key, http_options=opts)


# ------------------------------------------------------------------------------------------ helpers
def png_bytes(image: torch.Tensor) -> bytes:
    """``[3, H, W]`` in [0, 1] -> PNG bytes."""
    from PIL import Image  # noqa: PLC0415

    arr = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def parse_gemini_scores(text: str) -> tuple[float, float]:
    """``(similarity, quality)`` from the model's JSON reply (code fences allowed); ValueError when the
    reply is not JSON, lacks a key, or a score is outside 1..10."""
    m = re.search(r"\{.*\}", text or "", flags=re.S)
    if m is None:
        raise ValueError(f"no JSON object in reply {text!r:.200}")
    data = json.loads(m.group(0))
    out = []
    for name in ("similarity", "quality"):
        v = data.get(name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"'{name}' missing or not a number in {data}")
        if not GEMINI_SCORE_MIN <= float(v) <= GEMINI_SCORE_MAX:
            raise ValueError(f"'{name}' = {v} outside {GEMINI_SCORE_MIN:g}..{GEMINI_SCORE_MAX:g}")
        out.append(float(v))
    return out[0], out[1]


def gemini_penalty(score: float) -> float:
    """``clamp((10 - score) / 9, 0, 1)``."""
    return min(1.0, max(0.0, (GEMINI_SCORE_MAX - score) / (GEMINI_SCORE_MAX - GEMINI_SCORE_MIN)))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).double()


# ------------------------------------------------------------------------------------------ loss
class QualityLoss:
    """``loss(student_images, teacher_images, *, student_latents=None, teacher_latents=None, prompts=None)
    -> (total, terms)``: images ``[B, 3, H, W]`` in [0, 1], latents ``[B, N, C]``; a teacher batch of 1 is
    broadcast. ``total`` is a 0-dim fp64 tensor, ``terms`` the unweighted mean of each active term."""

    def __init__(self, cfg: QualityConfig) -> None:
        self.cfg = cfg
        self.skipped: list[str] = []
        self.lpips = _load_lpips(cfg) if cfg.lpips_weight > 0 else None
        self.dreamsim = _load_dreamsim(cfg) if cfg.dreamsim_weight > 0 else None
        self.hps = _load_hps(cfg) if cfg.hps_weight > 0 else None
        self.biqa_quality = (_load_pyiqa(cfg, cfg.biqa_quality_metric, cfg.biqa_quality_weights, "biqa_quality")
                             if cfg.biqa_quality_weight > 0 else None)
        self.biqa_aesthetic = (_load_pyiqa(cfg, cfg.biqa_aesthetic_metric, cfg.biqa_aesthetic_weights,
                                           "biqa_aesthetic") if cfg.biqa_aesthetic_weight > 0 else None)
        use_gemini = cfg.gemini_similarity_weight > 0 or cfg.gemini_quality_weight > 0
        self.gemini = _gemini_client(cfg) if use_gemini else None

    # --- terms ----------------------------------------------------------------------------------
    def _lpips(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if min(s.shape[-2:]) < self.cfg.lpips_min_size:
            scale = self.cfg.lpips_min_size / min(s.shape[-2:])
            s, t = (F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False) for x in (s, t))
        with torch.no_grad():
            return self.lpips(s, t, normalize=True).reshape(-1).double()

    def _dreamsim(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        model, _ = self.dreamsim
        size = 224  # DreamSim's fixed input size
        s, t = (F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1) for x in (s, t))
        with torch.no_grad():
            return model(s, t).reshape(-1).double()

    def _hps_text(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """``[B, D]`` unit text embeddings of the prompts (encoded once per call: the text tower of ViT-H-14
        costs about a third of an image encode)."""
        model, tokenizer = self.hps
        with torch.no_grad():
            return F.normalize(model.encode_text(tokenizer(prompts).to(device)), dim=-1)

    def _hps_scores(self, images: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """``[B]`` fp64 HPS scores (cosine of image and prompt embeddings) of ``images [B, 3, H, W]`` in [0, 1]."""
        model, _ = self.hps
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=images.device)[:, None, None]  # CLIP
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=images.device)[:, None, None]
        x = F.interpolate(images, size=(self.cfg.hps_size, self.cfg.hps_size), mode="bicubic", align_corners=False)
        x = (x.clamp(0, 1) - mean) / std
        with torch.no_grad():
            img = F.normalize(model.encode_image(x), dim=-1)
        return (img * txt).sum(-1).double()

    @staticmethod
    def _iqa(metric: torch.nn.Module, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, t = s.clamp(0, 1), t.clamp(0, 1)  # pyiqa rejects inputs outside [0, 1]
        with torch.no_grad():
            ss, ts = metric(s).reshape(-1).double(), metric(t).reshape(-1).double()
        better_low = bool(getattr(metric, "lower_better", False))
        return F.relu(ss - ts) if better_low else F.relu(ts - ss)

    def gemini_scores(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, float] | None:
        """Mean ``(similarity_penalty, quality_penalty)`` over the rows; None (and a warning) on any failure."""
        from google.genai import types  # noqa: PLC0415

        sims, quals = [], []
        try:
            for s, t in zip(student, teacher):
                resp = self.gemini.models.generate_content(
                    model=self.cfg.gemini_model,
                    contents=[GEMINI_INSTRUCTION,
                              types.Part.from_bytes(data=png_bytes(t), mime_type="image/png"),
                              types.Part.from_bytes(data=png_bytes(s), mime_type="image/png")],
                    config=types.GenerateContentConfig(response_mime_type="application/json", temperature=0.0))
                sim, qual = parse_gemini_scores(resp.text)
                sims.append(gemini_penalty(sim))
                quals.append(gemini_penalty(qual))
        except Exception as e:  # HTTP, transport, JSON or range: skip the Gemini terms this time
            log.warning("Gemini rating failed (%s: %s); skipping the Gemini terms for this call",
                        type(e).__name__, str(e)[:300])
            return None
        return sum(sims) / len(sims), sum(quals) / len(quals)

    # --- total ----------------------------------------------------------------------------------
    def __call__(self, student_images: torch.Tensor, teacher_images: torch.Tensor, *,
                 student_latents: torch.Tensor | None = None, teacher_latents: torch.Tensor | None = None,
                 prompts: list[str] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        dev = cfg.device
        s_img = student_images.float().to(dev)
        t_img = teacher_images.float().to(dev).expand_as(s_img)
        if cfg.latent_space and student_latents is not None and teacher_latents is not None:
            s_vec = _rows(student_latents)
            t_vec = _rows(teacher_latents.to(student_latents.device).expand_as(student_latents))
        else:
            s_vec, t_vec = _rows(s_img), _rows(t_img)
        vals: dict[str, torch.Tensor | float] = {
            "rmse": ((s_vec - t_vec) ** 2).mean(dim=1).sqrt().mean(),
            "cosine": (1.0 - F.cosine_similarity(s_vec, t_vec, dim=1)).clamp_min(0.0).mean(),
        }
        if self.lpips is not None:
            vals["lpips"] = self._lpips(s_img, t_img).mean()
        if self.dreamsim is not None:
            vals["dreamsim"] = self._dreamsim(s_img, t_img).mean()
        if self.hps is not None:
            if not prompts or len(prompts) != s_img.shape[0]:
                raise ValueError("quality.hps_weight > 0: pass prompts=[one per batch row]")
            txt = self._hps_text(prompts, s_img.device)
            vals["hps"] = F.relu(self._hps_scores(t_img, txt) - self._hps_scores(s_img, txt)).mean()
        if self.biqa_quality is not None:
            vals["biqa_quality"] = self._iqa(self.biqa_quality, s_img, t_img).mean()
        if self.biqa_aesthetic is not None:
            vals["biqa_aesthetic"] = self._iqa(self.biqa_aesthetic, s_img, t_img).mean()
        self.skipped = []
        if self.gemini is not None:
            g = self.gemini_scores(s_img, t_img)
            if g is None:
                self.skipped = [t for t in ("gemini_similarity", "gemini_quality") if getattr(cfg, f"{t}_weight") > 0]
            else:
                if cfg.gemini_similarity_weight > 0:
                    vals["gemini_similarity"] = g[0]
                if cfg.gemini_quality_weight > 0:
                    vals["gemini_quality"] = g[1]
        total = torch.zeros((), dtype=torch.float64)
        terms: dict[str, float] = {}
        for name, v in vals.items():
            v = torch.as_tensor(v, dtype=torch.float64).cpu()
            terms[name] = float(v)
            total = total + getattr(cfg, f"{name}_weight") * v
        return total, terms


if __name__ == "__main__":  # python -m flux2ttr.routing.quality install-hps-vocab
    if sys.argv[1:] != ["install-hps-vocab"]:
        raise SystemExit("usage: python -m flux2ttr.routing.quality install-hps-vocab")
    print(install_hps_vocab())
