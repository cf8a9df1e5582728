"""Training: one DeepSpeed engine for every mode, with exact resume.

``trainer`` runs the loop over a ``task`` (the mode: ``tasks/``) on the engine from ``engine``; ``schedules``,
``param_groups``, ``optim``, ``ema``, ``checkpoint``, ``faults``, ``rng``, ``metrics`` and ``tensorboard`` are
its parts. DeepSpeed itself is imported only where an engine is built or a ZeRO checkpoint consolidated.
"""
