"""KoPE pretraining pipeline: configs, stage runner, models, data, training, export.

Importing the package registers the model zoo (``vit_kope_*``, ``vit_ssa_*``, ``gaspnet_*``) with timm.
"""

from pipeline import models  # noqa: F401  (registration side effect)

__version__ = "0.1.0"
