"""Kedro nodes of the ``finetune`` pipeline: each takes the data it works on and the typed part
of the parameters it needs (made once by :func:`check_parameters`), and calls the core."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from headswap import registry, serving, tracking
from headswap.config import (
    BaseConfig,
    DataConfig,
    EvaluationConfig,
    ExportConfig,
    HeadConfig,
    RegistryConfig,
    parse_finetune,
)
from headswap.core import (
    Augmentation,
    Stage,
    bases,
    data,
    evaluation,
    explain,
    fit,
    heads,
    sources,
    weights,
)
from headswap.core import export as exports
from headswap.core.bases import input_spec
from headswap.core.card import model_card
from headswap.core.errors import InputError
from headswap.core.fit import FitOptions, History, next_epoch
from headswap.core.predict import Classifier
from headswap.pipelines import metrics_points

logger = logging.getLogger(__name__)

Metrics = dict[str, dict[str, float]]


def check_parameters(params: dict[str, Any]) -> tuple[
    DataConfig, BaseConfig, HeadConfig, Augmentation, FitOptions, list[Stage], list[Stage],
    EvaluationConfig, RegistryConfig, ExportConfig,
]:
    """The ``finetune`` parameters, validated, as the typed parts the other nodes take."""
    cfg = parse_finetune(params)
    for phase, keys in cfg.ignored.items():
        logger.warning("finetune.%s.%s not used: finetune.%s.stages sets them for each stage",
                       phase, ", ".join(keys) + (" is" if len(keys) == 1 else " are"), phase)
    return (cfg.data, cfg.base, cfg.head, cfg.training.augmentation, cfg.fit_options(),
            cfg.phase1.stages_list(), cfg.phase2.stages_list(), cfg.evaluation, cfg.registry,
            cfg.export)


def ingest_images(
    images: sources.ImageSource, data_config: DataConfig, options: FitOptions
) -> tuple[pd.DataFrame, pd.DataFrame, Metrics, str]:
    """The images (a folder or CSV, local or remote) as a manifest (path, label, split), or an
    earlier run's manifest reused; the files left out (path, reason); their counts as metrics;
    and the name of what was trained on (the folder's or CSV's own name).

    Every image is decoded once here (remote images through the local cache).
    """
    if data_config.manifest:
        manifest, skipped = data.load_manifest(data_config.manifest)
    else:
        manifest, skipped = data.ingest(
            images, data_config.val_fraction, data_config.test_fraction, options.seed
        )
    counts = {"images": len(manifest), "skipped_images": len(skipped)}
    return manifest, skipped, metrics_points(counts), images.name


def load_base(
    pretrained: keras.Model, base: BaseConfig, options: FitOptions
) -> tuple[keras.Model, dict[str, Any]]:
    """The pretrained network cut below its old classifier, taking raw pixels; and the report
    of the weights loaded into it by layer name from ``weights_file`` (if any)."""
    if base.source == "keras_applications":
        model, origin = pretrained, f"keras.applications {base.name}, weights: {base.weights}"
    elif base.source == "keras_hub":
        model, origin = pretrained, f"keras-hub preset {base.path}"
    else:
        model = bases.cut_model(pretrained, base.cut_at)
        origin = f"model file {base.path}, cut at {base.cut_at}"
    bases.check_image_size(model, options.image_size)
    about = {"base": origin, "base_params": model.count_params()}
    if base.weights_file is None:
        return model, {**about, "weights_file": None}
    report = weights.load_weights_by_name(model, base.weights_file, base.allow_unsafe)
    logger.info(weights.summarise(report))
    return model, {**about, **report}


def swap_head(
    base_model: keras.Model, manifest: pd.DataFrame, head: HeadConfig, augment: Augmentation,
    options: FitOptions,
) -> keras.Model:
    """Attach a new head sized for the manifest's classes (after augmentation layers, if any)."""
    names = data.class_names(manifest)
    model = heads.attach_head(
        base_model, len(names), head.pooling, head.dense, head.dropout,
        augmentation=heads.augmentation_layers(
            augment.flip, augment.rotation, augment.zoom, augment.contrast, augment.translation,
            seed=options.seed,
        ),
        seed=options.seed,
    )
    logger.info("New head for %s classes: %s", len(names), ", ".join(names))
    return model


