"""Devices: tf.distribute strategies, mixed precision, and the random layers' seeds."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

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
    collective operations afresh, and its all-reduces then clash with the first one's. A
    ``multi_worker_mirrored`` strategy must be made before TensorFlow runs any operation
    ("Collective ops must be configured at program startup"): call this first thing.
    """
    if name == "none":
        return None
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(devices=[d.name for d in devices])
    if name == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"Unknown distribution {name!r}; use none, mirrored or multi_worker_mirrored.")


def worker_count() -> int:
    """How many worker processes (chief included) the cluster ``TF_CONFIG`` names; 1 without
    one."""
    jobs = tf.distribute.cluster_resolver.TFConfigClusterResolver().cluster_spec().as_dict()
    return max(1, sum(len(jobs.get(job, [])) for job in ("chief", "worker")))


def is_chief() -> bool:
    """Whether this process is the one that writes (outputs, tracking, checkpoints): the
    ``chief`` task, or worker 0 of a cluster without one, or a process outside any cluster."""
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    jobs = resolver.cluster_spec().jobs
    if not jobs:
        return True
    if "chief" in jobs:
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and int(resolver.task_id or 0) == 0


def spans_workers(strategy: tf.distribute.Strategy | None) -> bool:
    """Whether ``strategy`` trains across several worker processes."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and worker_count() > 1


def wait_for_workers(strategy: tf.distribute.Strategy) -> None:
    """Return once every worker of ``strategy`` has called this (an all-reduce of one number).

    A worker that leaves while another still runs is reported as crashed by TensorFlow's
    coordination service: every worker calls this before it exits."""
    strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)


class _AcrossWorkers(keras.Model):
    """A model Keras 3.15 can ``fit`` under a MultiWorkerMirroredStrategy of several workers.

    Keras averages each replica's step results across workers with
    ``strategy.reduce("MEAN", value, axis=0)``, which fails on scalars ("Invalid reduction
    dimension 0 for input with 0 dimensions"): the metrics are handed over as vectors of one
    value. The metrics' variables are summed across replicas as they update, so every
    replica holds the same, global value, and their mean is that value.
    """

    def train_step(self, data):
        return {k: ops.reshape(v, (1,)) for k, v in super().train_step(data).items()}

    def test_step(self, data):
        return {k: ops.reshape(v, (1,)) for k, v in super().test_step(data).items()}


def across_workers(model: keras.Model) -> keras.Model:
    """``model``'s layers (built in a MultiWorkerMirroredStrategy's scope) as a model that
    Keras 3.15 can fit across workers. Call it outside the strategy's scope, then compile it
    and build its optimizer (``model.optimizer.build(model.trainable_variables)``) inside.

    Made outside the scope, the model does not keep the strategy, so ``fit`` skips its
    symbolic build, which reduces the first batch with ``strategy.reduce`` and fails across
    workers (TensorFlow's ``reduce`` takes no nested structure such as ``(images, labels)``);
    ``fit`` still runs under the strategy of the scope it is called in.
    """
    return _AcrossWorkers(model.inputs, model.outputs, name=model.name)


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
