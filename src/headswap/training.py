"""Which layers train, optimizers with per-layer rates and schedules, callbacks, phases."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from headswap.bases import BASE_NAME, PREPROCESS_PREFIX
from headswap.config import CallbacksConfig, LayerSelection, TrainingSettings
from headswap.heads import OUTPUT_NAME

logger = logging.getLogger(__name__)


def iter_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """Every layer of ``model``, descending into nested models."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer)


def base_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The base's leaf layers, bottom to top, without inputs and fixed preprocessing.

    This is the list that layer selections (names, regex, index ranges, top N) refer to.
    """
    return [
        layer
        for layer in iter_layers(model.get_layer(BASE_NAME))
        if not isinstance(layer, (keras.Model, keras.layers.InputLayer))
        and not layer.name.startswith(PREPROCESS_PREFIX)
    ]


def select_layers(
    layers: Sequence[keras.layers.Layer], selection: LayerSelection | None
) -> list[keras.layers.Layer]:
    """The layers a :class:`~headswap.config.LayerSelection` names, in their order.

    ``index`` is a Python slice (``"5:-1"``); ``top`` the last N layers; ``from_layer`` that
    layer and all above it. Unknown names raise, listing the layers there are.
    """
    if selection is None:
        return []
    names = [layer.name for layer in layers]
    if selection.all:
        return list(layers)
    if selection.names is not None:
        unknown = [n for n in selection.names if n not in names]
        if unknown:
            raise ValueError(f"No base layer named {unknown}. Base layers: {', '.join(names)}")
        return [layer for layer in layers if layer.name in set(selection.names)]
    if selection.regex is not None:
        chosen = [layer for layer in layers if re.fullmatch(selection.regex, layer.name)]
        if not chosen:
            raise ValueError(
                f"The regex {selection.regex!r} matches no base layer. Base layers: "
                + ", ".join(names)
            )
        return chosen
    if selection.index is not None:
        start, stop = (int(p) if p.strip() else None for p in selection.index.split(":"))
        return list(layers[start:stop])
    if selection.top is not None:
        return list(layers[len(layers) - selection.top :]) if selection.top else []
    if selection.from_layer not in names:
        raise ValueError(
            f"No base layer named {selection.from_layer!r}. Base layers: {', '.join(names)}"
        )
    return list(layers[names.index(selection.from_layer) :])


def set_trainable(
    model: keras.Model, selection: LayerSelection | None, train_batchnorm: bool = False
) -> list[str]:
    """Make exactly the selected base layers trainable (the head always trains).

    BatchNormalization layers stay frozen unless ``train_batchnorm``: in Keras 3 a frozen
    BatchNormalization layer runs in inference mode, so its moving mean and variance keep
    their pretrained values even while the layers around it train. Compile the model again
    afterwards: a change of ``trainable`` only takes effect on ``compile``. Returns the names
    of the base layers that train.
    """
    base = model.get_layer(BASE_NAME)
    chosen = select_layers(base_layers(model), selection)
    base.trainable = bool(chosen)
    if not chosen:
        return []
    keep = {id(layer) for layer in chosen}
    for layer in base_layers(model):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = id(layer) in keep and (train_batchnorm or not is_bn)
    for layer in iter_layers(base):
        if layer.name.startswith(PREPROCESS_PREFIX):
            layer.trainable = False
    return [layer.name for layer in base_layers(model) if layer.trainable and layer.weights]


def set_base_trainable(model: keras.Model, trainable: bool, train_batchnorm: bool = False) -> None:
    """Freeze or unfreeze the whole base (see :func:`set_trainable`)."""
    set_trainable(model, LayerSelection(all=True) if trainable else None, train_batchnorm)


def parameter_counts(model: keras.Model) -> dict[str, int]:
    """Trainable and non-trainable parameter counts, as Keras' summary reports them."""
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    frozen = int(sum(np.prod(w.shape) for w in model.non_trainable_weights))
    return {"trainable_params": trainable, "non_trainable_params": frozen}


def make_optimizer(
    name: str,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
) -> keras.optimizers.Optimizer:
    """An optimizer by name: ``adam``, ``adamw``, ``rmsprop`` or ``sgd`` (with momentum)."""
    decay = weight_decay or None
    name = name.lower()
    if name == "adam":
        return keras.optimizers.Adam(learning_rate, weight_decay=decay)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay or 0.004)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate, weight_decay=decay)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=momentum, weight_decay=decay)
    raise ValueError(f"Unknown optimizer {name!r}; use one of adam, adamw, rmsprop, sgd.")


