"""Fine-tuning a model with a head on a base: stages of training on one epoch axis.

:func:`fit` trains a model through a list of :class:`~headswap.core.recipe.Stage` objects
(phase 1: one stage with the base frozen; phase 2: one or more stages that open the base).
Each stage sets which layers train and compiles the model again, since a change of
``trainable`` only takes effect on ``compile``. :func:`fine_tune` runs the whole recipe: named
phases of stages, one after the other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from headswap.core import data, heads, inference, manifests
from headswap.core.bases import input_spec
from headswap.core.devices import (
    across_workers,
    distribution_strategy,
    is_chief,
    rebuild,
    reseed,
    spans_workers,
    strategy_scope,
)
from headswap.core.lr_find import RangeTest, RangeTestSettings, range_test
from headswap.core.progress import TrainingProgress
from headswap.core.recipe import Callbacks, Stage, check_plateau
from headswap.core.resume import StageState
from headswap.core.train import (
    StopOnCtrlC,
    build_optimizer,
    class_weights,
    compile_model,
    make_callbacks,
    make_optimizer,
    one_hot_labels,
    parameter_counts,
    set_trainable,
    steps_per_epoch,
)

logger = logging.getLogger(__name__)

History = dict[str, Any]


@dataclass
class FitOptions:
    """How the stages are trained, whatever they train.

    ``cache_memory_mb``: a split's decoded images (and a frozen base's features) are kept in
    memory when they fit in this many MiB. ``cache_features``: while the base is frozen (and
    the model has no augmentation layers), the base's features are computed once per image and
    the head trains on them. ``distribution``: ``none``, ``mirrored`` or
    ``multi_worker_mirrored`` (the strategy made first thing in the process, see
    :func:`~headswap.core.devices.distribution_strategy`; features are not cached there, and
    only the chief writes checkpoints). ``backup_dir``: keep what an interrupted run needs
    to continue (see :mod:`headswap.core.resume`); None keeps nothing. ``extra_callbacks``
    are added to every stage's. ``lr_find``: how the range test that picks a stage's
    ``learning_rate: auto`` runs (see :mod:`headswap.core.lr_find`).
    """

    image_size: tuple[int, int]
    resize: str = "stretch"
    batch_size: int = 32
    seed: int = 42
    cache_memory_mb: int = 1024
    cache_features: bool = True
    callbacks: Callbacks = field(default_factory=Callbacks)
    class_weight: str | dict[str, float] | None = None
    distribution: str = "none"
    mixed_precision: bool = False
    jit_compile: bool = False
    backup_dir: str | Path | None = None
    extra_callbacks: list[keras.callbacks.Callback] = field(default_factory=list)
    verbose: str | int = "progress"  # progress | epochs | quiet: headswap.core.progress
    lr_find: RangeTestSettings = field(default_factory=RangeTestSettings)


def fit(
    model: keras.Model,
    manifest: pd.DataFrame,
    stages: list[Stage],
    options: FitOptions,
    first_epoch: int = 0,
    name: str = "phase",
) -> History:
    """Train ``model`` (made by :func:`headswap.core.heads.attach_head`) through ``stages``.

    Epochs are numbered on one axis from ``first_epoch``. Returns the merged per-epoch history
    (``epoch``, ``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``, ``learning_rate``...)
    with ``stage_starts``, ``trainable_layers`` (per stage), ``parameter_counts`` (of the
    last stage), ``found_learning_rates`` (per stage: the rate the range test found for a
    ``learning_rate: auto``, else None) and ``seconds`` (the time it took). Under a
    tf.distribute strategy, or in mixed precision, each stage trains a copy built in its scope
    and hands the weights back to ``model``.
    """
    check_plateau(stages, options.callbacks)
    started = time.perf_counter()
    run = _Run.start(manifest, options, first_epoch)
    histories, layers_per_stage, counts, found = [], [], {}, []
    epoch = first_epoch
    for i, stage in enumerate(stages, start=1):
        if stage.epochs == 0:  # skipped: nothing opened, compiled or counted
            found.append(None)
            layers_per_stage.append([])
            continue
        label = f"{name} stage {i}" if len(stages) > 1 else name
        auto = stage.learning_rate == "auto"
        if auto:
            memo = (Path(options.backup_dir) / f"{name}_stage{i}.lr_find.json"
                    if options.backup_dir else None)
            with strategy_scope(run.strategy):
                stage = _auto_rate(model, stage, run, label, epoch, memo)
        found.append(stage.learning_rate if auto else None)
        work, logged, trainable, counts = _compiled(model, stage, run, label)
        with strategy_scope(run.strategy):
            keras.utils.set_random_seed(options.seed + epoch)
            reseed(work, options.seed + epoch)
            state = (StageState(Path(options.backup_dir) / f"{name}_stage{i}",
                                _stage_key(manifest, stage, options, epoch, model))
                     if options.backup_dir else None)
            history = state.reuse(work) if state else None
            if history is not None:
                logger.info("%s finished before the interruption; reusing its weights", label)
            else:
                history = _fit_stage(run, work, stage, label, logged, epoch, state)
            if work is not model:
                model.set_weights(work.get_weights())
            histories.append(history)
            layers_per_stage.append(trainable)
            epoch = next_epoch(history) or epoch
    merged = merge_histories(histories)
    merged["parameter_counts"] = counts
    merged["trainable_layers"] = layers_per_stage
    merged["found_learning_rates"] = found
    merged["seconds"] = time.perf_counter() - started
    return merged


def fine_tune(
    model: keras.Model,
    manifest: pd.DataFrame,
    phases: dict[str, list[Stage]],
    options: FitOptions,
    first_epoch: int = 0,
) -> dict[str, History]:
    """The recipe: each named phase's stages, in order, on one epoch axis; each phase's
    history by its name. The classic recipe is two phases, ``{"phase1": [the new head, the
    base frozen], "phase2": [part or all of the base opened, a lower rate]}``; any number
    (gradual unfreezing as a phase per group, a longer last phase) trains the same way."""
    histories: dict[str, History] = {}
    for name, stages in phases.items():
        histories[name] = fit(model, manifest, stages, options, first_epoch, name=name)
        first_epoch = next_epoch(histories[name]) or first_epoch
    return histories


def next_epoch(history: History) -> int:
    """The epoch after the last one of ``history`` (0 for an empty one)."""
    return history["epoch"][-1] + 1 if history.get("epoch") else 0


@dataclass
class _Run:
    """What every stage of one :func:`fit` shares."""

    manifest: pd.DataFrame
    options: FitOptions
    steps: int  # batches per epoch
    class_weight: dict[int, float] | None
    strategy: tf.distribute.Strategy | None
    order: tf.Variable  # the epoch the training data starts at (its order is keyed on epochs)

    @classmethod
    def start(cls, manifest: pd.DataFrame, options: FitOptions, first_epoch: int) -> _Run:
        labels = manifests.split_arrays(manifest, "train")[1]
        return cls(
            manifest, options, steps_per_epoch(len(labels), options.batch_size),
            class_weights(labels, manifests.class_names(manifest), options.class_weight),
            distribution_strategy(options.distribution),
            tf.Variable(first_epoch, dtype=tf.int64, trainable=False),  # outside the strategy
        )


def _compiled(
    model: keras.Model, stage: Stage, run: _Run, label: str
) -> tuple[keras.Model, dict[str, keras.optimizers.Optimizer], list[str], dict[str, int]]:
    """The model to train in ``stage`` (``model``, or a copy built in the strategy's scope or
    in mixed precision), compiled with the stage's optimizer; the optimizers whose rates are
    logged, the base layers that train, and the parameter counts."""
    options = run.options
    trainable = set_trainable(model, stage.train, stage.train_batchnorm)
    with strategy_scope(run.strategy):
        work = (rebuild(model, options.mixed_precision, synchronized=run.strategy is not None)
                if run.strategy is not None or options.mixed_precision else model)
    if spans_workers(run.strategy):
        work = across_workers(work)  # outside the scope: see its documentation
    with strategy_scope(run.strategy):
        optimizer, logged = build_optimizer(work, stage, run.steps)
        compile_model(work, optimizer, stage.label_smoothing, options.jit_compile)
        if spans_workers(run.strategy):
            work.optimizer.build(work.trainable_variables)
    counts = parameter_counts(work)
    logger.info(
        "%s: %s base layers train; %s trainable and %s non-trainable parameters; "
        "%s epochs, %s at learning rate %g (%s schedule)",
        label, len(trainable), f"{counts['trainable_params']:,}",
        f"{counts['non_trainable_params']:,}", stage.epochs, stage.optimizer,
        stage.learning_rate, stage.schedule,
    )
    return work, logged, trainable, counts


def _fit_stage(
    run: _Run,
    work: keras.Model,
    stage: Stage,
    label: str,
    logged: dict[str, keras.optimizers.Optimizer],
    first: int,
    state: StageState | None,
) -> History:
    """Fit one stage from epoch ``first``, on cached features when the base is frozen."""
    options = run.options
    trained, train, val = _stage_data(run, work, stage, label)
    ctrl_c = StopOnCtrlC()
    callbacks = [*make_callbacks(options.callbacks, logged, _checkpoint_path(options, label),
                                 label, first),
                 *(state.callbacks() if state else []), *options.extra_callbacks,
                 TrainingProgress(label, stage.epochs, first, options.verbose),
                 ctrl_c]  # last: an epoch that ended is backed up and logged before it stops
    resumed = state.backup.restore(trained) if state else None
    initial = max(first, resumed or 0)
    run.order.assign(initial)  # the training data starts at this epoch's order
    try:
        with ctrl_c:
            result = trained.fit(train, validation_data=val, epochs=first + stage.epochs,
                                 initial_epoch=initial, steps_per_epoch=run.steps,
                                 callbacks=callbacks, class_weight=run.class_weight,
                                 verbose=0, shuffle=False)  # TrainingProgress logs instead
    finally:
        if state is not None:
            state.close()
    if state is None:
        history = {k: [float(v) for v in values] for k, values in result.history.items()}
        return {"epoch": [int(e) for e in result.epoch], **history}
    history = state.history()
    state.finish(work, history)
    return history


def _stage_data(
    run: _Run, work: keras.Model, stage: Stage, label: str, steps_per_execution: int | None = None
) -> tuple[keras.Model, tf.data.Dataset, tf.data.Dataset]:
    """The model that trains in ``stage`` (``work``, or its head on cached features when the
    base is frozen, compiled with ``work``'s optimizer) and the train and val datasets."""
    manifest, options = run.manifest, run.options
    size, batch = options.image_size, options.batch_size
    if _can_cache(options, stage, work, manifest):
        trained, (train, val) = _cached_head(work, manifest, options, run.order)
        # A step of the head alone takes microseconds: one call runs a whole epoch's steps
        # (on one device; Keras' multi-step loop fails under a tf.distribute strategy).
        if steps_per_execution is None:
            steps_per_execution = run.steps if options.distribution == "none" else 1
        compile_model(trained, work.optimizer, stage.label_smoothing, options.jit_compile,
                      steps_per_execution=steps_per_execution)
        logger.info("%s: the base is frozen, so the head trains on features computed once "
                    "per image", label)
    else:
        channels, budget = input_spec(work)[2], options.cache_memory_mb * 2**20
        trained = work
        train, val = (
            data.make_dataset(manifest, split, size, channels, batch, shuffle=split == "train",
                              seed=options.seed, epoch=run.order if split == "train" else None,
                              cache_bytes=budget, resize=options.resize)
            for split in ("train", "val")
        )
    if stage.label_smoothing:
        classes = len(manifests.class_names(manifest))
        train, val = (one_hot_labels(d, classes) for d in (train, val))
    return trained, train, val


def find_learning_rate(
    model: keras.Model, manifest: pd.DataFrame, stage: Stage, options: FitOptions,
    label: str = "range test",
) -> RangeTest:
    """The learning-rate range test (:func:`headswap.core.lr_find.range_test`, settings
    ``options.lr_find``) on ``model`` as ``stage`` would train it: the same layers open, the
    stage's optimizer and label smoothing, on the frozen base's cached features when the base
    does not train. One rate for every layer that trains (per-layer rates, schedules and class
    weights are left out of the test). The model's weights are the same afterwards; its
    trainable layers are the stage's and it is compiled for the test."""
    run = _Run.start(manifest, options, 0)
    set_trainable(model, stage.train, stage.train_batchnorm)
    settings = options.lr_find
    optimizer = make_optimizer(stage.optimizer, settings.min_learning_rate, stage.weight_decay,
                               stage.momentum)
    compile_model(model, optimizer, stage.label_smoothing, options.jit_compile)
    trained, train, _ = _stage_data(run, model, stage, label, steps_per_execution=1)
    keras.utils.set_random_seed(options.seed)
    reseed(trained, options.seed)
    test = range_test(trained, train, settings)
    logger.info("%s: learning-rate range test over %s steps (%.3g to %.3g); %s; %s (smoothed "
                "loss lowest at %.3g, falling fastest at %.3g)",
                label, len(test.learning_rates), settings.min_learning_rate,
                settings.max_learning_rate, test.stopped,
                f"suggested learning rate {test.suggestion:.3g}"
                if np.isfinite(test.suggestion) else "no suggestion", test.minimum, test.steepest)
    return test


def _auto_rate(model: keras.Model, stage: Stage, run: _Run, label: str, epoch: int,
               memo: Path | None) -> Stage:
    """``stage`` with the rate the range test suggests for it; with ``memo`` (a file in the
    resume folder), a rerun of an interrupted run reuses the rate found the first time."""
    key = _stage_key(run.manifest, stage, run.options, epoch, model)
    if memo is not None and memo.is_file() and json.loads(memo.read_text())["key"] == key:
        rate = json.loads(memo.read_text())["learning_rate"]
        logger.info("%s: learning_rate auto, %.3g as found before the interruption", label, rate)
        return stage.model_copy(update={"learning_rate": rate})
    target = (rebuild(model, run.options.mixed_precision, synchronized=run.strategy is not None)
              if run.strategy is not None or run.options.mixed_precision else model)
    rate = find_learning_rate(target, run.manifest, stage, run.options, label).rate(label)
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps({"key": key, "learning_rate": rate}))
    return stage.model_copy(update={"learning_rate": rate})


