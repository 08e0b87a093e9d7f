"""The ``comfyui`` teacher: the user's own FLUX.2 (dev or Klein) from its three ComfyUI files, run by ComfyUI.

The people flux2ttr is for keep their model as ComfyUI keeps it: a BFL-format diffusion model in
``models/diffusion_models``, a text encoder in ``models/text_encoders`` (Mistral 3 Small for dev, with its
tokenizer inside the file; Qwen3 for Klein) and a VAE in ``models/vae``. This teacher runs them exactly as
ComfyUI does, so that what capture records is what the routed model meets inside ComfyUI:

- **ComfyUI** is imported from ``teacher.comfyui_path`` (default ``$COMFYUI_PATH``) by :func:`import_comfyui`,
  only inside this module's functions: the library and the other teacher kinds never import it.
- **Loading** (:func:`load_comfyui_teacher`): the diffusion model through ``comfy.sd.load_diffusion_model``
  (what UNETLoader calls; weight dtype ``teacher.dtype``, or with ``default`` ComfyUI's choice, UNETLoader's
  default, which keeps an fp8 file fp8), the text encoder through ``comfy.sd.load_clip``
  with ``CLIPType.FLUX2`` (CLIPLoader, type ``flux2``), the VAE through ``comfy.sd.VAE`` (VAELoader). A
  tiny codec file (``tiny_codec.safetensors``, written by the ``teacher`` stage) named as text encoder and VAE
  stands in for both: the tiny teacher's prompt encoder and decoder, exactly what the node pack's
  ``Flux2TTRTinyTextEncode`` / ``Flux2TTRTinyDecode`` run (how the tests load the tiny teacher as this kind).
- **Conditioning** (:meth:`ComfyTeacher.conditioning`): per prompt what CLIPTextEncode returns, FluxGuidance's
  ``guidance`` value (``sampler.guidance``; Klein's model has no guidance embedding and ignores it, the
  students are still given it as their ``cfg``, as the node gives it), ReferenceLatent's
  ``reference_latents``; then left-padded with zeros to 512 tokens, which is what ``model_base.Flux2``
  does to every conditioning (dev's Mistral tokens are the real ones only; Klein's Qwen3 tokenizer already
  pads to 512 with its pad token), so that prompts of different lengths share a batch.
- **Sampling** (:meth:`ComfyTeacher.sample`): ComfyUI's ``CFGGuider`` (only the positive conditioning, as
  BasicGuider, when ``cfg`` is 1: ComfyUI skips the unconditional pass at 1 anyway) with its ``euler``
  sampler over the project's FLUX.2 schedule (:func:`~flux2ttr.teachers.sampler.flux2_sigmas`: Flux2Scheduler's
  sigmas, or ``sampler.mu``'s), from the project's noise (:func:`~flux2ttr.teachers.sampler.initial_noise`,
  the tiny kind's). With ``cfg`` != 1 (Klein's base models) ComfyUI batches cond and uncond into one
  denoiser call when memory allows, and captures see both halves.
- **Capture**: a router with observers becomes ComfyUI's ``optimized_attention_override`` (the call the node
  patches: ``q, k, v [B, H, N, D]`` after QK-norm and RoPE) plus a DIFFUSION_MODEL wrapper that reads each
  denoiser call's sigma, guidance, latent grid and rows (:class:`CaptureHooks`). Every row is handed to the
  observers with its prompt, seed and ``uncond`` flag (ComfyUI's ``cond_or_uncond``); reference-latent
  tokens, which ComfyUI appends after the image grid, are moved in front of it
  (:func:`~flux2ttr.contract.reference_token_order`) and counted as conditioning tokens.
- **Student rollouts** go through the node's own patch (:func:`flux2ttr.routing.student_rollout.node_patch`,
  the router's ``external_patch``): the router's students and per-step route become a
  :class:`~flux2ttr.comfy.patch.RoutingHolder`, so the controller trains and is evaluated on exactly the
  routing the ComfyUI node does. (That function lives with the routing code so that this module, which
  every stage reaches, does not reach the student code.)

Shapes: latents are image tokens ``[B, h*w, 128]`` (row-major over the ``h x w`` latent grid) as for every
teacher; ComfyUI's latents are ``[B, 128, h, w]``; images ``[B, 3, 16h, 16w]`` in [0, 1].
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flux2ttr.atomic import file_sha256
from flux2ttr.config import to_dict
from flux2ttr.contract import FLUX2_COND_TOKENS, RunState, block_layer_keys, comfy_key, reference_token_order
from flux2ttr.teachers.router import RouterError
from flux2ttr.teachers.sampler import SamplerConfig, flux2_sigmas, initial_noise
from flux2ttr.teachers.teacher import (
    COMFYUI_DEFAULT_DTYPE,
    FLUX2_LATENT_CHANNELS,
    IDENTITY_FILE_NAME,
    TeacherConfig,
    TeacherError,
    _require,
    torch_dtype,
)

CAPTURE_KEY = "flux2ttr.capture"  # key of the capture wrapper on the ModelPatcher
COMFYUI_MARKERS = ("nodes.py", "execution.py", "folder_paths.py", "comfy/sd.py")
TINY_CODEC_KEY = "prompt_encoder.token"  # a tensor only the tiny codec file has
# ComfyUI reads Klein's Qwen tokenizer from this folder of its tree (comfy/text_encoders/flux.py)
QWEN_TOKENIZER_DIR = Path("comfy") / "text_encoders" / "qwen25_tokenizer"
_QWEN_TE = ("QWEN3_4B", "QWEN3_8B", "QWEN3VL_4B", "QWEN3VL_8B")  # ComfyUI's TEModel names of Klein's encoders
_MISTRAL_TE = ("MISTRAL3_24B", "MISTRAL3_24B_PRUNED_FLUX2")     # ... and of dev's (tokenizer in the file)
# packages ComfyUI imports at module level although FLUX.2 never uses them (see install_import_placeholders)
PLACEHOLDER_PACKAGES = ("torchaudio",)


# ----------------------------------------------------------------------------------------------------
# importing ComfyUI
# ----------------------------------------------------------------------------------------------------
class _Placeholder(types.ModuleType):
    """A module that imports fine and fails only when something in it is used."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        raise ImportError(f"{self.__name__}.{name}: '{self.__name__}' is not installed here (an import placeholder "
                          "stands in for it; FLUX.2 never uses it)")


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201 - importlib protocol
        if fullname.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):  # noqa: ANN001, ANN201
        module = _Placeholder(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:  # noqa: ANN001
        pass


def _comfy_kitchen_stand_in() -> types.ModuleType:
    """A ``comfy_kitchen`` for machines without its wheel (58 MB, too large to carry to a GPU device, see
    DESIGN.md): ComfyUI takes quantized ops (none in a bf16/fp32 FLUX.2) and FLUX.2's fused RoPE from it;
    the stand-in reports no int8 attention and applies RoPE with ComfyUI's own eager functions."""
    module = types.ModuleType("comfy_kitchen")

    def apply_rope(xq, xk, freqs_cis):  # noqa: ANN001, ANN202 - ComfyUI's signature
        from comfy.ldm.flux import math as flux_math  # noqa: PLC0415

        return flux_math._apply_rope(xq, xk, freqs_cis)

    def apply_rope1(x, freqs_cis):  # noqa: ANN001, ANN202
        from comfy.ldm.flux import math as flux_math  # noqa: PLC0415

        return flux_math._apply_rope1(x, freqs_cis)

    module.int8_attention_is_available = lambda *a, **k: False
    module.flash_attention_decode_is_available = lambda *a, **k: False
    module.apply_rope, module.apply_rope1 = apply_rope, apply_rope1
    return module


def install_import_placeholders() -> list[str]:
    """Make ComfyUI importable where some of its module-level imports are missing; returns their names.

    ``torchaudio`` (no build for the pinned torch on the package index; audio models only) gets an import
    placeholder that fails only when used; ``comfy_kitchen`` where missing gets :func:`_comfy_kitchen_stand_in`.
    Where the real packages are installed nothing is installed. diffusers, which probes optional packages'
    versions when imported, is imported first (where installed) so that it never sees a placeholder."""
    try:
        import diffusers  # noqa: F401, PLC0415
    except ImportError:
        pass
    missing = [n for n in PLACEHOLDER_PACKAGES if importlib.util.find_spec(n) is None]
    if missing and not any(isinstance(f, _PlaceholderFinder) for f in sys.meta_path):
        sys.meta_path.append(_PlaceholderFinder(tuple(missing)))
    if "comfy_kitchen" not in sys.modules and importlib.util.find_spec("comfy_kitchen") is None:
        sys.modules["comfy_kitchen"] = _comfy_kitchen_stand_in()
        missing.append("comfy_kitchen")
    return missing


def comfyui_root(cfg: TeacherConfig) -> Path:
    """The ComfyUI folder of ``teacher.comfyui_path`` (``""``: ``$COMFYUI_PATH``), checked."""
    raw = cfg.comfyui_path or os.environ.get("COMFYUI_PATH", "")
    if not raw:
        raise TeacherError("teacher.comfyui_path is empty and COMFYUI_PATH is not set: set teacher.comfyui_path in "
                           "params.yaml to your ComfyUI folder (the one holding main.py and comfy/)")
    root = Path(raw).expanduser().resolve()
    missing = [m for m in COMFYUI_MARKERS if not (root / m).is_file()]
    if missing:
        raise TeacherError(f"teacher.comfyui_path: {root} is not a ComfyUI folder (missing {', '.join(missing)}); "
                           "point it (or COMFYUI_PATH) at the folder holding ComfyUI's main.py")
    return root


def comfyui_version(root: Path) -> str:
    """ComfyUI's version as its ``comfyui_version.py`` states it (``"unknown"`` without one); read, not imported."""
    f = root / "comfyui_version.py"
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read_text()) if f.is_file() else None
    return m.group(1) if m else "unknown"


