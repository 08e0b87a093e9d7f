"""The ``flux2ttr`` command line: every DVC stage, plus ``inspect``, ``train-teacher``, ``scene-prompts``,
``comfy-install`` and ``offline-plots``.

Each stage command calls ``run_stage(params_path)`` of the project's ``stages/<name>.py`` (imported
lazily so that ``flux2ttr --help`` stays fast), the same function ``dvc repro`` runs. A config or input
error (the project's own error classes: a bad ``params.yaml``, a missing or mismatched input) prints one
line ``<stage>: <message>`` on stderr and exits 1; ``flux2ttr --debug <stage>`` (or ``FLUX2TTR_DEBUG=1``)
shows its traceback. Other exceptions are bugs and always show theirs.

The CLI needs the ``pipeline`` extra; the core install (what goes into ComfyUI's Python) lacks it, and
then ``flux2ttr`` exits with one line naming the extra instead of a traceback.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

from flux2ttr.config import DEBUG_ENV, report_input_errors

PIPELINE_INSTALL = 'pip install "flux2ttr[pipeline]"'

try:
    import click
except ModuleNotFoundError as _e:
    if _e.name != "click":
        raise
    # The console script imports this module before calling main(): a SystemExit here prints one line
    # and exits 1, where an ImportError would print a traceback. Nothing in the library imports the CLI.
    raise SystemExit("flux2ttr: the command line needs the pipeline extra (click is not installed): "
                     f"{PIPELINE_INSTALL}") from None

# import names of the pipeline extra's packages (pyproject.toml [project.optional-dependencies] pipeline)
PIPELINE_MODULES = frozenset({"zarr", "dvc", "click", "comet_ml", "diffusers", "yaml", "tqdm", "matplotlib", "PIL",
                              "vl_convert"})

_PARAMS = click.option(
    "--params", "params_path", type=click.Path(path_type=Path), default=Path("params.yaml"),
    show_default=True, help="params file holding every tunable number",
)

_DEBUG = click.option("--debug", is_flag=True, default=False,
                      help=f"show the traceback of a config or input error (also {DEBUG_ENV}=1)")

# command name -> module of stages/ (beside params.yaml) whose run_stage(params_path) does the work
STAGES = {
    "teacher": "teacher",
    "capture": "capture",
    "distill": "distill",
    "rollout": "rollout",
    "train_controller": "train_controller",
    "evaluate": "evaluate",
}


def run_stage(name: str, params_path: Path) -> None:
    """Run stage ``name`` (a key of :data:`STAGES`) with the params file at ``params_path``.

    The stage modules belong to the project checkout (``stages/`` beside ``params.yaml``), as in
    ``dvc.yaml``; the library itself holds no stage glue."""
    root = Path(params_path).resolve().parent
    if not (root / "stages" / f"{STAGES[name]}.py").is_file():
        raise click.ClickException(
            f"{root / 'stages' / (STAGES[name] + '.py')} not found: run `flux2ttr {name}` in the flux2ttr project "
            f"checkout (where dvc.yaml and params.yaml are) or pass --params PATH/params.yaml")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    with pipeline_needed():
        module = importlib.import_module(f"stages.{STAGES[name]}")
        module.run_stage(params_path)


@contextlib.contextmanager
def pipeline_needed() -> Iterator[None]:
    """Turn a missing pipeline package (a core-only install) into one error naming the extra."""
    try:
        yield
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in PIPELINE_MODULES:
            raise
        raise click.ClickException(f"{top} is not installed; the pipeline needs the pipeline extra: "
                                   f"{PIPELINE_INSTALL}") from e


@click.group()
@_DEBUG
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """flux2ttr: cheaper high-resolution FLUX.2 through distilled attention students."""
    ctx.ensure_object(dict)["debug"] = debug


def _debug(ctx: click.Context, debug: bool) -> bool:
    """``--debug`` given to the command or to ``flux2ttr`` itself."""
    return debug or bool((ctx.find_root().obj or {}).get("debug"))


def _stage_help(name: str) -> str:
    """The stage module's docstring (its params sections, inputs and outputs), read without importing it
    from ``stages/`` in the working directory; a generic line elsewhere."""
    base = f"Run the '{name}' pipeline stage (what `dvc repro {name}` runs)."
    path = Path("stages") / f"{STAGES[name]}.py"
    try:
        doc = ast.get_docstring(ast.parse(path.read_text()))
    except (OSError, SyntaxError):
        doc = None
    return f"{base}\n\n{doc}" if doc else base


def _stage_command(name: str) -> click.Command:
    @click.command(name=name, help=_stage_help(name))
    @_PARAMS
    @_DEBUG
    @click.pass_context
    def command(ctx: click.Context, params_path: Path, debug: bool) -> None:
        with report_input_errors(name, debug=_debug(ctx, debug)):
            run_stage(name, params_path)

    return command


for _name in STAGES:
    main.add_command(_stage_command(_name))


@main.command("inspect")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON for scripts")
@click.option("--heatmap", "heatmap_layer", default=None, help="layer key whose teacher attention to draw")
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=None, help="PNG path for --heatmap")
@click.option("--queries", default=4, show_default=True, help="stored queries drawn by --heatmap (spread over the image)")
@click.option("--prompt", type=int, default=None, help="--heatmap: only tuples of this prompt index")
@click.option("--step", type=int, default=None, help="--heatmap: only tuples of this denoising step")
@click.option("--query-token", "token", type=int, default=None, help="--heatmap: only this query token position")
@click.option("--tile", nargs=2, type=int, default=None,
              help="window-student tile TH TW (latent tokens) for the attention-mass report  [default: hkr.window_tile "
                   "of ./params.yaml, else of the shipped defaults]")
@click.option("--radius", type=int, default=None,
              help="window-student radius R (latent tokens)  [default: hkr.window_radius, as --tile]")
@click.option("--mass-tuples", default=16, show_default=True,
              help="tuples per layer the attention-mass report reads (0: no report)")
@click.option("--mass-plot", type=click.Path(path_type=Path), default=None,
              help="PNG of attention mass and restricted-softmax cosine vs window radius")
@_DEBUG
@click.pass_context
def inspect_cmd(ctx: click.Context, store: Path, as_json: bool, heatmap_layer: str | None, out_path: Path | None,
                queries: int, prompt: int | None, step: int | None, token: int | None, tile: tuple[int, int] | None,
                radius: int | None,
                mass_tuples: int, mass_plot: Path | None, debug: bool) -> None:
    """Summarise a captured trace STORE: contents, where the teacher's attention mass lies (text, 2-D
    windows, window-student tiles), and optionally attention heatmaps."""
    with pipeline_needed(), report_input_errors("inspect", debug=_debug(ctx, debug)):
        from flux2ttr.traces import inspect as inspect_mod  # noqa: PLC0415

        if tile is None or radius is None:  # the window the students of this project are built with
            from flux2ttr.config import load_section  # noqa: PLC0415
            from flux2ttr.students.hkr import HKRConfig  # noqa: PLC0415

            hkr = load_section(HKRConfig, "hkr", "params.yaml") if Path("params.yaml").is_file() else HKRConfig()
            tile = tuple(hkr.window_tile) if tile is None else tile
            radius = int(hkr.window_radius) if radius is None else radius
        inspect_mod.run_inspect(store, as_json=as_json, heatmap_layer=heatmap_layer, out_path=out_path,
                                queries=queries, tile=tile, radius=radius, mass_tuples=mass_tuples,
                                mass_plot=mass_plot, prompt=prompt, step=step, token=token)


@main.command("train-teacher", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@_DEBUG
@click.pass_context
def train_teacher_cmd(ctx: click.Context, args: tuple[str, ...], debug: bool) -> None:
    """Train the tiny FLUX.2 teacher on procedural captioned scenes (params sections train_teacher and scenes;
    resumable); writes train_teacher.out_file, the trained teacher's shipped file. `flux2ttr train-teacher
    --help` lists the options (the same as `python -m flux2ttr.teachers.train_teacher`)."""
    with pipeline_needed(), report_input_errors("train-teacher", debug=_debug(ctx, debug)):
        from flux2ttr.teachers import train_teacher  # noqa: PLC0415

        raise SystemExit(train_teacher.main(list(args)))


@main.command("comfy-install")
@click.argument("comfyui_dir", type=click.Path(path_type=Path))
@click.option("--artifacts", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True,
              help="folder holding the pipeline's final artifacts")
@click.option("--copy", "copy_pack", is_flag=True, help="copy the node pack instead of symlinking it")
@click.option("--python", "python", type=click.Path(path_type=Path), default=None,
              help="ComfyUI's Python (default: COMFYUI_DIR/venv, .venv or the portable build's python_embeded)")
@click.option("--no-pip", "no_pip", is_flag=True, help="do not install the library into ComfyUI's Python")
@click.option("--pip-arg", "pip_args", multiple=True,
              help="extra argument for that pip install, repeatable (e.g. --pip-arg=--no-deps)")
@click.option("--teacher", "teacher", type=click.Path(path_type=Path), default=Path("teachers/tiny"),
              show_default=True, help="tiny teacher folder: flux2_tiny.safetensors goes to models/diffusion_models, "
              "tiny_codec.safetensors to models/flux2ttr_tiny (what the tiny example workflow loads)")
@click.option("--no-tiny-teacher", "no_tiny_teacher", is_flag=True, help="do not copy the tiny teacher")
def comfy_install_cmd(comfyui_dir: Path, artifacts: Path, copy_pack: bool, python: Path | None, no_pip: bool,
                      pip_args: tuple[str, ...], teacher: Path, no_tiny_teacher: bool) -> None:
    """Install the node pack, the pipeline's artifacts, the tiny teacher and the library's core (into
    ComfyUI's own Python) into a ComfyUI checkout."""
    from flux2ttr.comfy import install as comfy_install  # noqa: PLC0415

    try:
        comfy_install.install(comfyui_dir, artifacts_dir=artifacts, copy_pack=copy_pack, python=python,
                              pip=not no_pip, pip_args=pip_args, teacher_dir=teacher,
                              tiny_teacher=not no_tiny_teacher)
    except comfy_install.InstallError as e:
        raise click.ClickException(str(e)) from e


@main.command("scene-prompts")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--split", type=click.Choice(["train", "held_out"]), default="held_out", show_default=True,
              help="training captions (for capture) or held-out ones, never trained on (for the controller's rollouts)")
@click.option("--count", type=int, default=5, show_default=True, help="distinct captions")
@_PARAMS
@_DEBUG
@click.pass_context
def scene_prompts_cmd(ctx: click.Context, out: Path, split: str, count: int, params_path: Path, debug: bool) -> None:
    """Write OUT, a JSON prompt list of scene captions (params section scenes) for the trained teacher: point
    capture.prompts and rollout.prompts at such files and the evaluation grid and its caption checker judge
    drawn scenes, not noise."""
    with pipeline_needed(), report_input_errors("scene-prompts", debug=_debug(ctx, debug)):
        import json  # noqa: PLC0415

        from flux2ttr.atomic import atomic_write_text  # noqa: PLC0415
        from flux2ttr.config import load_section  # noqa: PLC0415
        from flux2ttr.teachers.scenes import SceneConfig, scene_prompts  # noqa: PLC0415

        cfg = load_section(SceneConfig, "scenes", params_path) if params_path.is_file() else SceneConfig()
        captions = scene_prompts(cfg, split, count)
        atomic_write_text(out, json.dumps(captions, indent=1) + "\n")
        click.echo(f"wrote {out}: {len(captions)} {split} captions")


@main.command("offline-plots")
@click.option("--repo", type=click.Path(path_type=Path, file_okay=False), default=Path("."), show_default=True,
              help="the DVC repository (the project's root)")
def offline_plots_cmd(repo: Path) -> None:
    """Make `dvc plots show` work without internet: writes .dvc/plots/offline.html (Vega, Vega-Lite and
    Vega-Embed inline) and sets plots.html_template in .dvc/config.local. Run once per clone."""
    from flux2ttr import offline_plots  # noqa: PLC0415

    try:
        path = offline_plots.install(repo)
    except offline_plots.OfflinePlotsError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB); `dvc plots show` now writes a page that "
               "opens offline")


if __name__ == "__main__":
    main()
