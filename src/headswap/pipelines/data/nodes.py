"""Nodes preparing the Fashion-MNIST example."""

from __future__ import annotations

import logging
from typing import Any

from headswap.project import example

logger = logging.getLogger(__name__)


def extract_source_task(params: dict[str, Any]) -> dict[str, Any]:
    """``source_per_class`` seeded training images of each source class (all of them when
    null), in memory, for pretraining the base."""
    folder = example.find_fashion_mnist(params["fashion_mnist_dirs"])
    images, labels = example.load_split(folder, "train")
    idx = example.select_classes(labels, params["source_classes"], params["source_per_class"],
                                 params["seed"])
    names = [example.CLASS_NAMES[c] for c in params["source_classes"]]
    logger.info("Source task: %s images of %s", len(idx), ", ".join(names))
    return {"images": images[idx], "labels": labels[idx], "class_names": names}
