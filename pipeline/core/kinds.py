"""The stage-kind registry: where each kind's settings and its code live, imported only when needed.

A built-in kind names two places by string: its ``Settings`` class (a torch-free module, read at config time)
and its stage module (``run(settings, ctx)``, and ``run_part(settings, ctx, part, parts)`` for kinds whose work
splits into array tasks), imported only inside the stage's own process. So validating, planning and showing a
run never import torch or a stage implementation.

A dotted ``kind:`` (``mypkg.my_stage``) names any importable module with a ``Settings`` dataclass and ``run``
(and optionally ``run_part``): teams add stages without editing this package. Such a module is imported at
config time, so it should keep heavy imports inside ``run``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pipeline.core.config.validate import suggest


@dataclass(frozen=True)
class StageKind:
    """One kind of stage: ``settings`` and ``module`` as import paths (``module:attribute`` for settings)."""

    name: str
    settings: str
    module: str
    parts: bool = False  # has run_part(): may run as a Slurm array job
    rerun_when_changed: bool = False  # a cheap view of its inputs: re-run when they change instead of stopping

    def settings_class(self) -> type:
        module_name, _, attribute = self.settings.partition(":")
        return getattr(importlib.import_module(module_name), attribute)

    def stage_module(self) -> ModuleType:
        return importlib.import_module(self.module)

    def run_function(self) -> Callable[..., dict[str, Any]]:
        return self.stage_module().run

    def run_part_function(self) -> Callable[..., None]:
        run_part = getattr(self.stage_module(), "run_part", None)
        if not callable(run_part):
            raise LookupError(f"stage kind '{self.name}' has no run_part(): it cannot run as an array job")
        return run_part


BUILTIN_KINDS: dict[str, StageKind] = {kind.name: kind for kind in (
    StageKind("make_demo_data", "pipeline.data.settings:DemoDataSettings", "stages.make_demo_data"),
    StageKind("make_rehearsal_data", "pipeline.data.settings:RehearsalDataSettings", "stages.make_rehearsal_data"),
    StageKind("shard_imagenet", "pipeline.data.settings:ImageNetShardSettings", "stages.shard_imagenet", parts=True),
    StageKind("shard_datacomp", "pipeline.data.settings:DataCompShardSettings", "stages.shard_datacomp", parts=True),
    StageKind("shard_segmentation", "pipeline.data.settings:SegmentationShardSettings", "stages.shard_segmentation",
              parts=True),
    StageKind("pretrain", "pipeline.train.settings:PretrainSettings", "stages.pretrain"),
    StageKind("finetune", "pipeline.train.settings:FinetuneSettings", "stages.finetune"),
    StageKind("finetune_segmentation", "pipeline.train.settings:FinetuneSegmentationSettings",
              "stages.finetune_segmentation"),
    StageKind("export", "pipeline.export.settings:ExportSettings", "stages.export"),
    StageKind("evaluate", "pipeline.evaluation.settings:EvaluateSettings", "stages.evaluate"),
    StageKind("report", "pipeline.report.settings:ReportSettings", "stages.report", rerun_when_changed=True),
)}


def builtin_kinds() -> list[str]:
    return sorted(BUILTIN_KINDS)


def find_kind(kind: str) -> StageKind:
    """The registered kind, or a dotted module that is a stage; LookupError with a suggestion otherwise."""
    if kind in BUILTIN_KINDS:
        return BUILTIN_KINDS[kind]
    if "." not in kind:
        raise LookupError(f"unknown stage kind '{kind}'{suggest(kind, builtin_kinds())}")
    try:
        module = importlib.import_module(kind)
    except ModuleNotFoundError as exc:
        if exc.name not in (kind, *_parents(kind)):
            raise
        raise LookupError(f"unknown stage kind '{kind}': no module {kind}") from None
    if not hasattr(module, "Settings") or not callable(getattr(module, "run", None)):
        raise LookupError(f"module '{kind}' is not a stage: it needs a Settings dataclass and run()")
    return StageKind(kind, f"{kind}:Settings", kind, parts=callable(getattr(module, "run_part", None)))


def _parents(module_name: str) -> list[str]:
    parts = module_name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]
