"""Which stages a ``kope run`` touches, and which of them must run: finished stages are skipped while their
identity and inputs are unchanged; when they changed, planning stops and names what changed instead of silently
re-running or reusing them (``--force`` re-runs a stage and everything downstream). Kinds whose outputs are only a
view of their inputs (``rerun_when_changed``: the report) simply run again."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.config.schema import PipelineConfig
from pipeline.core.errors import ConfigError, StaleStageError
from pipeline.core.graph import ancestors, descendants, topological_order
from pipeline.core.identity import identity_changes
from pipeline.core.run_dir import RunDir
from pipeline.core.stage_main import input_fingerprints


@dataclass
class Selection:
    """Which stages this invocation may touch (``--only``, ``--from``, ``--until``) and force."""

    only: list[str] = field(default_factory=list)
    start: str | None = None
    until: str | None = None
    force: list[str] = field(default_factory=list)


@dataclass
class Plan:
    to_run: list[str]
    skipped: list[str]
    forced: set[str]


def select_stages(config: PipelineConfig, selection: Selection) -> set[str]:
    needs = config.needs()
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


def plan_run(config: PipelineConfig, run: RunDir, selection: Selection) -> Plan:
    """The stages to run and to skip, in order; raises StaleStageError naming what changed."""
    needs = config.needs()
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
        spec, state = config.stages[name], run.read(name)
        for dep in spec.needs:
            dep_state = run.read(dep)
            if dep not in chosen and not (dep_state and dep_state.status == "done"):
                raise StaleStageError(f"stage '{name}' needs '{dep}', which is not done and not selected; "
                                      f"run without --only/--from, or include '{dep}'")
        if name in forced or state is None or state.status != "done":
            to_run.append(name)
            continue
        reasons = identity_changes(state.identity, spec.identity(config.settings.seed))
        upstream_rerun = [dep for dep in spec.needs if dep in to_run]
        reasons += [f"input @{dep} is about to re-run" for dep in upstream_rerun]
        if not upstream_rerun:
            current = input_fingerprints(config, spec, run)
            reasons += [f"input {key} changed" for key in sorted(set(current) | set(state.inputs))
                        if current.get(key) != state.inputs.get(key)]
        if reasons and spec.kind.rerun_when_changed:
            to_run.append(name)
        elif reasons:
            stale[name] = f"stage '{name}' is done but changed since: {'; '.join(reasons)}"
        else:
            skip.append(name)
    if stale:
        flags = " ".join(f"--force {name}" for name in stale)
        raise StaleStageError("\n".join(stale.values()) + f"\nre-run with {flags} (dependents re-run too) "
                              "or choose another --run-dir")
    return Plan(to_run, skip, forced)
