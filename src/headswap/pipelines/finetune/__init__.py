"""The ``finetune`` pipeline, and its parts other pipelines are made of."""

from .pipeline import create_pipeline, new_head, packaging, preparation, training

__all__ = ["create_pipeline", "new_head", "packaging", "preparation", "training"]
