"""The DVC stages: one module per stage, each a thin ``run_stage(params_path)`` that reads its
``params.yaml`` sections, calls the library and writes its outs, metrics and plots. ``dvc.yaml`` runs
``python -m stages.<name>``; ``flux2ttr <name>`` runs the same function."""

import sys
from collections.abc import Callable
from pathlib import Path


def main(run_stage: Callable[[Path], None]) -> None:
    """``python -m stages.<name> [PARAMS]``: run the stage with ``PARAMS`` (default ``params.yaml``)."""
    run_stage(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("params.yaml"))
