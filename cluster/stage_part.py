"""Entry point of one array task: ``python -m cluster.stage_part RUN_DIR STAGE PART PARTS``.

A stage whose work splits into independent parts (a sharding stage: shard ``i`` depends only on the
config and the input list) may define

    run_part(settings, ctx, part: int, parts: int) -> None

doing the ``part``-th of ``parts`` slices of its work (e.g. the shards ``i`` with ``i % parts == part``),
idempotently. On Slurm such a stage becomes an array job of ``parts`` tasks followed by one job running
the stage's ``run``, which finds the parts' work done, checks it and writes the stage's outputs. Parts
never write the stage's state file; each logs to ``logs/<stage>.part<N>.log``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config.loader import load_pipeline
from pipeline.errors import KopeError
from pipeline.logs import get_logger, log_to_file, setup_console
from pipeline.run_state import RunState
from pipeline.stage import StageContext
from pipeline.stage_exec import stage_dir

RESOLVED_CONFIG = "config.yaml"


def splits_into_parts(module: object) -> bool:
    return callable(getattr(module, "run_part", None))


def run_stage_part(run_dir: Path, stage: str, part: int, parts: int) -> None:
    config = load_pipeline(run_dir / RESOLVED_CONFIG)
    if stage not in config.stages:
        raise KopeError(f"{run_dir / RESOLVED_CONFIG}: no stage '{stage}'")
    spec = config.stages[stage]
    if not splits_into_parts(spec.module):
        raise KopeError(f"stage {stage} ({spec.kind}) has no run_part(); it cannot run as an array job")
    if not 0 <= part < parts:
        raise KopeError(f"part {part} out of range for {parts} parts")
    run_dir = config.run_dir
    out_dir = stage_dir(run_dir, stage)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = get_logger(stage)
    ctx = StageContext(name=stage, run_dir=run_dir, out_dir=out_dir, seed=config.settings.seed, log=log,
                       stage_dirs={name: stage_dir(run_dir, name) for name in config.stages})
    with log_to_file(RunState(run_dir).log_dir / f"{stage}.part{part}.log"):
        log.info("stage %s part %d/%d started", stage, part, parts)
        try:
            spec.module.run_part(spec.settings, ctx, part, parts)
        except Exception:
            log.exception("stage %s part %d/%d failed", stage, part, parts)
            raise
        log.info("stage %s part %d/%d done", stage, part, parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.stage_part", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("stage")
    parser.add_argument("part", type=int)
    parser.add_argument("parts", type=int)
    args = parser.parse_args(argv)
    setup_console()
    try:
        run_stage_part(args.run_dir, args.stage, args.part, args.parts)
    except KopeError as exc:
        print(f"kope: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
