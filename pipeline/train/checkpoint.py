"""Checkpoints: DeepSpeed's files plus our client state and per-rank generator states, and a ``latest``
pointer that moves only once every rank has finished writing.

Layout of ``<out>/checkpoints/``::

    step_00000200/              DeepSpeed's files (model, optimizer partitions), client state inside
        rng_rank0.pt ...        every rank's torch/numpy/Python (and CUDA) generator states
        meta.json               step, world size, ZeRO stage: read before DeepSpeed loads anything
    latest                      the tag to resume from, replaced atomically by rank 0

A save: rank 0 clears a leftover folder of the same tag (from a save that was killed), every rank writes
its DeepSpeed files and generator file, a barrier, then rank 0 replaces ``latest`` and deletes all but the
last ``keep`` checkpoints. A process killed at any moment of a save leaves ``latest`` naming the previous,
complete checkpoint.

Resuming on another number of ranks: ZeRO stage 0 keeps whole optimizer states and resumes on any count
(training continues exactly where the global sample stream stopped, but not bitwise: the ranks' share of
each batch changes). ZeRO stages 1–3 partition optimizer states by rank, so a different count is refused
with a message saying what to do.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import pipeline
from pipeline.config.types import setting
from pipeline.errors import KopeError
from pipeline.fsutil import atomic_file, atomic_write_json, atomic_write_text

LATEST = "latest"
META = "meta.json"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")


class CheckpointError(KopeError):
    """A checkpoint that cannot be resumed in this run."""


@dataclass
class CheckpointSettings:
    every_steps: int = setting(1000, ge=1, help="save every N optimizer steps (and always at the end)")
    keep: int = setting(3, ge=1, help="checkpoints kept (older ones are deleted once a newer one is latest)")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def read_latest(directory: Path) -> str | None:
    """The tag ``latest`` names, or None before the first complete checkpoint."""
    path = Path(directory) / LATEST
    if not path.exists():
        return None
    tag = path.read_text(encoding="utf-8").strip()
    if not TAG_PATTERN.match(tag) or not (path.parent / tag).is_dir():
        raise CheckpointError(f"{path}: names {tag!r}, which is not a checkpoint folder beside it")
    return tag


def read_meta(directory: Path, tag: str) -> dict[str, Any]:
    return json.loads((Path(directory) / tag / META).read_text(encoding="utf-8"))


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


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_file(path) as handle:
        torch.save(obj, handle)


class Checkpointer:
    """Saves and finds checkpoints of one training run (every rank holds one)."""

    def __init__(self, directory: Path, keep: int, rank: int, world_size: int):
        self.directory = Path(directory)
        self.keep = keep
        self.rank = rank
        self.world_size = world_size

    def latest(self) -> str | None:
        return read_latest(self.directory)

    def save(self, engine: Any, step: int, client_state: dict[str, Any], rng_state: dict[str, Any],
             meta: dict[str, Any] | None = None) -> str:
        """Write checkpoint ``step`` on every rank, then make it ``latest`` (a collective: all ranks call it).
        ``meta`` (small, JSON) goes to ``meta.json``, readable before DeepSpeed loads anything."""
        tag = tag_for(step)
        folder = self.directory / tag
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if folder.exists() and tag != self.latest():
                shutil.rmtree(folder)
        _barrier()
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        _atomic_torch_save(rng_state, folder / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            atomic_write_json(folder / META, {**(meta or {}), "step": step, "world_size": self.world_size,
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

    def check_resumable(self, tag: str, zero_stage: int) -> dict[str, Any]:
        """The checkpoint's meta, or a one-line error when this run cannot load it."""
        meta = read_meta(self.directory, tag)
        where = self.directory / tag
        if meta["zero_stage"] != zero_stage:
            raise CheckpointError(f"{where}: written with ZeRO stage {meta['zero_stage']}, this run uses {zero_stage}; "
                                  f"set zero_stage: {meta['zero_stage']} to resume it, or start over in a new folder")
        if meta["world_size"] != self.world_size and zero_stage > 0:
            raise CheckpointError(
                f"{where}: written by {meta['world_size']} ranks with ZeRO stage {zero_stage}, whose optimizer "
                f"states are partitioned by rank; resume it on {meta['world_size']} ranks (this run has "
                f"{self.world_size}), or train with zero_stage: 0, which resumes on any number of ranks")
        return meta

    def load(self, engine: Any, tag: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Load ``tag`` into ``engine``: (client state, this rank's generator state or None if it has none)."""
        path, client_state = engine.load_checkpoint(str(self.directory), tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"{self.directory / tag}: DeepSpeed found no checkpoint files to load")
        rng_file = self.directory / tag / f"rng_rank{self.rank}.pt"
        rng_state = torch.load(rng_file, weights_only=False) if rng_file.exists() else None
        return client_state, rng_state


def module_state_dict(directory: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The wrapped module's full fp32 state dict from a checkpoint, whatever its ZeRO stage (for export and
    inspection; runs on CPU without a process group)."""
    directory = Path(directory)
    tag = tag or read_latest(directory)
    if tag is None:
        raise CheckpointError(f"{directory}: no complete checkpoint")
    if read_meta(directory, tag)["zero_stage"] == 0:
        states = torch.load(directory / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {name: tensor.float() if tensor.is_floating_point() else tensor
                for name, tensor in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
