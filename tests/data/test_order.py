"""The global order: pure in (seed, epoch, shards, settings), a permutation per pass, split without gaps."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline.data.order import EpochOrder, OrderSpec, rank_positions, steps_remaining, worker_steps

SIZES = (7, 5, 9, 6, 8, 0, 11)
N = sum(SIZES)


def pairs(spec: OrderSpec, epoch: int, positions=None) -> list[tuple[int, int]]:
    order = EpochOrder(spec, epoch)
    shards, indices = order.locate(np.arange(len(order)) if positions is None else np.asarray(positions))
    return list(zip(shards.tolist(), indices.tolist()))


def every_sample() -> set[tuple[int, int]]:
    return {(s, i) for s, n in enumerate(SIZES) for i in range(n)}


@pytest.mark.parametrize("window", [1, 3, len(SIZES)])
def test_each_epoch_is_a_permutation_of_the_dataset(window):
    spec = OrderSpec(SIZES, seed=3, window_shards=window)
    for epoch in range(3):
        seen = pairs(spec, epoch)
        assert len(seen) == N and set(seen) == every_sample()


def test_same_inputs_same_order_and_other_seed_or_epoch_another():
    spec = OrderSpec(SIZES, seed=5, window_shards=2)
    assert pairs(spec, 1) == pairs(OrderSpec(SIZES, seed=5, window_shards=2), 1)
    assert pairs(spec, 1) != pairs(spec, 2)
    assert pairs(spec, 1) != pairs(OrderSpec(SIZES, seed=6, window_shards=2), 1)


def test_lookups_agree_in_any_grouping():
    """Workers look positions up in scattered batches; the answer may not depend on which."""
    spec = OrderSpec(SIZES, seed=2, window_shards=2, samples_per_epoch=30, repeats=2)
    whole = pairs(spec, 4)
    scattered = np.random.default_rng(0).permutation(len(whole))
    assert [pairs(spec, 4, [p])[0] for p in scattered] == [whole[p] for p in scattered]


def test_a_window_draws_only_from_its_shards():
    spec = OrderSpec(SIZES, seed=1, window_shards=2)
    seen = pairs(spec, 0)
    shard_order = list(dict.fromkeys(s for s, _ in seen))
    start = 0
    for first in range(0, len(shard_order), 2):
        members = set(shard_order[first:first + 2])
        count = sum(SIZES[s] for s in members)
        assert {s for s, _ in seen[start:start + count]} == members
        start += count


def test_window_of_all_shards_mixes_them_and_no_shuffle_keeps_manifest_order():
    mixed = pairs(OrderSpec(SIZES, seed=0, window_shards=len(SIZES)), 0)
    assert len({s for s, _ in mixed[:10]}) >= 3
    plain = pairs(OrderSpec(SIZES, shuffle=False), 0)
    assert plain == [(s, i) for s, n in enumerate(SIZES) for i in range(n)]


def test_samples_per_epoch_continues_the_stream_across_epochs():
    spec = OrderSpec(SIZES, seed=4, window_shards=2, samples_per_epoch=15)
    stream = [p for epoch in range(7) for p in pairs(spec, epoch)]
    full = OrderSpec(SIZES, seed=4, window_shards=2)
    assert stream[:N] == pairs(full, 0)
    assert stream[N:2 * N] == pairs(full, 1)
    assert len(pairs(spec, 0)) == 15


def test_repeats_give_consecutive_copies_and_every_sample_k_times_over_k_epochs():
    spec = OrderSpec(SIZES, seed=4, window_shards=3, repeats=3)
    epochs = [pairs(spec, e) for e in range(3)]
    assert all(len(e) == N for e in epochs)
    stream = [p for e in epochs for p in e]
    assert all(len(set(stream[i:i + 3])) == 1 for i in range(0, len(stream), 3))
    assert set(Counter(stream).values()) == {3} and set(stream) == every_sample()


def test_resampled_draws_shards_with_replacement_reproducibly():
    spec = OrderSpec(SIZES, seed=9, window_shards=2, resampled=True, samples_per_epoch=400)
    epoch = pairs(spec, 0)
    assert epoch == pairs(spec, 0) and epoch != pairs(spec, 1)
    assert len(epoch) == 400
    counts = Counter(epoch)
    assert max(counts.values()) > 1, "400 draws from 46 samples must repeat some"
    assert 5 not in {s for s, _ in epoch}, "an empty shard is never drawn"
    per_shard = Counter(s for s, _ in epoch)
    assert per_shard[6] > per_shard[1], "shards are drawn in proportion to their size (11 vs 5)"


def test_augment_seeds_depend_on_seed_epoch_and_position():
    order = EpochOrder(OrderSpec(SIZES, seed=1), 0)
    seeds = order.augment_seeds(np.arange(20))
    assert len(set(seeds)) == 20
    assert seeds == EpochOrder(OrderSpec(SIZES, seed=1), 0).augment_seeds(np.arange(20))
    assert seeds != EpochOrder(OrderSpec(SIZES, seed=1), 1).augment_seeds(np.arange(20))
    assert seeds != EpochOrder(OrderSpec(SIZES, seed=2), 0).augment_seeds(np.arange(20))


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_split_every_step_without_gaps_or_overlaps(drop_last):
    length, batch, world = 23, 3, 2
    steps = steps_remaining(0, batch * world, length, drop_last)
    assert steps == (3 if drop_last else 4)
    taken = []
    for step in range(steps):
        shares = [rank_positions(0, step, batch, rank, world, length) for rank in range(world)]
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert sorted(np.concatenate(shares).tolist()) == list(range(step * 6, min(step * 6 + 6, length)))
        assert shares[0].tolist() == list(range(step * 6, min(step * 6 + 6, length), 2)), "strided"
        taken += np.concatenate(shares).tolist()
    assert sorted(taken) == list(range(18 if drop_last else 23))


def test_resuming_mid_epoch_starts_at_the_consumed_position():
    assert steps_remaining(10, 4, 23, drop_last=True) == 3
    assert rank_positions(10, 0, 2, 1, 2, 23).tolist() == [11, 13]


def test_workers_share_the_steps_round_robin():
    for workers in (1, 2, 3, 5):
        steps = sorted(s for w in range(workers) for s in worker_steps(11, w, workers))
        assert steps == list(range(11))


@pytest.mark.parametrize("bad", [
    dict(shard_sizes=(0, 0)), dict(seed=-1), dict(window_shards=0), dict(repeats=0),
    dict(samples_per_epoch=0), dict(resampled=True, shuffle=False),
])
def test_bad_specs_are_refused(bad):
    with pytest.raises(ValueError):
        OrderSpec(**{"shard_sizes": SIZES, **bad})


def test_positions_outside_the_epoch_are_refused():
    with pytest.raises(IndexError):
        EpochOrder(OrderSpec(SIZES), 0).locate(np.array([N]))
