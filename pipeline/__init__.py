"""KoPE pretraining pipeline: configs, stage runner, models, data, training, export.

Importing the package imports nothing heavy: ``pipeline.core`` (config, run directory, runner, CLI) runs
without torch. ``import pipeline.models`` registers the model zoo (``vit_kope_*``, ``vit_ssa_*``,
``gaspnet_*``) with timm.
"""

__version__ = "0.1.0"