def _stage_key(manifest: pd.DataFrame, stage: Stage, options: FitOptions, first: int,
               model: keras.Model) -> str:
    """What a stage's result depends on, as a digest: its images and their split, its settings,
    the training options, the epoch it starts at and the model's weights at its start (so that
    a model with another head never takes a finished stage's weights)."""
    digest = hashlib.sha256(manifest[["path", "label", "split"]].to_csv(index=False).encode())
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    settings = {k: v for k, v in vars(options).items()
                if k not in ("backup_dir", "extra_callbacks", "verbose", "cache_memory_mb")}
    digest.update(repr((stage.model_dump(), settings, first)).encode())
    return digest.hexdigest()


def _can_cache(options: FitOptions, stage: Stage, model: keras.Model,
               manifest: pd.DataFrame) -> bool:
    """Features can be computed once when nothing below the head changes between epochs,
    and are, when each split's features fit in the memory budget."""
    if not (options.cache_features and stage.train is None
            and options.distribution != "multi_worker_mirrored"  # see FitOptions
            and not heads.has_augmentation(model)
            and not options.callbacks.checkpoint):  # a checkpoint is of the whole model
        return False
    width = int(np.prod(heads.split_at_head(model)[0].output.shape[1:]))
    largest = max(len(manifests.split_arrays(manifest, split)[0]) for split in ("train", "val"))
    size = largest * width * np.dtype("float32").itemsize
    if size > options.cache_memory_mb * 2**20:
        logger.info(
            "Not caching the base's features: %.1f MiB for the largest split is over the cache "
            "budget of %s MiB; streaming the images instead", size / 2**20,
            options.cache_memory_mb,
        )
        return False
    return True


