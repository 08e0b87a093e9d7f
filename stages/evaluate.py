"""DVC stage `evaluate`: reads params.yaml and runs the library (see flux2ttr/cli.py STAGES)."""

import sys
from pathlib import Path

from flux2ttr.cli import run_stage

if __name__ == "__main__":
    run_stage("evaluate", Path(sys.argv[1]) if len(sys.argv) > 1 else Path("params.yaml"))
