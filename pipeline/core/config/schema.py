"""The pipeline file's shape: top-level settings plus named stages, each with its kind's settings class."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.core.config.matrix import VARIANT_KEY, Variant, expand_matrices
from pipeline.core.config.types import setting
from pipeline.core.config.validate import FileOf, ValidationContext, build_dataclass, suggest
from pipeline.core.errors import ConfigError
from pipeline.core.identity import settings_tree, stage_identity
from pipeline.core.kinds import StageKind, find_kind

Executor = Literal["inline", "local"]
RESERVED_STAGE_KEYS = ("kind", "needs", "launch", VARIANT_KEY)
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
"""Stage names become folder and file names in the run directory: letters, digits, ``_`` and ``-`` only."""


@dataclass
class LaunchSpec:
    """How a stage's processes are started; unset fields take the pipeline's defaults."""

    executor: Executor | None = setting(None, help="inline (in this process) or local (nproc processes)")
    nproc: int = setting(1, ge=1, help="processes for the local executor (ranks of one process group)")


@dataclass
class PipelineSettings:
    """Top-level keys of a pipeline file (everything except ``stages``)."""

    name: str = setting(help="pipeline name; the default run directory is runs/<name>")
    run_dir: str | None = setting(None, help="where state, logs and outputs go (default runs/<name>)")
    seed: int = setting(0, ge=0, help="base seed handed to every stage")
    executor: Executor = setting("inline", help="default executor for stages")
    log_every_s: float = setting(30.0, gt=0, help="seconds between progress log lines when not on a terminal")


@dataclass
class StageSpec:
    """One validated stage: its kind, dependencies and typed settings."""

    name: str
    kind: StageKind
    needs: list[str]
    launch: LaunchSpec
    settings: Any
    external_inputs: list[str] = field(default_factory=list)
    variant: Variant | None = None  # set for the stages a matrix expanded (see pipeline.core.config.matrix)

    def settings_dict(self) -> dict[str, Any]:
        """Every setting as plain JSON types (tuples become lists)."""
        return settings_tree(self.settings)

    def identity(self, pipeline_seed: int) -> dict[str, Any]:
        """What must stay the same for a finished stage to count as up to date (see pipeline.core.identity)."""
        return stage_identity(self.kind.name, self.settings, pipeline_seed)

    def resolved(self) -> dict[str, Any]:
        """The stage block as it would be written back to YAML, defaults filled in."""
        variant = {VARIANT_KEY: dataclasses.asdict(self.variant)} if self.variant else {}
        return {"kind": self.kind.name, "needs": list(self.needs), **variant,
                "launch": dataclasses.asdict(self.launch), **self.settings_dict()}


@dataclass
class PipelineConfig:
    settings: PipelineSettings
    stages: dict[str, StageSpec]
    source: Path

    @property
    def run_dir(self) -> Path:
        return Path(self.settings.run_dir or f"runs/{self.settings.name}")

    def resolved(self) -> dict[str, Any]:
        top = dataclasses.asdict(self.settings)
        top["run_dir"] = str(self.run_dir)
        return {**top, "stages": {name: spec.resolved() for name, spec in self.stages.items()}}

    def needs(self) -> dict[str, list[str]]:
        return {name: spec.needs for name, spec in self.stages.items()}


def build_pipeline(tree: dict, file_of: FileOf, source: Path) -> PipelineConfig:
    """Validate the merged tree: top-level settings, then expand stage matrices, then validate every stage
    against its kind's settings class (a variant's errors name the file's stage or matrix key)."""
    raw_stages = tree.get("stages")
    top = {key: value for key, value in tree.items() if key != "stages"}
    base_ctx = ValidationContext(file_of)
    if not isinstance(raw_stages, dict) or not raw_stages:
        raise base_ctx.error(("stages",), "missing required value (a mapping of stage name to settings)")
    settings = build_dataclass(PipelineSettings, top, (), base_ctx)
    _check_stage_names(raw_stages, base_ctx)
    expansion = expand_matrices(raw_stages, base_ctx.error)
    expanded = expansion.stages

    def expanded_file_of(path: tuple[str, ...]) -> str:
        return file_of(expansion.source_path(path))

    stages: dict[str, StageSpec] = {}
    for name, block in expanded.items():
        try:
            stages[name] = _build_stage(name, block, expanded, ValidationContext(expanded_file_of,
                                                                                 stage_names=frozenset(expanded)))
        except ConfigError as exc:
            raise expansion.explain(exc) from None
    config = PipelineConfig(settings, stages, source)
    _check_acyclic(config, expanded_file_of)
    return config


def _check_stage_names(raw_stages: dict, ctx: ValidationContext) -> None:
    top_keys = {f.name for f in dataclasses.fields(PipelineSettings)}
    for name, block in raw_stages.items():
        path = ("stages", str(name))
        if not isinstance(name, str) or not STAGE_NAME.match(name):
            raise ctx.error(path, "a stage name may hold only letters, digits, '_' and '-' (it names "
                                  "folders in the run directory)")
        if name in top_keys:
            raise ctx.error(path, "a stage may not share its name with a top-level key")
        if not isinstance(block, dict):
            raise ctx.error(path, f"expected a mapping, got {type(block).__name__}")


def _build_stage(name: str, block: dict, all_stages: dict, ctx: ValidationContext) -> StageSpec:
    path = ("stages", name)
    kind_name = block.get("kind")
    if not isinstance(kind_name, str):
        raise ctx.error((*path, "kind"), "missing required value (the stage kind)")
    try:
        kind = find_kind(kind_name)
    except LookupError as exc:
        raise ctx.error((*path, "kind"), str(exc)) from None
    needs = block.get("needs", [])
    if isinstance(needs, str):
        needs = [needs]
    if not isinstance(needs, list) or not all(isinstance(need, str) for need in needs):
        raise ctx.error((*path, "needs"), "expected a list of stage names")
    for need in needs:
        if need not in all_stages:
            raise ctx.error((*path, "needs"), f"unknown stage '{need}'{suggest(need, all_stages)}")
    launch = build_dataclass(LaunchSpec, block.get("launch"), (*path, "launch"), ctx)
    variant = build_dataclass(Variant, block[VARIANT_KEY], (*path, VARIANT_KEY), ctx) if VARIANT_KEY in block else None
    body = {key: value for key, value in block.items() if key not in RESERVED_STAGE_KEYS}
    stage_settings = build_dataclass(kind.settings_class(), body, path, ctx)
    all_needs = list(dict.fromkeys([*needs, *sorted(ctx.stage_refs)]))
    if name in all_needs:
        raise ctx.error((*path, "needs"), "a stage cannot depend on itself")
    return StageSpec(name, kind, all_needs, launch, stage_settings, sorted(ctx.external_paths), variant)


def _check_acyclic(config: PipelineConfig, file_of: FileOf) -> None:
    from pipeline.core.graph import find_cycle

    cycle = find_cycle(config.needs())
    if cycle:
        path = ("stages", cycle[0], "needs")
        raise ConfigError(f"dependency cycle: {' -> '.join(cycle)}", file=file_of(path), key=".".join(path))