def learning_rate_schedule(
    learning_rate: float,
    schedule: str,
    epochs: int,
    warmup_epochs: int,
    steps_per_epoch: int,
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """A constant rate, or linear warmup then constant (``constant``) or cosine decay to 0."""
    if schedule == "constant" and not warmup_epochs:
        return learning_rate
    warmup = warmup_epochs * steps_per_epoch
    total = max(epochs * steps_per_epoch - warmup, 1)
    alpha = 1.0 if schedule == "constant" else 0.0
    if warmup:
        return keras.optimizers.schedules.CosineDecay(
            0.0, total, alpha=alpha, warmup_target=learning_rate, warmup_steps=warmup
        )
    return keras.optimizers.schedules.CosineDecay(learning_rate, total, alpha=alpha)


@dataclass
class RateGroup:
    """Base layers trained at their own learning rate."""

    name: str
    layers: list[keras.layers.Layer]
    learning_rate: float


def rate_groups(model: keras.Model, settings: TrainingSettings) -> list[RateGroup]:
    """The layer groups with their own rates: ``layer_rates`` or ``discriminative`` blocks.

    Discriminative rates split the trainable base layers (bottom to top) into ``groups``
    contiguous blocks with rates ``min * (head / min) ** (i / groups)``, i = 0 … groups-1,
    so the lowest block learns slowest and the head learns at the phase's rate.
    """
    layers = base_layers(model)
    if settings.layer_rates:
        groups, taken = [], set()
        for i, spec in enumerate(settings.layer_rates):
            chosen = [l for l in select_layers(layers, spec.layers) if id(l) not in taken]
            taken |= {id(l) for l in chosen}
            groups.append(RateGroup(f"group{i}", chosen, spec.learning_rate))
        return groups
    if settings.discriminative:
        trainable = [layer for layer in layers if layer.trainable_weights]
        n = min(settings.discriminative.groups, len(trainable))
        low, high = settings.discriminative.min_learning_rate, settings.learning_rate
        return [
            RateGroup(f"block{i}", list(chunk), low * (high / low) ** (i / n))
            for i, chunk in enumerate(np.array_split(np.array(trainable, dtype=object), n))
        ]
    return []


def build_optimizer(
    model: keras.Model, settings: TrainingSettings, steps_per_epoch: int
) -> tuple[keras.optimizers.Optimizer, dict[str, keras.optimizers.Optimizer]]:
    """The phase's optimizer and, by name, the optimizers whose rates are logged.

    With layer groups, a ``keras.optimizers.MultiOptimizer`` routes each group's variables
    (by their exact ``variable.path``) to an optimizer of its own rate; everything else (the
    head) uses the phase's rate. A group at rate 0 does not change at all.
    """

    def make(rate: float) -> keras.optimizers.Optimizer:
        schedule = learning_rate_schedule(
            rate, settings.schedule, settings.epochs, settings.warmup_epochs, steps_per_epoch
        )
        return make_optimizer(settings.optimizer, schedule, settings.weight_decay, settings.momentum)

    head = make(settings.learning_rate)
    groups = [g for g in rate_groups(model, settings) if any(l.trainable_weights for l in g.layers)]
    if not groups:
        return head, {"learning_rate": head}
    mapping, logged = {}, {"learning_rate": head}
    for group in groups:
        paths = [v.path for layer in group.layers for v in layer.trainable_weights]
        optimizer = make(group.learning_rate)
        mapping["|".join(re.escape(p) for p in paths)] = optimizer
        logged[f"learning_rate.{group.name}"] = optimizer
        logger.info(
            "Layer group %s: %s layers (%s … %s) at learning rate %.3g", group.name,
            len(group.layers), group.layers[0].name, group.layers[-1].name, group.learning_rate,
        )
    optimizer = keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(head, mapping))
    return optimizer, logged


def compile_model(
    model: keras.Model,
    optimizer: str | keras.optimizers.Optimizer,
    learning_rate: float = 1e-3,
    label_smoothing: float = 0.0,
    jit_compile: bool | str = "auto",
    steps_per_execution: int = 1,
) -> None:
    """Compile against the softmax output (``from_logits=False``).

    ``steps_per_execution`` batches run per call of the compiled step (Keras runs them in
    one loop inside the graph): the same training, with less overhead when steps are tiny.
    With a dataset that spans several epochs (:func:`run_phase`'s ``steps_per_epoch``) it
    must divide the steps per epoch, or one call would run into the next epoch's batches.

    Integer labels use sparse cross-entropy; with label smoothing, labels must be one-hot
    (see :func:`one_hot_labels`) and categorical cross-entropy smooths them.
    """
    if isinstance(optimizer, str):
        optimizer = make_optimizer(optimizer, learning_rate)
    if label_smoothing:
        loss = keras.losses.CategoricalCrossentropy(
            from_logits=False, label_smoothing=label_smoothing
        )
        accuracy = keras.metrics.CategoricalAccuracy(name="accuracy")
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=False)
        accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    model.compile(optimizer=optimizer, loss=loss, metrics=[accuracy], jit_compile=jit_compile,
                  steps_per_execution=steps_per_execution)


