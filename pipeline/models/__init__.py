"""Models. Importing this package registers the KoPE and SSA ViTs with timm (``timm.create_model``).

Only torch and timm are imported here, so exported checkpoints load without the training stack.
"""

from pipeline.models import clip, gaspnet, ssa  # noqa: F401  (register vit_kope_*_clip_*, gaspnet_*, vit_ssa_*)
from pipeline.models.heads import DINOHead
from pipeline.models.kope_vit import KopeVisionTransformer

__all__ = ["KopeVisionTransformer", "DINOHead"]
