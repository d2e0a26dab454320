"""Thin Kedro nodes of the ``tune`` pipeline (the search itself is
:mod:`headswap.project.tuning`)."""

from __future__ import annotations

import logging
from typing import Any

import keras
import pandas as pd

from headswap.core import evaluation
from headswap.pipelines import metrics_points
from headswap.project import training, tuning
from headswap.project.config import merge_parameters, parse_finetune, parse_tune

logger = logging.getLogger(__name__)


def search_recipe(
    base_model: keras.Model, manifest: pd.DataFrame, finetune: dict[str, Any],
    tune: dict[str, Any],
) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Any], dict[str, dict[str, float]]]:
    """Trials of the study ``tune.study`` until it has ``tune.n_trials`` (or ``tune.timeout_s``
    passed), each the recipe with the trial's settings, scored by validation accuracy, in an
    MLflow run nested under this one. Returns every trial of the study (this process's and
    others'), the best settings as a parameters file (twice: saved, and in memory for
    :func:`evaluate_best`), and the counts as metrics."""
    cfg = parse_tune(tune)

    def train(params: dict[str, Any], callbacks: list[keras.callbacks.Callback]) -> float:
        # the epochs' metrics reach MLflow also when the pruning callback stops the trial
        model, _, options = training.train_recipe(base_model, manifest, params, callbacks)
        return training.split_accuracy(model, manifest, options, "val")

    study = tuning.search(cfg, finetune, train)
    table = tuning.trials_table(study)
    # one read of the best trial: another process may finish a better one meanwhile
    best, best_value = tuning.best_parameters(study, finetune)
    states = table["state"].value_counts()
    logger.info("Study %s: %s trials (%s complete, %s pruned); best validation accuracy %.4f",
                cfg.study, len(table), states.get("COMPLETE", 0), states.get("PRUNED", 0),
                best_value)
    metrics = {"trials": len(table), "complete": states.get("COMPLETE", 0),
               "pruned": states.get("PRUNED", 0), "best_trial.val_accuracy": best_value}
    return table, best, best, metrics_points(metrics)


def evaluate_best(
    base_model: keras.Model, manifest: pd.DataFrame, finetune: dict[str, Any],
    best_parameters: dict[str, Any],
) -> tuple[dict[str, Any], str, dict[str, dict[str, float]]]:
    """The best settings trained again (the same seed: the same model as their trial) and
    evaluated once on the test split: the report (dict and text) and metrics."""
    params = merge_parameters(finetune, best_parameters["finetune"])
    model, _, options = training.train_recipe(base_model, manifest, params)
    top_k = parse_finetune(params).evaluation.top_k
    result = evaluation.evaluate(model, manifest, options.image_size, options.batch_size,
                                 top_k=top_k, resize=options.resize)
    val = training.split_accuracy(model, manifest, options, "val")
    logger.info("Best settings, trained again: validation accuracy %.4f, test accuracy %.4f\n%s",
                val, result["metrics"]["accuracy"], result["text"])
    metrics = {"val_accuracy": val, **{f"test.{k}": v for k, v in result["metrics"].items()}}
    return result["report"], result["text"], metrics_points(metrics)
