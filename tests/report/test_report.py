"""The report stage on hand-made runs: its numbers (mean, sample std, best per column, steps to the reference's
accuracy) against values worked out by hand, its PNGs, re-rendering only when its inputs change, resuming a
half-finished matrix, and ``kope status`` printing its table without heavy imports."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import yaml

from pipeline.core.cli import main
from pipeline.core.run_dir import RunDir
from pipeline.report.collect import Curve, RunData
from pipeline.report.events import read_scalars
from pipeline.report.render import csv_text, plain_text
from pipeline.report.table import format_stat, summarise

REPO = Path(__file__).resolve().parents[2]
PLOTS = {"loss_vs_steps.png", "loss_vs_samples.png", "val_top1_vs_steps.png", "val_top1_vs_samples.png",
         "gini_per_block.png", "synchrony_per_block.png"}


def write(tmp_path: Path, **report) -> Path:
    """Two variants x three seeds of fake training and evaluation, then a report of every evaluation.

    kope: final top-1 0.8 + 0.1 * seed, Gini blocks (0.6, 0.7) + 0.01 * seed, synchrony (0.9, 0.8 - 0.1 * seed);
    vit: final top-1 0.6 + 0.1 * seed, Gini (0.4, 0.5) + 0.01 * seed, no synchrony. Curves rise linearly from 0 to
    the final value over 10 steps, logged every 2; the train loss ends at 1.0 for every run."""
    stages = {
        "train": {"kind": "tests.report.fake_train", "spread": 0.1,
                  "matrix": {"model": {"kope": {"base": 0.8, "gini": 0.6},
                                       "vit": {"base": 0.6, "gini": 0.4, "synchrony": False}},
                             "seed": [0, 1, 2]}},
        "evaluate": {"kind": "tests.report.fake_evaluate", "model": "@train"},
        "report": {"kind": "report", "runs": ["@evaluate[*]"], "reference": "vit",
                   "metrics": ["top1", "steps_to_reference", "final_loss", "gini", "gini_last", "synchrony",
                               "knn_top1"], **report},
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "run_dir": str(tmp_path / "run"), "stages": stages}))
    return path


def ran(tmp_path: Path) -> list[str]:
    path = tmp_path / "run" / "ran.txt"
    return path.read_text().split() if path.exists() else []


def csv_rows(path: Path, key: str = "variant") -> dict[str, dict[str, str]]:
    return {row[key]: row for row in csv.DictReader(io.StringIO(path.read_text()))}


def test_report_numbers_match_the_hand_made_runs(tmp_path, capsys):
    assert main(["run", str(write(tmp_path))]) == 0
    out = tmp_path / "run" / "report"
    rows = csv_rows(out / "report.csv")
    kope, vit = rows["kope"], rows["vit"]
    assert kope["runs"] == vit["runs"] == "3"
    assert float(kope["top1_mean"]) == pytest.approx(0.9) and float(kope["top1_std"]) == pytest.approx(0.1)
    assert float(vit["top1_mean"]) == pytest.approx(0.7) and float(vit["top1_std"]) == pytest.approx(0.1)
    assert float(kope["gini_mean"]) == pytest.approx(0.66) and float(kope["gini_std"]) == pytest.approx(0.01)
    assert float(vit["gini_mean"]) == pytest.approx(0.46) and float(vit["gini_last_mean"]) == pytest.approx(0.51)
    assert float(kope["synchrony_mean"]) == pytest.approx(0.8) and float(kope["synchrony_std"]) == pytest.approx(0.05)
    assert vit["synchrony_n"] == "0" and vit["synchrony_mean"] == ""
    # vit's mean final top-1 is 0.7: kope's seeds reach it at steps 10, 8, 8; vit's seed 0 never does
    assert float(kope["steps_to_reference_mean"]) == pytest.approx(26 / 3)
    assert float(kope["steps_to_reference_std"]) == pytest.approx(np.std([10, 8, 8], ddof=1))
    assert (vit["steps_to_reference_mean"], vit["steps_to_reference_n"]) == ("10.0", "2")
    # best: kope wins top-1 and both Gini columns; nothing in the tied loss column, nor where only one row competes
    assert kope["best"] == "top1;gini;gini_last" and vit["best"] == ""
    assert "knn_top1" not in kope, "a column nothing measured is left out"
    per_run = csv_rows(out / "runs.csv", key="stage")
    assert [per_run[f"evaluate-kope-seed_{seed}"]["steps_to_reference"] for seed in range(3)] == ["10.0", "8.0", "8.0"]
    assert per_run["evaluate-vit-seed_0"]["steps_to_reference"] == ""
    assert per_run["evaluate-vit-seed_2"]["training"] == "train-vit-seed_2"

    md = (out / "report.md").read_text()
    assert "| `kope` | 3 | **90.0 ± 10.0** | 9 ± 1 | 1.000 ± 0.000 | **0.660 ± 0.010** | **0.710 ± 0.010** | " \
           "0.800 ± 0.050 |" in md
    assert "| `vit` | 3 | 70.0 ± 10.0 | 10 ± 0 (2/3) | 1.000 ± 0.000 | 0.460 ± 0.010 | 0.510 ± 0.010 | – |" in md
    assert "mean final validation top-1 of `vit` (70.0 %)" in md and "Not measured by any run: knn_top1." in md
    assert all(f"]({name})" in md for name in PLOTS)

    capsys.readouterr()
    assert main(["status", str(tmp_path / "run")]) == 0
    status = capsys.readouterr().out
    assert "report report (report/report.md):" in status
    headline = status.split("report report (report/report.md):\n", 1)[1].splitlines()
    assert headline[0].split()[:2] == ["variant", "runs"]
    assert headline[1].split()[:5] == ["kope", "3", "90.0", "±", "10.0"] and "*" in headline[1]
    assert headline[2].split()[:2] == ["vit", "3"] and "*" not in headline[2]


def test_report_plots_are_real_pngs(tmp_path):
    assert main(["run", str(write(tmp_path))]) == 0
    out = tmp_path / "run" / "report"
    assert {path.name for path in out.glob("*.png")} == PLOTS
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, name
        pixels = matplotlib.image.imread(out / name)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and pixels[..., :3].std() > 0.05, name


def test_report_renders_again_only_when_its_inputs_change(tmp_path):
    path = write(tmp_path)
    assert main(["run", str(path)]) == 0
    report_md = tmp_path / "run" / "report" / "report.md"
    before = report_md.stat().st_mtime_ns
    assert main(["run", str(path)]) == 0
    assert report_md.stat().st_mtime_ns == before and RunDir(tmp_path / "run").read("report").attempt == 1
    assert main(["run", str(path), "train.matrix.seed=[0, 1, 2, 3]"]) == 0, "no --force needed for a report"
    assert sorted(ran(tmp_path)[12:]) == ["evaluate-kope-seed_3", "evaluate-vit-seed_3", "train-kope-seed_3",
                                          "train-vit-seed_3"]
    rows = csv_rows(tmp_path / "run" / "report" / "report.csv")
    assert rows["kope"]["runs"] == "4" and float(rows["kope"]["top1_mean"]) == pytest.approx(0.95)
    assert RunDir(tmp_path / "run").read("report").attempt == 2


def test_a_half_finished_matrix_resumes_only_what_is_missing(tmp_path):
    marker = tmp_path / "fixed"
    path = write(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["stages"]["train"].update(fail_seed=1, unless=str(marker))
    path.write_text(yaml.safe_dump(doc))
    assert main(["run", str(path)]) == 1
    run = RunDir(tmp_path / "run")
    assert run.read("train-kope-seed_1").status == "failed" and run.read("report").status == "pending"
    assert run.read("evaluate-vit-seed_2").status == "done"
    first = len(ran(tmp_path))
    marker.touch()
    assert main(["run", str(path)]) == 0
    assert sorted(ran(tmp_path)[first:]) == ["evaluate-kope-seed_1", "evaluate-vit-seed_1", "train-kope-seed_1",
                                             "train-vit-seed_1"]
    assert run.read("report").status == "done" and csv_rows(run.root / "report" / "report.csv")["vit"]["runs"] == "3"


def test_a_reference_that_is_no_variant_fails_the_report_naming_the_variants(tmp_path, capsys):
    assert main(["run", str(write(tmp_path, reference="vitt"))]) == 1
    assert "report: reference 'vitt' is not a variant (variants: kope, vit)" in capsys.readouterr().err


def test_report_settings_are_checked_when_the_config_loads(tmp_path, capsys):
    path = write(tmp_path, runs=[])
    assert main(["config", str(path)]) == 2
    assert f"{path}: stages.report.runs: name at least one stage" in capsys.readouterr().err


def test_status_with_a_report_imports_neither_torch_nor_matplotlib(tmp_path):
    assert main(["run", str(write(tmp_path))]) == 0
    code = ("import sys; from pipeline.core.cli import main; main(['status', sys.argv[1]]); "
            "heavy = [m for m in ('torch', 'matplotlib', 'tensorboard', 'numpy') if m in sys.modules]; "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "report report (report/report.md):" in proc.stdout


def run_data(stage: str, variant: str, top1: float | None, curve: list[float] | None = None, **metrics) -> RunData:
    data = RunData(stage, variant, None, metrics={**({"top1": top1} if top1 is not None else {}), **metrics})
    if curve is not None:
        data.curves["val_top1"] = Curve([10 * (i + 1) for i in range(len(curve))], curve)
    return data


def test_summary_of_hand_made_runs():
    runs = [run_data("a0", "a", 0.5, [0.2, 0.5], entropy=1.0), run_data("a1", "a", 0.7, [0.3, 0.7], entropy=1.2),
            run_data("b0", "b", 0.8, [0.6, 0.8], entropy=0.9), run_data("b1", "b", None, [0.6, 0.6], entropy=0.7),
            run_data("c0", "c", 0.4, [0.1, 0.4])]
    table = summarise(runs, ["top1", "entropy", "steps_to_reference", "synchrony"])
    stats = {row.variant: row.stats for row in table.rows}
    assert stats["a"]["top1"].mean == pytest.approx(0.6) and stats["a"]["top1"].std == pytest.approx(0.1414213562)
    assert (stats["b"]["top1"].n, stats["b"]["top1"].of, stats["b"]["top1"].std) == (1, 2, None)
    assert table.target == pytest.approx(0.6), "the first row is the default reference"
    assert (stats["a"]["steps_to_reference"].mean, stats["a"]["steps_to_reference"].n) == (20.0, 1), "a0 never does"
    assert stats["b"]["steps_to_reference"].mean == 10.0 and "steps_to_reference" not in stats["c"]
    # top-1: b has a run without a value and cannot win; a beats c. entropy: lower is better, b (0.8) wins.
    assert table.best["top1"] == {"a"} and table.best["entropy"] == {"b"}
    assert table.best["steps_to_reference"] == set(), "only b has a value for every run: no contest"
    assert table.metrics == ["top1", "entropy", "steps_to_reference"] and table.omitted == ["synchrony"]
    assert format_stat("top1", stats["b"]["top1"]) == "80.0 (1/2)"
    assert format_stat("entropy", stats["a"]["entropy"]) == "1.100 ± 0.141"
    text = plain_text(table)
    assert text.splitlines()[1].split()[:5] == ["a", "2", "60.0", "±", "14.1"] and "reference a at 60.0 %" in text
    assert csv_text(table).splitlines()[2].startswith("b,2,0.8,,1,0.8,")


def test_tensorboard_points_a_resumed_run_purged_are_not_read(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    first = SummaryWriter(str(tmp_path))
    for step in range(1, 11):
        first.add_scalar("train/loss", float(step), step)
    first.close()
    resumed = SummaryWriter(str(tmp_path), purge_step=6)
    for step in range(6, 9):
        resumed.add_scalar("train/loss", 100.0 + step, step)
    resumed.close()
    steps, values = read_scalars(tmp_path, ["train/loss", "model/val_top1"])["train/loss"]
    assert steps == list(range(1, 9)) and values == [1, 2, 3, 4, 5, 106, 107, 108]
    assert read_scalars(tmp_path / "missing", ["train/loss"]) == {}


def test_records_of_other_stages_and_sets_are_not_mixed_in(tmp_path):
    assert main(["run", str(write(tmp_path))]) == 0
    results = tmp_path / "run" / "results.jsonl"
    with results.open("a") as handle:
        handle.write(json.dumps({"stage": "elsewhere", "protocol": "top1", "dataset": "val",
                                 "metrics": {"top1": 0.0}}) + "\n")
        handle.write(json.dumps({"stage": "evaluate-kope-seed_0", "protocol": "top1", "dataset": "v2",
                                 "metrics": {"top1": 0.0}}) + "\n")
    assert main(["run", str(write(tmp_path)), "--force", "report"]) == 0
    assert float(csv_rows(tmp_path / "run" / "report" / "report.csv")["kope"]["top1_mean"]) == pytest.approx(0.9)
