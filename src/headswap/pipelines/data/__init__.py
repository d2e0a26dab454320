"""The example's data: Fashion-MNIST split into a source task and a few-label target folder."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
