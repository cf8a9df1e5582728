"""How to rebuild a trained model, and which task trained it, from the training stage's ``model.json``.

``model.json`` (written by training, :mod:`pipeline.train.run`) names the exported model: ``library`` (``timm``
or ``open_clip``), ``name`` and ``kwargs`` for the library's factory, and the ``mode`` whose task trained it. The
task class knows which of a checkpoint's weights are the model (its ``inference_weights``: the EMA, the DINO
teacher's backbone, the CLIP model), so export asks it instead of knowing each mode's layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.core.errors import KopeError
from pipeline.train.run import MODEL_JSON as MODEL_FILE
from pipeline.train.tasks import TASKS

LIBRARIES = ("timm", "open_clip")


@dataclass
class ModelRecipe:
    """A model's factory call and the mode that trained it."""

    mode: str
    library: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> type:
        """The task class that trained the model (it picks the exported weights from a checkpoint)."""
        return TASKS[self.mode]

    @classmethod
    def load(cls, training_dir: Path) -> ModelRecipe:
        path = Path(training_dir) / MODEL_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KopeError(f"{path}: missing (is the training stage finished?)") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise KopeError(f"{path}: unreadable: {exc}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = MODEL_FILE) -> ModelRecipe:
        mode, library, name = data.get("mode"), data.get("library"), data.get("name")
        if mode not in TASKS:
            raise KopeError(f"{source}: mode: expected one of {', '.join(TASKS)}, got {mode!r}")
        if library not in LIBRARIES:
            raise KopeError(f"{source}: library: expected one of {', '.join(LIBRARIES)}, got {library!r}")
        if not isinstance(name, str) or not name:
            raise KopeError(f"{source}: name: expected a model name, got {name!r}")
        kwargs = data.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise KopeError(f"{source}: kwargs: expected a mapping, got {kwargs!r}")
        return cls(mode, library, name, dict(kwargs))

    def build(self) -> nn.Module:
        """A freshly initialised model (never downloading or loading pretrained weights)."""
        import pipeline.models  # noqa: F401  (registers the KoPE models and open_clip towers)

        kwargs = {key: value for key, value in self.kwargs.items() if key != "pretrained"}
        if self.library == "timm":
            import timm

            return timm.create_model(self.name, pretrained=False, **kwargs)
        import open_clip

        from pipeline.models.clip import register_open_clip_configs

        register_open_clip_configs()
        return open_clip.create_model(self.name, pretrained=None, **kwargs)

    def open_clip_config(self) -> dict[str, Any]:
        """The open_clip model config the factory built from (registered name or ``local-dir:``)."""
        import open_clip

        from pipeline.models.clip import register_open_clip_configs

        register_open_clip_configs()
        config = open_clip.get_model_config(self.name)
        if config is None:
            raise KopeError(f"unknown open_clip model config {self.name!r}")
        return config
