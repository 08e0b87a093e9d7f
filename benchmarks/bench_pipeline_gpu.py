"""The whole pipeline at full size on a GPU: a random-weight FLUX.2-shaped model run as the ``comfyui`` teacher
(a GPU benchmark; the CPU smoke run is a test: ``tests/benchmarks/test_bench_pipeline.py``).

    python benchmarks/bench_pipeline_gpu.py --model klein --size 1024 --json pipeline_klein.json   # on an H200
    python benchmarks/bench_pipeline_gpu.py --model tiny --device cpu --size 256                 # CPU smoke run

What runs, in a work folder (``--work``, default a temp folder; kept with ``--keep`` or ``--work``):

- **Model files.** The diffusion model: a Klein-4B-shaped (``--model klein``) or tiny-shaped (``--model tiny``)
  FLUX.2 with random weights, built through ComfyUI's own loader by ``bench_e2e_gpu.py``'s builders and
  written as one BFL-format safetensors (``models/diffusion_models/``, what UNETLoader reads), or the file
  ``--from-file`` names. FLUX.2 [dev] is not offered: its 64 GB file does not fit the device's 64 GiB disk
  beside the store, and the ``comfyui`` teacher loads files (as a ComfyUI user has them), not models built in
  memory. Text encoder and VAE: a tiny-teacher codec file (``tiny_codec.safetensors``: hashed-token prompt
  tables of the model's context width, and a latent decoder) named as both, which the ``comfyui`` teacher
  accepts as a stand-in (:func:`flux2ttr.teachers.comfyui.is_tiny_codec`), so conditioning has the real shape
  ``[B, 512, context]``.
- **Params.** The repo's ``params.yaml`` with: ``teacher.kind: comfyui`` on those files, ``teacher.device``
  and ``distill.device`` = ``--device``; ``sampler`` and ``rollout`` at ``--size``² with ``--steps`` steps;
  ``--prompts`` capture prompts, all single blocks captured (``capture.budget_mib`` ``--budget-mib``,
  ``capture.tuple_heads`` ``--tuple-heads`` where the checkout has it); distill ``--distill-steps-per-layer``
  updates per layer (``--swap-layers`` layers a step), readiness threshold 2.0 (every layer ready: random
  weights give no student worth a threshold, and the later stages must route something); small rollout,
  controller and evaluate sections; every quality term that needs pretrained weights off (the defaults).
- **Stages.** ``teacher``, ``plain`` (the capture prompts sampled the same way with no capture: the reference
  for capture's cost), ``capture``, ``distill``, ``read_floor``, ``rollout``, ``train_controller``, ``evaluate``:
  each a child process (``python -m stages.<name>`` in the work folder with the repo on ``PYTHONPATH``; ``plain``
  and ``read_floor`` are this script's own ``--internal`` modes). Per stage: wall seconds; peak host RSS
  (``os.wait4``'s ``ru_maxrss`` of that child); GPU busy share and peak GPU memory (``nvidia-smi -lms 100``
  polled in the background, the device's ``memory.used``: includes the CUDA context); disk written
  (``/proc/<pid>/io`` ``write_bytes``, last poll) and the growth and peak of the work folder's size (polled
  every 0.2 s: the capture's spill and temporary store show there).
- **Read floor** (``read_floor``): the finished store's files read raw, once with ``O_DIRECT`` (past the page
  cache: the disk's rate; the floor where the file system allows it) and in a tight loop through the page
  cache as the earlier stages left it (the host's rate), as tuples/s at the store's on-disk bytes per tuple;
  and the distill loader alone (``bench_distill_io.bench_read``: zarr read, zstd decode, float32).
- **Report**: a markdown table per stage, the store figures (tuples per layer, bytes per tuple against
  heads x tokens x head_dim x 2 x itemsize for k and v plus q_sub/teacher_sub), the budgets (capture at most
  1.5x plain sampling per image; distill at least half the read floor or GPU-bound, taken as GPU busy
  >= 80%; peak GPU memory <= 139 GB, peak host RSS <= 128 GB), the spill/repack disk need at close (peak
  work-folder growth during capture over the final store size). ``--json`` writes all of it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for _p in (str(HERE), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_e2e_gpu  # noqa: E402 - the model shapes and the random-weight model file writer

STAGES = ("teacher", "plain", "capture", "distill", "read_floor", "rollout", "train_controller", "evaluate")
GPU_BUDGET_GB = 139.0    # one H200
HOST_BUDGET_GB = 128.0   # the device host
CAPTURE_BUDGET = 1.5     # capture seconds per image / plain sampling seconds per image
GPU_BOUND_BUSY = 0.80    # distill counts as GPU-bound at this nvidia-smi busy share
MODEL_FILE = "models/diffusion_models/flux2_random.safetensors"
CODEC_FILE = "models/text_encoders/tiny_codec.safetensors"
STORE = "traces/capture.zarr"


# --------------------------------------------------------------------------------------------------
# measuring a child process


class GpuPoller:
    """``nvidia-smi --query-gpu=utilization.gpu,memory.used -lms 100`` in the background; samples stamped on
    arrival (``time.monotonic()``). Absent nvidia-smi (a CPU run): no samples."""

    def __init__(self, gpu: int = 0) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (t, busy %, MiB used)
        self.proc = None
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        self.proc = subprocess.Popen([exe, f"--id={gpu}", "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits", "-lms", "100"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                busy, mem = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.monotonic(), busy, mem))

    def window(self, t0: float, t1: float) -> tuple[float | None, float | None]:
        """``(busy share 0..1, peak GiB)`` over ``[t0, t1]`` (``None`` without samples)."""
        got = [s for s in list(self.samples) if t0 <= s[0] <= t1]
        if not got:
            return None, None
        return sum(s[1] for s in got) / len(got) / 100.0, max(s[2] for s in got) / 1024.0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def tree_bytes(path: Path) -> int:
    """Allocated bytes of every file under ``path`` (files vanishing during the walk are skipped)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def io_write_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class StageResult:
    stage: str
    wall_s: float
    rc: int
    peak_rss_gib: float
    gpu_busy: float | None = None
    gpu_peak_gib: float | None = None
    write_bytes: int | None = None
    disk_growth_bytes: int = 0   # work folder after - before
    disk_peak_bytes: int = 0     # work folder peak - before
    extra: dict[str, Any] = field(default_factory=dict)


