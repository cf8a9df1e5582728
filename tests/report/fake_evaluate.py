"""A stand-in for the evaluate stage in report tests: it appends the records the real one appends to
``results.jsonl`` (protocols ``top1`` and ``analysis``, with the stage's name), with the numbers of the fake
training stage's ``model.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass

from pipeline.core.config.types import InputPath, setting
from pipeline.core.results import ResultsLog
from pipeline.core.stage import StageContext


@dataclass
class Settings:
    model: InputPath = setting(help="the fake training stage, e.g. '@train'")


def run(settings: Settings, ctx: StageContext) -> dict:
    with open(ctx.run_dir / "ran.txt", "a", encoding="utf-8") as handle:
        handle.write(ctx.name + "\n")
    model = json.loads((ctx.input_path(settings.model) / "model.json").read_text())
    results = ResultsLog(ctx.run.results_file)
    results.append({"stage": ctx.name, "id": f"{ctx.name}-top1", "protocol": "top1", "dataset": "val",
                    "metrics": {"top1": model["top1"], "top5": 1.0}})
    analysis = {name: {"mean": sum(values) / len(values), "per_block": values}
                for name, values in model.items() if name in ("gini", "synchrony")}
    results.append({"stage": ctx.name, "id": f"{ctx.name}-analysis", "protocol": "analysis", "dataset": "val",
                    "metrics": analysis})
    return {"top1": model["top1"]}
