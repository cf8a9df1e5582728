"""The model card: metrics of the exported weights only, and a load-by-name snippet that preprocesses at the
trained size."""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch

import pipeline.models  # noqa: F401  (registers vit_kope_*)
from pipeline.core.logs import get_logger
from pipeline.core.results import ResultsLog
from pipeline.core.run_dir import RunDir
from pipeline.core.stage import StageContext
from pipeline.export.model_card import load_snippets
from pipeline.export.package import recorded_metrics
from pipeline.export.timm_format import CONFIG_FILE, write_timm_folder


def test_the_card_shows_the_metrics_of_its_own_weights_only(tmp_path):
    run = RunDir(tmp_path)
    results = ResultsLog(run.results_file)
    results.append({"checkpoint_sha256": "aaa", "protocol": "top1", "dataset": "val", "metrics": {"top1": 0.5}})
    results.append({"checkpoint_sha256": "bbb", "protocol": "knn", "dataset": "val", "metrics": {"top1": 0.9}})
    ctx = StageContext(name="export", run_dir=tmp_path, out_dir=tmp_path / "export", seed=0, log=get_logger("t"))
    assert recorded_metrics(ctx, "aaa") == {"top1 top-1 on val": 0.5}
    assert recorded_metrics(ctx, "ccc") == {}


def test_load_by_name_builds_the_transform_of_the_trained_size(tmp_path):
    model = timm.create_model("vit_kope_tiny_patch16_224", img_size=48, patch_size=8, embed_dim=32, depth=1,
                              num_heads=2, num_classes=3)
    folder = tmp_path / "export"
    write_timm_folder(model, folder, data_config={"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                                                  "crop_pct": 1.0})
    snippet, _ = load_snippets(json.loads((folder / CONFIG_FILE).read_text()), has_open_clip=False)
    by_name = snippet.split("# or, by name, with the weights file:")[1].replace("path/to/this/folder", str(folder))
    scope: dict = {}
    exec(f"import timm\n{by_name}", scope)  # the card's own code, run as a user would
    config = timm.data.resolve_data_config(model=scope["model"])
    assert config["input_size"] == (3, 48, 48) and config["mean"] == (0.5, 0.5, 0.5) and config["crop_pct"] == 1.0
    images = torch.randn(1, 3, 48, 48)
    torch.testing.assert_close(scope["model"].eval()(images), model.eval()(images))
    assert Path(folder / CONFIG_FILE).is_file()
