"""Export: DeepSpeed checkpoints to the formats downstream teams load with their own tools.

``consolidate`` turns the latest (or a chosen) checkpoint, ZeRO shards included, into one fp32 state dict;
``weights`` picks the backbone (EMA or teacher weights where they exist); ``timm_format`` and
``open_clip_format`` write folders that ``timm.create_model("local-dir:PATH")`` and
``open_clip.create_model_and_transforms("local-dir:PATH")`` load; ``model_card`` and ``checksums`` describe them.
"""
