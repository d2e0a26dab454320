"""The ``lr_find`` pipeline: the learning-rate range test on the head, then on the unfrozen
model."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
