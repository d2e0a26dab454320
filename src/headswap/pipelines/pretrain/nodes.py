"""Nodes pretraining the example's base on the source task."""

from __future__ import annotations

from typing import Any

import keras

from headswap.project import example


def pretrain_base(source_task: dict[str, Any], params: dict[str, Any]) -> tuple[keras.Model, dict]:
    """Train the compact CNN on the source task; it becomes the example's pretrained base."""
    return example.pretrain_compact_cnn(
        source_task["images"],
        source_task["labels"],
        filters=tuple(params["filters"]),
        epochs=params["epochs"],
        batch_size=params["batch_size"],
        learning_rate=params["learning_rate"],
        val_fraction=params["val_fraction"],
        seed=params["seed"],
    )
