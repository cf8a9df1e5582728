"""``ResumableLoader.stream()``: every epoch from one DataLoader, whose workers live across epoch boundaries, with
the same batches and the same position after each batch as iterating the loader epoch by epoch."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.data.loaders import LoaderSettings, ResumableLoader
from pipeline.data.loaders_samples import SupervisedSamples, dino_samples, supervised_samples
from pipeline.data.transforms import DinoAugSettings, SupervisedAugSettings
from tests.data.loader_fixtures import write_dataset

BATCH, WORLD = 3, 2  # 35 samples, global batch 6: 5 full steps, 5 samples left over per epoch


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("stream") / "data")


def make(dataset: Path, rank: int = 1, samples=None, **settings) -> ResumableLoader:
    settings = {"batch_size": BATCH, "num_workers": 2, "window_shards": 2, **settings}
    samples = samples or supervised_samples(SupervisedAugSettings(image_size=16))
    return ResumableLoader(dataset, samples, LoaderSettings(**settings), seed=3, rank=rank, world_size=WORLD)


def by_epochs(loader: ResumableLoader, count: int) -> list[tuple[dict, dict]]:
    """``count`` batches with the loader's state after each, iterating epoch by epoch."""
    out = []
    while len(out) < count:
        for batch in loader:
            out.append((batch, loader.state_dict()))
            if len(out) == count:
                break
    return out


def streamed(loader: ResumableLoader, count: int) -> list[tuple[dict, dict]]:
    stream = loader.stream()
    return [(batch, loader.state_dict()) for batch in itertools.islice(stream, count)]


def assert_same(expected: list[tuple[dict, dict]], actual: list[tuple[dict, dict]], field: str = "image") -> None:
    assert [state for _, state in actual] == [state for _, state in expected]
    for (want, _), (got, _) in zip(expected, actual, strict=True):
        assert got["key"] == want["key"]
        assert torch.equal(got[field], want[field])


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_stream_is_the_epochs_one_after_another(dataset, workers):
    """Three epochs and a bit, resumed in the middle of an epoch: batches, pixels and positions agree."""
    expected = by_epochs(make(dataset, num_workers=0), 17)
    assert {state["epoch"] for _, state in expected} == {0, 1, 2, 3}
    assert_same(expected, streamed(make(dataset, num_workers=workers), 17))

    start = make(dataset, num_workers=0)
    start.load_state_dict(expected[7][1])  # epoch 1, two steps in
    resumed = make(dataset, num_workers=workers)
    resumed.load_state_dict(expected[7][1])
    assert_same(by_epochs(start, 9), streamed(resumed, 9))


def test_stream_without_drop_last_takes_the_partial_step_of_every_epoch(dataset):
    """Without drop_last the last step of an epoch is partial (the 5 samples left: rank 1 gets 2 of them)."""
    expected = by_epochs(make(dataset, num_workers=0, drop_last=False), 14)
    actual = streamed(make(dataset, num_workers=2, drop_last=False), 14)
    assert_same(expected, actual)
    assert [len(batch["key"]) for batch, _ in actual][5:7] == [2, BATCH]
    assert actual[5][1] == {**actual[5][1], "epoch": 0, "samples_consumed": 35}


def test_an_empty_share_keeps_the_workers_in_step(dataset):
    """Rank 1 of a last step holding one sample gets nothing there: with workers, the next epoch's batches still
    come in order (each worker answers for every step it owns, empty or not)."""
    settings = {"drop_last": False, "samples_per_epoch": 31}  # 5 steps of 6, then 1 sample: rank 0's
    expected = by_epochs(make(dataset, num_workers=0, **settings), 12)
    assert [len(batch["key"]) for batch, _ in expected][:6] == [BATCH] * 6, "no batch for the empty share"
    assert_same(expected, streamed(make(dataset, num_workers=3, **settings), 12))


class WorkerPid(SupervisedSamples):
    """The supervised pipeline, recording which process made each sample."""

    def make(self, key: str, members: dict[str, bytes], rng: np.random.Generator) -> dict[str, Any]:
        return {**super().make(key, members, rng), "pid": os.getpid()}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {**super().collate(samples), "pid": [s["pid"] for s in samples]}


def test_workers_live_across_epochs(dataset):
    plain = supervised_samples(SupervisedAugSettings(image_size=16))
    loader = make(dataset, num_workers=2, samples=WorkerPid(plain.transform))
    pids_by_epoch: dict[int, set[int]] = {}
    for batch, state in streamed(loader, 16):
        pids_by_epoch.setdefault(state["epoch"], set()).update(batch["pid"])
    assert sorted(pids_by_epoch) == [0, 1, 2, 3]
    assert len(set.union(*pids_by_epoch.values())) == 2, pids_by_epoch
    assert os.getpid() not in set.union(*pids_by_epoch.values())


def test_dino_batches_carry_their_masks_as_index_lists(dataset):
    aug = DinoAugSettings(global_size=16, local_size=8, local_crops=1, patch_size=4, mask_prob=1.0)
    batch = next(make(dataset, samples=dino_samples(aug)).stream())
    masks = batch["masks"]
    assert masks.shape == (2 * BATCH, 16) and masks.any()
    tokens = torch.randn(2 * BATCH, 16, 5)
    assert torch.equal(tokens.flatten(0, 1).index_select(0, batch["mask_indices"]), tokens[masks])
    per_image = masks.sum(1)
    weights = batch["mask_weights"]
    assert torch.allclose(weights, (1.0 / per_image.float()).repeat_interleave(per_image))


def test_a_stream_needs_an_epoch_of_at_least_one_global_batch(dataset):
    with pytest.raises(ValueError, match="holds no global batch"):
        next(make(dataset, samples_per_epoch=5).stream())
