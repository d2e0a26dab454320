"""Thin Kedro nodes wiring the core library into the ``finetune`` pipeline.

Each node takes the whole ``params:finetune`` dict, validated by
:func:`headswap.config.parse_finetune`; extra positional inputs (``*upstream``) only order a
node after other pipelines' outputs when pipelines are combined (see pipeline_registry).
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from headswap import bases, data, evaluation, heads, phases, training, weights
from headswap.config import parse_finetune

logger = logging.getLogger(__name__)


def ingest_images(
    params: dict[str, Any], *upstream: Any
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, dict[str, float]]]:
    """Scan the image folder into a manifest (path, label, split), or reuse a given one.

    Every image is decoded once here; files that cannot be are left out and returned as the
    skipped table (path, reason), with ``images`` and ``skipped_images`` counts as metrics.
    """
    cfg = parse_finetune(params)
    if cfg.data.manifest:
        manifest, skipped = data.load_manifest(cfg.data.manifest)
    else:
        manifest, skipped = data.ingest_image_folder(
            cfg.data.path, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed
        )
    counts = {"images": len(manifest), "skipped_images": len(skipped)}
    return manifest, skipped, {k: {"value": float(v), "step": 0} for k, v in counts.items()}


def load_base(params: dict[str, Any], *upstream: Any) -> tuple[keras.Model, dict[str, Any]]:
    """The pretrained base, cut below its old classifier, taking raw pixels; and the report of
    the weights loaded into it by layer name from ``finetune.base.weights_file`` (if any)."""
    full = parse_finetune(params)
    cfg, size = full.base, full.data.image_size
    if cfg.source == "keras_applications":
        base = bases.keras_application(cfg.name, size, cfg.weights)
        origin = f"keras.applications {cfg.name}, weights: {cfg.weights}"
    else:
        base = bases.cut_model(bases.load_model_file(cfg.path, cfg.allow_unsafe), cfg.cut_at)
        origin = f"model file {cfg.path}, cut at {cfg.cut_at}"
    bases.check_image_size(base, size)
    about = {"base": origin, "base_params": base.count_params()}
    if cfg.weights_file is None:
        return base, {**about, "weights_file": None}
    report = weights.load_weights_by_name(base, cfg.weights_file, cfg.allow_unsafe)
    logger.info(weights.summarise(report))
    return base, {**about, **report}


def swap_head(base: keras.Model, manifest: pd.DataFrame, params: dict[str, Any]) -> keras.Model:
    """Attach a new head sized for the manifest's classes."""
    cfg = parse_finetune(params)
    keras.utils.set_random_seed(cfg.seed)
    names = data.class_names(manifest)
    augment = cfg.training.augmentation
    model = heads.attach_head(
        base, len(names), cfg.head.pooling, cfg.head.dense, cfg.head.dropout,
        augmentation=heads.augmentation_layers(
            augment.flip, augment.rotation, augment.zoom, augment.contrast, augment.translation,
            seed=cfg.seed,
        ),
    )
    logger.info("New head for %s classes: %s", len(names), ", ".join(names))
    return model


def train_head(
    model: keras.Model, manifest: pd.DataFrame, params: dict[str, Any]
) -> tuple[keras.Model, dict[str, Any]]:
    """Phase 1: the base frozen (unless phase1.train opens part of it), the new head trains."""
    cfg = parse_finetune(params)
    return model, phases.run_training_phase(model, manifest, cfg, "phase1")


def fine_tune(
    model: keras.Model,
    manifest: pd.DataFrame,
    params: dict[str, Any],
    phase1_history: dict[str, Any],
) -> tuple[keras.Model, dict[str, Any]]:
    """Phase 2: (part of) the base unfrozen, BatchNormalization kept in inference mode."""
    cfg = parse_finetune(params)
    start = (phase1_history["epoch"][-1] + 1) if phase1_history.get("epoch") else 0
    return model, phases.run_training_phase(model, manifest, cfg, "phase2", start)


def _predict_test(model: keras.Model, manifest: pd.DataFrame, params: dict[str, Any]):
    """Image paths, true labels and predicted probabilities over the test split."""
    cfg = parse_finetune(params)
    test = data.make_dataset(
        manifest, "test", cfg.data.image_size, bases.input_spec(model)[2], cfg.data.batch_size
    )
    y_true, probabilities = evaluation.predict(model, test)
    return data.split_arrays(manifest, "test")[0], y_true, probabilities


