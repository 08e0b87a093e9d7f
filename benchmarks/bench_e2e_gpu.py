"""End-to-end denoiser speed of a routed FLUX.2 inside the real ComfyUI (a GPU benchmark; not a test).

    python benchmarks/bench_e2e_gpu.py --model both --sizes 1024 2048 4096 8192 --skip-native-above 4096
    python benchmarks/bench_e2e_gpu.py --model tiny --device cpu --sizes 128 256        # CPU smoke test

What runs:

- ComfyUI is started headless through ``tests/helpers/comfy.py`` (``COMFYUI_PATH``; on CUDA without
  ``--cpu``, with ComfyUI's VRAM state set to high-VRAM so the whole model stays resident: no partial
  loading and no weight moves between the variants, which are clones of one ModelPatcher).
- The model is a FLUX.2-shaped transformer with random weights, loaded through ComfyUI's own path,
  ``comfy.sd.load_diffusion_model_state_dict`` (``model_detection`` -> ``supported_models.Flux2`` ->
  ``model_base.Flux2`` -> a ``ModelPatcher``). The key set and shapes come from ComfyUI's
  ``comfy.ldm.flux.model.Flux`` built on the meta device with FLUX.2's parameters; the state dict handed to
  ComfyUI holds zero-storage bf16 placeholders of those shapes (so detection and loading take their usual
  path), the modules are allocated on the GPU while ComfyUI builds them (``torch.device`` context), and the
  random weights are written in place there afterwards: one copy of the weights, never on the CPU.
  ``--from-file`` loads a single-file safetensors with ``comfy.sd.load_diffusion_model`` instead.
- Students: ``build_student(HKRConfig(mode=--mode), num_heads=H)`` per layer, every parameter moved
  slightly off its initialisation (seeded), saved with ``save_students`` with every layer ready: one
  artifact for the single blocks, one for every block.
- Variants: ``native``; ``students-single`` / ``students-all``: ``controller_node(model, artifact, None,
  quality_speed=1.0, policy_mode="threshold", seed=0)`` (no controller: every ready layer routed);
  ``free-single`` / ``free-all``: an ``optimized_attention_override`` that returns zeros of the right
  shape for those blocks and native attention for the others (the ceiling of replacing them).
- Sampling: ``comfy.sample.sample`` (euler, simple, cfg 1.0: one denoiser call per step, batch 1) on an
  empty FLUX.2 latent ``[1, 128, size/16, size/16]`` with 512 tokens of random conditioning and guidance 4,
  under ``torch.inference_mode()`` as ComfyUI's executor runs a prompt. Every denoiser call is timed with
  CUDA events by a DIFFUSION_MODEL wrapper (outermost: the routing wrapper's work is inside it). Each
  variant is warmed up once, by a 1-step sample at the first size it runs (Triton compiles there), and the
  student kernels once per size by one direct student call of that size (whatever a size specialises
  compiles outside the timed calls). The timed sample has ``--repeats`` steps at sizes up to
  ``--repeat-max-size`` and one step above (median reported). Peak VRAM is
  ``torch.cuda.max_memory_allocated`` over the timed sample (reset per variant; the weights are resident).
- One model is built per shape and reused by every variant and size (the variants are ModelPatcher clones);
  it is released before the next model. ``--json`` rewrites the results after every variant, and with
  several models each model's tables print when it is done, so a run cut short still reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the shared test helpers (helpers.comfy)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # flux2ttr from the checkout (the device has no install of it)

VARIANTS = ("native", "students-single", "free-single", "students-all", "free-all")
TXT_TOKENS = 512     # ComfyUI left-pads FLUX.2 conditioning to 512 tokens
GUIDANCE = 4.0
LATENT_CHANNELS = 128
LATENT_DOWN = 16     # FLUX.2 latent: 128 channels at 1/16 of the image side, patch size 1 -> one token per latent pixel
HEAD_DIM = 128


@dataclass(frozen=True)
class Shape:
    """A FLUX.2 transformer shape (head_dim 128, in/out channels 128, RoPE axes (32, 32, 32, 32), mlp ratio 3)."""

    label: str
    hidden: int
    heads: int
    double: int
    single: int
    context: int
    guidance: bool

    def flux_kwargs(self) -> dict[str, Any]:
        """FLUX.2's ``FluxParams`` as ComfyUI's ``model_detection`` sets them (the constants it fixes for
        FLUX.2, the rest from this shape); the loaded model is checked against the shape after detection."""
        return dict(image_model="flux2", in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, vec_in_dim=None,
                    context_in_dim=self.context, hidden_size=self.hidden, mlp_ratio=3.0, num_heads=self.heads,
                    depth=self.double, depth_single_blocks=self.single, axes_dim=[32, 32, 32, 32], theta=2000,
                    patch_size=1, qkv_bias=False, guidance_embed=self.guidance, txt_ids_dims=[3],
                    global_modulation=True, mlp_silu_act=True, ops_bias=False, default_ref_method="index",
                    ref_index_scale=10.0)

    def describe(self) -> str:
        return (f"hidden {self.hidden}, {self.heads} heads x {HEAD_DIM}, {self.double} double + {self.single} single "
                f"blocks, context_dim {self.context}, guidance embed {'on' if self.guidance else 'off'}")


SHAPES = {
    # FLUX.2 [dev]: Mistral-Small-3 24B text features (3 layers x 5120 = 15360)
    "dev": Shape("FLUX.2 [dev]", hidden=6144, heads=48, double=8, single=48, context=15360, guidance=True),
    # FLUX.2 [klein] 4B: Qwen3-4B text features (3 layers x 2560 = 7680, comfy/text_encoders/flux.py); the
    # distilled Klein has no guidance embedding (guidance_in absent -> ComfyUI's detection turns it off)
    "klein": Shape("FLUX.2 [klein] 4B", hidden=3072, heads=24, double=5, single=20, context=7680, guidance=False),
    # the CPU smoke shape (FLUX.2's per-head shapes, few heads and blocks)
    "tiny": Shape("tiny FLUX.2", hidden=256, heads=2, double=1, single=2, context=64, guidance=True),
}


# --------------------------------------------------------------------------------------------------
# model


def write_model_file(shape: Shape, path: Path, device: Any, dtype: Any, seed: int) -> None:
    """Save :func:`random_flux2`'s diffusion model as one safetensors file with ComfyUI's (BFL) keys, written
    to a temporary name and renamed (never a half-written model file)."""
    import torch
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    patcher = random_flux2(shape, device, dtype, seed)
    sd = {k: t.detach().to("cpu").contiguous() for k, t in patcher.model.diffusion_model.state_dict().items()}
    del patcher
    if device.type == "cuda":
        torch.cuda.empty_cache()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(sd, str(tmp), metadata={"flux2ttr": f"random {shape.label} weights, seed {seed}"})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"# wrote {path}: {shape.label}, {len(sd)} tensors, {path.stat().st_size / 2**30:.2f} GiB in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)


def random_flux2(shape: Shape, device: Any, dtype: Any, seed: int) -> Any:
    """A ComfyUI ``ModelPatcher`` of ComfyUI's FLUX.2 ``model_base`` with ``shape`` and random weights on ``device``."""
    import comfy.ldm.flux.model
    import comfy.ops
    import comfy.sd
    import torch

    with torch.device("meta"):
        meta = comfy.ldm.flux.model.Flux(**shape.flux_kwargs(), dtype=dtype, device="meta",
                                         operations=comfy.ops.disable_weight_init)
    wanted = {k: tuple(t.shape) for k, t in meta.state_dict().items()}
    del meta
    zero = torch.zeros((), device=device, dtype=dtype)
    sd = {k: zero.expand(s) for k, s in wanted.items()}  # shapes and dtype only: no storage behind them
    with torch.device(device):  # ComfyUI builds the modules with device=None: allocate them here, once
        patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
    if patcher is None:
        raise RuntimeError(f"ComfyUI did not detect the {shape.label} state dict as a model")
    dm = patcher.model.diffusion_model
    got = {k: tuple(t.shape) for k, t in dm.state_dict().items()}
    if got != wanted:
        diff = sorted(set(got) ^ set(wanted)) or sorted(k for k in got if got[k] != wanted[k])
        raise RuntimeError(f"ComfyUI built another FLUX.2 than asked for ({len(diff)} keys differ, e.g. {diff[:5]})")
    check_shape(patcher, shape)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in dm.parameters():
            if p.device != device:
                raise RuntimeError(f"a weight was built on {p.device}, not {device}")
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)
            else:
                p.normal_(1.0, 0.02, generator=g)  # RMSNorm scales
    return patcher


