"""A training phase end to end: which layers train, optimizer, callbacks, stages, history.

Phase 1 trains the new head on a frozen base; phase 2 opens (part of) the base, possibly in
stages (gradual unfreezing). Every stage recompiles the model, since a change of
``trainable`` only takes effect on ``compile``, and continues the run's one epoch axis.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import keras
import pandas as pd

from headswap import bases, data, training
from headswap.config import FinetuneConfig, TrainingSettings

logger = logging.getLogger(__name__)


def stages_of(cfg: FinetuneConfig, phase: str) -> list[TrainingSettings]:
    """The stages of ``phase1`` or ``phase2``: its ``stages`` list, or the phase itself."""
    settings = getattr(cfg, phase)
    return list(settings.stages) or [settings]


def run_training_phase(
    model: keras.Model,
    manifest: pd.DataFrame,
    cfg: FinetuneConfig,
    phase: str,
    initial_epoch: int = 0,
) -> dict[str, Any]:
    """Train ``model`` through the stages of ``phase``; return the merged per-epoch history.

    The history also holds ``parameter_counts`` (of the last stage), ``stage_starts`` and
    ``trainable_layers`` per stage.
    """
    names = data.class_names(manifest)
    channels = bases.input_spec(model)[2]
    train_paths, train_labels = data.split_arrays(manifest, "train")
    steps = training.steps_per_epoch(len(train_paths), cfg.data.batch_size)
    class_weight = training.class_weights(train_labels, names, cfg.training.class_weight)
    histories, layers_per_stage, counts = [], [], {}
    epoch = initial_epoch
    for i, stage in enumerate(stages_of(cfg, phase), start=1):
        label = f"{phase} stage {i}" if getattr(cfg, phase).stages else phase
        trainable = training.set_trainable(model, stage.train, stage.train_batchnorm)
        optimizer, logged = training.build_optimizer(model, stage, steps)
        training.compile_model(model, optimizer, label_smoothing=stage.label_smoothing)
        counts = training.parameter_counts(model)
        logger.info(
            "%s: %s base layers train; %s trainable and %s non-trainable parameters; "
            "%s epochs, %s at learning rate %g (%s schedule)",
            label, len(trainable), f"{counts['trainable_params']:,}",
            f"{counts['non_trainable_params']:,}", stage.epochs, stage.optimizer,
            stage.learning_rate, stage.schedule,
        )
        keras.utils.set_random_seed(cfg.seed + epoch)
        train, val = (
            data.make_dataset(manifest, split, cfg.data.image_size, channels,
                              cfg.data.batch_size, shuffle=split == "train", seed=cfg.seed)
            for split in ("train", "val")
        )
        if stage.label_smoothing:
            train, val = (training.one_hot_labels(d, len(names)) for d in (train, val))
        callbacks = training.make_callbacks(
            cfg.training.callbacks, logged, _checkpoint_path(cfg, label)
        )
        history = training.run_phase(
            model, train, val, stage.epochs, epoch, callbacks, class_weight
        )
        histories.append(history)
        layers_per_stage.append(trainable)
        if history["epoch"]:
            epoch = history["epoch"][-1] + 1
    merged = training.merge_histories(histories)
    merged["parameter_counts"] = counts
    merged["trainable_layers"] = layers_per_stage
    return merged


def _checkpoint_path(cfg: FinetuneConfig, label: str) -> str | None:
    if not cfg.training.callbacks.checkpoint:
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H.%M.%S.%fZ")
    folder = Path(cfg.training.callbacks.checkpoint_dir) / stamp
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"{label.replace(' ', '_')}_best.keras")