def run_child(stage: str, argv: list[str], work: Path, env: dict[str, str], gpu: GpuPoller,
              log_file: Path) -> StageResult:
    """Run ``argv`` in ``work`` and measure it (see the module doc); its output goes to ``log_file`` and its
    last lines to stderr when it fails."""
    base = tree_bytes(work)
    peak = base
    last_io = None
    t0 = time.monotonic()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        while True:
            done, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if done:
                break
            io = io_write_bytes(proc.pid)
            last_io = io if io is not None else last_io
            peak = max(peak, tree_bytes(work))
            time.sleep(0.2)
    t1 = time.monotonic()
    proc.returncode = os.waitstatus_to_exitcode(status)
    end = tree_bytes(work)
    busy, vram = gpu.window(t0, t1)
    res = StageResult(stage, t1 - t0, proc.returncode, usage.ru_maxrss / 2**20, busy, vram, last_io, end - base,
                      max(peak, end) - base)
    if proc.returncode:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-40:])
        print(tail, file=sys.stderr, flush=True)
    return res


# --------------------------------------------------------------------------------------------------
# the work folder


def write_codec(path: Path, context: int, seed: int) -> None:
    """A tiny-teacher codec file (prompt tables of width ``context``, the latent decoder) at ``path``."""
    from safetensors.torch import save_file

    from flux2ttr.teachers.teacher import TeacherConfig, build_tiny_codec

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(build_tiny_codec(TeacherConfig(joint_attention_dim=context, vocab_size=1024, seed=seed)), str(path))