def check_shape(patcher: Any, shape: Shape) -> None:
    dm = patcher.model.diffusion_model
    p = dm.params
    got = (p.hidden_size, p.num_heads, len(dm.double_blocks), len(dm.single_blocks), p.context_in_dim,
           bool(p.guidance_embed), p.in_channels)
    want = (shape.hidden, shape.heads, shape.double, shape.single, shape.context, shape.guidance, LATENT_CHANNELS)
    if got != want or type(patcher.model).__name__ != "Flux2":
        raise RuntimeError(f"ComfyUI detected {type(patcher.model).__name__} {got}, expected Flux2 {want} "
                           "(hidden, heads, double, single, context, guidance, in_channels)")


def shape_of(patcher: Any, label: str) -> Shape:
    dm = patcher.model.diffusion_model
    p = dm.params
    return Shape(label, hidden=int(p.hidden_size), heads=int(p.num_heads), double=len(dm.double_blocks),
                 single=len(dm.single_blocks), context=int(p.context_in_dim), guidance=bool(p.guidance_embed))


def param_count(patcher: Any) -> int:
    return sum(p.numel() for p in patcher.model.diffusion_model.parameters())


# --------------------------------------------------------------------------------------------------
# students


def student_artifacts(shape: Shape, cfg: Any, folder: Path, seed: int) -> dict[str, Path]:
    """``{"single": path, "all": path}``: random students (every parameter perturbed off its init), all ready."""
    import torch

    from flux2ttr.contract import block_layer_keys, model_layer_keys
    from flux2ttr.students.artifacts import save_students
    from flux2ttr.students.build import build_student

    g = torch.Generator().manual_seed(seed)
    layers = {}
    for key in model_layer_keys(shape.double, shape.single):
        layer = build_student(cfg, num_heads=shape.heads).eval()
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        layers[key] = layer
    out = {}
    for name, keys in (("single", block_layer_keys("single", shape.single)), ("all", list(layers))):
        path = folder / f"students_{name}.safetensors"
        save_students(path, {k: layers[k] for k in keys}, cfg, num_heads=shape.heads, ready={k: True for k in keys},
                      metrics={}, train_config={"benchmark": "bench_e2e_gpu", "init": "random, perturbed"},
                      teacher={"kind": "random", "shape": dataclasses.asdict(shape)})
        out[name] = path
    return out


