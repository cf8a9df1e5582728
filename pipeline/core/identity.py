"""What decides whether a finished stage is up to date and whether a checkpoint may be resumed: one function,
used by the runner (done / changed) and by training (resumable).

A stage's identity is its kind, its effective seed and every setting that shapes what it computes, as plain JSON
types. Settings declared with ``setting(..., identity=False)`` (logging, checkpoint cadence, loader workers) are
left out, so changing them leaves a finished stage done and a checkpoint resumable. Paths stay as written
(``@stage/sub`` references, external paths), never resolved to absolute paths, so a run directory moved to another
filesystem keeps its identity.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from pipeline.core.config.diff import changed_settings
from pipeline.core.fsutil import canonical_json, sha256_text


def settings_tree(settings: Any, *, identity_only: bool = False) -> Any:
    """A settings dataclass as JSON types (tuples become lists), optionally only its identity fields."""
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        return {field.name: settings_tree(getattr(settings, field.name), identity_only=identity_only)
                for field in dataclasses.fields(settings)
                if not identity_only or field.metadata.get("identity", True)}
    if isinstance(settings, dict):
        return {str(key): settings_tree(value, identity_only=identity_only) for key, value in settings.items()}
    if isinstance(settings, list | tuple):
        return [settings_tree(value, identity_only=identity_only) for value in settings]
    return json.loads(canonical_json(settings))


def effective_seed(settings: Any, pipeline_seed: int) -> int:
    """A stage's own ``seed`` setting when it has one that is set, else the pipeline's."""
    own = getattr(settings, "seed", None)
    return own if isinstance(own, int) and not isinstance(own, bool) else pipeline_seed


def stage_identity(kind: str, settings: Any, pipeline_seed: int) -> dict[str, Any]:
    return {"kind": kind, "seed": effective_seed(settings, pipeline_seed),
            "settings": settings_tree(settings, identity_only=True)}


def identity_hash(identity: dict[str, Any]) -> str:
    return sha256_text(canonical_json(identity))


def identity_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every identity entry that differs (``settings.`` prefix dropped)."""
    if not old:
        return ["identity: not recorded (written by an older version)"] if new else []
    flat_old = {"kind": old.get("kind"), "seed": old.get("seed"), **(old.get("settings") or {})}
    flat_new = {"kind": new.get("kind"), "seed": new.get("seed"), **(new.get("settings") or {})}
    return changed_settings(flat_old, flat_new)
