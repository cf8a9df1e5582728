"""Run one stage in this process: the same code whether the process was started inline, by the local
executor, by torchrun or by Slurm. Rank 0 writes the stage's state; every rank runs the stage."""

from __future__ import annotations

import traceback
import uuid
from pathlib import Path

from cluster.env import RankInfo
from pipeline.config.schema import PipelineConfig, StageSpec
from pipeline.fsutil import canonical_json, fingerprint_path, sha256_text
from pipeline.logs import get_logger, log_to_file
from pipeline.run_state import RunState, StageState
from pipeline.stage import StageContext


def stage_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage


def input_fingerprints(config: PipelineConfig, spec: StageSpec, run_state: RunState) -> dict[str, str]:
    """Fingerprints of what the stage reads: upstream stages' completions and external paths."""
    prints = {}
    for dep in spec.needs:
        state = run_state.read(dep)
        prints[f"@{dep}"] = state.fingerprint if state and state.status == "done" else "not done"
    for path in spec.external_inputs:
        prints[path] = fingerprint_path(Path(path))
    return prints


def execute_stage(config: PipelineConfig, spec: StageSpec, rank: RankInfo) -> dict:
    """Run ``spec`` and, on rank 0, record running -> done/failed in its state file."""
    run_dir = config.run_dir
    run_state = RunState(run_dir)
    log = get_logger(spec.name)
    state = run_state.read(spec.name) or StageState(spec.name, spec.kind)
    is_main = rank.rank == 0
    if is_main:
        state.kind, state.config_hash, state.settings = spec.kind, spec.config_hash(), spec.settings_dict()
        state.inputs = input_fingerprints(config, spec, run_state)
        state.mark_running()
        run_state.write(state)
    out_dir = stage_dir(run_dir, spec.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        name=spec.name, run_dir=run_dir, out_dir=out_dir, seed=config.settings.seed, log=log,
        rank=rank.rank, world_size=rank.world_size, local_rank=rank.local_rank,
        stage_dirs={name: stage_dir(run_dir, name) for name in config.stages},
    )
    log_name = f"{spec.name}.log" if is_main else f"{spec.name}.rank{rank.rank}.log"
    with log_to_file(run_state.log_dir / log_name):
        try:
            log.info("stage %s (%s) started, attempt %d", spec.name, spec.kind, state.attempt)
            outputs = spec.module.run(spec.settings, ctx) or {}
        except BaseException as exc:
            suffix = "" if is_main else f".rank{rank.rank}"
            trace_path = run_state.log_dir / f"{spec.name}{suffix}.traceback.txt"
            trace_path.write_text(traceback.format_exc(), encoding="utf-8")
            first_line = (str(exc).strip().splitlines() or [""])[0]
            error = f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
            if is_main:
                state.error, state.traceback = error, str(trace_path.relative_to(run_dir))
                state.mark_finished("failed")
                run_state.write(state)
            log.error("stage %s failed on rank %d: %s (traceback: %s)", spec.name, rank.rank, error,
                      trace_path.relative_to(run_dir))
            raise
        if is_main:
            state.outputs = outputs
            state.fingerprint = sha256_text(canonical_json([state.config_hash, outputs, uuid.uuid4().hex]))
            state.mark_finished("done")
            run_state.write(state)
        log.info("stage %s done in %.1fs", spec.name, state.duration_s or 0.0)
    return outputs
