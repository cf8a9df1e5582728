"""Batches on the training device, the next one already on its way: the loader's stream, copied ahead.

While the device computes micro-batch n, micro-batch n + 1 is fetched from the loader and copied to the device
on a side CUDA stream, from pinned memory and without blocking (``non_blocking=True``); the compute stream waits
for that copy only when it takes the batch. Without CUDA the copies are plain (and free on the CPU).

Fetching ahead moves the loader one batch past the one training is on, so the feed is what the checkpoint saves
as ``loader``: its state is the loader's position after the batch handed out last, exactly what the loader's own
state would be without the look-ahead (``(epoch, samples consumed)``, see :mod:`pipeline.data.loaders`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Every tensor of a batch (nested in dicts, lists, tuples) on ``device``; anything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device, non_blocking) for key, value in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(value, device, non_blocking) for value in batch)
    return batch


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, list | tuple):
        for value in batch:
            yield from _tensors(value)


class DeviceFeed:
    """The loader's batches on ``device``, one prefetched (see the module docstring).

    ``loader`` is a :class:`pipeline.data.loaders.ResumableLoader` (or anything with its ``stream()``,
    ``state_dict`` / ``load_state_dict``, ``epoch``, ``samples_consumed`` and ``epoch_length``). Load state before
    the first batch is taken.
    """

    def __init__(self, loader: Any, device: torch.device):
        self.loader = loader
        self.device = device
        self._position: dict[str, Any] | None = None  # the loader's state after the last batch handed out

    # --- the checkpointed part: the position of the batches handed out --------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return dict(self._position) if self._position is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._position = None

    @property
    def epoch(self) -> int:
        return int(self.state_dict()["epoch"])

    @property
    def samples_consumed(self) -> int:
        return int(self.state_dict()["samples_consumed"])

    @property
    def epoch_length(self) -> int:
        return self.loader.epoch_length

    # --- batches -------------------------------------------------------------------------------------------

    def batches(self) -> Iterator[Any]:
        """Batches without end, each on the device when handed out; the next one is fetched and its copy started
        before this one is returned. Closing (or dropping) the iterator stops the loader's workers; a new one
        continues after the last batch handed out (the look-ahead batch is fetched again)."""
        if self._position is not None:
            self.loader.load_state_dict(self._position)
        source = self.loader.stream()
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        pending = self._fetch(source, side)
        while True:
            batch, position, copied = pending
            if copied is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(copied)
                for tensor in _tensors(batch):
                    tensor.record_stream(current)  # its memory is not reused before the compute stream is done
            pending = self._fetch(source, side)
            self._position = position
            yield batch

    def _fetch(self, source: Iterator[Any], side: torch.cuda.Stream | None
               ) -> tuple[Any, dict[str, Any], torch.cuda.Event | None]:
        """The next batch with its copy to the device started, the loader's position after it, and the event that
        marks the copy's end (None without CUDA)."""
        batch = next(source)
        position = self.loader.state_dict()
        if side is None:
            return to_device(batch, self.device), position, None
        with torch.cuda.stream(side):
            batch = to_device(batch, self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(side)
        return batch, position, copied
