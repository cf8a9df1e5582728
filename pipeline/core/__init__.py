"""The torch-free core: config loading and validation, the run directory and its state, the stage-kind
registry, planning, the runner, the stage-process entry point and the ``kope`` CLI.

Nothing here imports torch or a stage implementation: stage kinds and executors are named by strings and
imported only where they run (see ``kinds`` and ``launch``).
"""
