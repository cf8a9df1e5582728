"""Entry point of every stage process, whatever started it (inline, local processes, torchrun, Slurm)::

    python -m pipeline.core.stage_main RUN_DIR STAGE --config SNAPSHOT [--part I --parts N]

It reads the config snapshot the launcher wrote for this launch (never the run's latest ``config.yaml``), so
every rank of every attempt runs the settings it was launched with. Rank 0 records the stage in its state file:
running, then done, interrupted (a stop signal; exit status 75) or failed (one line and a traceback file) —
whatever raised, from loading the config and fingerprinting the inputs to the stage's own code. Parts of an
array job (``--part``) never write the state file; they log to ``logs/<stage>.part<I>.log``.
"""

from __future__ import annotations

import argparse
import sys
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config.loader import load_pipeline
from pipeline.core.config.schema import PipelineConfig, StageSpec
from pipeline.core.errors import INTERRUPTED_EXIT_CODE, Interrupted, KopeError
from pipeline.core.fsutil import canonical_json, fingerprint_path, sha256_text
from pipeline.core.logs import get_logger, log_to_file, setup_console
from pipeline.core.ranks import RankInfo, rank_info_from_env
from pipeline.core.run_dir import RunDir
from pipeline.core.run_state import StageState, error_line
from pipeline.core.signals import die_with_parent, interrupt_on_stop_signals
from pipeline.core.stage import StageContext


def input_fingerprints(config: PipelineConfig, spec: StageSpec, run: RunDir) -> dict[str, str]:
    """Fingerprints of what the stage reads: upstream stages' completions and external paths."""
    prints = {}
    for dep in spec.needs:
        state = run.read(dep)
        prints[f"@{dep}"] = state.fingerprint if state and state.status == "done" else "not done"
    for path in spec.external_inputs:
        prints[path] = fingerprint_path(Path(path))
    return prints


def stage_context(config: PipelineConfig, spec: StageSpec, rank: RankInfo) -> StageContext:
    run = RunDir(config.run_dir)
    out_dir = run.stage_dir(spec.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    identity = spec.identity(config.settings.seed)
    return StageContext(name=spec.name, run_dir=run.root, out_dir=out_dir, seed=identity["seed"],
                        log=get_logger(spec.name), rank=rank.rank, world_size=rank.world_size,
                        local_rank=rank.local_rank, stage_dirs={name: run.stage_dir(name) for name in config.stages},
                        identity=identity)


class _Attempt:
    """One stage process's attempt: what rank 0 writes to the state file, and the traceback files."""

    def __init__(self, run: RunDir, stage: str, rank: int, part: int | None, config_file: str):
        self.run, self.stage, self.rank, self.part = run, stage, rank, part
        self.records = rank == 0 and part is None
        self.error: str | None = None
        self.state = (run.read(stage) or StageState(stage, "")) if self.records else None
        if self.state is not None:
            self.state.config = config_file
            self.state.mark_running()
            run.write(self.state)

    def started(self, config: PipelineConfig, spec: StageSpec) -> None:
        if self.state is not None:
            self.state.kind, self.state.identity = spec.kind.name, spec.identity(config.settings.seed)
            self.state.inputs = input_fingerprints(config, spec, self.run)
            self.run.write(self.state)

    def done(self, outputs: dict) -> None:
        if self.state is not None:
            self.state.outputs = outputs
            self.state.fingerprint = sha256_text(canonical_json([self.state.identity, outputs, uuid.uuid4().hex]))
            self.state.mark_finished("done")
            self.run.write(self.state)

    def ended(self, exc: BaseException) -> int:
        """Record why the attempt ended; returns the process's exit status."""
        log = get_logger(self.stage)
        error = self.error = error_line(exc)
        if isinstance(exc, Interrupted):
            log.warning("stage %s stopped: %s", self.stage, exc)
            if self.state is not None:
                self.state.fail(error, status="interrupted")
                self.run.write(self.state)
            return INTERRUPTED_EXIT_CODE
        trace = self.run.traceback_file(self.stage, self.rank, self.part)
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.write_text("".join(traceback.format_exception(exc)), encoding="utf-8")
        where = f"part {self.part}" if self.part is not None else f"rank {self.rank}"
        log.error("stage %s failed on %s: %s (traceback: %s)", self.stage, where, error, self.run.relative(trace))
        if self.state is not None:
            self.state.fail(error, self.run.relative(trace))
            self.run.write(self.state)
        return exc.exit_code if isinstance(exc, KopeError) and exc.exit_code not in (0, INTERRUPTED_EXIT_CODE) else 1


@dataclass(frozen=True)
class StageExit:
    code: int  # 0 done, 75 interrupted, else failed
    error: str | None = None  # the one-line error of a failure or interruption


def run_stage(run_dir: Path, stage: str, config_file: Path | str, rank: RankInfo,
              part: int | None = None, parts: int | None = None) -> StageExit:
    """Run ``stage`` (or one of its parts) in this process and record how it ended."""
    run = RunDir(run_dir)
    config_path = Path(config_file) if Path(config_file).is_absolute() else run.root / config_file
    attempt = _Attempt(run, stage, rank.rank, part, run.relative(config_path))
    log_file = run.stage_log(stage, rank.rank, part)
    with log_to_file(log_file), interrupt_on_stop_signals():
        log = get_logger(stage)
        try:
            config = load_pipeline(config_path)
            if stage not in config.stages:
                raise KopeError(f"{config_path}: no stage '{stage}'")
            spec = config.stages[stage]
            attempt.started(config, spec)
            ctx = stage_context(config, spec, rank)
            if part is None:
                log.info("stage %s (%s) started, attempt %d", stage, spec.kind.name,
                         attempt.state.attempt if attempt.state else 0)
                outputs = spec.kind.run_function()(spec.settings, ctx) or {}
                attempt.done(outputs)
                log.info("stage %s done", stage)
            else:
                if not 0 <= part < (parts or 0):
                    raise KopeError(f"part {part} out of range for {parts} parts")
                log.info("stage %s part %d/%d started", stage, part, parts)
                spec.kind.run_part_function()(spec.settings, ctx, part, parts)
                log.info("stage %s part %d/%d done", stage, part, parts)
        except BaseException as exc:  # noqa: BLE001  (every ending is recorded, then the status tells the launcher)
            if isinstance(exc, KeyboardInterrupt):
                exc = Interrupted("SIGINT received: stopped; run the same command again to resume")
            return StageExit(attempt.ended(exc), attempt.error)
    return StageExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.core.stage_main", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("stage")
    parser.add_argument("--config", required=True, help="the config snapshot, relative to RUN_DIR")
    parser.add_argument("--part", type=int, help="run this part of an array job")
    parser.add_argument("--parts", type=int, help="number of parts")
    args = parser.parse_args(argv)
    die_with_parent()  # whatever started this process (an executor, torchrun, a Slurm job): never outlive it
    setup_console()
    ending = run_stage(args.run_dir, args.stage, args.config, rank_info_from_env(), args.part, args.parts)
    if ending.error:  # one line for the launcher's output; the log and the traceback file have the rest
        word = "stopped" if ending.code == INTERRUPTED_EXIT_CODE else "failed"
        print(f"kope: stage {args.stage} {word}: {ending.error}", file=sys.stderr)
    return ending.code


if __name__ == "__main__":
    sys.exit(main())
