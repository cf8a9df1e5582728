"""Stage ``pretrain``: train a model on a sharded dataset in ``supervised``, ``dino`` or ``clip`` mode (settings:
:class:`pipeline.train.settings.PretrainSettings`), resuming from its latest checkpoint whenever it is run again.
The training itself is :func:`pipeline.train.run.run_training`."""

from __future__ import annotations

from typing import Any

from pipeline.core.stage import StageContext
from pipeline.train.run import run_training
from pipeline.train.settings import PretrainSettings
from pipeline.train.tasks import create_task


def run(settings: PretrainSettings, ctx: StageContext) -> dict[str, Any]:
    return run_training(settings, create_task(settings, ctx), ctx)
