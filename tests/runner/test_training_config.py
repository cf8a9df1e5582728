"""Training settings as the core sees them: one mode block, rules checked when the config is loaded (exit 2 naming
file and key, before anything runs), and an identity that decides done / changed / resumable."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.core.cli import main
from pipeline.core.config.loader import load_pipeline
from pipeline.core.planner import Selection, plan_run
from pipeline.core.run_dir import RunDir
from pipeline.core.run_state import StageState
from pipeline.core.stage_main import input_fingerprints


@pytest.fixture
def pipeline_with(tmp_path: Path):
    """A pipeline file with one pretrain stage (training data: an existing folder) and a finetune stage."""
    (tmp_path / "data").mkdir()

    def write(pretrain: dict | None = None, **stages: dict) -> Path:
        block = {"kind": "pretrain", "data": str(tmp_path / "data"), "steps": 10, "global_batch_size": 8,
                 "loader": {"batch_size": 4}, **(pretrain or {})}
        doc = {"name": "t", "run_dir": str(tmp_path / "run"), "stages": {"pretrain": block, **stages}}
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    return write


def config_error(capsys, path: Path, *args: str) -> str:
    code = main(["config", str(path), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kope: {path}: stages."), err
    return lines[0]


@pytest.mark.parametrize(("overrides", "key", "message"), [
    ({"epochs": 2}, "stages.pretrain.epochs", "set exactly one of steps, epochs, samples (got steps, epochs)"),
    ({"steps": 0}, "stages.pretrain.steps", "set exactly one of steps, epochs, samples (got none)"),
    ({"global_batch_size": 10}, "stages.pretrain.global_batch_size", "10 is not a multiple of loader.batch_size 4"),
    ({"steps": 0, "samples": 4}, "stages.pretrain.samples", "4 is less than one optimizer step of 8 samples"),
    ({"optim": {"name": "lamb"}, "zero_stage": 1}, "stages.pretrain.optim.name", "lamb needs zero_stage 0"),
    ({"zero_stage": 3}, "stages.pretrain.supervised.ema_decay", "an EMA of the weights needs zero_stage 0, 1 or 2"),
    ({"mode": "dino", "zero_stage": 3}, "stages.pretrain.zero_stage", "mode dino supports ZeRO stages 0, 1 and 2"),
    ({"schedule": {"warmup_steps": 10}}, "stages.pretrain.schedule.warmup_steps",
     "a warm-up of 10 steps is not shorter than the run (10 steps)"),
    ({"steps": 0, "epochs": 2, "schedule": {"warmup_epochs": 3}}, "stages.pretrain.schedule.warmup_epochs",
     "a warm-up of 3.0 epochs is not shorter than the run (2.0 epochs)"),
    ({"global_batch_size": 6, "loader": {"batch_size": 3}}, "stages.pretrain.loader.batch_size",
     "Mixup/CutMix pairs images within a batch: 3 must be even"),
    ({"mode": "dino", "dino": {"aug": {"global_size": 100}}}, "stages.pretrain.dino.aug.global_size",
     "100 is not a multiple of dino.aug.patch_size 16"),
    ({"mode": "dinno"}, "stages.pretrain.mode", "must be one of 'supervised', 'dino', 'clip', got 'dinno'"),
])
def test_cross_field_rules_fail_at_config_time(pipeline_with, capsys, overrides, key, message):
    line = config_error(capsys, pipeline_with(overrides))
    assert f"{key}: {message}" in line, line


def test_a_rule_of_a_finetune_stage_and_of_another_modes_block(pipeline_with, capsys, tmp_path):
    finetune = {"kind": "finetune", "init": str(tmp_path / "data"), "data": str(tmp_path / "data"), "steps": 4,
                "global_batch_size": 8, "loader": {"batch_size": 4}, "zero_stage": 2, "supervised": {}}
    path = pipeline_with(finetune={**finetune, "epochs": 1})
    assert "stages.finetune.epochs: set exactly one" in config_error(capsys, path)
    path = pipeline_with({"dino": {"momentum_strat": 0.5}})  # a typo in the inactive block is still caught
    assert "stages.pretrain.dino.momentum_strat: unknown key (did you mean 'momentum_start'?)" in config_error(
        capsys, path)


def test_the_world_size_rule_stops_kope_run_before_any_stage(pipeline_with, capsys, tmp_path):
    path = pipeline_with({"global_batch_size": 4, "launch": {"executor": "local", "nproc": 2}})
    assert main(["config", str(path)]) == 0, "valid on its own"
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"kope: {path}: stages.pretrain.global_batch_size: 4 is not a multiple of loader.batch_size "
                       "4 x 2 ranks = 8: change one of them (with 2 ranks)")
    assert not (tmp_path / "run" / "state").exists()


def test_only_the_active_mode_block_is_part_of_the_settings(pipeline_with):
    config = load_pipeline(pipeline_with({"dino": {"momentum_start": 0.5}}))
    spec = config.stages["pretrain"]
    assert spec.settings.mode == "supervised" and not hasattr(spec.settings, "dino")
    assert "dino" not in spec.settings_dict() and "supervised" in spec.settings_dict()
    assert "dino" not in spec.identity(0)["settings"]


def finished(config_path: Path, *overrides: str) -> RunDir:
    """Record the pretrain stage as done with the config's identity, as a finished run would."""
    config = load_pipeline(config_path, list(overrides))
    run = RunDir(config.run_dir)
    spec = config.stages["pretrain"]
    run.write(StageState("pretrain", "pretrain", "done", identity=spec.identity(config.settings.seed),
                         inputs=input_fingerprints(config, spec, run)))
    return run


def test_another_modes_block_or_logging_changes_leave_a_finished_stage_done(pipeline_with):
    path = pipeline_with()
    run = finished(path)
    for override in ("pretrain.dino.momentum_start=0.5", "pretrain.clip.max_logit_scale=50",
                     "pretrain.log_every_steps=7", "pretrain.checkpoint.every_steps=3",
                     "pretrain.loader.num_workers=1"):
        plan = plan_run(load_pipeline(path, [override]), run, Selection())
        assert plan.skipped == ["pretrain"], override
    with pytest.raises(Exception, match=r"optim.lr: 0.001 -> 0.002"):
        plan_run(load_pipeline(path, ["pretrain.optim.lr=0.002"]), run, Selection())


def test_identity_paths_stay_as_written(pipeline_with, tmp_path):
    finetune = {"kind": "finetune", "init": "@pretrain", "data": str(tmp_path / "data"), "steps": 4,
                "global_batch_size": 8, "loader": {"batch_size": 4}, "supervised": {"ema_decay": 0.0}}
    config = load_pipeline(pipeline_with(finetune=finetune))
    identity = config.stages["finetune"].identity(config.settings.seed)
    assert identity["settings"]["init"] == "@pretrain"
    assert str(tmp_path / "run") not in str(identity), "no path of the run directory in the identity"