def kernel_module(mode: str) -> Any:
    """The fused-kernel dispatch module of student ``mode`` (None where it is not in this checkout)."""
    try:
        if mode == "hkr":
            from flux2ttr.students import fast_path as mod
        else:
            from flux2ttr.students import window_fast as mod
    except ImportError:
        return None
    return mod


def kernel_probe(cfg: Any, heads: int, device: Any, dtype: Any) -> str:
    """'fused' when the student's Triton kernels take a call of this kind, else 'eager (<why>)'."""
    import torch

    from flux2ttr.students.build import build_student

    mod = kernel_module(cfg.mode)
    if mod is None:
        return f"eager (no fused kernel module for mode {cfg.mode} in this checkout)"
    if torch.device(device).type != "cuda":
        return "eager (CPU)"
    with torch.inference_mode(False):
        layer = build_student(cfg, num_heads=heads).eval().to(device=device, dtype=dtype).requires_grad_(False)
    with torch.inference_mode():
        q, k, v = (torch.randn(1, heads, TXT_TOKENS + 64, HEAD_DIM, device=device, dtype=dtype) for _ in range(3))
        reason = mod.fast_path_reason(layer, q, k, v)
    return "fused" if reason is None else f"eager ({reason})"


def warm_student_kernels(cfg: Any, heads: int, size: int, device: Any, dtype: Any) -> None:
    """One student call at ``size``'s token count: Triton compiles whatever this size specialises (a token
    count threshold, another block plan) here, not inside a timed denoiser call."""
    import torch

    from flux2ttr.students.build import build_student

    side = size // LATENT_DOWN
    with torch.inference_mode(False):
        layer = build_student(cfg, num_heads=heads).eval().to(device=device, dtype=dtype).requires_grad_(False)
    with torch.inference_mode():
        q, k, v = (torch.randn(1, heads, TXT_TOKENS + side * side, HEAD_DIM, device=device, dtype=dtype) for _ in range(3))
        layer(q, k, v, TXT_TOKENS, 0.5, GUIDANCE, height=side, width=side)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class FusedCounter:
    """Counts the student calls the fused kernels answered (``fast_forward`` returning a tensor) while active:
    the dispatch module's ``fast_forward`` is looked up at call time, so a counting stand-in sees every call."""

    def __init__(self, mod: Any) -> None:
        self.mod, self.calls, self._orig = mod, 0, None

    def __enter__(self) -> "FusedCounter":
        if self.mod is not None:
            self._orig = orig = self.mod.fast_forward

            def counted(*args: Any, **kwargs: Any) -> Any:
                out = orig(*args, **kwargs)
                self.calls += out is not None
                return out

            self.mod.fast_forward = counted
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._orig is not None:
            self.mod.fast_forward = self._orig


