"""Includes, overrides, float parsing and the resolved config."""

from __future__ import annotations

import yaml

from pipeline.core.cli import main
from pipeline.core.config.loader import load_pipeline
from tests.runner.conftest import TOY, toy


def test_includes_merge_at_any_level_and_own_keys_win(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"seed": 7, "log_every_s": 5}))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"value": 1, "sleep_s": 0.5, "tags": ["r"]}))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "include": "base.yaml", "name": "t", "seed": 3,
        "stages": {"a": {"kind": TOY, "include": ["recipe.yaml"], "value": 9}},
    }))
    config = load_pipeline(tmp_path / "p.yaml")
    assert config.settings.seed == 3 and config.settings.log_every_s == 5
    settings = config.stages["a"].settings
    assert (settings.value, settings.sleep_s, settings.tags) == (9, 0.5, ["r"])


def test_overrides_set_stage_and_top_level_keys(write_pipeline):
    path = write_pipeline({"a": toy(1), "b": toy(2, source="@a")})
    config = load_pipeline(path, ["a.value=5", "seed=11", "b.tags=[x, y]", "stages.b.sleep_s=1e-3"])
    assert config.stages["a"].settings.value == 5
    assert config.settings.seed == 11
    assert config.stages["b"].settings.tags == ["x", "y"]
    assert config.stages["b"].settings.sleep_s == 0.001


def test_stage_reference_adds_dependency(write_pipeline):
    path = write_pipeline({"a": toy(1), "b": toy(2, source="@a/sub"), "c": toy(3, needs="b")})
    config = load_pipeline(path)
    assert config.stages["b"].needs == ["a"]
    assert config.stages["c"].needs == ["b"]


def test_kope_config_prints_resolved_yaml(write_pipeline, capsys):
    path = write_pipeline({"a": toy(1)})
    assert main(["config", str(path), "a.value=4"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["stages"]["a"]["value"] == 4
    assert resolved["stages"]["a"]["sleep_s"] == 0.0  # defaults are filled in
    assert resolved["seed"] == 0


def test_resolved_config_written_to_run_dir_and_reloads(write_pipeline, tmp_path):
    path = write_pipeline({"a": toy(1), "b": toy(2, source="@a")})
    assert main(["run", str(path), "b.value=8"]) == 0
    written = tmp_path / "run" / "config.yaml"
    again = load_pipeline(written)
    assert again.stages["b"].settings.value == 8
    assert again.resolved() == load_pipeline(path, ["b.value=8"]).resolved()
