"""Stage matrices: names, dependencies rewired to the matching variant, gathers, one state per variant, a changed
matrix value marking only its variants, errors naming the matrix key, and status grouping."""

from __future__ import annotations

import pytest
import yaml

from pipeline.core.cli import main
from pipeline.core.config.loader import load_pipeline
from pipeline.core.planner import Selection, plan_run
from pipeline.core.run_dir import RunDir
from tests.runner.conftest import TOY, toy


def order(tmp_path) -> list[str]:
    path = tmp_path / "run" / "order.txt"
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def grid(write_pipeline):
    """a -> b (a 2 x 2 matrix) -> c; d gathers every c; e follows c and adds a matrix of its own."""
    return write_pipeline({
        "a": toy(1),
        "b": toy(2, source="@a", matrix={"value": [2, 3], "sleep_s": [0, 0.01]}),
        "c": toy(5, source="@b"),
        "d": toy(6, tags=["@c[*]", "plain"], needs=["c[*]"]),
        "e": toy(7, source="@c", matrix={"window": {"narrow": [0.1, 0.2], "wide": [0.0, 1.0]}}),
    })


B_VARIANTS = ["b-value_2-sleep_s_0", "b-value_2-sleep_s_0p01", "b-value_3-sleep_s_0", "b-value_3-sleep_s_0p01"]


def test_names_follow_the_matrix_and_references_go_to_the_matching_variant(grid):
    config = load_pipeline(grid)
    c_variants = [name.replace("b-", "c-", 1) for name in B_VARIANTS]
    e_variants = [f"{name.replace('b-', 'e-', 1)}-{window}" for name in B_VARIANTS for window in ("narrow", "wide")]
    assert list(config.stages) == ["a", *B_VARIANTS, *c_variants, "d", *e_variants]
    b = config.stages["b-value_3-sleep_s_0p01"]
    assert (b.settings.value, b.settings.sleep_s, b.settings.source, b.needs) == (3, 0.01, "@a", ["a"])
    c = config.stages["c-value_3-sleep_s_0p01"]
    assert (c.settings.value, c.settings.source, c.needs) == (5, "@b-value_3-sleep_s_0p01", ["b-value_3-sleep_s_0p01"])
    assert c.variant.of == "c" and c.variant.axes == {"value": "value_3", "sleep_s": "sleep_s_0p01"}
    d = config.stages["d"]
    assert d.variant is None and d.needs == c_variants
    assert d.settings.tags == [f"@{name}" for name in c_variants] + ["plain"]
    e = config.stages["e-value_2-sleep_s_0-wide"]
    assert (e.settings.window, e.settings.source) == ((0.0, 1.0), "@c-value_2-sleep_s_0")
    assert e.variant.axes == {"value": "value_2", "sleep_s": "sleep_s_0", "window": "wide"}


def test_expansion_is_a_function_of_the_file_and_survives_the_snapshot(grid, tmp_path):
    first, second = load_pipeline(grid), load_pipeline(grid)
    assert first.resolved() == second.resolved()
    snapshot = tmp_path / "snapshot.yaml"
    snapshot.write_text(yaml.safe_dump(first.resolved(), sort_keys=False))
    reloaded = load_pipeline(snapshot)
    assert reloaded.resolved() == first.resolved()
    assert {name: spec.identity(0) for name, spec in reloaded.stages.items()} == \
        {name: spec.identity(0) for name, spec in first.stages.items()}
    assert "matrix" not in yaml.safe_dump(first.resolved())


def test_a_gather_matches_the_holders_own_variant(write_pipeline):
    """A stage that follows b's matrix and gathers c (which follows b too) gets the c of its own variant only."""
    path = write_pipeline({
        "b": toy(2, matrix={"value": [2, 3]}),
        "c": toy(3, source="@b", matrix={"sleep_s": [0, 1]}),
        "g": toy(4, source="@b", tags=["@c[*]/sub"]),
    })
    config = load_pipeline(path)
    assert config.stages["g-value_3"].settings.tags == ["@c-value_3-sleep_s_0/sub", "@c-value_3-sleep_s_1/sub"]


