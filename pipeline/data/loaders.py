"""The resumable loader: one rank's batches in the global order of :mod:`pipeline.data.order`.

State is ``(epoch, samples_consumed)``, samples counted globally (over all ranks) and only for batches
already handed to the training loop. ``load_state_dict`` is arithmetic: nothing before the position is
read or decoded.

What is exact on resume:

* same world size and batch size, any DataLoader worker count: every rank gets the same batches, sample
  for sample and pixel for pixel (augmentations are seeded by position), as an uninterrupted run;
* another world size or per-rank batch size (elastic): the global stream of samples continues at the
  same position with the same augmentations; with the same global batch size every global batch holds
  the same samples, only their assignment to ranks changes. If ``samples_consumed`` is not a multiple
  of the new global batch, the remaining steps start there.

Epoch length and the last batch: an epoch has ``samples_per_epoch`` positions (default: the dataset
size; see :mod:`pipeline.data.order` for passes and repeated augmentation). With ``drop_last`` (the
default for training) every rank takes ``epoch_length // global_batch`` steps and the remainder of the
epoch is skipped; without it the last step is partial, the ranks' shares differing by at most one, and
a rank whose share is empty yields no batch for that step (meant for evaluation). The loader moves to
the next epoch when an epoch's iteration finishes: train with ``while loader.epoch < epochs:
for batch in loader: ...``, or with :meth:`ResumableLoader.stream`, which yields the same batches epoch after
epoch from one DataLoader whose workers live across epochs (no new worker processes, no emptied prefetch queue
at an epoch boundary). The position after each batch is the same either way.

Pinned memory (``pin_memory``) is used where CUDA is, so batches copy to the GPU asynchronously.

Reading: each worker indexes the tar headers of the shards it touches (milliseconds per shard);
``index_cache_dir`` keeps those indexes, keyed by shard sha256, for every worker and node sharing it. A
sample that cannot be read or decoded stops the loader with one line naming its shard and key.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.core.signals import ignore_stop_signals
from pipeline.data.loaders_samples import SamplePipeline
from pipeline.data.loaders_tar import ShardReaders
from pipeline.data.manifest import Manifest
from pipeline.data.order import EpochOrder, OrderSpec, rank_positions, steps_remaining, worker_steps
from pipeline.data.settings import LoaderSettings


def _ignore_stop_signals(worker_id: int) -> None:
    """In each DataLoader worker: a stop signal is the training process's to handle (it checkpoints first); a
    worker that died of it would turn the stop into a loader failure."""
    ignore_stop_signals()


@contextmanager
def _seeded_globals(seed: int, restore: bool) -> Iterator[None]:
    """Seed the global generators the transforms draw from; ``restore`` the caller's states afterwards
    (needed in the main process only: saving numpy's state alone costs about 0.2 ms)."""
    saved = None
    if restore:
        saved = random.getstate(), np.random.get_state(), torch.random.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if saved:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.random.default_generator.set_state(saved[2])


@dataclass
class _ShardList:
    paths: list[Path]
    sizes: list[int]
    sha256s: list[str]


@dataclass
class _Failure:
    """A worker's data error, raised again by the main process as one line (not inside a traceback)."""

    message: str


class _Empty:
    """Stands for a step whose share on this rank is empty (a partial last step without ``drop_last``): the
    worker still answers for the step, so the DataLoader's round-robin over workers stays aligned with steps."""


@dataclass(frozen=True)
class _Steps:
    """The steps one DataLoader iteration covers: ``first`` steps of ``epoch`` from position ``start``, then
    ``per_epoch`` steps of each following epoch, ``epochs`` epochs in all (None: without end)."""

    epoch: int
    start: int
    first: int
    per_epoch: int
    epochs: int | None

    def count(self) -> int | None:
        if self.epochs is None:
            return None
        return self.first + max(self.epochs - 1, 0) * self.per_epoch

    def locate(self, step: int) -> tuple[int, int, int]:
        """(epoch, the position that epoch started at, step within it) of the iteration's ``step``-th step."""
        if step < self.first:
            return self.epoch, self.start, step
        later, within = divmod(step - self.first, self.per_epoch)
        return self.epoch + 1 + later, 0, within


class _StepStream(IterableDataset):
    """The batches of one rank over ``steps``; worker w builds steps w, w + W, ... of them."""

    def __init__(self, shards: _ShardList, spec: OrderSpec, steps: _Steps, batch_size: int, rank: int,
                 world_size: int, samples: SamplePipeline, cache_dir: Path | None):
        super().__init__()
        self.shards = shards
        self.spec = spec
        self.steps = steps
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.samples = samples
        self.cache_dir = cache_dir

    def __iter__(self) -> Iterator[dict[str, Any] | _Empty | _Failure]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        count = self.steps.count()
        mine = itertools.count(worker, workers) if count is None else worker_steps(count, worker, workers)
        readers = ShardReaders(self.shards.paths, self.shards.sizes, self.shards.sha256s, self.cache_dir,
                               max_open=2 * self.spec.window_shards + 2)
        order = None
        try:
            for step in mine:
                epoch, start, within = self.steps.locate(step)
                if order is None or order.epoch != epoch:
                    order = EpochOrder(self.spec, epoch)
                positions = rank_positions(start, within, self.batch_size, self.rank, self.world_size, len(order))
                if not positions.size:
                    yield _Empty()
                    continue
                try:
                    batch = self._batch(order, readers, positions, restore=info is None)
                except ValueError as error:
                    yield _Failure(str(error))
                    return
                yield batch
        finally:
            readers.close()

    def _batch(self, order: EpochOrder, readers: ShardReaders, positions: np.ndarray,
               restore: bool) -> dict[str, Any]:
        shards, indices = order.locate(positions)
        made = []
        for shard, index, seed in zip(shards.tolist(), indices.tolist(), order.augment_seeds(positions)):
            reader = readers[shard]
            key = reader.key(index)
            members = reader.read(index, self.samples.extensions)
            try:
                with _seeded_globals(seed, restore):
                    made.append(self.samples.make(key, members, np.random.default_rng(seed)))
            except Exception as error:
                raise ValueError(f"{reader.path.name}: sample {key}: {type(error).__name__}: {error}") from error
        return self.samples.collate(made)


def _fingerprint(manifest: Manifest, spec: OrderSpec) -> str:
    """Identifies the sample order: the shards' identities and every order setting."""
    shards = [[s.name, s.samples, s.sha256] for s in manifest.shards]
    order = {k: v for k, v in asdict(spec).items() if k != "shard_sizes"}
    text = json.dumps({"shards": shards, "order": order}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ResumableLoader:
    """Iterates one epoch of one rank's batches per ``iter()``; ``state_dict``/``load_state_dict`` resume."""

    def __init__(self, dataset_dir: str | Path, samples: SamplePipeline, settings: LoaderSettings,
                 *, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        dataset_dir = Path(dataset_dir)
        manifest = Manifest.load(dataset_dir)
        self.manifest = manifest
        self.samples = samples
        self.settings = settings
        self.rank = rank
        self.world_size = world_size
        self.spec = OrderSpec(
            shard_sizes=tuple(s.samples for s in manifest.shards),
            seed=seed,
            shuffle=settings.shuffle,
            window_shards=settings.window_shards,
            samples_per_epoch=settings.samples_per_epoch or None,
            repeats=settings.repeats,
            resampled=settings.resampled,
        )
        self._shards = _ShardList(
            manifest.shard_paths(dataset_dir), [s.samples for s in manifest.shards],
            [s.sha256 for s in manifest.shards],
        )
        self._fingerprint = _fingerprint(manifest, self.spec)
        self.epoch = 0
        self.samples_consumed = 0

    @property
    def global_batch_size(self) -> int:
        return self.settings.batch_size * self.world_size

    @property
    def epoch_length(self) -> int:
        return self.spec.epoch_length

    @property
    def steps_per_epoch(self) -> int:
        return steps_remaining(0, self.global_batch_size, self.epoch_length, self.settings.drop_last)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch; then the loader is at the start of the next one."""
        num_steps = steps_remaining(self.samples_consumed, self.global_batch_size, self.epoch_length,
                                    self.settings.drop_last)
        if num_steps:
            yield from self._iterate(_Steps(self.epoch, self.samples_consumed, num_steps, 0, epochs=1))
        self.epoch += 1
        self.samples_consumed = 0

    def stream(self) -> Iterator[dict[str, Any]]:
        """The batches of every epoch from the current position on, without end, from one DataLoader: the same
        batches, and the same ``epoch`` / ``samples_consumed`` after each, as ``for batch in loader`` epoch after
        epoch, but the workers (and their open shards and prefetched batches) carry on across epoch boundaries."""
        if not self.steps_per_epoch:
            raise ValueError(f"an epoch of {self.epoch_length} samples holds no global batch of "
                             f"{self.global_batch_size}")
        first = steps_remaining(self.samples_consumed, self.global_batch_size, self.epoch_length,
                                self.settings.drop_last)
        yield from self._iterate(_Steps(self.epoch, self.samples_consumed, first, self.steps_per_epoch, None))

    def _iterate(self, steps: _Steps) -> Iterator[dict[str, Any]]:
        """One DataLoader over ``steps``; the position moves as each batch is handed out."""
        settings = self.settings
        stream = _StepStream(
            self._shards, self.spec, steps, settings.batch_size, self.rank, self.world_size, self.samples,
            Path(settings.index_cache_dir) if settings.index_cache_dir else None,
        )
        loader = DataLoader(
            stream, batch_size=None, num_workers=settings.num_workers,
            pin_memory=settings.pin_memory and torch.cuda.is_available(),
            prefetch_factor=settings.prefetch_factor if settings.num_workers else None,
            worker_init_fn=_ignore_stop_signals,
        )
        for step, batch in enumerate(loader):
            if isinstance(batch, _Failure):
                raise ValueError(batch.message)
            if isinstance(batch, _Empty):
                continue
            epoch, start, within = steps.locate(step)
            self.epoch = epoch
            self.samples_consumed = min(start + (within + 1) * self.global_batch_size, self.epoch_length)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "samples_consumed": self.samples_consumed, "order": self._fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"epoch", "samples_consumed", "order"} - set(state)
        if missing:
            raise ValueError(f"loader state lacks {sorted(missing)}")
        if state["order"] != self._fingerprint:
            raise ValueError(
                f"loader state is for another sample order (fingerprint {state['order']}, this loader "
                f"{self._fingerprint}): the dataset's shards or the order settings (seed, shuffle, "
                "window_shards, samples_per_epoch, repeats, resampled) changed"
            )
        epoch, consumed = int(state["epoch"]), int(state["samples_consumed"])
        if epoch < 0 or not 0 <= consumed <= self.epoch_length:
            raise ValueError(f"loader state epoch {epoch}, samples_consumed {consumed} is out of range "
                             f"(epoch length {self.epoch_length})")
        self.epoch, self.samples_consumed = epoch, consumed
