"""Deep merge of config mappings: what includes, overrides and matrix values share."""

from __future__ import annotations


def deep_merge(base: dict, overlay: dict) -> None:
    """Merge ``overlay`` into ``base`` in place; mappings merge, everything else replaces."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
