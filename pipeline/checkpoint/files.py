"""Reading checkpoint files without unpickling arbitrary objects, and writing them atomically.

Every ``torch.load`` of a checkpoint (resume, export, inspection) runs with ``weights_only=True`` (forced
through PyTorch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, so DeepSpeed's own loaders are covered too) and an allowlist
of the few plain-data types DeepSpeed and our client state store (loss-scaler settings, ZeRO enums, numpy RNG
states). Files are checked for integrity first (zip structure and CRC of every member), so a truncated or
corrupted file fails with a one-line error naming it instead of a deep unpickling traceback.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from pipeline.core.errors import KopeError
from pipeline.core.fsutil import atomic_file, atomic_path

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class CheckpointError(KopeError):
    """A checkpoint that is missing, truncated, corrupted or holds objects we refuse to unpickle."""


def _allowed_globals() -> list[Any]:
    """Plain-data classes found in DeepSpeed checkpoints and in RNG states (numpy arrays)."""
    import numpy as np
    from numpy._core.multiarray import _reconstruct

    allowed: list[Any] = [np.ndarray, np.dtype, _reconstruct, np.dtypes.UInt32DType, np.dtypes.Int64DType,
                          np.dtypes.Float32DType, np.dtypes.Float64DType]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return allowed
    return allowed + [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loading() -> Iterator[None]:
    """Within the block, every ``torch.load`` (ours or DeepSpeed's) is a restricted ``weights_only`` load."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def check_file_integrity(path: Path) -> None:
    """Raise CheckpointError unless ``path`` is a complete torch zip file whose members pass their CRC."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file is missing")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint file ({exc})") from None
    except Exception as exc:  # zipfile raises bare errors (e.g. zlib.error) on damaged members
        raise CheckpointError(f"{path}: corrupted checkpoint file ({type(exc).__name__}: {exc})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupted checkpoint file (bad CRC in member {bad})")


def load_checkpoint_file(path: Path) -> Any:
    """``torch.load`` of one checked file, restricted to tensors and allowlisted plain data, on the CPU."""
    check_file_integrity(path)
    try:
        with weights_only_loading():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: cannot load with weights_only=True: {first}") from None


def save_file(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary name beside ``path``, then renamed over it."""
    with atomic_file(Path(path)) as handle:
        torch.save(obj, handle)


def save_safetensors(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temporary name, then rename); tensors are made contiguous."""
    path = Path(path)
    tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state_dict.items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