# --------------------------------------------------------------------------------------------------
# variants and timing


def free_override(blocks: tuple[str, ...]) -> Callable:
    """An ``optimized_attention_override`` returning zeros of attention's output shape for ``blocks``
    (``block_type`` values) and native attention for every other call."""
    import torch

    def override(func: Callable, *args: Any, **kwargs: Any) -> Any:
        topts = kwargs.get("transformer_options") or {}
        if topts.get("block_type") not in blocks or not kwargs.get("skip_reshape", False) or len(args) < 3:
            return func(*args, **kwargs)
        q = args[0]
        b, h, n, d = q.shape
        if kwargs.get("skip_output_reshape", False):
            return torch.zeros_like(q)
        return q.new_zeros(b, n, h * d)

    return override


class CallTimer:
    """DIFFUSION_MODEL wrapper: the time of every denoiser call (CUDA events on CUDA, else wall clock)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._pending: list[Any] = []

    def __call__(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = executor(*args, **kwargs)
            end.record()
            self._pending.append((start, end))
        else:
            t0 = time.perf_counter()
            out = executor(*args, **kwargs)
            self._pending.append(1e3 * (time.perf_counter() - t0))
        return out

    def take(self) -> list[float]:
        """Milliseconds of the calls since the last ``take``."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            out = [s.elapsed_time(e) for s, e in self._pending]
        else:
            out = list(self._pending)
        self._pending.clear()
        return out


def build_variants(base: Any, timer: CallTimer, artifacts: dict[str, Path] | None, wanted: list[str]) -> dict[str, Any]:
    """The variants' ModelPatchers, all clones of ``base`` (one set of weights) with ``timer`` outermost."""
    import comfy.patcher_extension
    import torch

    from flux2ttr.comfy import patch as comfy_patch

    timed = base.clone()
    timed.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "bench_e2e_timer", timer)
    out: dict[str, Any] = {}
    for name in wanted:
        if name == "native":
            out[name] = timed
        elif name.startswith("students-"):
            with torch.inference_mode():  # as the node runs inside ComfyUI's executor
                out[name] = comfy_patch.controller_node(timed, artifacts[name.split("-")[1]], None, quality_speed=1.0,
                                                        policy_mode="threshold", seed=0)
        else:
            m = timed.clone()
            blocks = ("single",) if name == "free-single" else ("single", "double")
            m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = free_override(blocks)
            out[name] = m
    return out


def sample(model: Any, size: int, steps: int, cond: list, seed: int = 0) -> None:
    """One KSampler-style run: ``steps`` euler steps at cfg 1 on an empty FLUX.2 latent of a ``size``² image."""
    import comfy.sample
    import torch

    side = size // LATENT_DOWN
    latent = torch.zeros(1, LATENT_CHANNELS, side, side)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, cond, latent, denoise=1.0,
                            disable_pbar=True, seed=seed)


@dataclass
class Result:
    model: str
    size: int
    tokens: int
    variant: str
    ms: list[float]
    warmed_here: bool
    peak_gib: float | None
    wall_ms_per_step: float
    student_calls: int | None = None
    attention_calls: int | None = None
    fused_calls: int | None = None
    fallbacks: dict[str, int] = field(default_factory=dict)
    kernel: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.ms)


