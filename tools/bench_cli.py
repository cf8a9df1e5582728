"""Wall time of the ``kope`` commands that must stay light (``--help``, ``config``, ``status``, ``cancel``), against
``python -c pass`` in the same run, as one JSON object.

    python tools/bench_cli.py [--repeats 7] [--pipeline configs/pipelines/demo.yaml]

``status`` and ``cancel`` run on a run directory made here: the demo pipeline's stages recorded as done (no stage
runs). Each command runs in a fresh interpreter, as a user's shell starts it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.config.loader import load_pipeline  # noqa: E402
from pipeline.core.run_dir import RunDir  # noqa: E402
from pipeline.core.run_state import StageState  # noqa: E402


def fake_run(pipeline: Path, root: Path) -> Path:
    """A run directory of ``pipeline`` whose stages are recorded as done."""
    config = load_pipeline(pipeline, [f"run_dir={root}"])
    run = RunDir(root)
    run.write_resolved_config(config.resolved())
    for name, spec in config.stages.items():
        run.write(StageState(name, spec.kind.name, "done", identity=spec.identity(config.settings.seed),
                             outputs={"top1": 0.5}, duration_s=1.0))
    return root


def wall_times(cmd: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--pipeline", type=Path, default=REPO / "configs" / "pipelines" / "demo.yaml")
    args = parser.parse_args()
    kope = [sys.executable, "-m", "pipeline.core.cli"]
    with tempfile.TemporaryDirectory(prefix="kope-bench-cli-") as tmp:
        run_dir = str(fake_run(args.pipeline, Path(tmp) / "run"))
        commands = {"python -c pass": [sys.executable, "-c", "pass"], "kope --help": [*kope, "--help"],
                    "kope config": [*kope, "config", str(args.pipeline)], "kope status": [*kope, "status", run_dir],
                    "kope cancel": [*kope, "cancel", run_dir]}
        results = {name: wall_times(cmd, args.repeats) for name, cmd in commands.items()}
    baseline = statistics.median(results["python -c pass"])
    print(json.dumps({
        "repeats": args.repeats, "python": sys.version.split()[0],
        "median_s": {name: round(statistics.median(times), 4) for name, times in results.items()},
        "min_s": {name: round(min(times), 4) for name, times in results.items()},
        "vs_python_pass": {name: round(statistics.median(times) / baseline, 2) for name, times in results.items()
                           if name != "python -c pass"},
    }))


if __name__ == "__main__":
    main()