def _test_report(
    y_true: np.ndarray, probabilities: np.ndarray, names: list[str], params: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, float]]:
    """The report of test predictions and its headline metrics with the top-k accuracy."""
    report = evaluation.report(y_true, probabilities.argmax(axis=1), names)
    metrics = evaluation.test_metrics(report, names)
    k, top_k = evaluation.top_k_accuracy(
        y_true, probabilities, parse_finetune(params).evaluation.top_k
    )
    metrics[f"top_{k}_accuracy"] = top_k
    return report, metrics


def predict_test(
    model: keras.Model, manifest: pd.DataFrame, params: dict[str, Any]
) -> pd.DataFrame:
    """The fine-tuned model's prediction for every test image (path, true and predicted class,
    confidence, each class's probability): computed once, read by the evaluation nodes."""
    paths, y_true, probabilities = _predict_test(model, manifest, params)
    return evaluation.predictions_table(paths, y_true, probabilities, data.class_names(manifest))


def evaluate(
    predictions: pd.DataFrame, manifest: pd.DataFrame, params: dict[str, Any]
) -> tuple[dict[str, Any], str, Figure, dict[str, dict[str, float]]]:
    """The fine-tuned model on the test split: report (dict and text), confusion matrix, metrics."""
    names = data.class_names(manifest)
    _, y_true, probabilities = evaluation.predictions_arrays(predictions, names)
    report, metrics = _test_report(y_true, probabilities, names, params)
    y_pred = probabilities.argmax(axis=1)
    text = evaluation.report_text(y_true, y_pred, names)
    logger.info("Classification report on %s test images:\n%s", len(y_true), text)
    return (
        report,
        text,
        evaluation.confusion_matrix_figure(y_true, y_pred, names),
        {k: {"value": v, "step": 0} for k, v in metrics.items()},
    )


def evaluate_head_only(
    model: keras.Model, manifest: pd.DataFrame, params: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """The phase-1 model on the test split, to show what phase 2 adds."""
    _, y_true, probabilities = _predict_test(model, manifest, params)
    report, metrics = _test_report(y_true, probabilities, data.class_names(manifest), params)
    logger.info(
        "Phase 1 (head only): test accuracy %.4f, macro F1 %.4f",
        metrics["accuracy"], metrics["macro_f1"],
    )
    return report, {k: {"value": v, "step": 0} for k, v in metrics.items()}


def evaluate_details(
    predictions: pd.DataFrame, manifest: pd.DataFrame, params: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, Figure]:
    """Confusion matrix (counts, row-normalised), per-class metrics, and the most confidently
    misclassified test images (table and image grid)."""
    names = data.class_names(manifest)
    paths, y_true, probabilities = evaluation.predictions_arrays(predictions, names)
    y_pred = probabilities.argmax(axis=1)
    counts, shares = evaluation.confusion_tables(y_true, y_pred, names)
    per_class = evaluation.per_class_table(evaluation.report(y_true, y_pred, names), names)
    errors = evaluation.confident_errors(
        paths, y_true, probabilities, names, parse_finetune(params).evaluation.misclassified
    )
    return counts, shares, per_class, errors, evaluation.confident_errors_figure(errors)


def summarise_training(
    phase1_history: dict[str, Any], phase2_history: dict[str, Any]
) -> tuple[Figure, dict[str, list[dict[str, float]]]]:
    """Learning curves over both phases and the per-epoch metrics on one step axis."""
    phases = [("phase 1", phase1_history), ("phase 2", phase2_history)]
    metrics = training.history_metrics([h for _, h in phases])
    for label, history in (("phase1", phase1_history), ("phase2", phase2_history)):
        for key, value in history.get("parameter_counts", {}).items():
            metrics[f"{label}.{key}"] = [{"step": 0, "value": float(value)}]
    return evaluation.learning_curves_figure(phases), metrics


def package_model(model: keras.Model) -> keras.Model:
    """The fine-tuned model, handed to MLflow as a model taking raw pixels."""
    return model
