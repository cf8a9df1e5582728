"""One small real run for the downstream tests: demo shards, three tiny pretraining runs (supervised under ZeRO-1
on 2 ranks, CLIP under ZeRO-3, DINO under ZeRO-2 with a learnt γ), their exports, a fine-tune and evaluations,
all through ``kope run`` with the real stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.data.loader_fixtures import write_dataset
from tests.train.helpers import demo_shards, pretrain_block, run_pipeline_file, use_shared_torch_extensions

TINY = {"name": "vit_kope_tiny_patch16_224_reg4",
        "kwargs": {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}}
TINY_LEARNABLE_GAMMA = {"name": TINY["name"], "kwargs": {**TINY["kwargs"], "learnable_gamma": True}}
CLIP_MODEL = "ViT-KoPE-Ti-16-64"
TWO_RANKS = {"executor": "local", "nproc": 2}
INLINE = {"executor": "inline"}


def downstream_stages(train: Path, val: Path, captions: Path) -> dict[str, Any]:
    supervised = pretrain_block(str(train), model=TINY, steps=3, zero_stage=1, launch=TWO_RANKS)
    clip = pretrain_block(str(captions), mode="clip", model={"name": CLIP_MODEL}, global_batch_size=8, steps=2,
                          schedule={"warmup_steps": 0}, zero_stage=3, launch=INLINE)
    dino = pretrain_block(
        str(train), mode="dino", model=TINY_LEARNABLE_GAMMA, global_batch_size=8, steps=2, zero_stage=2, launch=INLINE,
        schedule={"warmup_steps": 0},
        dino={"head_hidden_dim": 32, "head_bottleneck_dim": 16,
              "aug": {"global_size": 32, "local_size": 16, "local_crops": 1, "patch_size": 8}})
    for block in (clip, dino):
        del block["supervised"]
    evaluation = {"batch_size": 64, "num_workers": 0, "launch": INLINE}
    return {
        "pretrain_sup": supervised,
        "pretrain_clip": clip,
        "pretrain_dino": dino,
        "export_sup": {"kind": "export", "source": "@pretrain_sup", "launch": INLINE},
        "export_clip": {"kind": "export", "source": "@pretrain_clip", "launch": INLINE},
        "export_dino": {"kind": "export", "source": "@pretrain_dino", "launch": INLINE},
        "finetune": {
            "kind": "finetune", "init": "@export_dino", "data": str(train), "launch": INLINE,
            "global_batch_size": 8, "loader": {"batch_size": 8, "num_workers": 0}, "steps": 2,
            "optim": {"lr": 1e-12, "layer_decay": 0.75}, "schedule": {"min_lr": 0.0, "warmup_lr": 0.0},
            "checkpoint": {"every_steps": 2, "keep": 1},
            "supervised": {"ema_decay": 0.5, "val_data": str(val), "aug": {"image_size": 32}},
        },
        "evaluate_finetuned": {"kind": "evaluate", "model": "@finetune/export", "val": str(val), "train": str(train),
                               "protocols": ["top1", "knn", "linear", "analysis"],
                               "linear": {"epochs": 2}, "analysis": {"images": 4, "attention_maps": 2},
                               **evaluation},
        "evaluate_clip": {"kind": "evaluate", "model": "@export_clip", "val": str(val),
                          "protocols": ["zeroshot"], "zeroshot": {"templates": ["a photo of {}."]}, **evaluation},
    }


@pytest.fixture(scope="session")
def downstream_run(tmp_path_factory) -> Path:
    """The run directory of the pipeline above, run to completion once per test session."""
    use_shared_torch_extensions()
    root = tmp_path_factory.mktemp("downstream")
    shards = demo_shards(root / "demo")
    captions = write_dataset(root / "captions", kind="captions", shard_sizes=(8, 8), image_size=(64, 64))
    stages = downstream_stages(shards["train"], shards["val"], captions)
    return run_pipeline_file(root / "pipeline", stages, executor="inline", name="downstream")
