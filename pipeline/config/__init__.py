"""Pipeline configuration: YAML loading with includes and overrides, and typed validation."""

from pipeline.config.loader import load_pipeline
from pipeline.config.schema import PipelineConfig, StageSpec
from pipeline.config.types import InputPath, setting

__all__ = ["InputPath", "PipelineConfig", "StageSpec", "load_pipeline", "setting"]
