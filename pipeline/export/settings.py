"""Settings of the ``export`` stage. No heavy imports, so configs validate without torch."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.config.types import InputPath, setting
from pipeline.train.settings import WeightsChoice


@dataclass
class ExportSettings:
    """Stage ``export``: a training stage's checkpoint as a folder timm and open_clip load."""

    source: InputPath = setting(help="the training stage's folder (model.json, checkpoints/), e.g. '@pretrain'")
    tag: str = setting("", help="checkpoint folder to export, e.g. step_00001000 ('': the latest)")
    weights: WeightsChoice = setting("auto", help="auto: EMA/teacher weights when the run kept them, else the "
                                                  "trained ones; averaged: require them; trained: the student")
    tolerance: float = setting(1e-5, gt=0, help="largest output difference allowed when reloading the export")
