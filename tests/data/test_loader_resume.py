"""Resume exactness: 2 ranks × 2 DataLoader workers, interrupted and resumed, see what an uninterrupted run sees."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pipeline.data.loaders import LoaderSettings, ResumableLoader
from pipeline.data.loaders_samples import clip_samples, dino_samples, supervised_samples
from pipeline.data.transforms import ClipAugSettings, DinoAugSettings, SupervisedAugSettings
from tests.data.loader_fixtures import write_dataset

MODES: dict[str, tuple[str, Callable]] = {
    "supervised": ("classification", lambda: supervised_samples(SupervisedAugSettings(image_size=16))),
    "dino": ("classification", lambda: dino_samples(
        DinoAugSettings(global_size=16, local_size=8, local_crops=2, patch_size=8))),
    "clip": ("captions", lambda: clip_samples(ClipAugSettings(image_size=16, context_length=8))),
}
TENSOR_FIELD = {"supervised": "image", "dino": "global_crops", "clip": "image"}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("datasets")
    return {kind: write_dataset(root / kind, kind=kind) for kind in ("classification", "captions")}


def loader(dataset: Path, mode: str, rank: int, world: int, seed: int = 7, **settings) -> ResumableLoader:
    settings = {"batch_size": 4, "num_workers": 2, "window_shards": 2, **settings}
    return ResumableLoader(dataset, MODES[mode][1](), LoaderSettings(**settings), seed=seed, rank=rank,
                           world_size=world)


def run(dataset: Path, mode: str, rank: int, epochs: int, stop: tuple[int, int] | None = None,
        resume_with: dict | None = None, **settings) -> list[dict]:
    """Batches of rank ``rank`` of 2 through ``epochs`` epochs. With ``stop`` = (epoch, steps) the loader is
    dropped after that many steps of that epoch, and a fresh one (``settings`` updated by ``resume_with``)
    continues from its state."""
    current = loader(dataset, mode, rank, 2, **settings)
    batches = []
    while current.epoch < epochs:
        for step, batch in enumerate(current, start=1):
            batches.append(batch)
            if stop and (current.epoch, step) == stop:
                state = current.state_dict()
                current = loader(dataset, mode, rank, 2, **{**settings, **(resume_with or {})})
                current.load_state_dict(state)
                stop = None
                break
    return batches


def keys(batches: list[dict]) -> list[list[str]]:
    return [b["key"] for b in batches]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_two_ranks_two_workers_resume_exactly(datasets, mode):
    dataset = datasets[MODES[mode][0]]
    field = TENSOR_FIELD[mode]
    wholes = []
    for rank in range(2):
        whole = run(dataset, mode, rank, epochs=2)
        resumed = run(dataset, mode, rank, epochs=2, stop=(0, 2))
        assert len(whole) == 8, "35 samples, global batch 8: 4 steps per epoch"
        assert keys(resumed) == keys(whole)
        assert all(torch.equal(a[field], b[field]) for a, b in zip(resumed, whole)), "same augmentations"
        wholes.append(keys(whole))
    assert all(not set(a) & set(b) for a, b in zip(*wholes)), "ranks never share a sample in a step"


@pytest.mark.parametrize("variant", [
    {"repeats": 2},
    {"resampled": True, "samples_per_epoch": 24},
    {"samples_per_epoch": 20, "window_shards": 5},
])
def test_resume_exact_with_repeats_resampling_and_fixed_epoch_length(datasets, variant):
    """In-process (workers: see the other tests), so three epochs stay quick."""
    dataset = datasets["classification"]
    variant = {**variant, "num_workers": 0}
    for rank in range(2):
        whole = run(dataset, "supervised", rank, epochs=3, **variant)
        resumed = run(dataset, "supervised", rank, epochs=3, stop=(1, 1), **variant)
        assert keys(resumed) == keys(whole)


@pytest.mark.parametrize("workers", [0, 3])
def test_resume_with_another_worker_count(datasets, workers):
    dataset = datasets["classification"]
    for rank in range(2):
        whole = run(dataset, "supervised", rank, epochs=1)
        resumed = run(dataset, "supervised", rank, epochs=1, stop=(0, 1), resume_with={"num_workers": workers})
        assert keys(resumed) == keys(whole)
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, whole))


@pytest.mark.parametrize("world,batch", [(1, 8), (4, 2)])
def test_elastic_resume_keeps_every_global_batch(datasets, world, batch):
    """Resumed on another world size with the same global batch: the same samples, augmented the same."""
    dataset = datasets["classification"]
    whole = [run(dataset, "supervised", rank, epochs=1) for rank in range(2)]
    first = loader(dataset, "supervised", 0, 2)
    batches = iter(first)
    next(batches), next(batches)
    state = first.state_dict()
    assert state["samples_consumed"] == 16
    after = []
    for rank in range(world):
        resumed = loader(dataset, "supervised", rank, world, batch_size=batch)
        resumed.load_state_dict(state)
        after.append(list(resumed))

    def global_step(per_rank: list[list[dict]], step: int) -> dict[str, torch.Tensor]:
        return {k: img for batches in per_rank for k, img in zip(batches[step]["key"], batches[step]["image"])}

    assert all(len(batches) == 2 for batches in after)
    for step in range(2):
        expected, got = global_step(whole, step + 2), global_step(after, step)
        assert got.keys() == expected.keys() and len(got) == 8
        assert all(torch.equal(got[k], expected[k]) for k in got)
