"""Which settings differ between a stored config and the current one, for messages that name the keys."""

from __future__ import annotations

from typing import Any

UNSET = "<unset>"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs (compare JSON types: lists, not tuples)."""
    before, after = flatten(old), flatten(new)
    return [f"{key}: {before.get(key, UNSET)!r} -> {after.get(key, UNSET)!r}"
            for key in sorted(set(before) | set(after)) if before.get(key, UNSET) != after.get(key, UNSET)]
