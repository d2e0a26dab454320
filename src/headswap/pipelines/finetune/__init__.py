"""The ``finetune`` pipeline."""

from .pipeline import create_pipeline, packaging, recipe

__all__ = ["create_pipeline", "packaging", "recipe"]