def train_head(
    model: keras.Model, manifest: pd.DataFrame, stages: list[Stage], options: FitOptions
) -> tuple[keras.Model, History]:
    """Phase 1: the base frozen (unless a stage opens part of it), the new head trains."""
    with tracking.epoch_metrics() as live:
        history = fit(model, manifest, stages, tracked(options, live), name="phase1")
    tracking.log_history(history)
    tracking.log_found_rates(history, "phase1")
    return model, history


def fine_tune(
    model: keras.Model,
    manifest: pd.DataFrame,
    stages: list[Stage],
    options: FitOptions,
    phase1_history: History,
) -> tuple[keras.Model, History]:
    """Phase 2: (part of) the base unfrozen, BatchNormalization kept in inference mode; its
    epochs continue phase 1's."""
    with tracking.epoch_metrics() as live:
        history = fit(model, manifest, stages, tracked(options, live),
                      next_epoch(phase1_history), "phase2")
    tracking.log_history(history)
    tracking.log_found_rates(history, "phase2")
    return model, history


def tracked(options: FitOptions, live: tracking.EpochMetrics) -> FitOptions:
    """``options`` with ``live``, which logs the epochs' metrics to the MLflow run while they
    train (see :func:`headswap.tracking.epoch_metrics`)."""
    return replace(options, extra_callbacks=[*options.extra_callbacks, live])


def evaluate_head_only(
    model: keras.Model, manifest: pd.DataFrame, options: FitOptions,
    evaluation_config: EvaluationConfig,
) -> tuple[dict[str, Any], Metrics]:
    """The phase-1 model on the test split, to show what phase 2 adds."""
    result = evaluation.evaluate(model, manifest, options.image_size, options.batch_size,
                                 top_k=evaluation_config.top_k, resize=options.resize)
    metrics = result["metrics"]
    logger.info("Phase 1 (head only): test accuracy %.4f, macro F1 %.4f",
                metrics["accuracy"], metrics["macro_f1"])
    return result["report"], metrics_points(metrics)


def predict_test(model: keras.Model, manifest: pd.DataFrame, options: FitOptions) -> pd.DataFrame:
    """The fine-tuned model's prediction for every test image (path, true and predicted class,
    confidence, each class's probability): computed once, read by the evaluation nodes."""
    return evaluation.predict_split(model, manifest, "test", options.image_size,
                                    options.batch_size, options.resize)


def evaluate(
    predictions: pd.DataFrame, manifest: pd.DataFrame, evaluation_config: EvaluationConfig
) -> tuple[dict[str, Any], str, Figure, Metrics]:
    """The fine-tuned model on the test split: report (dict and text), confusion matrix, metrics."""
    names = data.class_names(manifest)
    result = evaluation.summarise(predictions, names, evaluation_config.top_k)
    logger.info("Classification report on %s test images:\n%s", len(predictions), result["text"])
    _, y_true, probabilities = evaluation.predictions_arrays(predictions, names)
    figure = evaluation.confusion_matrix_figure(y_true, probabilities.argmax(axis=1), names)
    return result["report"], result["text"], figure, metrics_points(result["metrics"])


def evaluate_details(
    predictions: pd.DataFrame, manifest: pd.DataFrame, evaluation_config: EvaluationConfig
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, Figure]:
    """Confusion matrix (counts, row-normalised), per-class metrics, and the most confidently
    misclassified test images (table and image grid)."""
    names = data.class_names(manifest)
    paths, y_true, probabilities = evaluation.predictions_arrays(predictions, names)
    y_pred = probabilities.argmax(axis=1)
    counts, shares = evaluation.confusion_tables(y_true, y_pred, names)
    per_class = evaluation.per_class_table(evaluation.report(y_true, y_pred, names), names)
    errors = evaluation.confident_errors(paths, y_true, probabilities, names,
                                         evaluation_config.misclassified)
    return counts, shares, per_class, errors, evaluation.confident_errors_figure(errors)


