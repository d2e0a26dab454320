"""Pretraining the example's base on the source task."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