def run_variant(name: str, model: Any, size: int, cond: list, timer: CallTimer, warmed: set, args: Any,
                cuda: bool, model_key: str) -> Result:
    import torch

    from flux2ttr.comfy import patch as comfy_patch

    warm_here = name not in warmed
    if warm_here:
        sample(model, size, 1, cond)
        timer.take()
        warmed.add(name)
    steps = args.repeats if size <= args.repeat_max_size else 1
    mod = kernel_module(args.mode) if name.startswith("students-") else None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with FusedCounter(mod) as fused:
        sample(model, size, steps, cond)
    if cuda:
        torch.cuda.synchronize()
    wall = 1e3 * (time.perf_counter() - t0) / steps
    ms = timer.take()
    if len(ms) != steps:
        raise RuntimeError(f"{name}: {len(ms)} denoiser calls timed for {steps} steps (cfg 1 should give one per step)")
    side = size // LATENT_DOWN
    res = Result(model_key, size, TXT_TOKENS + side * side, name, ms, warm_here,
                 torch.cuda.max_memory_allocated() / 2**30 if cuda else None, wall)
    if name.startswith("students-"):
        holder = comfy_patch.last_runs()[-1]
        counts: dict[str, int] = {}
        for (_step, _key, how), n in holder.routed_calls.items():
            counts[how] = counts.get(how, 0) + n
        res.student_calls, res.attention_calls = counts.get("student", 0), sum(counts.values())
        res.fallbacks = dict(holder.fallbacks)
        res.fused_calls = fused.calls
        res.kernel = ("fused" if fused.calls == res.student_calls else
                      f"fused {fused.calls} / {res.student_calls}" if fused.calls else "eager")
    return res


# --------------------------------------------------------------------------------------------------
# output


def fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def fmt_ms(ms: float) -> str:
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}"


def cell(res: Result | None, native: float | None, ref: bool) -> str:
    if res is None:
        return "—"
    if native is None:
        return f"({fmt_ms(res.median)} ms)"
    return f"{native / res.median:.2f}×{'ʳ' if ref else ''} ({fmt_ms(res.median)} ms)"


