"""The shipped ablation pipelines: every variant trains alike but for its one switch and its seed, and the report
gathers them all; the demo runs end to end (shrunk) to report.md, report.csv and the plots."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.config.loader import load_pipeline
from pipeline.core.run_dir import RunDir

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "pipelines" / "ablation-demo.yaml"
IMAGENET = REPO / "configs" / "pipelines" / "imagenet-ablation.yaml"
SWITCHES = {"kope": {}, "vit": {"kope": False}, "no_kuramoto": {"kuramoto": False}, "only_qk": {"vo_rotation": False},
            "no_phase_mix": {"phase_mix": False}}


def pretrain_variants(config) -> dict[str, object]:
    return {name: spec for name, spec in config.stages.items() if spec.kind.name == "pretrain"}


def assert_alike_but_for_the_switch(config, seeds: list[int]) -> dict:
    variants = pretrain_variants(config)
    assert sorted(variants) == sorted(f"pretrain-{label}-seed_{seed}" for label in SWITCHES for seed in seeds)
    base = variants[f"pretrain-kope-seed_{seeds[0]}"].settings_dict()
    for name, spec in variants.items():
        label, seed = name.split("-")[1], int(name.split("_")[-1])
        settings = spec.settings_dict()
        assert settings["seed"] == seed
        assert settings["model"]["kwargs"] == {**base["model"]["kwargs"], **SWITCHES[label]}, name
        same = {key: value for key, value in settings.items() if key not in ("seed", "model")}
        assert same == {key: value for key, value in base.items() if key not in ("seed", "model")}, name
        assert settings["model"]["name"] == base["model"]["name"]
    report = config.stages["report"]
    assert report.settings.runs == [f"@evaluate-{label}-seed_{seed}" for label in SWITCHES for seed in seeds]
    assert report.settings.reference == "vit"
    return base


def test_the_demo_ablation_trains_every_variant_alike():
    config = load_pipeline(DEMO)
    base = assert_alike_but_for_the_switch(config, [0, 1, 2])
    assert len(config.stages) == 2 + 3 * 15 + 1
    assert base["mode"] == "supervised" and base["supervised"]["val_every_steps"] > 0
    for label in SWITCHES:
        evaluate = config.stages[f"evaluate-{label}-seed_1"]
        assert evaluate.needs[0] == f"export-{label}-seed_1" and "analysis" in evaluate.settings.protocols
        assert config.stages[f"export-{label}-seed_1"].settings.source == f"@pretrain-{label}-seed_1"


def test_the_imagenet_ablation_validates_at_the_papers_s16_setting(tmp_path):
    config = load_pipeline(IMAGENET, [f"shard_imagenet.source={tmp_path}"])
    base = assert_alike_but_for_the_switch(config, [0])
    assert base["model"]["name"] == "vit_kope_small_patch16_224"
    assert base["model"]["kwargs"] == {"drop_path_rate": 0.05, "coupling": "vo_proj"}
    assert (base["epochs"], base["global_batch_size"], base["supervised"]["aug"]["image_size"]) == (300, 2048, 224)
    assert (base["optim"]["name"], base["optim"]["lr"], base["supervised"]["loss"]) == ("lamb", 4e-3, "bce")
    seeds = load_pipeline(IMAGENET, [f"shard_imagenet.source={tmp_path}", "pretrain.matrix.seed=[0, 1, 2]"])
    assert len(pretrain_variants(seeds)) == 15


@pytest.mark.slow
def test_the_demo_ablation_runs_to_a_report(tmp_path):
    """The shipped file with fewer steps and two seeds: every stage done, the report's files and plots there."""
    run_dir = tmp_path / "run"
    shrink = ["pretrain.steps=8", "pretrain.log_every_steps=4", "pretrain.supervised.val_every_steps=4",
              "pretrain.schedule.warmup_steps=2", "pretrain.matrix.seed=[0, 1]", "evaluate.analysis.images=8"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/kope-torch-ext")
    cmd = [sys.executable, "-m", "pipeline.core.cli", "run", str(DEMO), "--run-dir", str(run_dir), *shrink]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = RunDir(run_dir)
    assert len(run.stage_names()) == 2 + 3 * 10 + 1 and all(run.read(name).status == "done"
                                                            for name in run.stage_names())
    out = run_dir / "report"
    with (out / "report.csv").open() as handle:
        rows = {row["variant"]: row for row in csv.DictReader(handle)}
    assert list(rows) == list(SWITCHES) and all(row["runs"] == "2" for row in rows.values())
    assert all(0 <= float(row["top1_mean"]) <= 1 and row["gini_n"] == "2" for row in rows.values())
    assert rows["vit"]["synchrony_n"] == "0" and rows["kope"]["synchrony_n"] == "2", "a plain ViT has no phases"
    for name in ("loss_vs_steps", "loss_vs_samples", "val_top1_vs_steps", "val_top1_vs_samples", "gini_per_block",
                 "synchrony_per_block"):
        assert (out / f"{name}.png").stat().st_size > 5000, name
    status = subprocess.run([sys.executable, "-m", "pipeline.core.cli", "status", str(run_dir)], cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert "report report (report/report.md):" in status.stdout and "no_phase_mix" in status.stdout