def summarise_training(
    phase1_history: History, phase2_history: History
) -> tuple[Figure, dict[str, list[dict[str, float]]]]:
    """Learning curves over both phases (their per-epoch metrics reached MLflow as each epoch
    ended), and each phase's trainable and frozen parameter counts."""
    phases = [("phase 1", phase1_history), ("phase 2", phase2_history)]
    metrics: dict[str, list[dict[str, float]]] = {}
    for label, history in (("phase1", phase1_history), ("phase2", phase2_history)):
        for key, value in history.get("parameter_counts", {}).items():
            metrics[f"{label}.{key}"] = [{"step": 0, "value": float(value)}]
    return evaluation.learning_curves_figure(phases), metrics


def export_model(
    model: keras.Model, manifest: pd.DataFrame, export: ExportConfig, options: FitOptions
) -> dict[str, bytes]:
    """The fine-tuned model exported in ``finetune.export.formats`` (SavedModel, TFLite
    float32, TFLite with dynamic-range quantization), each with its ``labels.txt`` and
    ``preprocessing.json`` (image size, channels, resize mode)."""
    if not export.formats:
        logger.info("No export: finetune.export.formats is empty.")
        return {}
    with tempfile.TemporaryDirectory(prefix="headswap_export_") as tmp:
        paths = exports.export_model(model, tmp, data.class_names(manifest), export.formats,
                                     options.resize, options.image_size)
        files = {p.relative_to(tmp).as_posix(): p.read_bytes()
                 for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
        logger.info("Exported the model: %s", ", ".join(  # sizes before tmp is removed
            f"{name} ({_size(paths[name]):.3g} MB)" for name in export.formats))
    return files


def publish_model(
    model: keras.Model, manifest: pd.DataFrame, report: dict[str, Any],
    images_name: str, registry_config: RegistryConfig, options: FitOptions,
) -> dict[str, Any]:
    """Log the fine-tuned model to the MLflow run as ``model``, an MLflow model that takes
    images (paths or base64 bytes) and answers with class names, and as ``keras_model``, the
    plain Keras model; register ``model`` as a new version of ``finetune.registry.name``,
    tagged with its test results, and move the ``champion`` alias to it if it beats the
    current champion on the same test split."""
    run = mlflow.active_run()
    if run is None:
        logger.info("MLflow tracking is off for this run: the model is neither logged nor "
                    "registered.")
        return {"logged": False, "registered_model": None}
    classifier = Classifier(model, tuple(data.class_names(manifest)), options.image_size,
                            options.resize)
    name = registry_config.model_name(images_name)
    examples = sources.local_paths(data.split_arrays(manifest, "test")[0][:2])
    serving.log_keras_model(model, data.decode_all(examples, classifier.image_size,
                                                   classifier.channels, resize=options.resize))
    info = serving.log_classifier(classifier, examples[0], name)
    result: dict[str, Any] = {"logged": True, "model_uri": info.model_uri,
                              "registered_model": name}
    if name is None:
        return result
    version = str(info.registered_model_version)
    digest = registry.test_split_digest(manifest)
    accuracy = float(report["accuracy"])
    registry.tag_version(name, version, {
        "test_accuracy": f"{accuracy:.6f}",
        "test_macro_f1": f"{report['macro avg']['f1-score']:.6f}",
        "kedro_run_id": mlflow.MlflowClient().get_run(run.info.run_id).data.tags.get("run_id"),
        "mlflow_run_id": run.info.run_id,
        "manifest_digest": registry.manifest_digest(manifest),
        "test_split_digest": digest,
        "classes": ", ".join(classifier.class_names),
    })

    def score(model_uri: str) -> float | None:
        champion = serving.load_classifier(model_uri)
        if champion.class_names != classifier.class_names:
            return None
        predictions = evaluation.predict_split(champion.model, manifest, "test",
                                               champion.image_size, options.batch_size,
                                               champion.resize)
        return float((predictions["true"] == predictions["predicted"]).mean())

    return {**result, **registry.elect_champion(name, version, accuracy, digest, score)}


def describe_preprocessing(model: keras.Model, options: FitOptions) -> dict[str, Any]:
    """How the fine-tuned model reads images (image size, channels, resize mode), versioned
    beside it so that predicting with it later reads images the same way."""
    return {"image_size": list(options.image_size), "channels": input_spec(model)[2],
            "resize": options.resize}


def _size(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def write_model_card(
    manifest: pd.DataFrame, base_report: dict[str, Any], head: HeadConfig,
    phase1_stages: list[Stage], phase2_stages: list[Stage], phase1_history: History,
    phase2_history: History, report: dict[str, Any], phase1_report: dict[str, Any],
    images_name: str, registry_config: RegistryConfig, options: FitOptions,
) -> str:
    """The run's model card (Markdown): data, base and head, each phase, results with the
    weakest classes, intended use and limits."""
    name = registry_config.model_name(images_name) or images_name
    phases = {
        "Phase 1": (_with_found_rates(phase1_stages, phase1_history), phase1_history),
        "Phase 2": (_with_found_rates(phase2_stages, phase2_history), phase2_history),
    }
    return model_card(name, manifest, base_report, head.model_dump(), phases, report,
                      phase1_report, options.image_size)


def _with_found_rates(stages: list[Stage], history: History) -> list[dict[str, Any]]:
    """The stages as dicts, ``learning_rate: auto`` shown with the rate the range test found."""
    found = history.get("found_learning_rates") or [None] * len(stages)
    return [s.model_dump() | ({"learning_rate": f"auto ({rate:.3g})"} if rate else {})
            for s, rate in zip(stages, found, strict=True)]


def explain_predictions(
    model: keras.Model, predictions: pd.DataFrame, manifest: pd.DataFrame,
    evaluation_config: EvaluationConfig, options: FitOptions,
) -> Figure:
    """Grad-CAM heatmaps over the most confidently misclassified test images and the most
    confidently right ones: where the base's features drove the predicted class. A base
    without a feature map gets a figure that says why instead."""
    names = data.class_names(manifest)
    paths, y_true, probabilities = evaluation.predictions_arrays(predictions, names)
    count = min(evaluation_config.misclassified, 8)
    wrong = evaluation.confident_errors(paths, y_true, probabilities, names, count)
    y_pred = probabilities.argmax(axis=1)
    right = np.flatnonzero(y_pred == y_true)
    right = right[np.argsort(-probabilities[right, y_pred[right]], kind="stable")][:4]
    chosen = list(wrong["path"]) + [str(paths[i]) for i in right]
    if not chosen:
        return explain.message_figure("No test images to explain.")
    index = {str(p): i for i, p in enumerate(paths)}
    rows = [index[p] for p in chosen]
    titles = [f"{names[y_true[i]]} -> {names[y_pred[i]]} (p={probabilities[i, y_pred[i]]:.2f})"
              for i in rows]
    images = data.decode_all(np.asarray(chosen), options.image_size, input_spec(model)[2],
                             resize=options.resize)
    try:
        cams = explain.grad_cam(model, images, y_pred[rows])
    except InputError as err:
        logger.info("No Grad-CAM heatmaps: %s", err)
        return explain.message_figure(f"No Grad-CAM heatmaps: {err}")
    return explain.grad_cam_figure(
        images, cams, titles,
        title="Grad-CAM: where the predicted class came from (misclassified first, "
              "then right)")
