"""Types and field helpers that stage settings dataclasses use to declare validation rules.

Settings are plain dataclasses; validation reads their type hints and the ``metadata`` that
:func:`setting` attaches, so a settings class states its rules next to its fields. Two hooks go further:

* ``check(self)``: cross-field rules, raising :class:`SettingError` naming the key (relative to the class);
  called right after the class is built, so every rule that needs no GPU fails at config time.
* ``__variants__`` / ``__variant_key__`` on a base class: a sum type. The value of the variant key (``mode``)
  picks one subclass; keys that belong only to another variant (its own settings block) are validated against
  that variant and left out, so the built settings hold exactly one block.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NewType

InputPath = NewType("InputPath", str)
"""A path the stage reads. ``@stage`` or ``@stage/sub/path`` names another stage's output folder (and
makes that stage a dependency); any other value must exist when the config is validated."""

STAGE_REF_PREFIX = "@"


class SettingError(ValueError):
    """A cross-field rule that does not hold; ``key`` is a dotted path relative to the settings class."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")


def setting(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    le: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    help: str = "",
    identity: bool = True,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field carrying range bounds and a help line for validation and ``kope config``.

    ``identity=False`` marks a setting that does not change what the stage computes (logging, checkpoint
    cadence, worker counts): changing it leaves a finished stage done and a checkpoint resumable.
    """
    metadata = {"ge": ge, "le": le, "gt": gt, "lt": lt, "help": help, "identity": identity}
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