def _imported_root() -> Path | None:
    """The tree this process imported ComfyUI from (``None``: not imported)."""
    sd = sys.modules.get("comfy.sd")
    return Path(sd.__file__).resolve().parents[1] if sd is not None and getattr(sd, "__file__", None) else None


def import_comfyui(root: Path, *, device: str = "cpu") -> None:
    """Import ComfyUI from ``root`` into this process, headless, once (ComfyUI keeps global state).

    Its command-line flags: ``--cpu`` for ``device`` cpu, temporary base/output/input/user/temp folders
    (removed at exit; models are loaded by path, so nothing goes into the tree), no custom nodes. On CUDA
    ComfyUI takes the current device: ``cuda:N`` is made current first (under torchrun each rank's GPU already
    is, see :mod:`flux2ttr.distributed`). A process that already imported ComfyUI (a test session, ComfyUI
    itself) keeps it, when it is the same tree."""
    have = _imported_root()
    if have is not None:
        if have != root:
            raise TeacherError(f"teacher.comfyui_path: this process already imported ComfyUI from {have}, not {root}; "
                               "use one ComfyUI tree per process")
        return
    install_import_placeholders()
    cpu = str(device) == "cpu"
    if not cpu and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))
    base = Path(tempfile.mkdtemp(prefix="flux2ttr-comfyui-"))
    atexit.register(shutil.rmtree, base, True)
    for sub in ("output", "input", "user", "temp", "models"):
        (base / sub).mkdir()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    saved = sys.argv
    sys.argv = ["main.py", *(["--cpu"] if cpu else []), "--base-directory", str(base), "--output-directory",
                str(base / "output"), "--input-directory", str(base / "input"), "--user-directory", str(base / "user"),
                "--temp-directory", str(base / "temp"), "--disable-all-custom-nodes"]
    try:
        import comfy.options  # noqa: PLC0415

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401, PLC0415 - parses sys.argv now
        import comfy.sd  # noqa: F401, PLC0415
    finally:
        sys.argv = saved


