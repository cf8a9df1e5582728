"""Names inside a ``checkpoints/`` folder, and finding the checkpoint to read."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pipeline.checkpoint.files import CheckpointError

LATEST = "latest"
META = "meta.json"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_file(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"rng_rank{rank}.pt"


def read_latest(directory: Path) -> str | None:
    """The tag ``latest`` names, or None before the first complete checkpoint."""
    path = Path(directory) / LATEST
    if not path.exists():
        return None
    tag = path.read_text(encoding="utf-8").strip()
    if not TAG_PATTERN.match(tag) or not (path.parent / tag).is_dir():
        raise CheckpointError(f"{path}: names {tag!r}, which is not a checkpoint folder beside it")
    return tag


def resolve_tag_dir(directory: Path, tag: str | None = None) -> Path:
    """The folder of checkpoint ``tag``, or of the one ``latest`` names."""
    directory = Path(directory)
    if not tag:
        tag = read_latest(directory)
        if tag is None:
            raise CheckpointError(f"{directory / LATEST}: no checkpoint recorded (has the training stage saved one?)")
    elif not TAG_PATTERN.match(tag):
        raise CheckpointError(f"{directory}: {tag!r} is not a checkpoint tag (step_NNNNNNNN)")
    tag_dir = directory / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"{tag_dir}: no such checkpoint folder")
    return tag_dir


def read_meta(tag_dir: Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint folder ({} when it has none)."""
    path = Path(tag_dir) / META
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable: {exc}") from None
    return meta if isinstance(meta, dict) else {}
