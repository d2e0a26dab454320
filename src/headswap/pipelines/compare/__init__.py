"""The ``compare`` pipeline: the finetune recipe against its alternatives, side by side."""

from .pipeline import create_pipeline, variants

__all__ = ["create_pipeline", "variants"]
