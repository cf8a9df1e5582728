"""One module per stage kind; each defines ``Settings`` and ``run(settings, ctx)`` (see pipeline.core.stage)."""
