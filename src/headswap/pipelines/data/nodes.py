"""Nodes preparing the Fashion-MNIST example."""

from __future__ import annotations

import logging
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


def write_target_folder(params: dict[str, Any]) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The target task as an image folder: ``train/`` (few labels) and ``test/``.

    ``train/`` holds ``labels_per_class`` seeded training images of each target class (the
    finetune pipeline carves its validation images out of them); ``test/`` holds all the
    official test images of those classes. Returns the folder's files (the catalog writes
    them) and a summary of it (path, source, images per class in each split).
    """
    folder = example.find_fashion_mnist(params["fashion_mnist_dirs"])
    files: dict[str, bytes] = {}
    summary: dict[str, Any] = {"path": str(params["target_path"]), "source": str(folder)}
    for split, per_class in (("train", params["labels_per_class"]), ("test", None)):
        images, labels = example.load_split(folder, split)
        idx = example.select_classes(labels, params["target_classes"], per_class, params["seed"])
        files.update(example.image_files(images, labels, idx, split))
        names, counts = np.unique(labels[idx], return_counts=True)
        summary[split] = {example.CLASS_NAMES[int(n)]: int(c)
                          for n, c in zip(names, counts, strict=True)}
        logger.info("Target %s: %s images", split, len(idx))
    return files, summary
