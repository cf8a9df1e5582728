"""The CLIP task's contrastive loss: open_clip's ClipLoss on two gloo ranks equals one process on the whole batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.loaders import LoaderSettings
from pipeline.train.tasks.clip import ClipSettings, ClipTask
from tests.train.test_dino_losses import run_on_ranks

BATCH, DIM, SCALE = 4, 8, 14.0


def clip_task(local_loss: bool) -> ClipTask:
    return ClipTask(ClipSettings(local_loss=local_loss), model="ViT-KoPE-Ti-16-64", model_kwargs={},
                    data_dir=".", loader=LoaderSettings(), seed=0)


def features(world_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    image = F.normalize(torch.randn(world_size * BATCH, DIM, generator=gen), dim=-1)
    text = F.normalize(torch.randn(world_size * BATCH, DIM, generator=gen), dim=-1)
    return image, text


def loss_and_grads(task: ClipTask, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
    image, text = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    loss = task.loss(image, text, torch.tensor(SCALE))
    loss.backward()
    return {"loss": loss.detach(), "image_grad": image.grad, "text_grad": text.grad}


def _rank_part(rank: int, world_size: int) -> dict[str, Any]:
    image, text = features(world_size)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    return {local: loss_and_grads(clip_task(local), image[rows], text[rows]) for local in (True, False)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[bool, dict[str, torch.Tensor]]]:
    return run_on_ranks(_rank_part, 2, tmp_path_factory.mktemp("clip_ranks"))


def test_single_process_loss_is_symmetric_cross_entropy():
    image, text = features()
    logits = SCALE * image @ text.T
    labels = torch.arange(len(image))
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(loss_and_grads(clip_task(True), image, text)["loss"], expected)


@pytest.mark.parametrize("local_loss", [True, False])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(two_ranks, local_loss):
    single = loss_and_grads(clip_task(local_loss), *features())
    losses = torch.stack([part[local_loss]["loss"] for part in two_ranks])
    if local_loss:  # each rank scores its own rows: the rank losses average to the global loss
        torch.testing.assert_close(losses.mean(), single["loss"])
        assert not torch.allclose(losses[0], losses[1])
    else:  # every rank scores the whole gathered batch
        torch.testing.assert_close(losses, single["loss"].expand(2))
    # Gradients reach each rank's own features through the gather; averaged over ranks (as the engine does)
    # they are the global loss's gradient.
    for rank, part in enumerate(two_ranks):
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        for name in ("image_grad", "text_grad"):
            torch.testing.assert_close(part[local_loss][name] / 2, single[name][rows])