def stage_params(args: Any, model_file: Path, codec: Path) -> dict[str, Any]:
    """The repo's params.yaml edited for this run (module doc)."""
    import yaml

    p = yaml.safe_load((REPO / "params.yaml").read_text())
    cuda = args.device == "cuda"
    p["teacher"].update(kind="comfyui", out_dir="teachers/comfyui", transformer=str(model_file),
                        text_encoder=str(codec), vae=str(codec), comfyui_path=os.environ.get("COMFYUI_PATH", ""),
                        dtype="bfloat16" if cuda else "float32", device=args.device)
    p["sampler"].update(steps=args.steps, height=args.size, width=args.size, show_progress=False)
    p["capture"].update(prompts="data/prompts/capture.json", queries=args.queries, layers="all_single", steps="all",
                        rollouts=1, budget_mib=float(args.budget_mib), batch_size=args.batch_size)
    for name in ("compression", "write_threads"):  # given: this run's; not given: params.yaml's
        if getattr(args, name) is not None:
            p["capture"][name] = getattr(args, name)
    if "tuple_heads" in p["capture"]:
        p["capture"]["tuple_heads"] = args.tuple_heads
    elif args.tuple_heads:
        raise SystemExit("--tuple-heads: this checkout's params.yaml has no capture.tuple_heads")
    swap = args.swap_layers
    steps = max(1, -(-args.distill_steps_per_layer * args.layers // swap))
    p["distill"].update(device=args.device, steps=steps, batch_size=args.distill_batch, min_swap_layers=swap,
                        max_swap_layers=swap, warmup_steps=min(5, args.distill_steps_per_layer),
                        val_max_tuples=4, val_batch_size=1, val_every=steps, checkpoint_every=steps,
                        readiness_threshold=2.0, min_updates=1, cache_mib=args.cache_mib,
                        reader_threads=args.reader_threads, torch_threads=0 if cuda else 1, progress=False)
    p["rollout"].update(prompts="data/prompts/controller.json", num_prompts=0, eval_prompts=1, seeds_per_prompt=1,
                        steps=args.steps, height=args.size, width=args.size, batch_size=1)
    p["controller"].update(iterations=args.controller_iterations, group_size=args.group_size, checkpoint_every=0,
                           metrics_window=1)
    p["quality"].update(device=args.device)
    p["evaluate"].update(quality_speed=[0.5], modes=["threshold"], random_repeats=1, timing_repeats=1,
                         grid_rollouts=1)
    p["comet"]["enabled"] = False
    return p


def prepare(args: Any, work: Path, env: dict[str, str], gpu: GpuPoller) -> tuple[Path, StageResult | None]:
    """Model file (written unless ``--from-file``), codec, prompts, params in ``work``; returns the model file and
    the writing step's measurement."""
    import yaml

    shape = bench_e2e_gpu.SHAPES[args.model]
    written = None
    if args.from_file is not None:
        model_file = args.from_file.resolve()
    else:
        model_file = work / MODEL_FILE
        if not model_file.is_file():
            log(f"[write_model] {shape.label}: {shape.describe()} ...")
            written = run_child("write_model", [sys.executable, str(Path(__file__).resolve()), "--internal",
                                                "write_model", "--model", args.model, "--device", args.device,
                                                "--seed", str(args.seed), "--work", str(work)],
                                work, env, gpu, work / "logs" / "write_model.log")
            if written.rc:
                raise SystemExit(f"writing the model file failed (rc {written.rc}); see {work / 'logs'}")
            log(f"[write_model] {model_file.stat().st_size / 2**30:.2f} GiB in {written.wall_s:.1f} s")
    codec = work / CODEC_FILE
    write_codec(codec, shape.context, args.seed)
    prompts = json.loads((REPO / "data/prompts/capture.json").read_text())
    if args.prompts > len(prompts):
        raise SystemExit(f"--prompts: data/prompts/capture.json has {len(prompts)}")
    (work / "data/prompts").mkdir(parents=True, exist_ok=True)
    (work / "data/prompts/capture.json").write_text(json.dumps(prompts[:args.prompts], indent=1))
    ctrl = json.loads((REPO / "data/prompts/controller.json").read_text())
    (work / "data/prompts/controller.json").write_text(json.dumps(ctrl[:args.rollout_prompts], indent=1))
    (work / "params.yaml").write_text(yaml.safe_dump(stage_params(args, model_file, codec), sort_keys=False))
    return model_file, written


# --------------------------------------------------------------------------------------------------
# --internal modes (child processes)


def internal_write_model(args: Any) -> None:
    import torch

    from flux2ttr.teachers.comfyui import comfyui_root, import_comfyui
    from flux2ttr.teachers.teacher import TeacherConfig

    cuda = args.device == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    import_comfyui(comfyui_root(TeacherConfig(kind="comfyui")), device=str(device))
    if cuda:  # as bench_e2e_gpu runs its builder: the model is built and stays on the GPU, no offload device
        import comfy.model_management as mm

        mm.vram_state = mm.VRAMState.HIGH_VRAM
    bench_e2e_gpu.write_model_file(bench_e2e_gpu.SHAPES[args.model], args.work / MODEL_FILE, device,
                                   torch.bfloat16 if cuda else torch.float32, args.seed)


def internal_plain(args: Any) -> None:
    """The capture prompts in capture's batches and seeds, sampled with no capture; prints one JSON line."""
    import torch

    from flux2ttr.config import load_section
    from flux2ttr.teachers.prompts import load_prompts
    from flux2ttr.teachers.sampler import SamplerConfig, sample
    from flux2ttr.teachers.teacher import TeacherConfig, load_teacher
    from flux2ttr.traces.capture import CaptureConfig

    params = Path("params.yaml")
    cap = load_section(CaptureConfig, "capture", params)
    scfg = load_section(SamplerConfig, "sampler", params)
    teacher = load_teacher(load_section(TeacherConfig, "teacher", params))
    prompts = load_prompts(cap.prompts)
    runs = [(r, i) for r in range(cap.rollouts) for i in range(len(prompts))]
    cuda = torch.cuda.is_available() and str(teacher.device).startswith("cuda")
    t0 = time.perf_counter()
    for s in range(0, len(runs), cap.batch_size):
        batch = runs[s:s + cap.batch_size]
        sample(teacher, [prompts[i] for _, i in batch], scfg, seeds=[int(scfg.seed) + r * len(prompts) + i for r, i in batch],
               prompt_indices=[i for _, i in batch])
    if cuda:
        torch.cuda.synchronize()
    print(json.dumps({"plain_seconds_sampling": time.perf_counter() - t0, "images": len(runs)}), flush=True)


def internal_read_floor(args: Any) -> None:
    """Raw read rate of the store's files and the distill loader's rate (module doc); prints one JSON line."""
    import bench_distill_io

    from flux2ttr.config import load_section
    from flux2ttr.distill.trainer import DistillConfig
    from flux2ttr.traces.store import TraceStore

    cfg = load_section(DistillConfig, "distill", Path("params.yaml"))
    store = TraceStore.open(cfg.store)
    files = [f for f in Path(cfg.store).rglob("*") if f.is_file()]
    total = sum(f.stat().st_size for f in files)
    buf = bytearray(16 * 2**20)
    t0, done, rounds = time.perf_counter(), 0, 0
    while rounds < 3 or time.perf_counter() - t0 < 2.0:
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while (n := fh.readinto(buf)) > 0:
                    done += n
        rounds += 1
        if rounds >= 50:
            break
    raw_bps = done / (time.perf_counter() - t0)
    direct_bps = direct_read_bytes_per_s(files)
    tuples = store.count()
    steps = max(1, min(cfg.steps, 40))
    loader = bench_distill_io.bench_read(store, cfg, steps, cfg.reader_threads, cfg.prefetch_steps)
    per_tuple = total / tuples
    floor_bps = direct_bps if direct_bps is not None else raw_bps
    print(json.dumps({"raw_read_bytes_per_s": raw_bps, "direct_read_bytes_per_s": direct_bps,
                      "store_disk_bytes": total, "tuples": tuples, "raw_read_tuples_per_s": raw_bps / per_tuple,
                      "direct_read_tuples_per_s": None if direct_bps is None else direct_bps / per_tuple,
                      "floor": "disk (O_DIRECT)" if direct_bps is not None else "host (page cache)",
                      "floor_tuples_per_s": floor_bps / per_tuple, "loader_tuples_per_s": loader,
                      "loader_steps": steps}), flush=True)


def direct_read_bytes_per_s(files: list[Path]) -> float | None:
    """One pass over ``files`` with ``O_DIRECT`` (past the page cache: the disk's rate) into a page-aligned
    buffer; ``None`` where the file system refuses ``O_DIRECT`` (tmpfs, some overlay file systems)."""
    import mmap

    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        return None
    buf = mmap.mmap(-1, 8 * 2**20)
    done, t0 = 0, time.perf_counter()
    try:
        for f in files:
            fd = os.open(f, os.O_RDONLY | flag)
            try:
                while (n := os.readv(fd, [buf])) > 0:
                    done += n
            finally:
                os.close(fd)
    except OSError:
        return None
    finally:
        buf.close()
    return done / max(time.perf_counter() - t0, 1e-9)


# --------------------------------------------------------------------------------------------------
# the report


def store_figures(store_path: Path) -> dict[str, Any]:
    """Tuples per layer, bytes per tuple (as stored, uncompressed) and the formula's bytes per tuple."""
    import numpy as np

    from flux2ttr.traces.store import SCALAR_FIELDS, TraceStore

    store = TraceStore.open(store_path)
    item = {"float32": 4, "float16": 2, "bfloat16": 2}[store.attrs["storage_dtype"]]
    per_layer, groups = {}, []
    for layer in store.layers:
        per_layer[layer] = store.count(layer)
        for n, count in store.groups(layer):
            sh = store.shapes(layer, n)
            stored = (item * (int(np.prod(sh["q_sub"])) + int(np.prod(sh["teacher_sub"])) + int(np.prod(sh["k"]))
                              + int(np.prod(sh["v"]))) + 4 * int(np.prod(sh["q_idx"])) + 8 * len(SCALAR_FIELDS)
                      + 4 * int(np.prod(sh.get("heads", (0,)))))
            groups.append({"layer": layer, "tokens": n, "count": count, "shapes": {k: list(v) for k, v in sh.items()},
                           "bytes_per_tuple": stored})
    heads = sorted({g["shapes"]["k"][0] for g in groups})
    return {"tuples": store.count(), "tuples_per_layer": per_layer, "groups": groups, "storage_itemsize": item,
            "heads_per_tuple": heads, "disk_bytes": store.nbytes_on_disk(),
            "tuple_heads": (store.attrs.get("capture") or {}).get("tuple_heads", 0)}


def tuple_formula(heads: int, tokens: int, queries: int, head_dim: int, item: int, subset: bool = False) -> int:
    """Bytes of one stored tuple: k, v ``[H, N, D]`` and q_sub, teacher_sub ``[H, Nq, D]`` at ``item`` bytes, q_idx
    int32, the 9 scalars as 8 bytes each, and a head subset's ``heads`` int32
    (:meth:`flux2ttr.traces.store.TraceWriter.tuple_nbytes`)."""
    return item * heads * head_dim * (2 * tokens + 2 * queries) + 4 * queries + 8 * 9 + (4 * heads if subset else 0)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def report(res: dict[str, Any]) -> str:
    th = res["store"]["tuple_heads"]
    lines = [f"## bench_pipeline_gpu: {res['model']} at {res['size']}², {res['prompts']} prompts x {res['steps']} steps, "
             f"tuple_heads {th or 'all'}, {res['device_name']}", ""]
    lines += ["| stage | wall s | GPU busy | peak GPU GiB | peak host RSS GiB | disk written | work folder growth (peak) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["stages"]:
        busy = "—" if r["gpu_busy"] is None else f"{100 * r['gpu_busy']:.0f}%"
        lines.append(f"| {r['stage']} | {r['wall_s']:.1f} | {busy} | {fmt(r['gpu_peak_gib'])} | {r['peak_rss_gib']:.2f} "
                     f"| {fmt_bytes(r['write_bytes'])} | {fmt_bytes(r['disk_growth_bytes'])} "
                     f"({fmt_bytes(r['disk_peak_bytes'])}) |")
    s = res["store"]
    lines += ["", "| figure | value |", "| --- | --- |"]
    lines.append(f"| capture (sampling {res['capture_seconds_sampling']:.1f} s + close {res['capture_seconds_close']:.1f} s) / "
                 f"plain sampling {res['plain_seconds_sampling']:.1f} s ({res['images']} images) | "
                 f"{res['capture_over_plain']:.2f}× |")
    c = res["capture"]
    lines.append(f"| tuples offered / spilled / kept (planned cut) | {c['offered']} / {c['spilled']} / {c['kept']} |")
    per_layer = sorted(set(s["tuples_per_layer"].values()))
    lines.append(f"| tuples kept per layer ({len(s['tuples_per_layer'])} layers) | "
                 f"{', '.join(map(str, per_layer))} (of {res['offered_per_layer']} offered) |")
    g = s["groups"][0]
    on_disk = fmt_bytes(s["disk_bytes"] / s["tuples"])
    lines.append(f"| bytes per tuple (heads {g['shapes']['k'][0]}, tokens {g['tokens']}, queries {g['shapes']['q_sub'][1]}) | "
                 f"{g['bytes_per_tuple']:,} ({fmt_bytes(g['bytes_per_tuple'])}; on disk {on_disk}) |")
    lines.append(f"| store | {s['tuples']} tuples, {fmt_bytes(s['disk_bytes'])} on disk |")
    lines.append(f"| distill tuples/s (trained) | {fmt(res['distill_tuples_per_s'], '.2f')} |")
    f = res["read_floor"]
    direct = f["direct_read_bytes_per_s"]
    lines.append("| store files read raw, disk (O_DIRECT) | " + ("file system refuses O_DIRECT" if direct is None else
                 f"{fmt_bytes(direct)}/s = {f['direct_read_tuples_per_s']:.1f} tuples/s") + " |")
    lines.append(f"| store files read raw, host (page cache) | {fmt_bytes(f['raw_read_bytes_per_s'])}/s = "
                 f"{f['raw_read_tuples_per_s']:.1f} tuples/s |")
    lines.append(f"| read floor ({f['floor']}) | {f['floor_tuples_per_s']:.1f} tuples/s |")
    lines.append(f"| distill loader alone (zarr + zstd + fp32) | {f['loader_tuples_per_s']:.1f} tuples/s |")
    lines.append(f"| spill/repack at close: peak work-folder growth in capture / final store | "
                 f"{fmt_bytes(res['capture_disk_peak_bytes'])} / {fmt_bytes(s['disk_bytes'])} = "
                 f"{res['capture_disk_peak_over_store']:.2f}× |")
    lines += ["", "| budget | measured | ok |", "| --- | --- | --- |"]
    for b in res["budgets"]:
        lines.append(f"| {b['budget']} | {b['measured']} | {'yes' if b['ok'] else 'NO'} |")
    return "\n".join(lines)


def budgets(res: dict[str, Any]) -> list[dict[str, Any]]:
    by = {r["stage"]: r for r in res["stages"]}
    out = [{"budget": f"capture ≤ {CAPTURE_BUDGET}× plain sampling per image", "measured": f"{res['capture_over_plain']:.2f}×",
            "ok": res["capture_over_plain"] <= CAPTURE_BUDGET}]
    floor = res["read_floor"]["floor_tuples_per_s"]
    rate, busy = res["distill_tuples_per_s"] or 0.0, by["distill"]["gpu_busy"]
    gpu_bound = busy is not None and busy >= GPU_BOUND_BUSY
    out.append({"budget": f"distill ≥ ½ read floor ({floor / 2:.1f} tuples/s) or GPU-bound (busy ≥ {GPU_BOUND_BUSY:.0%})",
                "measured": f"{rate:.2f} tuples/s, GPU busy {fmt(None if busy is None else 100 * busy, '.0f')}%",
                "ok": rate >= floor / 2 or gpu_bound})
    vram = max((r["gpu_peak_gib"] or 0.0) for r in res["stages"])
    out.append({"budget": f"peak GPU memory ≤ {GPU_BUDGET_GB:.0f} GB", "measured": f"{vram * 2**30 / 1e9:.1f} GB",
                "ok": vram * 2**30 / 1e9 <= GPU_BUDGET_GB})
    rss = max(r["peak_rss_gib"] for r in res["stages"])
    out.append({"budget": f"peak host RSS ≤ {HOST_BUDGET_GB:.0f} GB", "measured": f"{rss * 2**30 / 1e9:.1f} GB",
                "ok": rss * 2**30 / 1e9 <= HOST_BUDGET_GB})
    return out


def stage_figures(stage: str, work: Path) -> str:
    """The figures a stage leaves that the report needs, as one line, as soon as the stage ends ("" if none)."""
    try:
        if stage == "plain":
            p = last_json_line(work / "logs/plain.log")
            return f"sampling {p['plain_seconds_sampling']:.2f} s for {p['images']} images"
        if stage == "capture":
            c = json.loads((work / "metrics/capture_details.json").read_text())
            write = max(r["seconds_write"] for r in c["ranks"])
            return (f"sampling {c['seconds_sampling']:.2f} s, close {c['seconds_close']:.2f} s (shards {write:.2f} s); "
                    f"kept {c['kept']} of {c['offered']} tuples, {c['spilled']} spilled")
        if stage == "distill":
            d = json.loads((work / "metrics/distill_details.json").read_text())["summary"]
            return f"{fmt(d.get('tuples_per_s_trained'), '.2f')} tuples/s trained"
        if stage == "read_floor":
            f = last_json_line(work / "logs/read_floor.log")
            return f"floor {f['floor_tuples_per_s']:.1f} tuples/s ({f['floor']}), loader {f['loader_tuples_per_s']:.1f}"
    except (OSError, KeyError, ValueError, SystemExit):
        return ""
    return ""


def last_json_line(log_file: Path) -> dict[str, Any]:
    for line in reversed(log_file.read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"{log_file}: no result line")


def device_name(device: str) -> str:
    if device != "cuda":
        return f"CPU ({os.cpu_count()} cores)"
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "CUDA"
    out = subprocess.run([exe, "--id=0", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True,
                         text=True)
    return out.stdout.strip() or "CUDA"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> Any:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["klein", "tiny"], default="klein",
                    help="model shape (bench_e2e_gpu.SHAPES); dev's 64 GB file does not fit the device's disk")
    ap.add_argument("--from-file", type=Path, default=None, help="use this FLUX.2 single file instead of writing one "
                    "(its shape must be --model's: the codec's context width comes from it)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (capture and rollouts)")
    ap.add_argument("--prompts", type=int, default=2, help="capture prompts (at least 2: distill holds one out)")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps (capture and rollouts)")
    ap.add_argument("--batch-size", type=int, default=1, help="capture.batch_size (prompts per sampler batch)")
    ap.add_argument("--queries", type=int, default=64, help="capture.queries")
    ap.add_argument("--budget-mib", type=float, default=16384.0, help="capture.budget_mib")
    ap.add_argument("--tuple-heads", type=int, default=0, help="capture.tuple_heads (0 = all heads)")
    ap.add_argument("--compression", choices=["zstd", "none"], default=None, help="capture.compression (default: params.yaml's)")
    ap.add_argument("--write-threads", type=int, default=None, help="capture.write_threads (default: params.yaml's)")
    ap.add_argument("--distill-steps-per-layer", type=int, default=30)
    ap.add_argument("--swap-layers", type=int, default=4, help="distill.min/max_swap_layers")
    ap.add_argument("--distill-batch", type=int, default=2, help="distill.batch_size")
    ap.add_argument("--cache-mib", type=int, default=16384,
                    help="distill.cache_mib (decoded fp32 tuples in host RAM: Klein at 1024², all heads, 115 MB each)")
    ap.add_argument("--reader-threads", type=int, default=4, help="distill.reader_threads")
    ap.add_argument("--rollout-prompts", type=int, default=3, help="rollout prompts (the last one is the eval split)")
    ap.add_argument("--controller-iterations", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="work folder (kept; default: a temp folder, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the temp work folder")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--internal", choices=["write_model", "plain", "read_floor"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.size % 16:
        raise SystemExit(f"--size {args.size}: a multiple of 16")
    if args.prompts < 2 or args.rollout_prompts < 2:
        raise SystemExit("--prompts and --rollout-prompts: at least 2 (one is held out)")
    args.layers = bench_e2e_gpu.SHAPES[args.model].single
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse(argv)
    if args.internal is not None:
        {"write_model": internal_write_model, "plain": internal_plain, "read_floor": internal_read_floor}[args.internal](args)
        return None
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here (use --model tiny --device cpu for the smoke run)")
    work = (args.work or Path(tempfile.mkdtemp(prefix="bench_pipeline_"))).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PYTHONUNBUFFERED": "1"}
    gpu = GpuPoller()
    me = str(Path(__file__).resolve())
    try:
        model_file, written = prepare(args, work, env, gpu)
        results = [written] if written is not None else []
        notes: dict[str, str] = {}
        argvs = {s: [sys.executable, "-m", f"stages.{s}", "params.yaml"] for s in STAGES}
        for s in ("plain", "read_floor"):
            argvs[s] = [sys.executable, me, "--internal", s, "--model", args.model]
        for stage in STAGES:
            log(f"[{stage}] ...")
            r = run_child(stage, argvs[stage], work, env, gpu, work / "logs" / f"{stage}.log")
            results.append(r)
            log(f"[{stage}] {r.wall_s:.1f} s, rc {r.rc}, peak RSS {r.peak_rss_gib:.2f} GiB, GPU busy "
                f"{fmt(None if r.gpu_busy is None else 100 * r.gpu_busy, '.0f')}%, peak GPU {fmt(r.gpu_peak_gib)} GiB")
            note = stage_figures(stage, work)
            if note:
                log(f"[{stage}] {note}")
                notes[stage] = note
            if args.json is not None:  # so far: a run cut short still leaves every finished stage's figures
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"partial": True, "model": args.model, "size": args.size,
                                                 "stages": [asdict(x) for x in results], "notes": notes}, indent=1))
            if r.rc:
                raise SystemExit(f"stage {stage} failed (rc {r.rc}); log: {work / 'logs' / (stage + '.log')}")
        cap = json.loads((work / "metrics/capture_details.json").read_text())
        plain = last_json_line(work / "logs/plain.log")
        floor = last_json_line(work / "logs/read_floor.log")
        distill = json.loads((work / "metrics/distill_details.json").read_text())["summary"]
        by = {r.stage: r for r in results}
        store = store_figures(work / STORE)
        res: dict[str, Any] = {
            "model": args.model, "shape": asdict(bench_e2e_gpu.SHAPES[args.model]), "model_file": str(model_file),
            "size": args.size, "prompts": args.prompts, "steps": args.steps, "device": args.device,
            "device_name": device_name(args.device), "args": {k: str(v) for k, v in vars(args).items()},
            "stages": [asdict(r) for r in results],
            "images": plain["images"], "plain_seconds_sampling": plain["plain_seconds_sampling"],
            "capture_seconds_sampling": cap["seconds_sampling"], "capture_seconds_close": cap["seconds_close"],
            # the whole cost of a capture: sampling with the observer, then the shards, manifest and rename at close
            "capture_over_plain": (cap["seconds_sampling"] + cap["seconds_close"]) / plain["plain_seconds_sampling"],
            "offered_per_layer": cap["offered"] // max(1, cap["layers"]), "capture": cap,
            "store": store, "read_floor": floor,
            "distill_tuples_per_s": distill.get("tuples_per_s_trained"), "distill": distill,
            "capture_disk_peak_bytes": by["capture"].disk_peak_bytes,
            "capture_disk_peak_over_store": by["capture"].disk_peak_bytes / max(1, store["disk_bytes"]),
        }
        res["budgets"] = budgets(res)
        text = report(res)
        print(text, flush=True)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(res, indent=1))
        return res
    finally:
        gpu.stop()
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work folder kept: {work}")


if __name__ == "__main__":
    main()
