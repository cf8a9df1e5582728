"""The core runs without the heavy stack: `kope --help`, `status`, `config` and `cancel` import none of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.cli import main
from tests.runner.conftest import REPO, toy

HEAVY = ("torch", "timm", "deepspeed", "open_clip", "pyarrow", "tensorboard", "torchvision", "webdataset")
PROBE = """
import json, sys
from pipeline.core.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads({heavy!r})))
print("HEAVY=" + json.dumps(heavy))
sys.exit(code)
"""


def imported_heavy(*args: str) -> tuple[int, list[str], str]:
    code = PROBE.replace("{heavy!r}", repr(json.dumps(HEAVY)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)
    line = next(line for line in done.stdout.splitlines() if line.startswith("HEAVY="))
    return done.returncode, json.loads(line.removeprefix("HEAVY=")), done.stderr


@pytest.fixture
def finished_run(write_pipeline, tmp_path) -> Path:
    assert main(["run", str(write_pipeline({"a": toy(1), "b": toy(2, source="@a")}))]) == 0
    return tmp_path / "run"


def test_help_config_status_and_cancel_import_nothing_heavy(finished_run):
    demo = str(REPO / "configs" / "pipelines" / "demo.yaml")
    for args in (["--help"], ["config", demo], ["status", str(finished_run)], ["cancel", str(finished_run)]):
        code, heavy, err = imported_heavy(*args)
        assert code == 0, err
        assert heavy == [], f"kope {' '.join(args[:1])} imported {heavy}"


def test_every_builtin_kind_validates_without_torch():
    """The settings of every built-in kind live in torch-free modules (the stage modules are never imported)."""
    code = ("import sys; from pipeline.core.kinds import BUILTIN_KINDS\n"
            "[kind.settings_class() for kind in BUILTIN_KINDS.values()]\n"
            "bad = sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'timm', 'open_clip', 'pyarrow', 'PIL'})\n"
            "assert not bad and not any(n.startswith('stages.') for n in sys.modules), bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr


def test_cli_benchmark_prints_each_command_against_python():
    done = subprocess.run([sys.executable, str(REPO / "tools" / "bench_cli.py"), "--repeats", "1"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["vs_python_pass"]) == {"kope --help", "kope config", "kope status", "kope cancel"}
    assert all(value > 0 for value in report["median_s"].values())
