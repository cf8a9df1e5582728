"""The evaluate stage: headline outputs, records in results.jsonl, analysis files, and resuming by skipping what
is already recorded for the same weights, settings and data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.core.results import ResultsLog
from pipeline.evaluation.exported import load_export
from pipeline.evaluation.zeroshot import zero_shot_weights
from tests.train.helpers import REPO, train_env

pytestmark = pytest.mark.slow
PNG = b"\x89PNG\r\n\x1a\n"


def outputs(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / "state" / f"{stage}.json").read_text())["outputs"]


def test_headline_outputs_records_and_analysis_files(downstream_run):
    headline = outputs(downstream_run, "evaluate_finetuned")
    for key in ("top1", "knn_top1", "linear_top1", "synchrony"):
        assert 0.0 <= headline[key] <= 1.0, key
    sha = outputs(downstream_run, "finetune")["export_sha256"]
    records = [r for r in ResultsLog(downstream_run / "results.jsonl").records() if r["stage"] == "evaluate_finetuned"]
    assert sorted(r["protocol"] for r in records) == ["analysis", "knn", "linear", "top1"]
    assert {r["checkpoint_sha256"] for r in records} == {sha}
    knn = next(r for r in records if r["protocol"] == "knn")
    assert set(knn["metrics"]["table"]) == {f"k{k}_top{t}" for k in (10, 20, 100, 200) for t in (1, 5)}
    analysis = json.loads((downstream_run / "evaluate_finetuned" / "analysis.json").read_text())["metrics"]
    assert set(analysis) == {"gini", "entropy", "synchrony"}
    assert len(analysis["gini"]["per_block"]) == 2 and len(analysis["gini"]["per_block_head"][0]) == 2
    for name in ("analysis_blocks.png", "attention_maps.png"):
        assert (downstream_run / "evaluate_finetuned" / name).read_bytes().startswith(PNG)
    zeroshot = outputs(downstream_run, "evaluate_clip")
    assert 0.0 <= zeroshot["zeroshot_top1"] <= 1.0


def test_kope_status_shows_the_headline_metrics(downstream_run):
    result = subprocess.run([sys.executable, "-m", "pipeline.core.cli", "status", str(downstream_run)], cwd=REPO,
                            env=train_env(), capture_output=True, text=True, timeout=120)
    line = next(line for line in result.stdout.splitlines() if line.startswith("evaluate_finetuned"))
    assert "knn_top1=" in line and "linear_top1=" in line


def test_zero_shot_class_embeddings_average_synonyms(downstream_run):
    model = load_export(downstream_run / "export_clip")
    templates = ["a photo of {}.", "{}"]
    weights = zero_shot_weights(model.model, model.tokenizer, [["seven"], ["three", "drei"]], templates)
    with torch.no_grad():
        def embed(name: str) -> torch.Tensor:
            texts = model.tokenizer([template.format(name) for template in templates])
            mean = model.model.encode_text(texts, normalize=True).mean(dim=0)
            return mean / mean.norm()
        synonyms = embed("three") + embed("drei")
    assert torch.allclose(weights[:, 0], embed("seven"), atol=1e-5)
    assert torch.allclose(weights[:, 1], synonyms / synonyms.norm(), atol=1e-5)


def flat_numbers(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flat_numbers(value, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, value in enumerate(tree) for k, v in flat_numbers(value, f"{prefix}{i}.").items()}
    return {prefix: tree}


def run_evaluate_stage(block: dict, run_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """``kope run`` of a one-stage pipeline holding ``block`` as stage ``evaluate``, with run directory ``run_dir``."""
    pipeline = tmp_path / "evaluate.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "evaluate", "run_dir": str(run_dir), "executor": "inline",
                                        "stages": {"evaluate": block}}))
    return subprocess.run([sys.executable, "-m", "pipeline.core.cli", "run", str(pipeline)], cwd=REPO, env=train_env(),
                          capture_output=True, text=True, timeout=600)


def test_rerun_skips_recorded_evaluations_and_computes_only_missing_ones(downstream_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recorded = [r for r in ResultsLog(downstream_run / "results.jsonl").records() if r["stage"] == "evaluate_finetuned"]
    kept = [r for r in recorded if r["protocol"] != "analysis"]
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    block = yaml.safe_load((downstream_run / "config.yaml").read_text())["stages"]["evaluate_finetuned"]
    block = {key: value for key, value in block.items() if key not in ("needs", "launch")}
    block["model"] = str(downstream_run / "finetune" / "export")
    result = run_evaluate_stage(block, run_dir, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("already recorded") == 3
    assert "extracting train features" not in result.stderr
    after = ResultsLog(run_dir / "results.jsonl").records()
    assert [r["id"] for r in after[:3]] == [r["id"] for r in kept]
    original = next(r for r in recorded if r["protocol"] == "analysis")
    assert len(after) == 4 and after[3]["id"] == original["id"]
    redone, expected = flat_numbers(after[3]["metrics"]), flat_numbers(original["metrics"])
    assert redone.keys() == expected.keys()
    assert all(abs(redone[key] - expected[key]) <= 1e-6 for key in expected)
    headline = outputs(run_dir, "evaluate")
    assert headline["top1"] == outputs(downstream_run, "evaluate_finetuned")["top1"]


def test_other_preprocessing_in_the_export_config_is_a_new_evaluation(downstream_run, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(downstream_run / "finetune" / "export", export)
    config = json.loads((export / "config.json").read_text())
    config["pretrained_cfg"]["crop_pct"] = 0.5
    (export / "config.json").write_text(json.dumps(config))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(downstream_run / "results.jsonl", run_dir / "results.jsonl")
    val = yaml.safe_load((downstream_run / "config.yaml").read_text())["stages"]["evaluate_finetuned"]["val"]
    block = {"kind": "evaluate", "model": str(export), "val": val, "protocols": ["top1"], "batch_size": 64,
             "num_workers": 0}
    result = run_evaluate_stage(block, run_dir, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already recorded" not in result.stderr
    assert "CenterCrop" in ResultsLog(run_dir / "results.jsonl").records()[-1]["settings"]["preprocess"]
