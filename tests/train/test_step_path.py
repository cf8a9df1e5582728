"""What a training micro-step does between the loader and backward: uint8 batches normalised and mixed on the
device, and no read of a device value (no host sync, no data-dependent shape) in any mode's ``compute_loss`` or in
the metrics window. On the CPU a read shows as the aten op behind it: ``_local_scalar_dense`` (``.item()``,
``float(t)``, ``if t:``), ``nonzero`` / boolean-mask indexing (a size only the device knows)."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.data.loaders import LoaderSettings
from pipeline.data.settings import SupervisedAugSettings
from pipeline.train.engine import BatchPlan, build_engine, init_distributed
from pipeline.train.faults import poison_if_nonfinite
from pipeline.train.metrics import MeanWindow
from pipeline.train.optim import OptimSettings
from pipeline.train.settings import SupervisedSettings
from pipeline.train.tasks.supervised import SupervisedTask, TimmModel
from tests.train.helpers import TINY_KOPE, use_shared_torch_extensions
from tests.train.test_dino_task import BATCH, dino_task, fake_batch

DATA_DEPENDENT = {"aten.nonzero.default", "aten.masked_select.default", "aten.masked_scatter.default"}


class HostReads(TorchDispatchMode):
    """Every op that reads a device value to the host or sizes its output by data."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name == "aten.index.Tensor" and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1] if t is not None)
        if name == "aten._local_scalar_dense.default" or name in DATA_DEPENDENT or bool_index:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def engine_for(module: torch.nn.Module, batch: int):
    use_shared_torch_extensions()
    device = init_distributed(0, 1, 0)
    return build_engine(module, OptimSettings(lr=1e-3), BatchPlan.derive(batch, batch, 1), 0, "fp32", device)


def supervised_task(shards, uint8: bool) -> SupervisedTask:
    aug = SupervisedAugSettings(image_size=32, uint8_images=uint8)
    kwargs = {**TINY_KOPE["kwargs"], "drop_path_rate": 0.0}
    return SupervisedTask(SupervisedSettings(ema_decay=0.9, aug=aug), model=TimmModel(TINY_KOPE["name"], kwargs),
                          data_dir=shards["train"], loader=LoaderSettings(batch_size=4), seed=0)


