"""Run the stages of a pipeline that are not done yet, in dependency order, resuming after failures.

A finished stage is skipped while its config and inputs are unchanged; when they changed, the runner
stops and names what changed instead of silently re-running or reusing it (``--force`` re-runs it and
everything downstream).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import yaml

from cluster.executors import executor_for
from cluster.profile import ClusterProfile
from cluster.slurm_runs import SLURM_KEY, reconcile, refuse_if_active
from pipeline.config.diff import changed_settings
from pipeline.config.schema import PipelineConfig
from pipeline.errors import ConfigError, StageFailed, StaleStageError
from pipeline.fsutil import atomic_write_text
from pipeline.graph import ancestors, descendants, topological_order
from pipeline.logs import get_logger, log_to_file
from pipeline.run_lock import RunLock
from pipeline.run_state import RunState, StageState
from pipeline.stage_exec import input_fingerprints

log = get_logger("runner")
RESOLVED_CONFIG = "config.yaml"


@dataclass
class Selection:
    """Which stages this invocation may touch (``--only``, ``--from``, ``--until``) and force."""

    only: list[str] = field(default_factory=list)
    start: str | None = None
    until: str | None = None
    force: list[str] = field(default_factory=list)


@dataclass
class RunSummary:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    submitted: dict[str, str] = field(default_factory=dict)  # stage -> Slurm job id


def _needs(config: PipelineConfig) -> dict[str, list[str]]:
    return {name: spec.needs for name, spec in config.stages.items()}


def select_stages(config: PipelineConfig, selection: Selection) -> set[str]:
    needs = _needs(config)
    for name in [*selection.only, selection.start, selection.until, *selection.force]:
        if name is not None and name not in needs:
            raise ConfigError(f"unknown stage '{name}' (stages: {', '.join(needs)})", file="<command line>")
    chosen = set(needs)
    if selection.only:
        chosen &= set(selection.only)
    if selection.start:
        chosen &= {selection.start} | descendants(needs, selection.start)
    if selection.until:
        chosen &= {selection.until} | ancestors(needs, selection.until)
    return chosen


def plan_run(config: PipelineConfig, run_state: RunState, selection: Selection) -> tuple[list[str], list[str]]:
    """(stages to run, stages to skip) in order; raises StaleStageError naming what changed."""
    needs = _needs(config)
    chosen = select_stages(config, selection)
    forced: set[str] = set()
    for name in selection.force:
        forced |= ({name} | descendants(needs, name)) & chosen
    to_run: list[str] = []
    skip: list[str] = []
    stale: dict[str, str] = {}
    for name in topological_order(needs):
        if name not in chosen:
            continue
        spec, state = config.stages[name], run_state.read(name)
        for dep in spec.needs:
            dep_state = run_state.read(dep)
            if dep not in chosen and not (dep_state and dep_state.status == "done"):
                raise StaleStageError(f"stage '{name}' needs '{dep}', which is not done and not selected; "
                                      f"run without --only/--from, or include '{dep}'")
        if name in forced or state is None or state.status != "done":
            to_run.append(name)
            continue
        reasons = changed_settings(state.settings, spec.settings_dict())
        if state.kind != spec.kind:
            reasons.insert(0, f"kind: {state.kind!r} -> {spec.kind!r}")
        upstream_rerun = [dep for dep in spec.needs if dep in to_run]
        reasons += [f"input @{dep} is about to re-run" for dep in upstream_rerun]
        if not upstream_rerun:
            current = input_fingerprints(config, spec, run_state)
            reasons += [f"input {key} changed" for key in sorted(set(current) | set(state.inputs))
                        if current.get(key) != state.inputs.get(key)]
        if reasons:
            stale[name] = f"stage '{name}' is done but changed since: {'; '.join(reasons)}"
        else:
            skip.append(name)
    if stale:
        flags = " ".join(f"--force {name}" for name in stale)
        raise StaleStageError("\n".join(stale.values()) + f"\nre-run with {flags} (dependents re-run too) "
                              "or choose another --run-dir")
    return to_run, skip


def _prepare_run(config: PipelineConfig, run_state: RunState, selection: Selection) -> tuple[list[str], list[str]]:
    """Plan the run, then write the resolved config and a state file for every new stage (holding the lock)."""
    to_run, skipped = plan_run(config, run_state, selection)
    atomic_write_text(config.run_dir / RESOLVED_CONFIG, yaml.safe_dump(config.resolved(), sort_keys=False))
    for name, spec in config.stages.items():
        if run_state.read(name) is None:
            run_state.write(StageState(name, spec.kind))
    for name in skipped:
        log.info("stage %s: done, skipped", name)
    return to_run, skipped


def run_pipeline(config: PipelineConfig, selection: Selection | None = None,
                 cluster: ClusterProfile | None = None) -> RunSummary:
    """Run every selected stage that is not done; raise StageFailed if any stage failed.

    With a Slurm profile the stages are submitted as jobs and this returns at once (``summary.submitted``).
    Under torchrun on several machines every machine runs this; the one with node rank 0 leads (holds the
    lock, writes the resolved config and records failures), the others start their share of each stage.
    """
    selection = selection or Selection()
    run_dir = config.run_dir
    run_state = RunState(run_dir)
    if cluster is not None and cluster.executor == "torchrun" and not cluster.torchrun_settings().leads:
        to_run, skipped = plan_run(config, run_state, selection)
        summary = RunSummary(skipped=skipped)
        _run_stages(config, run_state, to_run, summary, cluster, leader=False)
        return _finish(run_state, summary)
    with RunLock(run_dir) as lock, log_to_file(run_state.log_dir / "kope.log"):
        if lock.stale_holder:
            log.warning("previous run (pid %s on %s) ended without releasing the lock; taking over",
                        lock.stale_holder.get("pid"), lock.stale_holder.get("host"))
        on_slurm = cluster is not None and cluster.executor == "slurm"
        if any(state and state.extra.get(SLURM_KEY) for state in map(run_state.read, config.stages)):
            reconcile(run_state)
            if not on_slurm:
                refuse_if_active(run_state, list(config.stages))
        to_run, skipped = _prepare_run(config, run_state, selection)
        summary = RunSummary(skipped=skipped)
        if on_slurm:
            from cluster.slurm_submit import submit_stages

            summary.submitted = submit_stages(config, run_state, to_run, cluster)
            return summary
        _run_stages(config, run_state, to_run, summary, cluster)
    return _finish(run_state, summary)


def _finish(run_state: RunState, summary: RunSummary) -> RunSummary:
    if summary.failed:
        details = "; ".join(f"{name}: {(run_state.read(name) or StageState(name, '')).error}"
                            for name in summary.failed)
        blocked = f" ({', '.join(summary.blocked)} not started)" if summary.blocked else ""
        raise StageFailed(f"failed stages: {details}{blocked}")
    return summary


def _run_stages(config: PipelineConfig, run_state: RunState, to_run: Iterable[str], summary: RunSummary,
                cluster: ClusterProfile | None = None, leader: bool = True) -> None:
    for name in to_run:
        spec = config.stages[name]
        bad_deps = [dep for dep in spec.needs if dep in summary.failed or dep in summary.blocked]
        if bad_deps:
            summary.blocked.append(name)
            log.warning("stage %s: not started, because %s did not finish", name, ", ".join(bad_deps))
            continue
        log.info("stage %s: running (%s)", name, spec.kind)
        ok = executor_for(config, spec, cluster).run(config, spec)
        state = run_state.read(name)
        if ok and state is not None and state.status == "done":
            summary.ran.append(name)
            continue
        if leader and state is not None and state.status in ("running", "done"):
            state.error = ("stage processes ended without reporting a result (killed?)" if state.status == "running"
                           else f"a process other than rank 0 failed (see logs/{name}.rank*.traceback.txt)")
            state.mark_finished("failed")
            run_state.write(state)
        summary.failed.append(name)
