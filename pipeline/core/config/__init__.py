"""Pipeline configuration: YAML loading with includes and overrides (``loader``), the pipeline's shape
(``schema``), typed validation of settings dataclasses (``validate``, ``types``) and naming what changed
(``diff``)."""
