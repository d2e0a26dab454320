"""How a stage trains: which layers, optimizers with per-layer rates and schedules,
compilation, callbacks."""

from __future__ import annotations

import logging
import math
import re
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from headswap.core.bases import BASE_NAME, PREPROCESS_PREFIX
from headswap.core.errors import InputError
from headswap.core.progress import LoggedEarlyStopping, LoggedReduceLROnPlateau
from headswap.core.recipe import Callbacks, LayerSelection, Stage

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
    """The layers a :class:`~headswap.core.recipe.LayerSelection` names, in their order.

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
            raise InputError(f"No base layer named {unknown}. Base layers: {', '.join(names)}")
        return [layer for layer in layers if layer.name in set(selection.names)]
    if selection.regex is not None:
        chosen = [layer for layer in layers if re.fullmatch(selection.regex, layer.name)]
        if not chosen:
            raise InputError(
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
        raise InputError(
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
    """A Keras optimizer by its name, as ``keras.optimizers.get`` knows it (``adam``,
    ``adamw``, ``rmsprop``, ``sgd``, ``lion``, ...), with ``weight_decay`` when not 0 (AdamW
    keeps its own default then) and, for SGD, ``momentum``."""
    try:
        kind = type(keras.optimizers.get(name.lower()))
    except ValueError:
        raise ValueError(
            f"Unknown optimizer {name!r}; use a Keras optimizer's name, e.g. adam, adamw, "
            "rmsprop, sgd."
        ) from None
    settings: dict[str, object] = {"learning_rate": learning_rate}
    if weight_decay:
        settings["weight_decay"] = weight_decay
    if kind is keras.optimizers.SGD:
        settings["momentum"] = momentum
    return kind(**settings)


def learning_rate_schedule(
    learning_rate: float,
    schedule: str,
    epochs: int,
    warmup_epochs: int,
    steps_per_epoch: int,
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """A constant rate, or linear warmup then constant (``constant``) or cosine decay to 0.

    The warmup takes at most all epochs but the last, so that a short run (``epochs=2`` to try
    a setting) keeps a default warmup of more epochs than it has."""
    warmup_epochs = min(warmup_epochs, max(epochs - 1, 0))
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


def rate_groups(model: keras.Model, settings: Stage) -> list[RateGroup]:
    """The layer groups with their own rates: ``layer_rates`` or ``discriminative`` blocks.

    Discriminative rates split the trainable base layers (bottom to top) into ``groups``
    contiguous blocks with rates ``min * (head / min) ** (i / groups)``, i = 0 … groups-1,
    so the lowest block learns slowest and the head learns at the phase's rate.
    """
    layers = base_layers(model)
    if settings.layer_rates:
        groups, taken = [], set()
        for i, spec in enumerate(settings.layer_rates):
            chosen = [x for x in select_layers(layers, spec.layers) if id(x) not in taken]
            taken |= {id(x) for x in chosen}
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
    model: keras.Model, settings: Stage, steps_per_epoch: int
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
        return make_optimizer(settings.optimizer, schedule, settings.weight_decay,
                              settings.momentum)

    head = make(settings.learning_rate)
    groups = [g for g in rate_groups(model, settings)
              if any(layer.trainable_weights for layer in g.layers)]
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
    optimizer: keras.optimizers.Optimizer,
    label_smoothing: float = 0.0,
    jit_compile: bool | str = "auto",
    steps_per_execution: int = 1,
) -> None:
    """Compile against the softmax output (``from_logits=False``).

    ``steps_per_execution`` batches run per call of the compiled step (Keras runs them in
    one loop inside the graph): the same training, with less overhead when steps are tiny.
    Integer labels use sparse cross-entropy; with label smoothing, labels must be one-hot
    (see :func:`one_hot_labels`) and categorical cross-entropy smooths them.
    """
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


#: ``class_weight: auto`` weighs the classes (as ``balanced``) from this ratio of the largest
#: training class to the smallest.
AUTO_IMBALANCE = 1.5


def class_weights(
    labels: np.ndarray, class_names: list[str], spec: str | dict[str, float] | None
) -> dict[int, float] | None:
    """Keras ``class_weight``: ``balanced`` (n / (k * count)), ``auto`` (``balanced`` when the
    largest class has at least :data:`AUTO_IMBALANCE` times the smallest's images, else none)
    or explicit weights by class name."""
    if spec is None:
        return None
    if spec == "auto":
        counts = np.bincount(labels, minlength=len(class_names))
        balanced = counts.max() >= AUTO_IMBALANCE * max(counts.min(), 1)
        return class_weights(labels, class_names, "balanced") if balanced else None
    if spec == "balanced":
        counts = np.bincount(labels, minlength=len(class_names))
        return {
            i: float(len(labels) / (len(class_names) * max(c, 1))) for i, c in enumerate(counts)
        }
    unknown = sorted(set(spec) - set(class_names))
    if unknown:
        raise InputError(
            f"`class_weight` names unknown class(es) {unknown}; the classes are "
            f"{class_names}."
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


class StopOnCtrlC(keras.callbacks.Callback):
    """Ctrl-C stops training, also when the KeyboardInterrupt it raised was lost.

    Python raises KeyboardInterrupt wherever the main thread is when it handles SIGINT. Inside
    NumPy's conversion of a TensorFlow tensor (Keras converts each batch's and epoch's logs)
    the exception is cleared, and training goes on as if Ctrl-C had not been pressed: 4 of 250
    Ctrl-Cs on 0.0 s epochs (a frozen base's head on cached features). Entered as a context
    manager around training (in the main thread, where SIGINT has Python's default handler),
    it also notes the signal; the next batch's or epoch's end (or a loop of its own, through
    :meth:`stop_if_pressed`) raises KeyboardInterrupt again."""

    # Keras may run batch-end hooks in its callback thread; fit re-raises what they raise.
    async_safe = True

    def __init__(self) -> None:
        super().__init__()
        self.pressed = False
        self._previous: Any = None

    def __enter__(self) -> StopOnCtrlC:
        self.pressed = False
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._pressed)
        return self

    def __exit__(self, *exception: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _pressed(self, signum: int, frame: Any) -> None:
        self.pressed = True
        signal.default_int_handler(signum, frame)

    def stop_if_pressed(self, *args: Any, **kwargs: Any) -> None:
        """Raise KeyboardInterrupt if Ctrl-C was pressed since the context was entered."""
        if self.pressed:
            raise KeyboardInterrupt

    on_train_batch_end = on_test_batch_end = on_epoch_end = stop_if_pressed


def steps_per_epoch(examples: int, batch_size: int) -> int:
    """Batches per epoch."""
    return max(math.ceil(examples / batch_size), 1)


def make_callbacks(
    settings: Callbacks,
    logged: dict[str, keras.optimizers.Optimizer],
    checkpoint_path: str | None = None,
    label: str = "training",
    first_epoch: int = 0,
) -> list[keras.callbacks.Callback]:
    """The phase's callbacks from the parameters, the learning-rate logger first. Early
    stopping and the plateau's rate cuts are logged (as ``label``, epochs counted from
    ``first_epoch``), not printed."""
    callbacks: list[keras.callbacks.Callback] = [LearningRateLogger(logged)]
    if settings.terminate_on_nan:
        callbacks.append(keras.callbacks.TerminateOnNaN())
    if settings.reduce_lr_on_plateau:
        plateau = settings.reduce_lr_on_plateau
        callbacks.append(
            LoggedReduceLROnPlateau(
                monitor=plateau.monitor, factor=plateau.factor, patience=plateau.patience,
                min_delta=plateau.min_delta, min_lr=plateau.min_learning_rate, label=label,
                first_epoch=first_epoch,
            )
        )
    if settings.early_stopping:
        stop = settings.early_stopping
        callbacks.append(
            LoggedEarlyStopping(
                monitor=stop.monitor, patience=stop.patience, min_delta=stop.min_delta,
                restore_best_weights=stop.restore_best_weights, label=label,
                first_epoch=first_epoch,
            )
        )
    if checkpoint_path:
        callbacks.append(
            keras.callbacks.ModelCheckpoint(
                checkpoint_path, monitor="val_loss", save_best_only=True, verbose=0
            )
        )
    return callbacks


