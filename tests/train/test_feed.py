"""The device feed: the loader's stream one batch ahead, with the position of the batches handed out (what the
checkpoint saves), so prefetching changes nothing about resume."""

from __future__ import annotations

import itertools

import torch

from pipeline.data.loaders import LoaderSettings, ResumableLoader
from pipeline.data.loaders_samples import supervised_samples
from pipeline.data.transforms import SupervisedAugSettings
from pipeline.train.feed import DeviceFeed, to_device
from tests.data.loader_fixtures import write_dataset

CPU = torch.device("cpu")


def loader(dataset, workers: int = 2) -> ResumableLoader:
    samples = supervised_samples(SupervisedAugSettings(image_size=16, uint8_images=True))
    settings = LoaderSettings(batch_size=4, num_workers=workers, window_shards=2)
    return ResumableLoader(dataset, samples, settings, seed=1)


def test_feed_state_is_the_position_of_the_batches_handed_out(tmp_path):
    dataset = write_dataset(tmp_path / "data")  # 35 samples: 8 steps of 4 per epoch
    reference, states = [], []
    plain = loader(dataset, workers=0)
    while len(reference) < 12:
        for batch in plain:
            reference.append(batch)
            states.append(plain.state_dict())
    feed = DeviceFeed(loader(dataset), CPU)
    batches = feed.batches()
    assert feed.state_dict() == states[0] | {"epoch": 0, "samples_consumed": 0}
    for step in range(10):
        batch = next(batches)
        assert batch["key"] == reference[step]["key"] and torch.equal(batch["image"], reference[step]["image"])
        assert batch["image"].dtype == torch.uint8
        assert feed.state_dict() == states[step], "the look-ahead batch is not counted"
        assert feed.loader.state_dict() == states[step + 1], "the loader itself is one batch ahead"
    assert (feed.epoch, feed.samples_consumed, feed.epoch_length) == (1, 8, 35)

    resumed = DeviceFeed(loader(dataset, workers=1), CPU)
    resumed.load_state_dict(feed.state_dict())
    after = list(itertools.islice(resumed.batches(), 2))
    assert [b["key"] for b in after] == [b["key"] for b in reference[10:12]]
    batches.close()
    again = list(itertools.islice(feed.batches(), 2))  # a new iterator carries on after the last batch handed out
    assert [b["key"] for b in again] == [b["key"] for b in reference[10:12]]


def test_to_device_moves_every_tensor_of_a_nested_batch():
    batch = {"image": torch.zeros(2, 3), "crops": [torch.ones(1), (torch.ones(2), "x")], "key": ["a", "b"]}
    moved = to_device(batch, torch.device("meta"))
    assert moved["image"].device.type == "meta" and moved["crops"][0].device.type == "meta"
    assert moved["crops"][1][0].device.type == "meta" and moved["crops"][1][1] == "x"
    assert moved["key"] == ["a", "b"] and isinstance(moved["crops"][1], tuple)
