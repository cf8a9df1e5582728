"""Training modes: ``mode`` names one of these task classes (see :mod:`pipeline.train.task` for the contract).
``model.json`` records the mode, so export asks the same class which weights are the model."""

from __future__ import annotations

from pipeline.core.stage import StageContext
from pipeline.train.settings import PretrainSettings
from pipeline.train.task import Task
from pipeline.train.tasks.clip import ClipTask
from pipeline.train.tasks.dino import DinoTask
from pipeline.train.tasks.segmentation import SegmentationTask
from pipeline.train.tasks.supervised import SupervisedTask, TimmModel

TASKS: dict[str, type] = {"supervised": SupervisedTask, "dino": DinoTask, "clip": ClipTask,
                          "segmentation": SegmentationTask}

__all__ = ["TASKS", "TimmModel", "create_task"]


def create_task(settings: PretrainSettings, ctx: StageContext) -> Task:
    """The task of a ``pretrain`` stage (``TASKS[mode]``), with its paths resolved in ``ctx``."""
    common = {"data_dir": ctx.input_path(settings.data), "loader": settings.loader, "seed": ctx.seed}
    model = settings.model
    cls = TASKS[settings.mode]
    if settings.mode == "supervised":
        val = settings.supervised.val_data
        return cls(settings.supervised, model=TimmModel(model.name, dict(model.kwargs)),
                   val_dir=ctx.input_path(val) if val else None, **common)
    return cls(getattr(settings, settings.mode), model=model.name, model_kwargs=model.kwargs, **common)