def pixels(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def seed_mixing(seed: int) -> None:
    """Mixup/CutMix draw their parameters from numpy (timm); the rest from torch and Python."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_uint8_batches_train_as_the_float_batches_they_stand_for(shards, one_rank):
    """The same pixels sent as uint8 (normalised and mixed on the device) and as the loader's normalised floats:
    the same mixed images reach the model, so the same loss (Mixup/CutMix on uint8 used to fail, and the model
    saw 0-255 pixels)."""
    losses = {}
    for uint8 in (True, False):
        task = supervised_task(shards, uint8)
        torch.manual_seed(0)
        engine = engine_for(task.build_module(), 4)
        images = pixels()
        aug = task.settings.aug
        if not uint8:  # what ToTensor + Normalize make of the same pixels on the workers
            images = (images.float() / 255 - torch.tensor(aug.mean).view(1, 3, 1, 1)) / torch.tensor(
                aug.std).view(1, 3, 1, 1)
        for mode in ("mixup", "cutmix"):
            task.mixup.switch_prob = 1.0 if mode == "cutmix" else 0.0
            seed_mixing(3)
            batch = {"image": images.clone(), "label": torch.tensor([0, 1, 2, 3])}  # Mixup mixes in place
            loss, _ = task.compute_loss(engine, batch, 0)
            probe = task._probe
            losses[uint8, mode] = loss.detach(), probe
    for mode in ("mixup", "cutmix"):
        (loss8, probe8), (loss32, probe32) = losses[True, mode], losses[False, mode]
        torch.testing.assert_close(probe8, probe32, rtol=1e-5, atol=1e-5)
        assert probe8.abs().max() < 5, "the model sees normalised pixels"
        torch.testing.assert_close(loss8, loss32, rtol=1e-5, atol=1e-6)


def test_supervised_step_reads_nothing_back(shards, one_rank):
    task = supervised_task(shards, uint8=True)
    torch.manual_seed(0)
    engine = engine_for(task.build_module(), 4)
    window = MeanWindow(engine.device)
    batch = {"image": pixels(), "label": torch.tensor([0, 1, 2, 3])}
    seed_mixing(0)
    with HostReads() as probe:
        for step in range(2):
            loss, metrics = task.compute_loss(engine, batch, step)
            window.add(poison_if_nonfinite(loss), metrics)
    assert probe.reads == []
    assert window.means()["loss"] > 0, "read back at the report"


@pytest.mark.parametrize("objective", ["simdino", "dino"])
def test_dino_step_reads_nothing_back(objective):
    task = dino_task(total_steps=4, objective=objective, phase_alignment_weight=0.1)
    torch.manual_seed(0)
    engine = engine_for(task.build_module(), BATCH)
    window = MeanWindow(engine.device)
    batches = [fake_batch(step) for step in range(2)]  # the loader's work (its index lists), on its workers
    with HostReads() as probe:
        for step, batch in enumerate(batches):
            loss, metrics = task.compute_loss(engine, batch, step)
            window.add(poison_if_nonfinite(loss), metrics)
    assert probe.reads == []
    assert all(isinstance(value, torch.Tensor | float) for value in metrics.values())
    means = window.means()
    assert {"loss", "loss_cls", "loss_ibot", "loss_phase"} <= set(means) and means["loss_phase"] < -0.9


def test_dino_uint8_crops_are_normalised_on_the_device():
    float_task = dino_task()
    aug = dataclasses.replace(float_task.settings.aug, uint8_images=True)
    uint8_task = dino_task(aug=aug)
    crops = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    expected = (crops.float() / 255 - torch.tensor(aug.mean).view(1, 3, 1, 1)) / torch.tensor(aug.std).view(1, 3, 1, 1)
    torch.testing.assert_close(uint8_task._crops(crops, torch.device("cpu")), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(float_task._crops(expected, torch.device("cpu")), expected)


def test_the_teacher_and_the_centres_are_placed_once(monkeypatch):
    task = dino_task(objective="dino")
    torch.manual_seed(0)
    engine = engine_for(task.build_module(), BATCH)
    moves = []
    original = torch.nn.Module.to

    def counting(self, *args, **kwargs):
        moves.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", counting)
    for step in range(3):
        task.compute_loss(engine, fake_batch(step), step)
    assert sorted(moves) == ["DinoLoss", "DinoStudent", "IbotLoss"]


def test_the_mask_hook_is_registered_once():
    task = dino_task()
    student = task.build_module()
    hooks = student.backbone.patch_embed._forward_hooks
    assert len(hooks) == 1 and len(task.teacher.backbone.patch_embed._forward_hooks) == 1
    batch = fake_batch()
    for _ in range(3):
        student(batch["global_crops"], batch["local_crops"], batch["masks"], batch["mask_indices"])
    assert len(hooks) == 1 and student._masks is None


def test_clip_uint8_batches_train_as_float_ones_and_the_step_reads_nothing_back(one_rank):
    from pipeline.data.transforms import clip_normalizer
    from pipeline.train.tasks.clip import ClipSettings, ClipTask

    tasks = {uint8: ClipTask(ClipSettings(uint8_images=uint8), model="ViT-KoPE-Demo-8-64", model_kwargs={},
                             data_dir=".", loader=LoaderSettings(batch_size=4), seed=0) for uint8 in (True, False)}
    size = tasks[True].aug_settings().image_size
    images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    as_floats = clip_normalizer(tasks[True].aug_settings())(images)
    text = torch.randint(1, 100, (4, tasks[True].aug_settings().context_length))
    losses = {}
    for uint8, task in tasks.items():
        torch.manual_seed(0)
        engine = engine_for(task.build_module(), 4)
        batch = {"image": images if uint8 else as_floats, "text": text}
        with HostReads() as probe:
            loss, metrics = task.compute_loss(engine, batch, 0)
        assert probe.reads == [] and isinstance(metrics["logit_scale"], torch.Tensor)
        losses[uint8] = loss.detach()
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)
