"""Run the stages of a pipeline that are not done yet, in dependency order, resuming after failures.

The runner plans (:mod:`pipeline.core.planner`), checks what needs the number of ranks, writes the resolved
config and the immutable snapshot every launched process reads, and hands each stage to its executor (or
submits them all to a batch scheduler). A failed stage's dependents do not start; after an interruption no
further stage starts.

Stop signals (SIGTERM, SIGINT, SIGHUP, SIGUSR1) while stages run: the first is passed to every process of the
running stage (a training stage saves a checkpoint at the next step boundary and exits 75, another stage stops and
stays resumable), no further stage starts, and ``kope run`` exits 75 ("interrupted: run the same command again").
A second one within ``HARD_STOP_WINDOW_S`` kills the stage's processes (SIGKILL to their process groups).
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType

from pipeline.core.cluster_profile import ClusterProfile
from pipeline.core.config.schema import PipelineConfig
from pipeline.core.config.types import SettingError
from pipeline.core.errors import ConfigError, Interrupted, StageFailed
from pipeline.core.launch import Executor, StageLaunch, StageProcesses, executor, scheduler
from pipeline.core.logs import get_logger, log_to_file
from pipeline.core.planner import Plan, Selection, plan_run
from pipeline.core.run_dir import RunDir
from pipeline.core.run_lock import RunLock
from pipeline.core.run_state import StageState, error_line
from pipeline.core.signals import HARD_STOP_WINDOW_S, STOP_SIGNALS

log = get_logger("runner")

__all__ = ["RunSummary", "Selection", "run_pipeline"]


@dataclass
class RunSummary:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    interrupted: str | None = None  # the stage a stop signal ended
    stopped_before: str | None = None  # the stage that did not start because of a stop signal
    submitted: dict[str, str] = field(default_factory=dict)  # stage -> Slurm job id


def _executor_name(config: PipelineConfig, name: str, cluster: ClusterProfile | None) -> str:
    """The profile given to ``kope run --cluster`` decides for every stage; else the stage's launch block, else
    the pipeline's default."""
    if cluster is not None:
        return cluster.executor
    return config.stages[name].launch.executor or config.settings.executor


def _check_world(config: PipelineConfig, names: Iterable[str], world_of: dict[str, int]) -> None:
    """Rules that need the number of ranks, before any stage starts (exit 2, naming the key)."""
    for name in names:
        check = getattr(config.stages[name].settings, "check_world", None)
        if check is None:
            continue
        try:
            check(world_of[name])
        except SettingError as exc:
            raise ConfigError(f"{exc.message} (with {world_of[name]} ranks)", file=str(config.source),
                              key=f"stages.{name}.{exc.key}") from None


def run_pipeline(config: PipelineConfig, selection: Selection | None = None,
                 cluster: ClusterProfile | None = None) -> RunSummary:
    """Run every selected stage that is not done; raise StageFailed if a stage failed, Interrupted if a stop
    signal ended one.

    With a Slurm profile the stages are submitted as jobs and this returns at once (``summary.submitted``).
    Under torchrun on several machines every machine runs this; the one with node rank 0 leads (holds the
    lock, writes the resolved config and records failures), the others start their share of each stage.
    """
    selection = selection or Selection()
    run = RunDir(config.run_dir)
    tree = config.resolved()
    if cluster is not None and cluster.executor == "torchrun" and not cluster.torchrun_settings().leads:
        plan = plan_run(config, run, selection)
        summary = RunSummary(skipped=plan.skipped)
        _run_stages(config, run, plan.to_run, run.relative(run.snapshot_path(tree)), summary, StageProcesses(),
                    cluster, leader=False)
        return _finish(run, summary)
    with RunLock(run.root) as lock, log_to_file(run.log_dir / "kope.log"):
        if lock.stale_holder:
            log.warning("previous run (pid %s on %s) ended without releasing the lock; taking over",
                        lock.stale_holder.get("pid"), lock.stale_holder.get("host"))
        on_slurm = cluster is not None and cluster.executor == "slurm"
        if any(state and state.job for state in map(run.read, config.stages)):
            slurm = scheduler()
            slurm.reconcile(run)
            if not on_slurm:
                slurm.refuse_if_active(run, list(config.stages))
        plan = plan_run(config, run, selection)
        if on_slurm:
            slurm = scheduler()
            _check_world(config, plan.to_run, {name: slurm.world_size(cluster, config.stages[name])
                                               for name in plan.to_run})
        else:
            _check_world(config, plan.to_run, {name: _executor(config, name, cluster).world_size(
                _launch(config, name, "")) for name in plan.to_run})
        snapshot = _prepare(config, run, plan, tree)
        summary = RunSummary(skipped=plan.skipped)
        if on_slurm:
            summary.submitted = scheduler().submit(config, run, plan.to_run, cluster, snapshot)
            return summary
        _run_stages(config, run, plan.to_run, snapshot, summary, StageProcesses(lock.record_processes), cluster)
    return _finish(run, summary)


def _prepare(config: PipelineConfig, run: RunDir, plan: Plan, tree: dict) -> str:
    """Write the resolved config, its snapshot and a state file for every new stage; clear forced stages."""
    run.write_resolved_config(tree)
    snapshot = run.write_snapshot(tree)
    for name in plan.forced:
        shutil.rmtree(run.stage_dir(name), ignore_errors=True)
        state = run.read(name)
        if state is not None:
            state.status, state.outputs, state.error, state.traceback = "pending", {}, None, None
            run.write(state)
    for name, spec in config.stages.items():
        if run.read(name) is None:
            run.write(StageState(name, spec.kind.name))
    for name in plan.skipped:
        log.info("stage %s: done, skipped", name)
    return snapshot


