"""The ``flux2ttr`` command line: every DVC stage, plus ``inspect`` and ``comfy-install``.

Each stage command calls ``run_stage(params_path)`` of the project's ``stages/<name>.py`` (imported
lazily so that ``flux2ttr --help`` stays fast), the same function ``dvc repro`` runs.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

_PARAMS = click.option(
    "--params", "params_path", type=click.Path(path_type=Path), default=Path("params.yaml"),
    show_default=True, help="params file holding every tunable number",
)

# command name -> module of stages/ (beside params.yaml) whose run_stage(params_path) does the work
STAGES = {
    "teacher": "teacher",
    "capture": "capture",
    "distill": "distill",
    "rollout": "rollout",
    "train-controller": "train_controller",
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
    module = importlib.import_module(f"stages.{STAGES[name]}")
    module.run_stage(params_path)


@click.group()
def main() -> None:
    """flux2ttr: cheaper high-resolution FLUX.2 through distilled attention students."""


def _stage_command(name: str) -> click.Command:
    @click.command(name=name, help=f"Run the '{name}' pipeline stage (what `dvc repro` runs).")
    @_PARAMS
    def command(params_path: Path) -> None:
        run_stage(name, params_path)

    return command


for _name in STAGES:
    main.add_command(_stage_command(_name))


@main.command("inspect")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON for scripts")
@click.option("--heatmap", "heatmap_layer", default=None, help="layer key whose teacher attention to draw")
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=None, help="PNG path for --heatmap")
@click.option("--queries", default=4, show_default=True, help="stored queries drawn by --heatmap")
def inspect_cmd(store: Path, as_json: bool, heatmap_layer: str | None, out_path: Path | None, queries: int) -> None:
    """Summarise a captured trace STORE (and optionally draw attention heatmaps)."""
    from flux2ttr.traces import inspect as inspect_mod  # noqa: PLC0415

    inspect_mod.run_inspect(store, as_json=as_json, heatmap_layer=heatmap_layer, out_path=out_path,
                            queries=queries)


@main.command("comfy-install")
@click.argument("comfyui_dir", type=click.Path(path_type=Path))
@click.option("--artifacts", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True,
              help="folder holding the pipeline's final artifacts")
@click.option("--copy", "copy_pack", is_flag=True, help="copy the node pack instead of symlinking it")
def comfy_install_cmd(comfyui_dir: Path, artifacts: Path, copy_pack: bool) -> None:
    """Install the node pack and the pipeline's artifacts into a ComfyUI checkout."""
    from flux2ttr.comfy import install as comfy_install  # noqa: PLC0415

    comfy_install.install(comfyui_dir, artifacts_dir=artifacts, copy_pack=copy_pack)


if __name__ == "__main__":
    main()