def one_hot_labels(dataset: tf.data.Dataset, num_classes: int) -> tf.data.Dataset:
    """Turn a dataset's integer labels into one-hot vectors (for label smoothing)."""
    return dataset.map(lambda x, y: (x, tf.one_hot(y, num_classes)))


def class_weights(
    labels: np.ndarray, class_names: list[str], spec: str | dict[str, float] | None
) -> dict[int, float] | None:
    """Keras ``class_weight``: ``balanced`` (n / (k * count)) or explicit weights by class name."""
    if spec is None:
        return None
    if spec == "balanced":
        counts = np.bincount(labels, minlength=len(class_names))
        return {
            i: float(len(labels) / (len(class_names) * max(c, 1))) for i, c in enumerate(counts)
        }
    unknown = sorted(set(spec) - set(class_names))
    if unknown:
        raise ValueError(
            f"finetune.training.class_weight names unknown class(es) {unknown}; the classes "
            f"are {class_names}."
        )
    return {i: float(spec.get(name, 1.0)) for i, name in enumerate(class_names)}


class LearningRateLogger(keras.callbacks.Callback):
    """Adds each logged optimizer's current learning rate to the epoch's logs."""

    def __init__(self, optimizers: dict[str, keras.optimizers.Optimizer]) -> None:
        super().__init__()
        self.optimizers = optimizers

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        for name, optimizer in self.optimizers.items():
            logs[name] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def run_phase(
    model: keras.Model,
    train: tf.data.Dataset,
    val: tf.data.Dataset,
    epochs: int,
    initial_epoch: int = 0,
    callbacks: list[keras.callbacks.Callback] | None = None,
    class_weight: dict[int, float] | None = None,
    verbose: int = 2,
    steps_per_epoch: int | None = None,
) -> dict[str, Any]:
    """Train for ``epochs`` epochs numbered from ``initial_epoch``; return the history.

    Without ``steps_per_epoch`` each epoch iterates ``train`` afresh; with it, ``train`` holds
    the batches of all the epochs and one iterator runs across them (as the datasets
    :func:`headswap.data.make_dataset` makes with ``epochs``). ``val`` is iterated afresh
    each epoch.

    The history is a dict of lists: ``epoch`` (on the run's one epoch axis), ``loss``,
    ``accuracy``, ``val_loss``, ``val_accuracy`` and ``learning_rate`` (plus one
    ``learning_rate.<group>`` per layer group). Early stopping may end it sooner.
    """
    if epochs == 0:
        return {"epoch": []}
    callbacks = list(callbacks or [])
    if not any(isinstance(c, LearningRateLogger) for c in callbacks):
        callbacks.insert(0, LearningRateLogger({"learning_rate": model.optimizer}))
    result = model.fit(
        train,
        validation_data=val,
        epochs=initial_epoch + epochs,
        initial_epoch=initial_epoch,
        callbacks=callbacks,
        class_weight=class_weight,
        verbose=verbose,
        steps_per_epoch=steps_per_epoch,
    )
    history = {k: [float(v) for v in values] for k, values in result.history.items()}
    history["epoch"] = [int(e) for e in result.epoch]
    return history


def merge_histories(histories: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Consecutive histories (stages of one phase) as one; ``stage_starts`` marks each start."""
    merged: dict[str, Any] = {"epoch": []}
    starts = []
    for history in histories:
        if history.get("epoch"):
            starts.append(history["epoch"][0])
        for key, values in history.items():
            if isinstance(values, list):
                merged.setdefault(key, []).extend(values)
    merged["stage_starts"] = starts
    return merged


def steps_per_epoch(examples: int, batch_size: int) -> int:
    """Batches per epoch."""
    return max(math.ceil(examples / batch_size), 1)


def history_metrics(histories: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Per-epoch metrics of consecutive phases as ``{name: [{"step", "value"}, ...]}``."""
    metrics: dict[str, list[dict[str, float]]] = {}
    for history in histories:
        for name, values in history.items():
            per_epoch = isinstance(values, list) and len(values) == len(history["epoch"])
            if name == "epoch" or not per_epoch or not all(
                isinstance(v, (int, float)) for v in values
            ):
                continue
            metrics.setdefault(name, []).extend(
                {"step": int(step), "value": float(value)}
                for step, value in zip(history["epoch"], values)
            )
    return metrics


def make_callbacks(
    settings: CallbacksConfig,
    logged: dict[str, keras.optimizers.Optimizer],
    checkpoint_path: str | None = None,
) -> list[keras.callbacks.Callback]:
    """The phase's callbacks from the parameters, the learning-rate logger first."""
    callbacks: list[keras.callbacks.Callback] = [LearningRateLogger(logged)]
    if settings.terminate_on_nan:
        callbacks.append(keras.callbacks.TerminateOnNaN())
    if settings.reduce_lr_on_plateau:
        plateau = settings.reduce_lr_on_plateau
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor=plateau.monitor, factor=plateau.factor, patience=plateau.patience,
                min_delta=plateau.min_delta, min_lr=plateau.min_learning_rate, verbose=1,
            )
        )
    if settings.early_stopping:
        stop = settings.early_stopping
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=stop.monitor, patience=stop.patience, min_delta=stop.min_delta,
                restore_best_weights=stop.restore_best_weights, verbose=1,
            )
        )
    if checkpoint_path:
        callbacks.append(
            keras.callbacks.ModelCheckpoint(
                checkpoint_path, monitor="val_loss", save_best_only=True, verbose=0
            )
        )
    return callbacks