def _launch(config: PipelineConfig, name: str, snapshot: str) -> StageLaunch:
    return StageLaunch(RunDir(config.run_dir).root, name, snapshot, config.stages[name].launch.nproc)


def _executor(config: PipelineConfig, name: str, cluster: ClusterProfile | None) -> Executor:
    return executor(_executor_name(config, name, cluster), cluster, config.settings.name)


def _finish(run: RunDir, summary: RunSummary) -> RunSummary:
    if summary.interrupted:
        state = run.read(summary.interrupted)
        detail = f" ({state.error})" if state and state.error else ""
        raise Interrupted(f"stage {summary.interrupted} interrupted{detail}; no further stage started: run the "
                          "same command again to resume")
    if summary.stopped_before:
        raise Interrupted(f"stopped by a signal before stage {summary.stopped_before} started: run the same command "
                          "again to resume")
    if summary.failed:
        details = "; ".join(f"{name}: {_error_of(run, name)}" for name in summary.failed)
        blocked = f" ({', '.join(summary.blocked)} not started)" if summary.blocked else ""
        raise StageFailed(f"failed stages: {details}{blocked}")
    return summary


def _error_of(run: RunDir, name: str) -> str:
    state = run.read(name)
    return state.error if state is not None and state.error else "no error recorded (see the stage's log)"


class _Stopper:
    """``kope run``'s handler of stop signals while stages run (see the module docstring)."""

    def __init__(self, processes: StageProcesses):
        self.processes = processes
        self.signal_name: str | None = None
        self._last: float | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        name, now = signal.Signals(signum).name, time.monotonic()
        if self._last is not None and now - self._last <= HARD_STOP_WINDOW_S:
            log.warning("%s again: stopping hard (SIGKILL to the stage's processes)", name)
            self.processes.kill()
            return
        if self.signal_name is None:
            log.warning("%s: asking the running stage to stop at its next step boundary; no further stage starts "
                        "(another stop signal within %.0f s stops hard)", name, HARD_STOP_WINDOW_S)
        else:
            log.warning("%s: still stopping; another one within %.0f s stops hard", name, HARD_STOP_WINDOW_S)
        self.signal_name = self.signal_name or name
        self._last = now
        self.processes.forward(signum)


@contextmanager
def _stop_signals_forwarded(processes: StageProcesses) -> Iterator[_Stopper]:
    stopper = _Stopper(processes)
    if threading.current_thread() is not threading.main_thread():  # only the main thread may handle signals
        yield stopper
        return
    previous = {signum: signal.signal(signum, stopper) for signum in STOP_SIGNALS}
    try:
        yield stopper
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _record_launch_failure(run: RunDir, name: str, exc: BaseException) -> None:
    """An executor that could not even start the stage (or crashed) leaves the reason in the state file."""
    trace = run.traceback_file(name)
    trace.parent.mkdir(parents=True, exist_ok=True)
    trace.write_text("".join(traceback.format_exception(exc)), encoding="utf-8")
    state = run.read(name) or StageState(name, "")
    state.fail(f"launching the stage failed: {error_line(exc)}", run.relative(trace))
    run.write(state)
    log.error("stage %s: %s (traceback: %s)", name, state.error, state.traceback)


def _run_stages(config: PipelineConfig, run: RunDir, to_run: Iterable[str], snapshot: str, summary: RunSummary,
                processes: StageProcesses, cluster: ClusterProfile | None = None, leader: bool = True) -> None:
    with _stop_signals_forwarded(processes) as stopper:
        for name in to_run:
            if stopper.signal_name:
                summary.stopped_before = name
                return
            if not _run_stage(config, run, name, snapshot, summary, processes, stopper, cluster, leader):
                return


def _run_stage(config: PipelineConfig, run: RunDir, name: str, snapshot: str, summary: RunSummary,
               processes: StageProcesses, stopper: _Stopper, cluster: ClusterProfile | None, leader: bool) -> bool:
    """Run one stage; False when the run must stop (the stage was interrupted)."""
    spec = config.stages[name]
    bad_deps = [dep for dep in spec.needs if dep in summary.failed or dep in summary.blocked]
    if bad_deps:
        summary.blocked.append(name)
        log.warning("stage %s: not started, because %s did not finish", name, ", ".join(bad_deps))
        return True
    log.info("stage %s: running (%s)", name, spec.kind.name)
    try:
        code = _executor(config, name, cluster).run(_launch(config, name, snapshot), processes)
    except Exception as exc:  # noqa: BLE001  (recorded in the state file, then reported)
        if leader:
            _record_launch_failure(run, name, exc)
        summary.failed.append(name)
        return True
    finally:
        processes.reap()
    state = run.read(name)
    if code == 0 and state is not None and state.status == "done":
        summary.ran.append(name)
        return True
    if (state is not None and state.status == "interrupted") or code == Interrupted.exit_code:
        summary.interrupted = name
        return False
    if stopper.signal_name and leader and state is not None and state.status in ("running", "pending"):
        state.fail(f"Interrupted: stopped hard after {stopper.signal_name} (exit status {code}), without a "
                   "checkpoint: run the same command again to resume from the latest one", status="interrupted")
        run.write(state)
        summary.interrupted = name
        return False
    if leader and state is not None and state.status in ("running", "done", "pending"):
        state.fail(f"stage processes ended without reporting a result (exit status {code}; killed?)"
                   if state.status != "done" else
                   f"a process other than rank 0 failed (see logs/{name}.rank*.traceback.txt)")
        run.write(state)
    summary.failed.append(name)
    return True
