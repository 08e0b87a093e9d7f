"""The DVC stages: one module per stage, each a thin ``run_stage(params_path)`` that reads its
``params.yaml`` sections, calls the library and writes its outs, metrics and plots. ``dvc.yaml`` runs
``python -m stages.<name>``; ``flux2ttr <name>`` runs the same function.

A config or input error (a bad ``params.yaml``, a missing or mismatched input file: the project's own
error classes, see :func:`flux2ttr.config.is_input_error`) prints one line ``<stage>: <message>`` on stderr
and exits with status 1; ``FLUX2TTR_DEBUG=1`` keeps the traceback. Any other exception is a bug and
shows its traceback."""

import sys
from collections.abc import Callable
from pathlib import Path

from flux2ttr.config import report_input_errors


def main(run_stage: Callable[[Path], None]) -> None:
    """``python -m stages.<name> [PARAMS]``: run the stage with ``PARAMS`` (default ``params.yaml``)."""
    stage = _stage_name(run_stage)
    with report_input_errors(stage):
        run_stage(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("params.yaml"))


def _stage_name(run_stage: Callable[[Path], None]) -> str:
    """``capture`` for ``stages.capture.run_stage``, also when it runs as ``python -m stages.capture``
    (where its module is ``__main__``)."""
    module = run_stage.__module__
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = spec.name if spec is not None else Path(sys.argv[0]).stem
    return module.rpartition(".")[2] or "stage"
