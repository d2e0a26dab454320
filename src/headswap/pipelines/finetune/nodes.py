"""Thin Kedro nodes wiring the core library into the ``finetune`` pipeline.

Each node takes the whole ``params:finetune`` dict, validated by
:func:`headswap.config.parse_finetune`; extra positional inputs (``*upstream``) only order a
node after other pipelines' outputs when pipelines are combined (see pipeline_registry).
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import pandas as pd
from matplotlib.figure import Figure

from headswap import bases, data, evaluation, heads, training
from headswap.config import FinetuneConfig, PhaseConfig, parse_finetune

logger = logging.getLogger(__name__)


def ingest_images(params: dict[str, Any], *upstream: Any) -> pd.DataFrame:
    """Scan the image folder into a manifest (path, label, split), or reuse a given one."""
    cfg = parse_finetune(params)
    if cfg.data.manifest:
        manifest = pd.read_csv(cfg.data.manifest)
        data.check_manifest(manifest)
        return manifest
    return data.scan_image_folder(
        cfg.data.path, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed
    )


def load_base(params: dict[str, Any], *upstream: Any) -> keras.Model:
    """The pretrained base, cut below its old classifier, taking raw pixels."""
    cfg = parse_finetune(params).base
    size = parse_finetune(params).data.image_size
    if cfg.source == "keras_applications":
        base = bases.keras_application(cfg.name, size, cfg.weights)
    else:
        base = bases.cut_model(bases.load_model_file(cfg.path, cfg.allow_unsafe), cfg.cut_at)
    bases.check_image_size(base, size)
    return base


def swap_head(base: keras.Model, manifest: pd.DataFrame, params: dict[str, Any]) -> keras.Model:
    """Attach a new head sized for the manifest's classes."""
    cfg = parse_finetune(params)
    keras.utils.set_random_seed(cfg.seed)
    names = data.class_names(manifest)
    model = heads.attach_head(
        base, len(names), cfg.head.pooling, cfg.head.dense, cfg.head.dropout
    )
    logger.info("New head for %s classes: %s", len(names), ", ".join(names))
    return model


def _datasets(manifest: pd.DataFrame, model: keras.Model, cfg: FinetuneConfig):
    channels = bases.input_spec(model)[2]
    make = lambda split, shuffle: data.make_dataset(  # noqa: E731
        manifest, split, cfg.data.image_size, channels, cfg.data.batch_size, shuffle, cfg.seed
    )
    return make("train", True), make("val", False)


def _train(
    model: keras.Model,
    manifest: pd.DataFrame,
    cfg: FinetuneConfig,
    phase: PhaseConfig,
    name: str,
    initial_epoch: int,
) -> tuple[keras.Model, dict[str, Any]]:
    training.compile_model(model, phase.optimizer, phase.learning_rate)
    counts = training.parameter_counts(model)
    logger.info(
        "%s: %s trainable and %s non-trainable parameters; %s epochs at learning rate %g",
        name, f"{counts['trainable_params']:,}", f"{counts['non_trainable_params']:,}",
        phase.epochs, phase.learning_rate,
    )
    keras.utils.set_random_seed(cfg.seed + initial_epoch)
    train, val = _datasets(manifest, model, cfg)
    history = training.run_phase(model, train, val, phase.epochs, initial_epoch)
    history["parameter_counts"] = counts
    return model, history


def train_head(
    model: keras.Model, manifest: pd.DataFrame, params: dict[str, Any]
) -> tuple[keras.Model, dict[str, Any]]:
    """Phase 1: the base frozen, only the new head trains."""
    cfg = parse_finetune(params)
    training.set_base_trainable(model, False)
    return _train(model, manifest, cfg, cfg.phase1, "phase 1 (head only)", 0)


def fine_tune(
    model: keras.Model,
    manifest: pd.DataFrame,
    params: dict[str, Any],
    phase1_history: dict[str, Any],
) -> tuple[keras.Model, dict[str, Any]]:
    """Phase 2: the base unfrozen (BatchNormalization kept in inference mode), lower rate."""
    cfg = parse_finetune(params)
    training.set_base_trainable(model, True, cfg.phase2.train_batchnorm)
    start = (phase1_history["epoch"][-1] + 1) if phase1_history.get("epoch") else 0
    return _train(model, manifest, cfg, cfg.phase2, "phase 2 (fine-tuning)", start)


def _predict_test(model: keras.Model, manifest: pd.DataFrame, params: dict[str, Any]):
    cfg = parse_finetune(params)
    test = data.make_dataset(
        manifest, "test", cfg.data.image_size, bases.input_spec(model)[2], cfg.data.batch_size
    )
    y_true, probabilities = evaluation.predict(model, test)
    return y_true, probabilities.argmax(axis=1), data.class_names(manifest)


def evaluate(
    model: keras.Model, manifest: pd.DataFrame, params: dict[str, Any]
) -> tuple[dict[str, Any], str, Figure, dict[str, dict[str, float]]]:
    """The fine-tuned model on the test split: report (dict and text), confusion matrix, metrics."""
    y_true, y_pred, names = _predict_test(model, manifest, params)
    text = evaluation.report_text(y_true, y_pred, names)
    logger.info("Classification report on %s test images:\n%s", len(y_true), text)
    report = evaluation.report(y_true, y_pred, names)
    metrics = evaluation.test_metrics(report, names)
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
    y_true, y_pred, names = _predict_test(model, manifest, params)
    report = evaluation.report(y_true, y_pred, names)
    metrics = evaluation.test_metrics(report, names)
    logger.info(
        "Phase 1 (head only): test accuracy %.4f, macro F1 %.4f",
        metrics["accuracy"], metrics["macro_f1"],
    )
    return report, {k: {"value": v, "step": 0} for k, v in metrics.items()}


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
