"""Reports: finished stages side by side. A table of variant x metric (mean ± std over seeds, the best per column
marked) as Markdown, CSV and plain text, and PNG plots of training curves and per-block KoPE attention metrics.

The inputs are files the other stages leave in the run directory: ``results.jsonl`` (evaluations), each
training stage's outputs and TensorBoard events, and the run's config snapshot (which variant of a matrix each
stage is). So this package imports only the core; :mod:`pipeline.report.collect` reads, :mod:`.table`
aggregates, :mod:`.render` and :mod:`.plots` write.
"""
