"""Stage finetune_segmentation through ``kope run`` on 2 ranks: killed after a checkpoint and run again, it ends
with the bits of an uninterrupted run; its export reloads from ``pipeline.models`` alone; the evaluate stage
scores it into results.jsonl."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from pipeline.core.results import ResultsLog
from pipeline.core.run_dir import RunDir
from pipeline.core.stage import StageContext
from pipeline.data.demo_data import DemoSpec, make_demo_data
from pipeline.data.settings import LoaderSettings, SegmentationShardSettings
from pipeline.export.timm_format import write_timm_folder
from pipeline.models.segmentation import SegmenterConfig, create_segmenter, load_segmenter
from pipeline.train.metrics import MeanWindow
from pipeline.train.settings import SegmentationSettings
from pipeline.train.tasks.segmentation import SegmentationTask
from stages import shard_segmentation
from stages.finetune_segmentation import backbone
from tests.train.helpers import (
    assert_same_tensors,
    checkpoint_weights,
    exported_weights,
    run_killed_then_resumed,
    run_pipeline_file,
    use_shared_torch_extensions,
)
from tests.train.test_step_path import HostReads, engine_for

STAGE = "finetune_segmentation"
BACKBONE = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 64, "learnable_gamma": True}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A backbone export folder (timm's format, as the export stage writes it) and sharded digit masks."""
    use_shared_torch_extensions()
    root = tmp_path_factory.mktemp("segmentation")
    torch.manual_seed(0)
    backbone = timm.create_model("vit_kope_tiny_patch16_224_reg4", num_classes=0, **BACKBONE)
    write_timm_folder(backbone, root / "export")
    make_demo_data(root / "demo", DemoSpec(digits=4, train_per_class=2, val_per_class=1, captioned=1))
    ctx = StageContext(name="shard", run_dir=root, out_dir=root / "shard", seed=0, log=logging.getLogger("shard"))
    shard_segmentation.run(SegmentationShardSettings(source=str(root / "demo" / "segmentation"), num_classes=5,
                                                     reduce_zero_label=False, samples_per_shard=8, workers=1), ctx)
    return {"export": root / "export", "train": root / "shard" / "train", "val": root / "shard" / "val"}


def segmentation_block(inputs: dict[str, Path], **settings) -> dict:
    block = {
        "kind": STAGE, "init": str(inputs["export"]), "data": str(inputs["train"]), "global_batch_size": 8,
        "loader": {"batch_size": 4, "num_workers": 0, "window_shards": 2}, "steps": 8, "zero_stage": 1,
        "optim": {"lr": 1e-3, "layer_decay": 0.75, "grad_clip": 1.0}, "schedule": {"warmup_steps": 2},
        "checkpoint": {"every_steps": 2, "keep": 2}, "log_every_steps": 2,
        "segmentation": {"out_indices": [0, 1], "channels": 16,
                         "aug": {"crop_size": 48, "scale": [128, 64], "ratio_range": [0.5, 1.5]}},
    }
    return {**block, **settings}


@pytest.mark.slow
def test_killed_and_resumed_fine_tuning_ends_bitwise_equal_and_its_export_reloads(inputs, tmp_path):
    evaluate = {"kind": "evaluate", "model": f"@{STAGE}/export", "val": str(inputs["val"]),
                "protocols": ["segmentation"], "num_workers": 0, "segmentation": {"overlays": 2},
                "launch": {"executor": "inline"}}
    reference = run_pipeline_file(tmp_path / "whole", {STAGE: segmentation_block(inputs), "evaluate": evaluate})
    resumed = run_killed_then_resumed(tmp_path / "killed", {STAGE: segmentation_block(inputs)}, 4, stage=STAGE)
    assert_same_tensors(exported_weights(reference, STAGE), exported_weights(resumed, STAGE))
    assert_same_tensors(checkpoint_weights(reference, STAGE), checkpoint_weights(resumed, STAGE))

    outputs = RunDir(reference).read(STAGE).outputs
    assert outputs["steps"] == 8 and outputs["export_max_abs_diff"] <= 1e-5
    export = reference / STAGE / "export"
    model, description = load_segmenter(export)
    assert description["classes"] == ["background", "zero", "one", "two", "three"]
    assert description["preprocess"]["crop_size"] == 48
    spec = json.loads((reference / STAGE / "model.json").read_text())
    assert spec["mode"] == "segmentation"
    trained = create_segmenter(SegmenterConfig(**spec["kwargs"])).eval()
    trained.load_state_dict({k: v.reshape(trained.state_dict()[k].shape)
                             for k, v in load_file(reference / STAGE / "model.safetensors").items()})
    images = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(images)["out"], trained(images)["out"])
    assert model.backbone.coupling.gamma_raw.requires_grad  # segmentation keeps a learnt γ learnable

    records = [r for r in ResultsLog(RunDir(reference).results_file).records() if r["protocol"] == "segmentation"]
    assert len(records) == 1
    metrics = records[0]["metrics"]
    assert set(metrics["whole"]) == {"miou", "pixel_accuracy", "per_class_iou"} and metrics["mode"] == "slide"
    assert 0 <= metrics["miou"] <= 1 and sorted(metrics["slide"]["per_class_iou"]) == sorted(description["classes"])
    assert RunDir(reference).read("evaluate").outputs["miou"] == pytest.approx(metrics["miou"], abs=1e-4)
    assert (reference / "evaluate" / "segmentation" / "001.png").is_file()


def test_a_segmentation_step_reads_nothing_back(inputs, one_rank):
    """Like the other modes (tests/train/test_step_path.py): no device value read in ``compute_loss``, the
    auxiliary losses logged as device tensors."""
    model, norm = backbone(inputs["export"], {})
    settings = SegmentationSettings(out_indices=[0, 1], channels=16, aux_convs=1, aux_weight=0.4)
    settings = dataclasses.replace(settings, aug=dataclasses.replace(settings.aug, crop_size=48, **norm))
    task = SegmentationTask(settings, backbone=model, data_dir=inputs["train"], loader=LoaderSettings(batch_size=2),
                            seed=0)
    torch.manual_seed(0)
    engine = engine_for(task.build_module(), 2)
    batch = {"image": torch.randn(2, 3, 48, 48), "mask": torch.randint(0, 5, (2, 48, 48))}
    window = MeanWindow(engine.device)
    with HostReads() as probe:
        for step in range(2):
            loss, metrics = task.compute_loss(engine, batch, step)
            window.add(loss.detach(), metrics)
    assert probe.reads == []
    assert set(metrics) == {"loss_decode", "loss_aux"}
    assert window.means()["loss_aux"] > 0
