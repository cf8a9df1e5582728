"""Types and field helpers that stage settings dataclasses use to declare validation rules.

Settings are plain dataclasses; validation reads their type hints and the ``metadata`` that
:func:`setting` attaches, so a stage module states its rules next to its fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NewType

InputPath = NewType("InputPath", str)
"""A path the stage reads. ``@stage`` or ``@stage/sub/path`` names another stage's output folder (and
makes that stage a dependency); any other value must exist when the config is validated."""

STAGE_REF_PREFIX = "@"


def setting(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    le: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    help: str = "",
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field carrying range bounds and a help line for validation and ``kope config``."""
    metadata = {"ge": ge, "le": le, "gt": gt, "lt": lt, "help": help}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def is_stage_ref(value: str) -> bool:
    return isinstance(value, str) and value.startswith(STAGE_REF_PREFIX)


def split_stage_ref(value: str) -> tuple[str, str]:
    """``@shard/train`` -> (``shard``, ``train``); ``@shard`` -> (``shard``, ``""``)."""
    body = value[len(STAGE_REF_PREFIX):]
    stage, _, sub = body.partition("/")
    return stage, sub