def test_every_variant_has_its_own_state_and_folder_and_status_groups_them(grid, tmp_path, capsys):
    assert main(["run", str(grid)]) == 0
    run = RunDir(tmp_path / "run")
    for name in B_VARIANTS:
        state = run.read(name)
        assert state.status == "done" and state.outputs["value"] == int(name.split("_")[1][0])
        assert (run.stage_dir(name) / "result.json").is_file()
    assert run.read("c-value_3-sleep_s_0").outputs == {"value": 5, "upstream": 3}, "c read its own b"
    capsys.readouterr()
    assert main(["status", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    b_row = names.index("b")
    assert lines[b_row].split()[1:4] == ["matrix", "of", "4"] and "4 done" in lines[b_row]
    assert names[b_row + 1: b_row + 5] == B_VARIANTS
    assert all(lines[b_row + i].startswith("  b-") for i in range(1, 5))
    assert names.count("e") == 1 and "8 done" in lines[names.index("e")]


def test_a_changed_list_value_runs_only_the_new_variants(grid, tmp_path, capsys):
    """Variants of a new value are new stages; of the finished ones only d, which gathers them all, changed (a
    report kind would simply render again: see tests/report)."""
    assert main(["run", str(grid)]) == 0
    ran_before = len(order(tmp_path))
    capsys.readouterr()
    assert main(["run", str(grid), "b.matrix.value=[2, 4]"]) == 3
    stale = [line for line in capsys.readouterr().err.splitlines() if "is done but changed" in line]
    assert len(stale) == 1 and stale[0].startswith("kope: stage 'd' is done but changed since: tags:"), stale
    assert main(["run", str(grid), "b.matrix.value=[2, 4]", "--force", "d"]) == 0
    new = sorted(order(tmp_path)[ran_before:])
    expected = [f"{stage}-value_4-sleep_s_{sleep}" for stage in "bc" for sleep in ("0", "0p01")]
    expected += [f"e-value_4-sleep_s_{sleep}-{window}" for sleep in ("0", "0p01") for window in ("narrow", "wide")]
    assert new == sorted(expected + ["d"])
    assert RunDir(tmp_path / "run").read("b-value_2-sleep_s_0").attempt == 1


def test_a_changed_labelled_value_marks_only_its_variants_changed(write_pipeline, tmp_path, capsys):
    path = write_pipeline({"b": toy(2, matrix={"window": {"narrow": [0.1, 0.2], "wide": [0.0, 1.0]},
                                               "value": [1, 2]}),
                           "c": toy(3, source="@b")})
    assert main(["run", str(path)]) == 0
    capsys.readouterr()
    assert main(["run", str(path), "b.matrix.window.wide=[0.0, 0.9]"]) == 3
    err = capsys.readouterr().err
    changed = sorted(line.split("'")[1] for line in err.splitlines() if "is done but changed" in line)
    assert changed == ["b-wide-value_1", "b-wide-value_2"], err
    assert "window: [0.0, 1.0] -> [0.0, 0.9]" in err
    config = load_pipeline(path, ["b.matrix.window.wide=[0.0, 0.9]"])
    plan = plan_run(config, RunDir(tmp_path / "run"), Selection(force=["b-wide-value_1", "b-wide-value_2"]))
    assert sorted(plan.to_run) == ["b-wide-value_1", "b-wide-value_2", "c-wide-value_1", "c-wide-value_2"]


def test_a_half_finished_matrix_resumes_only_what_is_missing(write_pipeline, tmp_path):
    path = write_pipeline({"b": toy(2, matrix={"value": [1, 2, 3]}), "c": toy(3, source="@b")})
    assert main(["run", str(path), "--only", "b-value_1", "--only", "b-value_3", "--only", "c-value_3"]) == 0
    assert main(["run", str(path)]) == 0
    assert order(tmp_path)[3:] == ["b-value_2", "c-value_1", "c-value_2"]


def test_status_without_a_matrix_is_unchanged(write_pipeline, tmp_path, capsys):
    path = write_pipeline({"a": toy(1), "b": toy(2, source="@a")})
    assert main(["run", str(path)]) == 0
    assert "variant" not in (tmp_path / "run" / "config.yaml").read_text()
    capsys.readouterr()
    main(["status", str(tmp_path / "run")])
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["STAGE", "a", "b"]


def error_line(capsys, path, *overrides: str) -> str:
    assert main(["config", str(path), *overrides]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kope:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("matrix, key, message", [
    ({"valu": [1, 2]}, "stages.b.matrix.valu", "unknown key (did you mean 'value'?) (variant b-valu_1)"),
    ({"value": [1, 2000]}, "stages.b.matrix.value", "out of range: must be <= 1000 (variant b-value_2000)"),
    ({"value": "1"}, "stages.b.matrix.value", "expected a list of values or a mapping of labels"),
    ({"value": []}, "stages.b.matrix.value", "no values"),
    ({"value": [1, 1]}, "stages.b.matrix.value", "same variant name part 'value_1'"),
    ({"tags": [["x"]]}, "stages.b.matrix.tags", "give lists and mappings labels"),
    ({"window": {"a b": [0, 1]}}, "stages.b.matrix.window", "label 'a b' names stages"),
    ({"kind": ["x"]}, "stages.b.matrix.kind", "'kind' cannot vary"),
    ({"value.x": [1]}, "stages.b.matrix.value.x", "cannot set a key inside 'value'"),
    ([1, 2], "stages.b.matrix", "expected a mapping"),
    ({"value": list(range(40)), "sleep_s": list(range(40))}, "stages.b.matrix", "1,600 variants"),
])
def test_a_wrong_matrix_is_one_line_naming_file_and_matrix_key(write_pipeline, capsys, matrix, key, message):
    path = write_pipeline({"b": toy(2, matrix=matrix)})
    line = error_line(capsys, path)
    assert f"{path}: {key}: " in line and message in line, line


def test_an_error_outside_the_matrix_names_the_stage_of_the_file(write_pipeline, capsys):
    path = write_pipeline({"b": {**toy(2, matrix={"value": [1, 2]}), "sleep_ss": 1}})
    line = error_line(capsys, path)
    assert f"{path}: stages.b.sleep_ss: unknown key (did you mean 'sleep_s'?) (in variant b-value_1)" in line


def test_a_matrix_in_an_included_file_is_named_by_that_file(tmp_path, capsys):
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({"matrix": {"valu": [1, 2]}}))
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "stages": {"b": {"include": "grid.yaml", "kind": TOY, "value": 1}}}))
    line = error_line(capsys, path)
    assert f"{tmp_path / 'grid.yaml'}: stages.b.matrix.valu: unknown key" in line