def _cached_head(
    model: keras.Model, manifest: pd.DataFrame, options: FitOptions, order: tf.Variable
) -> tuple[keras.Model, tuple[tf.data.Dataset, tf.data.Dataset]]:
    """The model's head (sharing its layers) and train/val datasets of the frozen base's
    features, each image passed through the base once."""
    extractor, head = heads.split_at_head(model)
    channels = input_spec(model)[2]
    datasets = []
    for split in ("train", "val"):
        images = data.make_dataset(manifest, split, options.image_size, channels,
                                   options.batch_size, resize=options.resize)
        features = np.concatenate([out for out, _ in inference.outputs(extractor, images)])
        labels = manifests.split_arrays(manifest, split)[1]
        train = split == "train"
        datasets.append(data.array_dataset((features, labels), options.batch_size,
                                           shuffle=train, seed=options.seed,
                                           epoch=order if train else None))
    return head, (datasets[0], datasets[1])


def _checkpoint_path(options: FitOptions, label: str) -> str | None:
    if not options.callbacks.checkpoint or not is_chief():  # one writer across workers
        return None
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H.%M.%S.%fZ")
    folder = Path(options.callbacks.checkpoint_dir) / stamp
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"{label.replace(' ', '_')}_best.keras")


def merge_histories(histories: list[History]) -> History:
    """Consecutive histories (stages of one phase) as one; ``stage_starts`` marks each start."""
    merged: History = {"epoch": []}
    starts = []
    for history in histories:
        if history.get("epoch"):
            starts.append(history["epoch"][0])
        for key, values in history.items():
            if isinstance(values, list):
                merged.setdefault(key, []).extend(values)
    merged["stage_starts"] = starts
    return merged
