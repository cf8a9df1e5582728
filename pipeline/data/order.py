"""The global sample order: a pure function of (seed, epoch, shard sizes, order settings).

Why positions, not streams. A streamed tar can only be resumed by reading everything before the resume
point, and splitting whole shards across ranks and workers ties the order to their count. Here every
epoch is a sequence of *positions* 0..L-1, each mapped arithmetically to (shard, index in shard); ranks
and DataLoader workers only decide who fetches which positions, and samples are read by byte offset
(:mod:`pipeline.data.loaders_tar`). So resuming is a seek, and the order does not depend on the world
size or the worker count.

Semantics
---------
* **Pass** p (one sweep over all N samples): the shards are permuted by a generator seeded with
  (seed, p), the permuted list is cut into *windows* of ``window_shards`` consecutive shards, and the
  samples of each window are permuted by a generator seeded with (seed, p, window). Shuffle quality vs.
  reads: a batch mixes samples from ``window_shards`` shards, and at any moment all readers touch only
  those shards (page cache and open files stay small). ``window_shards >= number of shards`` is a full
  sample permutation; 1 reads one shard at a time (fine for shards mixed when written, as
  ``shard_imagenet`` does). ``shuffle=False`` keeps manifest order (evaluation).
* **Stream and epochs.** The passes, concatenated, form a stream. With ``repeats`` = k (repeated
  augmentation, DeiT's RASampler adapted to streams), every stream element appears k times in a row,
  each copy at its own position (so with its own augmentation seed). Epoch e is the stream's positions
  [e·L, (e+1)·L) with L = ``samples_per_epoch`` or N. Passes need not line up with epochs: with k = 3
  an epoch sees N/3 distinct samples three times each, and over three epochs every sample exactly three
  times. With L = N and k = 1, epoch e is exactly pass e.
* **Resampled** (open_clip's ``dataset-resampled``): epoch e draws shards *with replacement*, with
  probability proportional to their sample count, from a generator seeded with (seed, e); the drawn
  list is windowed and permuted like a pass, cut at L positions. Epochs are independent draws.
* **Split by rank and worker.** The global batch of step j is the positions [c + j·B, c + (j+1)·B),
  c the position the run started (or resumed) at, B = world size × per-rank batch; rank r takes every
  world-size-th one from r (so the k copies of a repeated sample land on different ranks, as in
  RASampler). A rank's DataLoader worker w builds the batches of steps j ≡ w (mod workers); the
  DataLoader returns them round-robin, so the rank's sequence does not depend on the worker count.
* **Augmentation** of the sample at position i of epoch e is seeded by (seed, e, i): it is the same
  whichever rank or worker decodes it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

_TAG_SHARDS = 1
_TAG_WINDOW = 2
_TAG_DRAWS = 3
_TAG_DRAW_WINDOW = 4
_TAG_AUGMENT = 5
_PERMUTATION_CACHE = 4


@dataclass(frozen=True)
class OrderSpec:
    """Everything the order depends on besides the epoch."""

    shard_sizes: tuple[int, ...]
    seed: int = 0
    shuffle: bool = True
    window_shards: int = 8
    samples_per_epoch: int | None = None
    repeats: int = 1
    resampled: bool = False

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if any(size < 0 for size in self.shard_sizes) or sum(self.shard_sizes) == 0:
            raise ValueError(f"shard sizes must be >= 0 with at least one sample, got {self.shard_sizes}")
        if self.window_shards < 1:
            raise ValueError(f"window_shards must be >= 1, got {self.window_shards}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {self.samples_per_epoch}")
        if self.resampled and not self.shuffle:
            raise ValueError("resampled mode draws shards at random: it needs shuffle=True")

    @property
    def num_samples(self) -> int:
        return sum(self.shard_sizes)

    @property
    def epoch_length(self) -> int:
        """Positions per epoch: ``samples_per_epoch`` if set, else the dataset size."""
        return self.samples_per_epoch or self.num_samples


class _Sweep:
    """A list of shard ids read window by window; each window's samples in a seeded permutation."""

    def __init__(self, shard_ids: np.ndarray, sizes: np.ndarray, window: int, seed_key: list[int] | None):
        self._ids = shard_ids
        self._sizes = sizes
        self._window = window
        self._seed_key = seed_key
        window_totals = np.add.reduceat(sizes[shard_ids], np.arange(0, len(shard_ids), window))
        self._window_ends = np.cumsum(window_totals)
        self._permutations: OrderedDict[int, np.ndarray] = OrderedDict()

    @property
    def length(self) -> int:
        return int(self._window_ends[-1])

    def _permutation(self, window: int, total: int) -> np.ndarray:
        if window not in self._permutations:
            rng = np.random.default_rng([*self._seed_key, window])
            self._permutations[window] = rng.permutation(total)
            if len(self._permutations) > _PERMUTATION_CACHE:
                self._permutations.popitem(last=False)
        self._permutations.move_to_end(window)
        return self._permutations[window]

    def locate(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard id, index in shard) of each offset into the sweep."""
        windows = np.searchsorted(self._window_ends, offsets, side="right")
        shards = np.empty_like(offsets)
        indices = np.empty_like(offsets)
        for window in np.unique(windows):
            here = windows == window
            start = int(self._window_ends[window - 1]) if window else 0
            total = int(self._window_ends[window]) - start
            within = offsets[here] - start
            if self._seed_key is not None:
                within = self._permutation(int(window), total)[within]
            ids = self._ids[window * self._window:(window + 1) * self._window]
            ends = np.cumsum(self._sizes[ids])
            member = np.searchsorted(ends, within, side="right")
            shards[here] = ids[member]
            indices[here] = within - (ends[member] - self._sizes[ids[member]])
        return shards, indices


class EpochOrder:
    """The positions of one epoch, mapped to (shard, index in shard) and to augmentation seeds."""

    def __init__(self, spec: OrderSpec, epoch: int):
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.spec = spec
        self.epoch = epoch
        self._sizes = np.asarray(spec.shard_sizes, dtype=np.int64)
        self._passes: OrderedDict[int, _Sweep] = OrderedDict()
        self._draws = self._draw_sweep() if spec.resampled else None

    def __len__(self) -> int:
        return self.spec.epoch_length

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard id, index in shard) arrays for positions in [0, len)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"positions must lie in [0, {len(self)}) for epoch {self.epoch}")
        if self._draws is not None:
            return self._draws.locate(positions // self.spec.repeats)
        stream = (self.epoch * len(self) + positions) // self.spec.repeats
        passes, offsets = np.divmod(stream, self.spec.num_samples)
        shards = np.empty_like(positions)
        indices = np.empty_like(positions)
        for number in np.unique(passes):
            here = passes == number
            shards[here], indices[here] = self._pass(int(number)).locate(offsets[here])
        return shards, indices

    def augment_seeds(self, positions: np.ndarray) -> list[int]:
        """One 32-bit seed per position, from (seed, epoch, position)."""
        base = [self.spec.seed, _TAG_AUGMENT, self.epoch]
        return [int(np.random.SeedSequence([*base, int(p)]).generate_state(1)[0]) for p in positions]

    def _pass(self, number: int) -> _Sweep:
        if number not in self._passes:
            spec = self.spec
            if spec.shuffle:
                ids = np.random.default_rng([spec.seed, _TAG_SHARDS, number]).permutation(len(self._sizes))
                sweep = _Sweep(ids, self._sizes, spec.window_shards, [spec.seed, _TAG_WINDOW, number])
            else:
                sweep = _Sweep(np.arange(len(self._sizes)), self._sizes, len(self._sizes), None)
            self._passes[number] = sweep
            if len(self._passes) > 2:
                self._passes.popitem(last=False)
        return self._passes[number]

    def _draw_sweep(self) -> _Sweep:
        spec = self.spec
        needed = -(-len(self) // spec.repeats)
        rng = np.random.default_rng([spec.seed, _TAG_DRAWS, self.epoch])
        weights = self._sizes / self._sizes.sum()
        mean_size = self._sizes.sum() / np.count_nonzero(self._sizes)
        draws = np.empty(0, dtype=np.int64)
        while self._sizes[draws].sum() < needed:
            count = int(1.1 * (needed - self._sizes[draws].sum()) / mean_size) + 16
            draws = np.concatenate([draws, rng.choice(len(self._sizes), size=count, p=weights)])
        ends = np.cumsum(self._sizes[draws])
        draws = draws[: int(np.searchsorted(ends, needed)) + 1]
        return _Sweep(draws, self._sizes, spec.window_shards, [spec.seed, _TAG_DRAW_WINDOW, self.epoch])


def steps_remaining(start: int, global_batch: int, epoch_length: int, drop_last: bool) -> int:
    """Steps left in an epoch begun (or resumed) at position ``start``.

    ``drop_last``: only full global batches, so every rank takes the same number of steps and the last
    ``(epoch_length - start) % global_batch`` positions of the epoch are not visited (with shuffling
    these are different samples every epoch). Otherwise the last step is partial.
    """
    remaining = max(epoch_length - start, 0)
    return remaining // global_batch if drop_last else -(-remaining // global_batch)


def rank_positions(
    start: int, step: int, batch_size: int, rank: int, world_size: int, epoch_length: int
) -> np.ndarray:
    """Positions rank ``rank`` takes at ``step``: every world-size-th of the step's global batch.

    In a partial last step the ranks' shares differ by at most one and may be empty.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    base = start + step * batch_size * world_size
    end = min(base + batch_size * world_size, epoch_length)
    return np.arange(base + rank, end, world_size, dtype=np.int64)


def worker_steps(num_steps: int, worker: int, num_workers: int) -> range:
    """The steps DataLoader worker ``worker`` builds: the DataLoader hands them out round-robin."""
    return range(worker, num_steps, num_workers)