def test_more_matrix_errors(write_pipeline, capsys):
    taken = write_pipeline({"b": toy(2, matrix={"value": [1]}), "b-value_1": toy(3)})
    assert "variant name 'b-value_1' is taken" in error_line(capsys, taken)
    twice = write_pipeline({"a": toy(1, matrix={"value": [1, 2]}), "b": toy(2, source="@a",
                                                                         matrix={"value": [3, 4]})})
    assert "stages.b.matrix.value: 'value' is varied already by the matrix of stage 'a'" in error_line(capsys, twice)
    both = write_pipeline({"a": toy(1, matrix={"value": [1, 2]}), "b": toy(2, matrix={"value": [3, 4]}),
                           "c": toy(3, source="@a", tags=["@b"])})
    assert "stages.c: follows the matrices of stages 'a' and 'b', which both vary 'value'" in error_line(capsys, both)
    outside = write_pipeline({"a": toy(1, matrix={"value": [1, 2]}), "b": toy(2, source="@a[*]")})
    assert "stages.b.source: '@a[*]' stands for every variant of 'a': it must be an item of a list" in \
        error_line(capsys, outside)
    cycle = write_pipeline({"a": toy(1, source="@b", matrix={"value": [1, 2]}), "b": toy(2, source="@a")})
    assert "dependency cycle: a -> b -> a" in error_line(capsys, cycle)
