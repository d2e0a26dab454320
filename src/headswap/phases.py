"""A training phase end to end: which layers train, optimizer, callbacks, stages, history.

Phase 1 trains the new head on a frozen base; phase 2 opens (part of) the base, possibly in
stages (gradual unfreezing). Every stage recompiles the model, since a change of
``trainable`` only takes effect on ``compile``, and continues the run's one epoch axis.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from headswap import bases, data, heads, training
from headswap.config import FinetuneConfig, TrainingSettings

logger = logging.getLogger(__name__)


def stages_of(cfg: FinetuneConfig, phase: str) -> list[TrainingSettings]:
    """The stages of ``phase1`` or ``phase2``: its ``stages`` list, or the phase itself."""
    settings = getattr(cfg, phase)
    return list(settings.stages) or [settings]


def state_dir(cfg: FinetuneConfig) -> Path:
    """Where a run with these parameters keeps what it needs to resume after an interruption."""
    # what changes no result (resuming, the memory budget) leaves the key as it is
    key = hashlib.sha256(
        cfg.model_dump_json(
            exclude={"training": {"resume"}, "data": {"cache_memory_mb"}}
        ).encode()
    ).hexdigest()[:16]
    return Path(cfg.training.resume_dir) / key


def run_training_phase(
    model: keras.Model,
    manifest: pd.DataFrame,
    cfg: FinetuneConfig,
    phase: str,
    initial_epoch: int = 0,
) -> dict[str, Any]:
    """Train ``model`` through the stages of ``phase``; return the merged per-epoch history.

    The history also holds ``parameter_counts`` (of the last stage), ``stage_starts`` and
    ``trainable_layers`` per stage. Each epoch leaves a backup (weights, optimizer state,
    epoch) and a log line under :func:`state_dir`; with ``training.resume`` a stage that
    finished is reused and an interrupted one continues from its last completed epoch, with
    the same data order, so the result matches an uninterrupted run.
    """
    steps = training.steps_per_epoch(
        len(data.split_arrays(manifest, "train")[0]), cfg.data.batch_size
    )
    histories, layers_per_stage, counts = [], [], {}
    epoch = initial_epoch
    strategy = training.distribution_strategy(cfg.distribution)
    with training.strategy_scope(strategy):
        rebuilt = strategy is not None or cfg.mixed_precision
        for i, stage in enumerate(stages_of(cfg, phase), start=1):
            label = f"{phase} stage {i}" if getattr(cfg, phase).stages else phase
            folder = state_dir(cfg) / phase / f"stage{i}"
            if not cfg.training.resume:
                shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
            trainable = training.set_trainable(model, stage.train, stage.train_batchnorm)
            # Under a strategy (or in mixed precision) variables must be made in its scope:
            # each stage trains a rebuilt copy and hands its weights back to ``model``.
            work = (training.rebuild(model, cfg.mixed_precision, synchronized=strategy is not None)
                    if rebuilt else model)
            optimizer, logged = training.build_optimizer(work, stage, steps)
            training.compile_model(work, optimizer, label_smoothing=stage.label_smoothing,
                                   jit_compile=cfg.jit_compile)
            counts = training.parameter_counts(work)
            logger.info(
                "%s: %s base layers train; %s trainable and %s non-trainable parameters; "
                "%s epochs, %s at learning rate %g (%s schedule)",
                label, len(trainable), f"{counts['trainable_params']:,}",
                f"{counts['non_trainable_params']:,}", stage.epochs, stage.optimizer,
                stage.learning_rate, stage.schedule,
            )
            keras.utils.set_random_seed(cfg.seed + epoch)
            training.reseed(work, cfg.seed + epoch)
            done, epoch_log = folder / "done.weights.h5", str(folder / "epochs.jsonl")
            if done.exists():
                work.optimizer.build(work.trainable_variables)
                work.load_weights(done)
                logger.info("%s finished before the interruption; reusing its weights", label)
            else:
                _train_stage(work, manifest, cfg, stage, label, optimizer, logged, folder,
                             epoch)
                work.save_weights(done)
            if work is not model:
                model.set_weights(work.get_weights())
            history = training.read_epoch_log(epoch_log)
            histories.append(history)
            layers_per_stage.append(trainable)
            if history["epoch"]:
                epoch = history["epoch"][-1] + 1
    merged = training.merge_histories(histories)
    merged["parameter_counts"] = counts
    merged["trainable_layers"] = layers_per_stage
    return merged


def _train_stage(
    work: keras.Model,
    manifest: pd.DataFrame,
    cfg: FinetuneConfig,
    stage: TrainingSettings,
    label: str,
    optimizer: keras.optimizers.Optimizer,
    logged: dict[str, keras.optimizers.Optimizer],
    folder: Path,
    epoch: int,
) -> None:
    """Fit one stage from ``epoch``, on cached features when the base is frozen, with a
    backup and a log line after every epoch (under ``folder``).

    The training data holds the batches of every epoch still to run, each epoch in its
    ``(seed, epoch)`` order, and is iterated once across the whole fit (no new iterator, and
    no idle input pipeline, at each epoch's start); a resumed stage starts it at the epoch
    after its last backup.
    """
    names = data.class_names(manifest)
    backup = training.EpochBackup(folder / "backup")
    found = backup.latest()
    first = max(epoch, found[0]) if found else epoch
    epochs = (first, max(epoch + stage.epochs - first, 0))
    budget = cfg.data.cache_memory_mb * 2**20
    steps = training.steps_per_epoch(len(data.split_arrays(manifest, "train")[0]),
                                     cfg.data.batch_size)
    if _can_cache(cfg, stage, work, manifest):
        trained, (train, val) = _cached_head(work, manifest, cfg, epochs)
        # A step of the head alone takes microseconds: one call runs a whole epoch's steps
        # (on one device; Keras' multi-step loop fails under a tf.distribute strategy).
        training.compile_model(
            trained, optimizer, label_smoothing=stage.label_smoothing,
            jit_compile=cfg.jit_compile,
            steps_per_execution=steps if cfg.distribution == "none" else 1,
        )
        logger.info("%s: the base is frozen, so the head trains on features computed once "
                    "per image", label)
    else:
        channels = bases.input_spec(work)[2]
        trained, (train, val) = work, (
            data.make_dataset(manifest, split, cfg.data.image_size, channels,
                              cfg.data.batch_size, shuffle=split == "train", seed=cfg.seed,
                              epochs=epochs if split == "train" else None, cache_bytes=budget)
            for split in ("train", "val")
        )
    if stage.label_smoothing:
        train, val = (training.one_hot_labels(d, len(names)) for d in (train, val))
    callbacks = training.make_callbacks(
        cfg.training.callbacks, logged, _checkpoint_path(cfg, label)
    ) + [
        training.EpochLog(str(folder / "epochs.jsonl")),
        backup,
    ]
    class_weight = training.class_weights(
        data.split_arrays(manifest, "train")[1], names, cfg.training.class_weight
    )
    training.run_phase(trained, train, val, stage.epochs, epoch, callbacks, class_weight,
                       steps_per_epoch=steps)


def _can_cache(
    cfg: FinetuneConfig, stage: TrainingSettings, model: keras.Model, manifest: pd.DataFrame
) -> bool:
    """Features can be computed once when nothing below the head changes between epochs,
    and are, when each split's features fit in the memory budget (``data.cache_memory_mb``)."""
    settings = cfg.training
    if not (
        settings.cache_features
        and stage.train is None
        and not settings.augmentation.active
        and not settings.callbacks.checkpoint  # a checkpoint is of the whole model
    ):
        return False
    width = int(np.prod(heads.split_at_head(model)[0].output.shape[1:]))
    largest = max(len(data.split_arrays(manifest, split)[0]) for split in ("train", "val"))
    size = largest * width * np.dtype("float32").itemsize
    if size > cfg.data.cache_memory_mb * 2**20:
        logger.info(
            "Not caching the base's features: %.1f MiB for the largest split is over the cache "
            "budget of %s MiB (finetune.data.cache_memory_mb); streaming the images instead",
            size / 2**20, cfg.data.cache_memory_mb,
        )
        return False
    return True


def _cached_head(
    model: keras.Model, manifest: pd.DataFrame, cfg: FinetuneConfig, epochs: tuple[int, int]
) -> tuple[keras.Model, tuple[tf.data.Dataset, tf.data.Dataset]]:
    """The model's head (sharing its layers) and train/val datasets of the frozen base's
    features for ``epochs`` (first, count), each image passed through the base once."""
    extractor, head = heads.split_at_head(model)
    channels, size = bases.input_spec(model)[2], cfg.data.image_size
    datasets = []
    for split in ("train", "val"):
        images = data.make_dataset(manifest, split, size, channels, cfg.data.batch_size)
        features = extractor.predict(images, verbose=0)
        labels = data.split_arrays(manifest, split)[1]
        train = split == "train"
        datasets.append(data.array_dataset(
            (features, labels), cfg.data.batch_size, shuffle=train, seed=cfg.seed,
            epochs=epochs if train else None,
        ))
    return head, (datasets[0], datasets[1])


def _checkpoint_path(cfg: FinetuneConfig, label: str) -> str | None:
    if not cfg.training.callbacks.checkpoint:
        return None
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H.%M.%S.%fZ")
    folder = Path(cfg.training.callbacks.checkpoint_dir) / stamp
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"{label.replace(' ', '_')}_best.keras")
