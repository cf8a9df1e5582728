"""Entry point of a stage process started by an executor: ``python -m pipeline.stage_main RUN_DIR STAGE``.

It reads the resolved config that ``kope run`` wrote into the run directory, so every rank of every
launcher runs exactly the settings the runner validated.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster.env import rank_info_from_env
from pipeline.config.loader import load_pipeline
from pipeline.errors import KopeError
from pipeline.logs import setup_console
from pipeline.stage_exec import execute_stage

RESOLVED_CONFIG = "config.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stage_main", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("stage")
    args = parser.parse_args(argv)
    setup_console()
    try:
        config = load_pipeline(args.run_dir / RESOLVED_CONFIG)
        execute_stage(config, config.stages[args.stage], rank_info_from_env())
    except KopeError as exc:
        print(f"kope: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # the stage logged it with its traceback file; one line for the launcher's output
        print(f"kope: stage {args.stage} failed: {type(exc).__name__}: {str(exc).strip()[:300]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
