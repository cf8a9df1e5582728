from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TOY = "tests.runner.toy_stage"


def toy(value: int, **extra) -> dict:
    return {"kind": TOY, "value": value, **extra}


@pytest.fixture
def write_pipeline(tmp_path: Path):
    """Write a pipeline YAML into tmp_path and return its path."""

    def write(stages: dict, name: str = "p.yaml", **top) -> Path:
        doc = {"name": "t", "run_dir": str(tmp_path / "run"), **top, "stages": stages}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    return write


@pytest.fixture
def subprocess_env() -> dict:
    """Environment for ``kope`` subprocesses that can import the toy stage."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture
def kope_cmd() -> list[str]:
    return [sys.executable, "-m", "pipeline.core.cli"]


def stage_processes(run_dir: Path) -> list[int]:
    """PIDs of live stage processes of this run directory (any launcher), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"pipeline.core.stage_main" in cmdline and str(run_dir).encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found
