"""README's first command: the demo pipeline runs the whole chain, learns, records every evaluation, and a second
run does nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.core.results import ResultsLog
from pipeline.core.run_dir import RunDir

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "pipelines" / "demo.yaml"
CHANCE = 1 / 12  # ordered pairs of the digits 0-3
TRAINING = ("pretrain_supervised", "pretrain_dino", "pretrain_clip", "finetune", "finetune_segmentation")


@pytest.mark.slow
def test_demo_pipeline_learns_records_every_evaluation_and_runs_once(tmp_path):
    run_dir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "pipeline.core.cli", "run", str(DEMO), "--run-dir", str(run_dir)]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    states = RunDir(run_dir)
    stages = yaml.safe_load(DEMO.read_text())["stages"]
    assert sorted(states.stage_names()) == sorted(stages)
    assert all(states.read(name).status == "done" for name in stages)
    outputs = {name: states.read(name).outputs for name in stages}

    for name in TRAINING:
        assert outputs[name]["last_loss"] < outputs[name]["first_loss"] - 0.05, name
        events = EventAccumulator(str(run_dir / name / "tensorboard"))
        events.Reload()
        losses = [event.value for event in events.Scalars("train/loss")]
        assert len(losses) >= 4 and losses[-1] < losses[0], name
    assert outputs["pretrain_supervised"]["val_top1"] > 4 * CHANCE
    assert outputs["evaluate_supervised"]["top1"] == pytest.approx(outputs["pretrain_supervised"]["val_top1"],
                                                                   abs=1e-4)  # the export evaluates alike
    assert outputs["evaluate_finetune"]["top1"] > 3 * CHANCE
    assert outputs["evaluate_dino"]["knn_top1"] > 1.5 * CHANCE
    assert outputs["evaluate_dino"]["linear_top1"] > 2 * CHANCE
    assert outputs["evaluate_clip"]["zeroshot_top1"] > 3 * CHANCE

    segmentation = next(record["metrics"] for record in ResultsLog(RunDir(run_dir).results_file).records()
                        if record["protocol"] == "segmentation")
    background = segmentation["class0_everywhere"]["miou"]  # the trivial predictor: all background
    assert 0.1 < background < 0.25
    assert outputs["evaluate_segmentation"]["miou"] > 2.5 * background
    assert min(segmentation["slide"]["per_class_iou"][digit] for digit in ("zero", "one", "two", "three")) > 0.2
    assert (run_dir / "evaluate_segmentation" / "segmentation" / "000.png").is_file()

    recorded = {(record["stage"], record["protocol"]) for record in ResultsLog(RunDir(run_dir).results_file).records()}
    assert recorded == {(name, protocol) for name, block in stages.items() if block["kind"] == "evaluate"
                        for protocol in block["protocols"]}
    for name in ("export_supervised", "export_dino", "export_clip"):
        assert (run_dir / name / "model.safetensors").is_file() and (run_dir / name / "SHA256SUMS").is_file()
    assert (run_dir / "export_clip" / "open_clip_model.safetensors").is_file()

    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert all(f"stage {name}: done, skipped" in second.stderr for name in stages)
    assert ": running" not in second.stderr
