"""Fine-tuning a pretrained base with a new head on an image folder."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