class EpochLog(keras.callbacks.Callback):
    """Appends each finished epoch's logs to a JSON-lines file (kept across interruptions)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        record = {"epoch": int(epoch), **{k: float(v) for k, v in (logs or {}).items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")  # closed at once: survives a killed process


def read_epoch_log(path: str) -> dict[str, Any]:
    """The history in an :class:`EpochLog` file; a repeated epoch keeps its last record."""
    records: dict[int, dict[str, float]] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    records[int(record.pop("epoch"))] = record
    history: dict[str, Any] = {"epoch": sorted(records)}
    for epoch in history["epoch"]:
        for key, value in records[epoch].items():
            history.setdefault(key, []).append(value)
    return history


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


class EpochBackup(keras.callbacks.Callback):
    """Keeps the state of the last completed epoch in ``folder``: weights, optimizer state
    and the random layers' states, in one ``epoch-<n>.npz`` file.

    The file holds the values of ``model.variables`` (weights and random-layer states) and of
    the optimizer's variables, in order; it is written under a temporary name and renamed
    into place, so a process killed mid-write leaves the previous backup intact. On the next
    ``fit`` the latest backup is loaded and training continues after its epoch. (Writing the
    values directly costs about a millisecond, against some 15 ms for Keras' ``save_weights``,
    which walks the model's object graph: the difference matters when an epoch is short, as on
    cached features.)
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        super().__init__()
        self.folder = os.fspath(folder)

    def latest(self) -> tuple[int, str] | None:
        """(epochs completed, file) of the newest complete backup, if any."""
        if not os.path.isdir(self.folder):
            return None
        done = sorted(f for f in os.listdir(self.folder) if re.fullmatch(r"epoch-\d+\.npz", f))
        if not done:
            return None
        return int(done[-1].split("-")[1].split(".")[0]), os.path.join(self.folder, done[-1])

    def _variables(self) -> dict[str, list]:
        return {
            "model": list(self.model.variables),
            "optimizer": list(self.model.optimizer.variables),
        }

    def on_train_begin(self, logs: dict | None = None) -> None:
        found = self.latest()
        if found is None:
            return
        epochs_done, path = found
        if not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        with np.load(path) as saved:
            for group, variables in self._variables().items():
                values = [saved[f"{group}/{i}"] for i in range(int(saved[f"{group}/count"]))]
                shapes = [tuple(v.shape) for v in variables]
                if [tuple(v.shape) for v in values] != shapes:
                    raise ValueError(
                        f"The backup {path} does not fit this model: its {group} variables "
                        f"have the shapes {[tuple(v.shape) for v in values]}, the model's "
                        f"{shapes}. Delete {self.folder} (or set finetune.training.resume "
                        "to false) to train this stage afresh."
                    )
                for variable, value in zip(variables, values, strict=True):
                    variable.assign(value.astype(variable.dtype))
        self.model._initial_epoch = epochs_done  # the hook Keras' own BackupAndRestore uses
        logger.info("Resumed after epoch %s from %s", epochs_done, path)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        os.makedirs(self.folder, exist_ok=True)
        arrays = {}
        for group, variables in self._variables().items():
            arrays[f"{group}/count"] = np.asarray(len(variables))
            for i, variable in enumerate(variables):
                arrays[f"{group}/{i}"] = keras.ops.convert_to_numpy(variable)
        name = f"epoch-{epoch + 1:05d}.npz"
        partial = os.path.join(self.folder, f"partial-{name}")
        with open(partial, "wb") as f:
            np.savez(f, **arrays)
        os.replace(partial, os.path.join(self.folder, name))
        for other in os.listdir(self.folder):
            if other != name:
                os.remove(os.path.join(self.folder, other))

    def on_train_end(self, logs: dict | None = None) -> None:
        self.model._initial_epoch = None


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
