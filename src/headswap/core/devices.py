"""Devices: tf.distribute strategies, mixed precision, and the random layers' seeds."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from headswap.core.heads import OUTPUT_NAME
from headswap.core.train import iter_layers


def seed_states(model: keras.Model) -> list[keras.Variable]:
    """The random-number states of the model's layers (dropout, augmentation), in order.

    Keras does not save them with the weights; a resumed run restores them itself so that
    random layers continue their sequence instead of restarting it.
    """
    return [
        v for layer in iter_layers(model) for v in layer.variables
        if v.path.endswith("seed_generator_state")
    ]


def reseed(model: keras.Model, seed: int) -> None:
    """Give every random layer a state derived from ``seed`` alone, however the model was
    built or loaded, so that runs with the same seed draw the same dropout masks."""
    for i, variable in enumerate(seed_states(model)):
        variable.assign(np.asarray([(seed * 7919 + i) % 2**31, 0], dtype=variable.dtype))


@functools.cache
def distribution_strategy(name: str) -> tf.distribute.Strategy | None:
    """``none``, ``mirrored`` (every local GPU, else every logical CPU device) or
    ``multi_worker_mirrored`` (workers from ``TF_CONFIG``).

    One strategy per process: a second MirroredStrategy in the same process numbers its
    collective operations afresh, and its all-reduces then clash with the first one's.
    """
    if name == "none":
        return None
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(devices=[d.name for d in devices])
    if name == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"Unknown distribution {name!r}; use none, mirrored or multi_worker_mirrored.")


def strategy_scope(strategy: tf.distribute.Strategy | None):
    """The strategy's scope, or a scope that does nothing."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def rebuild(
    model: keras.Model, mixed_precision: bool = False, synchronized: bool = False
) -> keras.Model:
    """A copy of ``model`` with its weights, built in the current (strategy) scope.

    With ``mixed_precision`` every layer computes in float16 (``mixed_float16``; variables
    stay float32) except the output layer, which stays float32 so the softmax and the loss
    are computed in full precision. With ``synchronized`` the BatchNormalization layers that
    train compute their batch statistics over all replicas' parts of a batch, as one device
    would over the whole batch.
    """
    config = model.get_config()
    if mixed_precision:
        _set_policy(config, "mixed_float16", keep={OUTPUT_NAME})
    if synchronized:
        _set_in_layers(config, "BatchNormalization", "synchronized", True)
    copy = model.__class__.from_config(config)
    copy.set_weights(model.get_weights())
    return copy


def _set_in_layers(config: Any, class_name: str, key: str, value: Any) -> None:
    """Set ``key`` in the config of every ``class_name`` layer of a (nested) model config."""
    if isinstance(config, dict):
        if config.get("class_name") == class_name and isinstance(config.get("config"), dict):
            config["config"][key] = value
        for item in config.values():
            _set_in_layers(item, class_name, key, value)
    elif isinstance(config, list):
        for item in config:
            _set_in_layers(item, class_name, key, value)


def _set_policy(config: Any, policy: str, keep: set[str]) -> None:
    """Set the dtype policy of every layer in a (nested) model config, except ``keep``."""
    if isinstance(config, dict):
        dtype = config.get("dtype")
        if (isinstance(dtype, dict) and config.get("name") not in keep
                and dtype.get("class_name") == "DTypePolicy"):
            dtype["config"]["name"] = policy
        for value in config.values():
            _set_policy(value, policy, keep)
    elif isinstance(config, list):
        for value in config:
            _set_policy(value, policy, keep)
