"""The ``tune`` pipeline: an Optuna search over the recipe's settings."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