def gib(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def print_tables(results: list[Result], refs: dict[tuple[str, int], float]) -> None:
    rows: dict[tuple[str, int], dict[str, Result]] = {}
    for r in results:
        rows.setdefault((r.model, r.size), {})[r.variant] = r
    print()
    print("| model | image | tokens | native ms | students single | free single | students all | free all "
          "| peak GiB native / students |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (model, size), by in rows.items():
        nat = by.get("native")
        ref = nat is None and (model, size) in refs
        native_ms = nat.median if nat is not None else refs.get((model, size))
        nat_cell = fmt_ms(nat.median) if nat is not None else (f"{fmt_ms(native_ms)}ʳ" if ref else "skipped")
        tokens = next(iter(by.values())).tokens
        peaks = [by[v].peak_gib for v in ("students-single", "students-all") if v in by and by[v].peak_gib is not None]
        peak = f"{gib(nat.peak_gib if nat else None)} / {gib(max(peaks) if peaks else None)}"
        cells = [cell(by.get(v), native_ms, ref) for v in VARIANTS[1:]]
        print(f"| {model} | {size}² | {tokens:,} | {nat_cell} | " + " | ".join(cells) + f" | {peak} |")
    if any((model, size) in refs and "native" not in by for (model, size), by in rows.items()):
        print("ʳ native time given with --native-ref (not measured in this run)")
    print()
    print("| model | image | variant | ms / call (median) | calls | warm-up at this size | wall ms / step | peak GiB "
          "| student / attention calls | fallbacks | student kernel |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        calls = "" if r.student_calls is None else f"{r.student_calls} / {r.attention_calls}"
        fb = ", ".join(f"{k}: {v}" for k, v in r.fallbacks.items()) or ("none" if r.student_calls is not None else "")
        print(f"| {r.model} | {r.size}² | {r.variant} | {fmt_ms(r.median)} | {len(r.ms)} | {'yes' if r.warmed_here else 'no'} "
              f"| {fmt_ms(r.wall_ms_per_step)} | {gib(r.peak_gib)} | {calls} | {fb} | {r.kernel} |")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_refs(items: list[str]) -> dict[tuple[str, int], float]:
    out = {}
    for item in items:
        try:
            model, rest = item.split(":", 1)
            size, ms = rest.split("=", 1)
            out[(model, int(size))] = float(ms)
        except ValueError:
            raise SystemExit(f"--native-ref {item!r}: expected MODEL:SIZE=MS, e.g. dev:8192=307000") from None
    return out


# --------------------------------------------------------------------------------------------------


def bench_model(model_key: str, shape: Shape | None, args: Any, cfg: Any, device: Any, dtype: Any, folder: Path,
                cond_seed: Any) -> list[Result]:
    """Every size and variant of one model (built once; released when this returns)."""
    import torch

    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    if shape is None:
        import comfy.sd

        base = comfy.sd.load_diffusion_model(str(args.from_file), model_options={"dtype": dtype})
        shape = shape_of(base, args.from_file.name)
        source = f"from {args.from_file}"
    else:
        base = random_flux2(shape, device, dtype, args.seed)
        source = "random weights built through comfy.sd.load_diffusion_model_state_dict"
    if cuda:
        torch.cuda.synchronize()
    kernel = kernel_probe(cfg, shape.heads, device, dtype)
    print(f"# model {model_key}: {shape.label}, {shape.describe()}, {fmt_params(param_count(base))} parameters, {source} "
          f"in {time.perf_counter() - t0:.1f} s; student kernel: {kernel}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    artifacts = student_artifacts(shape, cfg, folder, args.seed)
    timer = CallTimer(cuda)
    variants = build_variants(base, timer, artifacts, args.variants)
    cond = [[torch.randn(1, TXT_TOKENS, shape.context, generator=cond_seed), {"guidance": GUIDANCE}]]
    warmed: set[str] = set()
    kernels_warm: set[int] = set()
    results: list[Result] = []
    for size in args.sizes:
        for name, model in variants.items():
            if name == "native" and args.skip_native_above is not None and size > args.skip_native_above:
                continue
            if name.endswith("-single") and args.single_max_size is not None and size > args.single_max_size:
                continue
            if name.startswith("students-") and cuda and kernel != "fused" and size > 1024 and not args.allow_eager:
                log(f"[{model_key} {size}² {name}] skipped: the student runs eagerly here ({kernel}); "
                    "--allow-eager runs it anyway")
                continue
            log(f"[{model_key} {size}² {name}] ...")
            if name.startswith("students-") and size not in kernels_warm and (kernel == "fused" or not cuda):
                warm_student_kernels(cfg, shape.heads, size, device, dtype)
                kernels_warm.add(size)
            res = run_variant(name, model, size, cond, timer, warmed, args, cuda, model_key)
            results.append(res)
            extra = "" if res.student_calls is None else f", {res.student_calls}/{res.attention_calls} student calls"
            log(f"[{model_key} {size}² {name}] {fmt_ms(res.median)} ms / call ({len(res.ms)} calls, "
                f"peak {gib(res.peak_gib)} GiB{extra})")
            if args.json is not None:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                done = json.loads(args.json.read_text()) if args.json.exists() and args.json.stat().st_size else []
                done = [r for r in done if r["model"] != model_key or (r["size"], r["variant"]) != (size, name)]
                args.json.write_text(json.dumps(done + [dataclasses.asdict(res)], indent=1))
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["dev", "klein", "both", "tiny"], default="both",
                    help="model shape(s); both = klein then dev")
    ap.add_argument("--from-file", type=Path, default=None,
                    help="a FLUX.2 single-file safetensors (BFL keys) loaded with comfy.sd.load_diffusion_model instead")
    ap.add_argument("--write-file", type=Path, default=None,
                    help="build --model (one shape) with random weights, save its diffusion model as a single "
                         "BFL-format safetensors here (what ComfyUI's UNETLoader reads), and stop")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="image side in pixels")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--skip-native-above", type=int, default=None, help="no native run for sizes above this")
    ap.add_argument("--single-max-size", type=int, default=None,
                    help="no students-single / free-single runs for sizes above this (the slow rows at 8192²)")
    ap.add_argument("--mode", choices=["window", "hkr"], default="window", help="student mode (HKRConfig().mode is window)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--repeats", type=int, default=3, help="timed denoiser calls (steps of one sample) per variant")
    ap.add_argument("--repeat-max-size", type=int, default=2048, help="above this size one timed call per variant")
    ap.add_argument("--allow-eager", action="store_true",
                    help="run student variants above 1024² even when the fused kernels cannot run (eager is slow)")
    ap.add_argument("--native-ref", nargs="*", default=[], metavar="MODEL:SIZE=MS",
                    help="native ms for skipped sizes, for the speedup column (e.g. dev:8192=307000)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here (after every variant)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for s in args.sizes:
        if s % LATENT_DOWN:
            raise SystemExit(f"--sizes: {s} is not a multiple of {LATENT_DOWN}")
    refs = parse_refs(args.native_ref)

    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --model tiny for the smoke test)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    from helpers import comfy as comfy_harness

    tmp = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    comfy_harness.start_comfy(tmp / "comfy", gpu=cuda)
    import comfy.ldm.modules.attention as comfy_attention
    import comfy.model_management as mm

    if cuda:
        mm.vram_state = mm.VRAMState.HIGH_VRAM  # as --highvram: the whole model stays on the GPU
    from flux2ttr.students.hkr import HKRConfig

    cfg = HKRConfig(mode=args.mode)
    try:
        import comfyui_version

        comfy_version = comfyui_version.__version__
    except ImportError:
        comfy_version = "?"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    dev_name = (f"{torch.cuda.get_device_name(device)} ({torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB)"
                if cuda else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    attn_name = getattr(comfy_attention.optimized_attention, "__name__", str(comfy_attention.optimized_attention))
    print(f"# bench_e2e_gpu: {dev_name}; torch {torch.__version__}, triton {triton_version}, Python "
          f"{platform.python_version()}, ComfyUI {comfy_version} (attention {attn_name}, vram {mm.vram_state.name}), "
          f"{str(dtype).replace('torch.', '')}")
    landmarks = f"landmarks {cfg.landmark_fraction}·image tokens in [{cfg.landmark_min}, {cfg.landmark_max}]"
    if cfg.mode == "window":
        shape_txt = (f"tile {list(cfg.window_tile)}, radius {cfg.window_radius}, feature_dim {cfg.feature_dim} (hidden "
                     f"{cfg.hidden_dim}), text queries {cfg.text_query_keys}, "
                     + (landmarks if cfg.window_landmarks else "no landmarks"))
    else:
        shape_txt = (f"feature_dim {cfg.feature_dim} (hidden {cfg.hidden_dim}), {landmarks} + all text tokens, alpha_max "
                     f"{cfg.alpha_max}, adaptive alpha {cfg.adaptive_alpha}")
    print(f"# students: HKRConfig(mode={cfg.mode!r}) defaults: {shape_txt}; random init, every parameter perturbed "
          f"(seed {args.seed}), every layer ready; controller_node without a controller, quality_speed 1.0, threshold")
    clock = "CUDA events" if cuda else "wall clock"
    print(f"# sampling: comfy.sample.sample euler/simple, cfg 1.0 (one denoiser call per step), batch 1, "
          f"{TXT_TOKENS} random text tokens, guidance {GUIDANCE}, under torch.inference_mode(); ms = {clock} around "
          f"each denoiser call, median of {args.repeats} calls up to {args.repeat_max_size}², one call above; every "
          "variant warmed up by one 1-step sample at its first size, the student kernels by one direct call at every "
          "size; speedup = native ms / variant ms")

    if args.write_file is not None:
        if args.model not in SHAPES:
            raise SystemExit("--write-file: name one --model shape (dev, klein or tiny)")
        write_model_file(SHAPES[args.model], args.write_file, device, dtype, args.seed)
        return
    if args.from_file is not None:
        models = [("file", None)]
    elif args.model == "both":
        models = [("klein", SHAPES["klein"]), ("dev", SHAPES["dev"])]
    else:
        models = [(args.model, SHAPES[args.model])]

    cond_seed = torch.Generator().manual_seed(args.seed + 1)
    results: list[Result] = []
    for model_key, shape in models:
        results += bench_model(model_key, shape, args, cfg, device, dtype, tmp / model_key, cond_seed)
        mm.unload_all_models()  # ComfyUI lets go of the patchers; bench_model's locals (the model) are gone
        gc.collect()
        mm.soft_empty_cache()
        if cuda:
            torch.cuda.empty_cache()
            log(f"[{model_key}] released: {torch.cuda.memory_allocated() / 2**30:.1f} GiB still allocated")
        if len(models) > 1:
            print_tables([r for r in results if r.model == model_key], refs)  # in case a later model runs out of time
            sys.stdout.flush()
    print("\n## all results" if len(models) > 1 else "")
    print_tables(results, refs)


if __name__ == "__main__":
    main()
