"""Every kind of bad config stops before anything runs, with one line naming file and key, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.core.cli import main
from tests.runner.conftest import TOY, toy


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def assert_config_error(capsys, pipeline: Path, *expected: str, overrides: tuple[str, ...] = ()) -> str:
    code, err = run_cli(capsys, "run", str(pipeline), *overrides)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("kope:")]
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]
    assert not (pipeline.parent / "run" / "state").exists(), "nothing may run after a config error"
    return lines[0]


def test_unknown_key_suggests_closest(write_pipeline, capsys):
    path = write_pipeline({"a": {**toy(1), "sleep_ss": 1}})
    assert_config_error(capsys, path, str(path), "stages.a.sleep_ss", "unknown key", "did you mean 'sleep_s'")


def test_unknown_top_level_key(write_pipeline, capsys):
    path = write_pipeline({"a": toy(1)}, sed=3)
    assert_config_error(capsys, path, "sed", "did you mean 'seed'")


def test_wrong_type(write_pipeline, capsys):
    path = write_pipeline({"a": toy("three")})
    assert_config_error(capsys, path, "stages.a.value", "expected int", "'three'")


def test_bool_is_not_an_int(write_pipeline, capsys):
    path = write_pipeline({"a": toy(True)})
    assert_config_error(capsys, path, "stages.a.value", "expected int")


def test_missing_required_value(write_pipeline, capsys):
    path = write_pipeline({"a": {"kind": TOY}})
    assert_config_error(capsys, path, "stages.a.value", "missing required value")


@pytest.mark.parametrize("value, bound", [(-1, ">= 0"), (1001, "<= 1000")])
def test_out_of_range(write_pipeline, capsys, value, bound):
    path = write_pipeline({"a": toy(value)})
    assert_config_error(capsys, path, "stages.a.value", "out of range", bound)


def test_missing_input_path(write_pipeline, capsys, tmp_path):
    path = write_pipeline({"a": toy(1, source=str(tmp_path / "nowhere"))})
    assert_config_error(capsys, path, "stages.a.source", "path does not exist")


def test_reference_to_unknown_stage(write_pipeline, capsys):
    path = write_pipeline({"first": toy(1), "b": toy(1, source="@firts/x")})
    assert_config_error(capsys, path, "stages.b.source", "unknown stage 'firts'", "did you mean 'first'")


def test_unknown_dependency_and_cycle(write_pipeline, capsys):
    path = write_pipeline({"a": toy(1, needs=["c"])})
    assert_config_error(capsys, path, "stages.a.needs", "unknown stage 'c'")
    path = write_pipeline({"a": toy(1, needs=["b"]), "b": toy(1, source="@a")})
    assert_config_error(capsys, path, "dependency cycle", "a -> b -> a")


def test_unknown_stage_kind(write_pipeline, capsys):
    path = write_pipeline({"a": {"kind": "make_demo_dat"}})
    assert_config_error(capsys, path, "stages.a.kind", "unknown stage kind", "did you mean 'make_demo_data'")


def test_include_cycle(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("include: b.yaml\nname: t\nstages: {}\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    line = assert_config_error(capsys, tmp_path / "a.yaml", "include cycle")
    assert "a.yaml -> " in line and "b.yaml -> " in line


def test_missing_include(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text("include: nope.yaml\nname: t\nstages: {}\n")
    assert_config_error(capsys, tmp_path / "p.yaml", "p.yaml", "include", "file not found")


def test_yaml_syntax_error(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text("name: t\nstages:\n  a: [1, 2\n")
    assert_config_error(capsys, tmp_path / "p.yaml", "p.yaml", "invalid YAML", "line")


def test_error_in_included_file_names_that_file(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"value": 1, "sleep_s": "slow"}))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(
        {"name": "t", "run_dir": str(tmp_path / "run"), "stages": {"a": {"kind": TOY, "include": "recipe.yaml"}}}))
    line = assert_config_error(capsys, tmp_path / "p.yaml", "stages.a.sleep_s", "expected float")
    assert "recipe.yaml" in line and "p.yaml" not in line


def test_bad_override_is_a_config_error(write_pipeline, capsys):
    path = write_pipeline({"a": toy(1)})
    assert_config_error(capsys, path, "<command line>", "stages.a.valeu", "did you mean 'value'",
                        overrides=("a.valeu=3",))
    assert_config_error(capsys, path, "<command line>", "must look like", overrides=("a.value",))


def test_real_subprocess_exit_code(write_pipeline, subprocess_env, kope_cmd):
    import subprocess

    path = write_pipeline({"a": toy(-5)})
    proc = subprocess.run([*kope_cmd, "run", str(path)], capture_output=True, text=True, env=subprocess_env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("kope: ")
    assert "stages.a.value" in proc.stderr
