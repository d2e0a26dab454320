"""The ``label_efficiency`` pipeline: the ``compare`` variants at several labels-per-class
counts, to show when transfer pays off."""

from .pipeline import LABELS_PER_CLASS, create_pipeline

__all__ = ["LABELS_PER_CLASS", "create_pipeline"]
