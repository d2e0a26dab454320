"""Freezing and unfreezing the base, compiling, and running a training phase."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from headswap.bases import BASE_NAME, PREPROCESS_PREFIX

logger = logging.getLogger(__name__)


def iter_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """Every layer of ``model``, descending into nested models."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer)


def set_base_trainable(
    model: keras.Model, trainable: bool, train_batchnorm: bool = False
) -> None:
    """Freeze (``trainable=False``) or unfreeze the whole base of a head-swapped model.

    When unfreezing, BatchNormalization layers stay frozen unless ``train_batchnorm``: in
    Keras 3 a frozen BatchNormalization layer runs in inference mode, so its moving mean and
    variance keep their pretrained values. Fixed preprocessing layers never train. Compile
    the model again afterwards: a change of ``trainable`` only takes effect on ``compile``.
    """
    base = model.get_layer(BASE_NAME)
    base.trainable = trainable
    if not trainable:
        return
    for layer in iter_layers(base):
        if layer.name.startswith(PREPROCESS_PREFIX):
            layer.trainable = False
        elif isinstance(layer, keras.layers.BatchNormalization) and not train_batchnorm:
            layer.trainable = False


def parameter_counts(model: keras.Model) -> dict[str, int]:
    """Trainable and non-trainable parameter counts, as Keras' summary reports them."""
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    frozen = int(sum(np.prod(w.shape) for w in model.non_trainable_weights))
    return {"trainable_params": trainable, "non_trainable_params": frozen}


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """An optimizer by name: ``adam``, ``adamw``, ``rmsprop`` or ``sgd`` (momentum 0.9)."""
    name = name.lower()
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9)
    raise ValueError(f"Unknown optimizer {name!r}; use one of adam, adamw, rmsprop, sgd.")


def compile_model(model: keras.Model, optimizer: str, learning_rate: float) -> None:
    """Compile for integer labels against the softmax output (``from_logits=False``)."""
    model.compile(
        optimizer=make_optimizer(optimizer, learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=False),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


class _LearningRateLogger(keras.callbacks.Callback):
    """Adds the optimizer's learning rate of each epoch to the logs."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["learning_rate"] = float(
                keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
            )


def run_phase(
    model: keras.Model,
    train: tf.data.Dataset,
    val: tf.data.Dataset,
    epochs: int,
    initial_epoch: int = 0,
    verbose: int = 2,
) -> dict[str, Any]:
    """Train for ``epochs`` epochs numbered from ``initial_epoch``; return the history.

    The history is a dict of lists: ``epoch`` (on the run's one epoch axis), ``loss``,
    ``accuracy``, ``val_loss``, ``val_accuracy`` and ``learning_rate``.
    """
    if epochs == 0:
        return {"epoch": []}
    result = model.fit(
        train,
        validation_data=val,
        epochs=initial_epoch + epochs,
        initial_epoch=initial_epoch,
        callbacks=[_LearningRateLogger()],
        verbose=verbose,
    )
    history = {k: [float(v) for v in values] for k, values in result.history.items()}
    history["epoch"] = [int(e) for e in result.epoch]
    return history


def history_metrics(histories: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Per-epoch metrics of consecutive phases as ``{name: [{"step", "value"}, ...]}``."""
    metrics: dict[str, list[dict[str, float]]] = {}
    for history in histories:
        for name, values in history.items():
            if name == "epoch" or not isinstance(values, list):
                continue
            metrics.setdefault(name, []).extend(
                {"step": int(step), "value": float(value)}
                for step, value in zip(history["epoch"], values)
            )
    return metrics
