"""Nodes preparing the Fashion-MNIST example."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from headswap import example

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


def write_target_folder(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Write the target task as an image folder: ``train/`` (few labels) and ``test/``.

    ``train/`` holds ``labels_per_class`` seeded training images of each target class (the
    finetune pipeline carves its validation images out of them); ``test/`` holds all the
    official test images of those classes. Files already there are kept. Returns the folder's
    path and a summary of it (path, source, images per class in each split).
    """
    folder = example.find_fashion_mnist(params["fashion_mnist_dirs"])
    out = Path(params["target_path"])
    summary: dict[str, Any] = {"path": str(out), "source": str(folder)}
    for split, per_class in (("train", params["labels_per_class"]), ("test", None)):
        images, labels = example.load_split(folder, split)
        idx = example.select_classes(labels, params["target_classes"], per_class, params["seed"])
        summary[split] = example.write_image_folder(out, images, labels, idx, split)
        logger.info("Target %s: %s images in %s", split,
                    int(np.sum(list(summary[split].values()))), out / split)
    return str(out), summary