# ----------------------------------------------------------------------------------------------------
# paths, identity
# ----------------------------------------------------------------------------------------------------
_FILE_KINDS = {
    "transformer": "FLUX.2 diffusion model file (ComfyUI's models/diffusion_models/*.safetensors, what UNETLoader loads)",
    "text_encoder": "text encoder file (ComfyUI's models/text_encoders: Mistral 3 Small for dev, Qwen3 for Klein)",
    "vae": "VAE file (ComfyUI's models/vae: the FLUX.2 VAE)",
}


def validate_comfyui_paths(cfg: TeacherConfig) -> dict[str, Path]:
    """The ComfyUI tree and the three files exist (each a file); else a :class:`TeacherError` naming the param.
    Returns ``{"transformer", "text_encoder", "vae": path}``."""
    comfyui_root(cfg)
    files = {}
    for param, kind in _FILE_KINDS.items():
        path = _require(getattr(cfg, param), param, kind=kind)
        if not path.is_file():
            raise TeacherError(f"teacher.{param}: {path} is a folder; teacher.kind comfyui takes the single {kind}")
        files[param] = path
    return files


def comfyui_identity(cfg: TeacherConfig, cached: dict[str, Any] | None = None) -> dict[str, Any]:
    """Identity of a comfyui teacher: every file's path, size, mtime and sha256, ComfyUI's version, and
    ``sha256``: one digest over the three files' (what the stores and rollouts are checked against).

    ``cached``: an earlier identity (``identity.json`` of the ``teacher`` stage); a file whose path, size and
    mtime it records unchanged keeps its sha256 instead of being hashed again (a FLUX.2 dev file is 64 GB)."""
    files = validate_comfyui_paths(cfg)
    old = (cached or {}).get("files") or {}
    out: dict[str, dict[str, Any]] = {}
    for name, path in files.items():
        st = path.stat()
        entry = {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        prev = old.get(name) or {}
        same = all(prev.get(k) == v for k, v in entry.items()) and isinstance(prev.get("sha256"), str)
        entry["sha256"] = prev["sha256"] if same else file_sha256(path)
        out[name] = entry
    digest = hashlib.sha256(json.dumps({k: v["sha256"] for k, v in out.items()}, sort_keys=True).encode()).hexdigest()
    root = comfyui_root(cfg)
    return {"kind": "comfyui", "config": to_dict(cfg), "sha256": digest, "file": str(files["transformer"]),
            "files": out, "comfyui": {"path": str(root), "version": comfyui_version(root)}}


def _cached_identity(cfg: TeacherConfig) -> dict[str, Any] | None:
    f = Path(cfg.out_dir) / IDENTITY_FILE_NAME
    try:
        ident = json.loads(f.read_text()) if f.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None
    return ident if isinstance(ident, dict) and ident.get("kind") == "comfyui" else None


# ----------------------------------------------------------------------------------------------------
# text encoder and VAE
# ----------------------------------------------------------------------------------------------------
def _keys_and_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of a safetensors file, from its header (no weights read)."""
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise TeacherError(f"{path} cannot be read as safetensors ({e})") from None


def is_tiny_codec(path: str | Path) -> bool:
    """Whether ``path`` is the tiny teacher's codec file (prompt encoder + decoder) rather than a real model."""
    path = Path(path)
    return path.suffix == ".safetensors" and TINY_CODEC_KEY in _keys_and_shapes(path)


def check_text_encoder(path: Path, root: Path) -> str:
    """The ComfyUI TEModel name of the text encoder file ``path`` (ComfyUI's own detection on the file's tensor
    shapes, no weights read), after checking that ComfyUI at ``root`` can build its tokenizer: Klein's Qwen3
    tokenizer is a folder of the ComfyUI tree, dev's Mistral tokenizer travels inside the file."""
    import comfy.sd  # noqa: PLC0415

    shapes = _keys_and_shapes(path)
    te = comfy.sd.detect_te_model({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    name = getattr(te, "name", None)
    if name in _QWEN_TE:
        tok = root / QWEN_TOKENIZER_DIR
        if not tok.is_dir():
            raise TeacherError(
                f"teacher.text_encoder: {path} is a Qwen3 text encoder (FLUX.2 Klein, ComfyUI {name}), whose tokenizer "
                f"ComfyUI reads from its own folder {tok}; that folder is missing in teacher.comfyui_path {root} (a "
                "trimmed ComfyUI tree?): point teacher.comfyui_path (or COMFYUI_PATH) at a complete ComfyUI checkout")
    elif name in _MISTRAL_TE:
        if "tekken_model" not in shapes:
            raise TeacherError(f"teacher.text_encoder: {path} is a Mistral 3 text encoder (FLUX.2 dev) without the "
                               "tokenizer ComfyUI expects inside the file (tensor 'tekken_model'); use the text "
                               "encoder file ComfyUI's FLUX.2 dev workflow names")
    else:
        raise TeacherError(f"teacher.text_encoder: ComfyUI does not recognise {path} as a FLUX.2 text encoder (found "
                           f"{name or 'no known model'}; FLUX.2 dev takes Mistral 3 Small, Klein Qwen3 4B/8B)")
    return name


class _TinyCodecText:
    """The tiny teacher's prompt encoder as a ComfyUI text encoder: CONDITIONING ``[[cond [1, 512, ctx], {}]]``
    (what ``Flux2TTRTinyTextEncode`` returns, less its guidance, set like FluxGuidance does)."""

    def __init__(self, path: Path) -> None:
        from flux2ttr.comfy.tiny_nodes import load_codec  # noqa: PLC0415

        self.codec = load_codec(path)

    def encode(self, text: str) -> list[list[Any]]:
        return [[self.codec.encoder([text]), {}]]


class _ComfyText:
    """A ComfyUI CLIP (``comfy.sd.load_clip`` with ``CLIPType.FLUX2``) encoded by the CLIPTextEncode node."""

    def __init__(self, clip: Any) -> None:
        self.clip = clip

    def encode(self, text: str) -> list[list[Any]]:
        import nodes  # noqa: PLC0415 - ComfyUI's nodes.py

        return nodes.CLIPTextEncode().encode(self.clip, text)[0]


class _TinyCodecVAE:
    """The tiny teacher's latent decoder (``Flux2TTRTinyDecode``): ``[B, 128, h, w]`` -> ``[B, 16h, 16w, 3]``."""

    def __init__(self, path: Path) -> None:
        from flux2ttr.comfy.tiny_nodes import load_codec  # noqa: PLC0415

        self.codec = load_codec(path)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        from flux2ttr.comfy.tiny_nodes import decode  # noqa: PLC0415

        return decode(self.codec, samples)


def _load_text_encoder(path: Path) -> Any:
    """The text encoder file ``path`` (checked by :func:`check_text_encoder` first), or the tiny codec."""
    if is_tiny_codec(path):
        return _TinyCodecText(path)
    import comfy.sd  # noqa: PLC0415
    import folder_paths  # noqa: PLC0415

    try:  # what CLIPLoader (type flux2) calls
        clip = comfy.sd.load_clip(ckpt_paths=[str(path)], embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                  clip_type=comfy.sd.CLIPType.FLUX2)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise TeacherError(f"teacher.text_encoder: ComfyUI could not load {path} as a FLUX.2 text encoder "
                           f"({type(e).__name__}: {e})") from e
    return _ComfyText(clip)


def _load_vae(path: Path) -> Any:
    if is_tiny_codec(path):
        return _TinyCodecVAE(path)
    import comfy.sd  # noqa: PLC0415
    import comfy.utils  # noqa: PLC0415

    sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)  # what VAELoader calls
    vae = comfy.sd.VAE(sd=sd, metadata=metadata)
    try:
        vae.throw_exception_if_invalid()
    except Exception as e:  # ComfyUI raises a plain RuntimeError for a file it cannot use as a VAE
        raise TeacherError(f"teacher.vae: ComfyUI cannot use {path} as a VAE ({e})") from e
    return vae


# ----------------------------------------------------------------------------------------------------
# conditioning
# ----------------------------------------------------------------------------------------------------
def batch_conditioning(conds: list[list[list[Any]]]) -> list[list[Any]]:
    """One CONDITIONING ``[[cond [B, T, ctx], extras]]`` from ``B`` single-prompt ones (one entry each, batch 1).

    Each ``cond`` is left-padded with zeros to 512 tokens first: exactly what ``model_base.Flux2.extra_conds``
    does to every conditioning before the model sees it, so the values are unchanged and prompts of different
    lengths batch. Extras: tensors (``pooled_output``) are concatenated, other values must agree;
    ``attention_mask`` is dropped (ComfyUI's FLUX.2 uses it only with ``attention_mask_img_shape``, which text
    encoding never sets, and it cannot batch across lengths)."""
    tensors, extras = [], []
    for i, c in enumerate(conds):
        if len(c) != 1 or c[0][0].shape[0] != 1:
            raise TeacherError(f"prompt {i}: a text encoding gave {len(c)} conditioning entries of batch "
                               f"{c[0][0].shape[0] if c else 0}; expected one of batch 1")
        t = c[0][0]
        if t.shape[1] < FLUX2_COND_TOKENS:
            t = torch.nn.functional.pad(t, (0, 0, FLUX2_COND_TOKENS - t.shape[1], 0))
        tensors.append(t)
        extras.append({k: v for k, v in c[0][1].items() if k != "attention_mask"})
    lengths = sorted({t.shape[1] for t in tensors})
    if len(lengths) > 1:
        raise TeacherError(f"prompts encode to {lengths} conditioning tokens (more than {FLUX2_COND_TOKENS} for some): "
                           "they cannot share a batch; set capture.batch_size (rollout.batch_size) to 1 or shorten them")
    merged: dict[str, Any] = {}
    for key in extras[0]:
        values = [e.get(key) for e in extras]
        if all(isinstance(v, torch.Tensor) for v in values):
            merged[key] = torch.cat(values, dim=0)
        elif all(v == values[0] for v in values):
            merged[key] = values[0]
        else:
            raise TeacherError(f"prompts' text encodings differ in {key!r}; they cannot share a batch")
    return [[torch.cat(tensors, dim=0), merged]]


def tokens_to_latent(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Image tokens ``[B, h*w, C]`` (row-major) -> ComfyUI latent ``[B, C, h, w]``."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)


def latent_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """ComfyUI latent ``[B, C, h, w]`` -> image tokens ``[B, h*w, C]`` (row-major)."""
    return x.flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------
# capture hooks
# ----------------------------------------------------------------------------------------------------
@dataclass
class _Call:
    """What the DIFFUSION_MODEL wrapper saw of the current denoiser call."""

    state: RunState  # per row: prompt index, seed, uncond
    n_txt: int       # conditioning (text) tokens: the context length
    height: int      # latent grid in tokens
    width: int


class CaptureHooks:
    """Hands ComfyUI's attention calls of one sampling run to a router's observers.

    :meth:`attention` is the ``optimized_attention_override`` (``func(q, k, v, heads, skip_reshape=True, ...)``
    with ``q, k, v [B, H, N, D]``), :meth:`diffusion_model` the DIFFUSION_MODEL wrapper that reads, once per
    denoiser call, sigma (-> the step of ``schedule``), the guidance input, the latent grid and which rows are
    which: ComfyUI puts ``len(cond_or_uncond)`` chunks of the ``B`` latent rows into one call, chunk ``c`` being
    ``cond_or_uncond[c]`` (0 cond, 1 uncond), so row ``r`` is latent row ``r % B`` of chunk ``r // B``.

    Each observed call reaches ``observer(key, q, k, v, out, n_cond, state)`` (the router's contract) with the
    native output ``out`` and ``state`` holding per-row lists; sequences with reference latents (ComfyUI's
    ``[text, grid, ref_1, ...]``) are permuted to ``[text, ref_1, ..., grid]`` with ``n_cond = text + refs``.
    ``skipped`` counts calls not observed (an attention mask). What the model computes is unchanged: the
    native result is returned in the layout the caller asked for."""

    def __init__(self, router: Any, schedule: list[float], prompt_indices: list[int], seeds: list[int],
                 sampler_cfg: float) -> None:
        self.router, self.schedule = router, [float(s) for s in schedule]
        self.prompt_indices, self.seeds, self.sampler_cfg = list(prompt_indices), list(seeds), float(sampler_cfg)
        self.call: _Call | None = None
        self.skipped: Counter = Counter()

    def step_of(self, sigma: float) -> int:
        """The step whose schedule entry is nearest ``sigma`` (the sampler calls the model at those sigmas)."""
        return min(range(max(1, len(self.schedule) - 1)), key=lambda i: abs(self.schedule[i] - sigma))

    def diffusion_model(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """DIFFUSION_MODEL wrapper: ``(x [R, C, h, w], timestep, context [R, T, ctx], y, guidance, ref_latents,
        control, transformer_options)``."""
        x, timestep, context = args[0], args[1], args[2]
        guidance = args[4] if len(args) > 4 else kwargs.get("guidance")
        topts = args[7] if len(args) > 7 else kwargs.get("transformer_options", {})
        sigmas = topts.get("sigmas", timestep)
        sigma = float(sigmas.reshape(-1)[0])  # one host read per denoiser call; rows share sigma
        g = float(guidance.reshape(-1)[0]) if isinstance(guidance, torch.Tensor) else guidance
        rows, B = int(x.shape[0]), len(self.prompt_indices)
        chunks = list(topts.get("cond_or_uncond") or [0])
        if rows != len(chunks) * B:
            raise RuntimeError(f"flux2ttr capture: a denoiser call of {rows} rows with cond_or_uncond {chunks} does "
                               f"not split into chunks of the run's {B} latent rows")
        state = RunState(sigma=sigma, cfg=float(g) if g is not None else self.sampler_cfg, step=self.step_of(sigma),
                         height=int(x.shape[-2]), width=int(x.shape[-1]),
                         prompt_index=[self.prompt_indices[r % B] for r in range(rows)],
                         seed=[self.seeds[r % B] for r in range(rows)],
                         uncond=[int(chunks[r // B]) for r in range(rows)])
        self.call = _Call(state=state, n_txt=int(context.shape[1]), height=state.height, width=state.width)
        self.router.state = state
        try:
            return executor(*args, **kwargs)
        finally:
            self.call = None

    def attention(self, func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``optimized_attention_override``: the native call, its inputs and output shown to the observers."""
        topts = kwargs.get("transformer_options") or {}
        block_type, block_index, call = topts.get("block_type"), topts.get("block_index"), self.call
        if (call is None or len(args) < 3 or not kwargs.get("skip_reshape", False)
                or block_type not in ("single", "double") or block_index is None):
            return func(*args, **kwargs)
        key = comfy_key(block_type, block_index)
        observers = self.router.observers_for(key)
        if not observers:
            return func(*args, **kwargs)
        if kwargs.get("mask") is not None:  # no FLUX.2 text-to-image call has one; never record masked attention
            self.skipped["attention mask"] += 1
            return func(*args, **kwargs)
        q, k, v = args[0], args[1], args[2]
        out = func(*args, **{**kwargs, "skip_output_reshape": True})  # [B, H, N, D]
        n_txt = int(topts["img_slice"][0]) if topts.get("img_slice") is not None else call.n_txt
        n_img = call.height * call.width
        n_ref = int(sum(topts.get("reference_image_num_tokens") or []))
        n = int(q.shape[2])
        if n_txt + n_img + n_ref != n:
            raise RuntimeError(f"flux2ttr capture: {key} sees {n} tokens, not text {n_txt} + grid {n_img} + "
                               f"reference {n_ref}")
        seen = (q, k, v, out)
        if n_ref:
            perm = reference_token_order(n_txt, n_img, n_ref, device=q.device)
            seen = tuple(t.index_select(2, perm) for t in seen)
        for fn in observers:
            fn(key, *seen, n_txt + n_ref, call.state)
        if kwargs.get("skip_output_reshape", False):
            return out
        b, h, _, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)  # what the native call returns without skip_output_reshape


# ----------------------------------------------------------------------------------------------------
# the teacher
# ----------------------------------------------------------------------------------------------------
class ComfyTeacher:
    """A FLUX.2 run by ComfyUI behind the teacher interface (see the module docstring and
    :class:`~flux2ttr.teachers.teacher.Teacher`): ``sample`` (the whole sampling run, which
    :func:`flux2ttr.teachers.sampler.sample` hands over: ``samples_itself``), ``encode_prompts``, ``decode``."""

    samples_itself = True  # flux2ttr.teachers.sampler.sample hands the run to self.sample

    def __init__(self, model: Any, text: Any, vae: Any, identity: dict[str, Any], *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.model, self._text, self._vae, self.identity = model, text, vae, identity
        self.device, self.dtype = torch.device(device), dtype
        dm = getattr(getattr(model, "model", None), "diffusion_model", None)
        params = getattr(dm, "params", None)
        if dm is None or params is None or not hasattr(dm, "single_blocks") or not hasattr(dm, "double_blocks"):
            raise TeacherError("teacher.transformer: ComfyUI did not load a FLUX transformer (no double_blocks/"
                               "single_blocks); give the FLUX.2 file of models/diffusion_models")
        if type(model.model).__name__ != "Flux2":
            raise TeacherError(f"teacher.transformer: ComfyUI loaded a {type(model.model).__name__} model, not FLUX.2")
        self.num_heads = int(params.num_heads)
        self.head_dim = int(params.hidden_size) // self.num_heads
        self.in_channels = int(params.in_channels)
        self.context_dim = int(params.context_in_dim)
        self.guidance_embeds = bool(params.guidance_embed)
        self.cond_tokens = FLUX2_COND_TOKENS
        self.single_layer_keys = block_layer_keys("single", len(dm.single_blocks))
        self.double_layer_keys = block_layer_keys("double", len(dm.double_blocks))
        if self.in_channels != FLUX2_LATENT_CHANNELS:
            raise TeacherError(f"teacher.transformer: {self.in_channels} latent channels, FLUX.2 has "
                               f"{FLUX2_LATENT_CHANNELS}")

    @property
    def layer_keys(self) -> list[str]:
        return self.double_layer_keys + self.single_layer_keys

    def attach_router(self, router: Any) -> None:
        """Nothing to install: each :meth:`sample` call routes through ComfyUI's hooks (see there)."""

    # --- conditioning ------------------------------------------------------------------------------
    def conditioning(self, prompts: list[str], guidance: float, references: list[list[torch.Tensor]] | None = None,
                     grid: tuple[int, int] | None = None) -> list[list[Any]]:
        """ComfyUI CONDITIONING of ``prompts`` batched (:func:`batch_conditioning`): CLIPTextEncode per prompt,
        FluxGuidance's ``guidance``, and ReferenceLatent once per reference (``references[b]``: the prompt's
        reference latents, each ``[128, h', w']`` or tokens ``[h*w, 128]`` of the ``grid`` ``(h, w)``; every
        prompt the same number and shapes)."""
        import node_helpers  # noqa: PLC0415 - ComfyUI's

        cond = batch_conditioning([self._text.encode(p) for p in prompts])
        cond = node_helpers.conditioning_set_values(cond, {"guidance": float(guidance)})  # FluxGuidance
        for lat in _reference_batches(references, len(prompts), grid):
            cond = node_helpers.conditioning_set_values(cond, {"reference_latents": [lat]}, append=True)  # ReferenceLatent
        return cond

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """``[B, 512, ctx]`` conditioning tensors (as the model sees them: left-padded to 512)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        with torch.inference_mode():
            cond = batch_conditioning([self._text.encode(p) for p in prompts])[0][0]
        with torch.inference_mode(False):
            return cond.clone().to(self.device, self.dtype)

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``[B, h*w, 128]`` -> images ``[B, 3, 16h, 16w]`` float in [0, 1] (the VAE, or the tiny codec)."""
        with torch.inference_mode():
            images = self._vae.decode(tokens_to_latent(latents.float(), height, width))  # [B, H, W, 3]
        with torch.inference_mode(False):
            return images.movedim(-1, 1).float().clone()

    # --- sampling ----------------------------------------------------------------------------------
    def sample(self, prompts: list[str], cfg: SamplerConfig, *, router: Any = None, seeds: list[int],
               prompt_indices: list[int], on_step: Callable | None = None,
               references: list[list[torch.Tensor]] | None = None) -> torch.Tensor:
        """One ComfyUI sampling run of ``prompts``; final latents ``[B, h*w, 128]`` fp32.

        ``router``: its observers see every attention call of their layers (:class:`CaptureHooks`); its students
        run where its route says, through ``router.external_patch`` (the node's patch, set by
        :func:`flux2ttr.routing.student_rollout.make_router`), and ``router.calls`` counts their calls.
        ``on_step(step, sigma, x, velocity)`` after each step's model call (tokens ``[B, h*w, 128]``).
        ``references``: per prompt, the reference latents (ReferenceLatent), given to the negative too (as
        ComfyUI's FLUX.2 edit workflows do)."""
        import comfy.patcher_extension  # noqa: PLC0415
        import comfy.samplers  # noqa: PLC0415

        B, h, w = len(prompts), cfg.latent_height, cfg.latent_width
        sigmas = flux2_sigmas(cfg.steps, h * w, cfg.mu).float()
        noise = tokens_to_latent(initial_noise(seeds, h * w, self.in_channels), h, w)
        model = self.model
        if router is not None and router.has_observers:
            hooks = CaptureHooks(router, sigmas.tolist(), prompt_indices, seeds, cfg.cfg)
            model = model.clone()
            model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = hooks.attention
            model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, CAPTURE_KEY,
                                       hooks.diffusion_model)
        calls = None
        if router is not None and router.students:
            if router.external_patch is None:
                raise RouterError("the comfyui teacher routes students through the ComfyUI node's patch: build the "
                                  "router with flux2ttr.routing.student_rollout.make_router")
            model, calls = router.external_patch(model, router)
        callback = None
        if on_step is not None:
            def callback(step: int, denoised: torch.Tensor, x: torch.Tensor, total: int) -> None:
                s = float(sigmas[step])
                on_step(step, s, latent_to_tokens(x).float(), latent_to_tokens((x - denoised) / s).float())
        with torch.inference_mode():
            positive = self.conditioning(prompts, cfg.guidance, references, (h, w))
            guider = comfy.samplers.CFGGuider(model)
            if cfg.true_cfg:
                negative = self.conditioning([cfg.negative_prompt] * B, cfg.guidance, references, (h, w))
                guider.set_conds(positive, negative)
                guider.set_cfg(float(cfg.cfg))
            else:  # BasicGuider: the conditional pass alone (what ComfyUI's CFG does at a scale of 1)
                guider.inner_set_conds({"positive": positive})
            out = guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas,
                                callback=callback, disable_pbar=not cfg.show_progress, seed=int(seeds[0]))
        if calls is not None:
            router.calls = calls()
        with torch.inference_mode(False):  # ordinary tensors for the caller (quality, stores, autograd-free maths)
            return latent_to_tokens(out).float().clone().to(self.device)


def _reference_batches(references: list[list[torch.Tensor]] | None, batch: int,
                       grid: tuple[int, int] | None) -> list[torch.Tensor]:
    """``references[b][j]`` (``[128, h', w']``, or tokens ``[h*w, 128]`` of ``grid``) -> per ``j`` one latent
    ``[B, 128, h', w']`` (ReferenceLatent's input)."""
    if not references:
        return []
    if len(references) != batch or len({len(r) for r in references}) != 1:
        raise ValueError(f"references: {batch} prompts need one list each of the same length, got "
                         f"{[len(r) for r in references]}")
    out = []
    for j in range(len(references[0])):
        lats = []
        for r in references:
            t = r[j].float()
            if t.ndim == 2:
                if grid is None or t.shape[0] != grid[0] * grid[1]:
                    raise ValueError(f"references: a token latent {tuple(t.shape)} needs the grid {grid}")
                t = tokens_to_latent(t[None], *grid)[0]
            if t.ndim != 3:
                raise ValueError(f"references: a reference latent must be [128, h, w] or [h*w, 128], got {tuple(t.shape)}")
            lats.append(t)
        out.append(torch.stack(lats))
    return out


def load_comfyui_teacher(cfg: TeacherConfig) -> ComfyTeacher:
    """The comfyui teacher of ``cfg``: paths checked, ComfyUI imported, the three files loaded (module doc)."""
    files = validate_comfyui_paths(cfg)
    root = comfyui_root(cfg)
    default = cfg.dtype == COMFYUI_DEFAULT_DTYPE
    import_comfyui(root, device=str(cfg.device))
    if not is_tiny_codec(files["text_encoder"]):  # before hashing and loading gigabytes: the tokenizer's error first
        check_text_encoder(files["text_encoder"], root)
    identity = comfyui_identity(cfg, _cached_identity(cfg))
    text = _load_text_encoder(files["text_encoder"])
    vae = _load_vae(files["vae"])
    import comfy.sd  # noqa: PLC0415

    try:  # what UNETLoader calls: weight dtype "default" (ComfyUI's choice) or the one teacher.dtype names
        model = comfy.sd.load_diffusion_model(str(files["transformer"]),
                                              model_options={} if default else {"dtype": torch_dtype(cfg.dtype)})
    except (RuntimeError, ValueError, KeyError) as e:
        raise TeacherError(f"teacher.transformer: ComfyUI could not load {files['transformer']} "
                           f"({type(e).__name__}: {e})") from e
    if model is None:
        raise TeacherError(f"teacher.transformer: ComfyUI does not recognise {files['transformer']} as a diffusion "
                           "model (give the BFL-format FLUX.2 file of models/diffusion_models)")
    dtype = model.model.get_dtype() if default else torch_dtype(cfg.dtype)
    return ComfyTeacher(model, text, vae, identity, device=cfg.device, dtype=dtype)
