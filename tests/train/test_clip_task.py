"""The CLIP task on a real DeepSpeed engine (one process, CPU) with real shards: the logit-scale clamp under every
ZeRO stage, the loader built from the model config, and the export that open_clip loads."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param

from pipeline.data.loaders import LoaderSettings
from pipeline.train.engine import BatchPlan, build_engine, init_distributed
from pipeline.train.optim import OptimSettings
from pipeline.train.tasks.clip import ClipSettings, ClipTask
from tests.data.loader_fixtures import write_dataset
from tests.train.helpers import use_shared_torch_extensions

MODEL = "ViT-KoPE-Ti-16-64"
BATCH = 4


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("captions"), kind="captions", shard_sizes=(6, 6),
                         image_size=(80, 72))


def clip_task(data_dir=".") -> ClipTask:
    return ClipTask(ClipSettings(), model=MODEL, model_kwargs={}, data_dir=data_dir,
                    loader=LoaderSettings(batch_size=BATCH, num_workers=0), seed=0)


def engine_for(task: ClipTask, zero_stage: int, precision: str = "fp32", logit_scale: float | None = None):
    use_shared_torch_extensions()
    device = init_distributed(0, 1, 0)
    torch.manual_seed(0)
    task.begin(1, zero_stage)
    module = task.build_module()
    if logit_scale is not None:
        with torch.no_grad():
            module.logit_scale.fill_(logit_scale)
    return build_engine(module, OptimSettings(lr=1e-4, weight_decay=0.0), BatchPlan.derive(BATCH, BATCH, 1),
                        zero_stage, precision, device)


def first_batch(task: ClipTask) -> dict:
    return next(iter(task.build_loader(rank=0, world_size=1)))


def test_loader_follows_the_model_config(captions):
    batch = first_batch(clip_task(captions))
    assert batch["image"].shape == (BATCH, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (BATCH, 32) and batch["text"].dtype == torch.long  # context length 32
    assert (batch["text"][:, 0] == open_clip.get_tokenizer(MODEL)(["x"])[0, 0]).all()  # start-of-text token


@pytest.mark.parametrize(("zero_stage", "precision"), [(0, "fp32"), (0, "bf16"), (1, "fp32"), (2, "fp32"),
                                                       (3, "fp32")])
def test_logit_scale_is_clamped_in_master_and_working_copies(captions, zero_stage, precision):
    task = clip_task(captions)
    engine = engine_for(task, zero_stage, precision, logit_scale=math.log(150.0))
    tolerance = 0.05 if precision == "bf16" else 1e-6  # bf16 holds ln(150) to about 2 %
    loss, metrics = task.compute_loss(engine, first_batch(task), step=0)
    assert torch.isfinite(loss) and metrics["logit_scale"] == pytest.approx(150.0, rel=tolerance)
    engine.backward(loss)
    engine.step()
    task.after_optimizer_step(engine, step=0)
    param = engine.module.logit_scale
    working = param.ds_tensor if zero_stage == 3 else param
    assert working.float().item() == pytest.approx(math.log(100.0), rel=tolerance)
    master = safe_get_full_fp32_param(param)
    if master is not None:  # DeepSpeed keeps an fp32 master copy: the next step must start from it clamped
        assert master.item() == pytest.approx(math.log(100.0))
    _, metrics = task.compute_loss(engine, first_batch(task), step=1)
    assert metrics["logit_scale"] == pytest.approx(100.0, rel=tolerance)
    assert {"gamma", "phase_synchrony"} <= set(task.extra_metrics(engine))  # gathers ZeRO-3 partitions


def test_export_loads_into_open_clip_and_matches_the_trained_model(captions):
    task = clip_task(captions)
    engine = engine_for(task, zero_stage=2)
    loss, _ = task.compute_loss(engine, first_batch(task), step=0)
    engine.backward(loss)
    engine.step()
    task.after_optimizer_step(engine, step=0)
    exported = dict(task.parameters_for_export(engine))
    assert exported["logit_scale"].shape == ()  # open_clip's own shape, though DeepSpeed trained it as (1,)
    spec = task.model_spec()
    assert spec == {"library": "open_clip", "name": MODEL, "kwargs": {}}
    model = open_clip.create_model(spec["name"], **spec["kwargs"])
    model.load_state_dict(exported)  # strict
    images = first_batch(task)["image"]
    trained = engine.module.eval()
    torch.testing.assert_close(model.eval().encode_image(images), trained.encode_image(images))
