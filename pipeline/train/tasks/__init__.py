"""Training modes: the ``pretrain`` stage's ``mode`` names one of these task classes (see
:mod:`pipeline.train.task` for the contract and the constructor every task takes)."""

from __future__ import annotations

from typing import Any

from pipeline.train.task import Task
from pipeline.train.tasks.clip import ClipSettings, ClipTask
from pipeline.train.tasks.dino import DinoSettings, DinoTask
from pipeline.train.tasks.supervised import SupervisedSettings, SupervisedTask

TASKS: dict[str, type] = {"supervised": SupervisedTask, "dino": DinoTask, "clip": ClipTask}

__all__ = ["TASKS", "ClipSettings", "DinoSettings", "SupervisedSettings", "create_task"]


def create_task(mode: str, mode_settings: Any, **common: Any) -> Task:
    """``TASKS[mode](mode_settings, model=, model_kwargs=, data_dir=, loader=, seed=, total_steps=, zero_stage=)``."""
    return TASKS[mode](mode_settings, **common)
