"""Saving and resuming a training run: DeepSpeed's engine files (weights, optimizer partitions) plus the
training state's named parts, each with ``state_dict`` / ``load_state_dict``.

Shared parts (task, loader, schedule, fault counters, meters, progress) are the same on every rank: rank 0's
copy goes into DeepSpeed's client state. Per-rank parts (the random generators) go into ``rng_rank<r>.pt``
beside it. Adding a stateful part to training means adding it to the dictionary the trainer passes here.

A save: rank 0 clears a leftover folder of the same tag (from a save that was killed), every rank writes its
DeepSpeed files and its per-rank file, a barrier, then rank 0 replaces ``latest`` and deletes all but the last
``keep`` checkpoints. A process killed at any moment of a save leaves ``latest`` naming the previous, complete
checkpoint.

Resuming on another number of ranks: ZeRO stage 0 keeps whole optimizer states and resumes on any count
(training continues exactly where the global sample stream stopped, but not bitwise: the ranks' share of each
batch changes). ZeRO stages 1–3 partition optimizer states by rank, so a different count is refused with a
message saying what to do.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist

import pipeline
from pipeline.checkpoint.files import CheckpointError, load_checkpoint_file, save_file, weights_only_loading
from pipeline.checkpoint.layout import LATEST, META, TAG_PATTERN, read_latest, read_meta, rng_file, tag_for
from pipeline.core.fsutil import atomic_write_json, atomic_write_text
from pipeline.core.identity import identity_changes

PARTS_KEY = "parts"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def code_version() -> str:
    """The package version, with the git commit when running from a checkout."""
    root = Path(pipeline.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return pipeline.__version__
    return f"{pipeline.__version__}+g{commit}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    """Saves and finds checkpoints of one training run (every rank holds one)."""

    def __init__(self, directory: Path, keep: int, rank: int, world_size: int):
        self.directory = Path(directory)
        self.keep = keep
        self.rank = rank
        self.world_size = world_size

    def latest(self) -> str | None:
        return read_latest(self.directory)

    def save(self, engine: Any, step: int, parts: Mapping[str, Stateful], per_rank: Mapping[str, Stateful],
             meta: dict[str, Any]) -> str:
        """Write checkpoint ``step`` on every rank, then make it ``latest`` (a collective: all ranks call it).
        ``meta`` (small, JSON) goes to ``meta.json``, readable before DeepSpeed loads anything."""
        tag = tag_for(step)
        folder = self.directory / tag
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if folder.exists() and tag != self.latest():
                shutil.rmtree(folder)
        own = {name: part.state_dict() for name, part in per_rank.items()}  # before anything else can draw
        client = {PARTS_KEY: {name: part.state_dict() for name, part in parts.items()}}
        _barrier()
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client, save_latest=False)
        save_file(own, rng_file(folder, self.rank))
        if self.rank == 0:
            atomic_write_json(folder / META, {**meta, "step": step, "world_size": self.world_size,
                                              "zero_stage": engine.zero_optimization_stage()})
        _barrier()
        if self.rank == 0:
            atomic_write_text(self.directory / LATEST, tag + "\n")
            self._prune(tag)
        return tag

    def _prune(self, latest: str) -> None:
        tags = sorted(p.name for p in self.directory.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
        complete = [t for t in tags if t <= latest]
        for tag in complete[: max(len(complete) - self.keep, 0)] + [t for t in tags if t > latest]:
            shutil.rmtree(self.directory / tag, ignore_errors=True)

    def check_resumable(self, tag: str, zero_stage: int, identity: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's meta, or a one-line error when this run cannot load it."""
        where = self.directory / tag
        meta = read_meta(where)
        if not meta:
            raise CheckpointError(f"{where / META}: missing: not a checkpoint of this pipeline")
        changes = identity_changes(meta.get("identity", {}), identity)
        if changes:
            raise CheckpointError(f"{where}: written with other settings ({'; '.join(changes)}); restore them, or "
                                  "delete the checkpoints folder to start over")
        if meta["zero_stage"] != zero_stage:
            raise CheckpointError(f"{where}: written with ZeRO stage {meta['zero_stage']}, this run uses {zero_stage}; "
                                  f"set zero_stage: {meta['zero_stage']} to resume it, or start over in a new folder")
        if meta["world_size"] != self.world_size and zero_stage > 0:
            raise CheckpointError(
                f"{where}: written by {meta['world_size']} ranks with ZeRO stage {zero_stage}, whose optimizer "
                f"states are partitioned by rank; resume it on {meta['world_size']} ranks (this run has "
                f"{self.world_size}), or train with zero_stage: 0, which resumes on any number of ranks")
        return meta

    def load(self, engine: Any, tag: str, parts: Mapping[str, Stateful], per_rank: Mapping[str, Stateful]) -> bool:
        """Load ``tag`` into ``engine`` and the parts; False when this rank has no per-rank state in it (the
        checkpoint was written by fewer ranks)."""
        with weights_only_loading():
            path, client = engine.load_checkpoint(str(self.directory), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"{self.directory / tag}: DeepSpeed found no checkpoint files to load")
        saved = client.get(PARTS_KEY, {})
        missing = sorted(set(parts) - set(saved))
        if missing:
            raise CheckpointError(f"{self.directory / tag}: no saved state for {', '.join(missing)}")
        for name, part in parts.items():
            part.load_state_dict(saved[name])
        own = rng_file(self.directory / tag, self.rank)
        if not own.exists():
            return False
        states = load_checkpoint_file(own)
        for name, part in per_rank.items():
            part.load_state_dict(states[name])
        return True
