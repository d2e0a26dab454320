"""The ``finetune`` pipeline."""

from .pipeline import create_pipeline, inputs_from_parameters, packaging, recipe

__all__ = ["create_pipeline", "inputs_from_parameters", "packaging", "recipe"]
