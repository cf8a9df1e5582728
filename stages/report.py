"""Stage ``report``: tables and plots that put finished stages side by side (see :mod:`pipeline.report`).

``runs`` names the stages, usually every variant of a matrix (``['@evaluate[*]']``). Which variant each is comes
from the config snapshot this launch runs (the ``variant:`` blocks the matrix expansion writes). Writes
``report.md``, ``report.csv``, ``runs.csv``, ``headline.txt`` (the table ``kope status`` prints) and PNG plots into
the stage folder. The kind re-runs by itself when its inputs change (a new variant, a re-run evaluation).
"""

from __future__ import annotations

from typing import Any

from pipeline.core.config.loader import load_pipeline
from pipeline.core.config.types import split_stage_ref
from pipeline.core.stage import StageContext
from pipeline.report.build import build_report
from pipeline.report.settings import ReportSettings


def run(settings: ReportSettings, ctx: StageContext) -> dict[str, Any]:
    if not ctx.is_main:
        return {}
    state = ctx.run.read(ctx.name)
    snapshot = ctx.run.root / state.config if state is not None and state.config else ctx.run.config_file
    config = load_pipeline(snapshot)
    stages = list(dict.fromkeys(split_stage_ref(ref)[0] for ref in settings.runs))
    outputs = build_report(ctx.run, config, stages, settings, ctx.out_dir, settings.title or ctx.name)
    ctx.log.info("report of %d runs (%d variants) in %s", outputs["runs"], outputs["variants"], outputs["report"])
    return outputs
