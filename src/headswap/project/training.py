"""The recipe as one call on finetune parameters, for the pipelines that train many models
(``compare``, ``label_efficiency``, ``tune``): a new head on a copy of the base, every phase
(:func:`headswap.core.fine_tune`), each epoch's metrics to the active MLflow run as it ends."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import keras
import pandas as pd

from headswap.core import evaluation, fine_tune, heads, manifests
from headswap.core.bases import image_size_for
from headswap.core.devices import rebuild
from headswap.core.fit import FitOptions, History
from headswap.project import tracking
from headswap.project.config import parse_finetune


def train_recipe(
    base_model: keras.Model, manifest: pd.DataFrame, params: dict[str, Any],
    callbacks: list[keras.callbacks.Callback] = (), from_scratch: bool = False,
) -> tuple[keras.Model, dict[str, History], FitOptions]:
    """The finetune recipe with ``params`` (finetune parameters) on a copy of the base
    (``from_scratch``: its architecture with fresh random weights, seeded): the model, each
    phase's history by name, and the options it trained with. No resume state (each training
    is short and its own); no per-epoch lines in the terminal."""
    cfg = parse_finetune(params)
    cfg = cfg.with_image_size(image_size_for(base_model, cfg.data.image_size))
    options = replace(cfg.fit_options(), backup_dir=None, verbose="quiet")
    base = rebuild(base_model)
    if from_scratch:
        keras.utils.set_random_seed(cfg.seed)
        base = keras.models.clone_model(base)
    model = heads.swap_head(base, manifests.class_names(manifest), cfg.head,
                            cfg.training.augmentation, options.seed)
    with tracking.epoch_metrics() as live:
        histories = fine_tune(model, manifest, cfg.phases(),
                              replace(options, extra_callbacks=[live, *callbacks]))
    for name, history in histories.items():
        tracking.log_found_rates(history, name)
    return model, histories, options


def split_accuracy(model: keras.Model, manifest: pd.DataFrame, options: FitOptions,
                   split: str = "val") -> float:
    """The trained model's accuracy on a split (a search scores on ``val`` and never sees the
    test split)."""
    result = evaluation.evaluate(model, manifest, options.image_size, options.batch_size,
                                 split=split, resize=options.resize)
    return float(result["metrics"]["accuracy"])
