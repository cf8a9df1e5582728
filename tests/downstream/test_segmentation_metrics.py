"""The segmentation protocol's numbers against values worked out by hand, and its two inference modes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.evaluation.segmentation import segmentation_metrics, slide_logits, summarise, whole_logits

NAMES = ["zero", "one", "two", "three", "four"]


def test_miou_per_class_iou_and_pixel_accuracy_match_hand_computed_values():
    metrics = segmentation_metrics(len(NAMES))
    metrics.update(torch.tensor([[[0, 1, 1], [1, 2, 2]]]), torch.tensor([[[0, 0, 1], [1, 2, 255]]]))
    first = summarise(metrics, NAMES)
    # labelled pixels: target 0 0 1 1 2, prediction 0 1 1 1 2 (the ignored pixel's prediction does not count)
    assert first["per_class_iou"] == pytest.approx({"zero": 1 / 2, "one": 2 / 3, "two": 1.0, "three": None,
                                                    "four": None})
    assert first["miou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)  # absent classes are left out, not zero
    assert first["pixel_accuracy"] == pytest.approx(4 / 5)

    metrics.update(torch.tensor([[[0, 3]]]), torch.tensor([[[3, 3]]]))
    both = summarise(metrics, NAMES)
    # now target 0 0 1 1 2 3 3, prediction 0 1 1 1 2 0 3: zero 1/(1+1+1), three 1/(1+1)
    assert both["per_class_iou"] == pytest.approx({"zero": 1 / 3, "one": 2 / 3, "two": 1.0, "three": 1 / 2,
                                                   "four": None})
    assert both["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 + 1 / 2) / 4)
    assert both["pixel_accuracy"] == pytest.approx(5 / 7)


class Pointwise(nn.Module):
    """A per-pixel segmenter (1x1 convolution): its logits do not depend on where a window starts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(images)}


@torch.no_grad()
def test_sliding_windows_cover_the_image_and_average_overlaps():
    model = Pointwise()
    image = torch.randn(1, 3, 50, 83, generator=torch.Generator().manual_seed(0))
    whole = whole_logits(model, image, patch=8)
    assert whole.shape == (1, 4, 50, 83)
    slide = slide_logits(model, image, crop=32, stride=21, patch=8)
    assert torch.allclose(slide, whole, atol=1e-6)
    assert torch.allclose(slide_logits(model, image[..., :20, :20], crop=32, stride=21, patch=8),
                          whole[..., :20, :20], atol=1e-6)  # an image smaller than one window


@torch.no_grad()
def test_sliding_windows_differ_from_whole_inference_for_a_model_that_sees_context():
    class Context(nn.Module):
        def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"out": images - images.mean(dim=(-2, -1), keepdim=True)}

    image = torch.randn(1, 3, 40, 64, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(slide_logits(Context(), image, 32, 21, 8), whole_logits(Context(), image, 8))
