"""Kedro nodes of the ``finetune`` pipeline: each takes the data it works on and the typed part
of the parameters it needs (made once by :func:`check_parameters`), and calls the core."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from headswap.core import (
    Stage,
    bases,
    data,
    evaluation,
    explain,
    export_check,
    heads,
    manifests,
    ood,
    quality,
    sources,
    weights,
)
from headswap.core import export as exports
from headswap.core.bases import input_spec
from headswap.core.card import model_card
from headswap.core.errors import InputError
from headswap.core.fit import History, next_epoch
from headswap.core.predict import Classifier
from headswap.pipelines import metrics_points
from headswap.project import registry, serving, tracking
from headswap.project.config import FinetuneConfig, parse_finetune

logger = logging.getLogger(__name__)

Metrics = dict[str, dict[str, float]]


def check_parameters(params: dict[str, Any]) -> FinetuneConfig:
    """The ``finetune`` parameters, validated once, as the typed object the other nodes take
    (``data.image_size`` as given: :func:`load_base` resolves it from the base)."""
    cfg = parse_finetune(params)
    for phase, keys in cfg.ignored.items():
        logger.warning("finetune.%s.%s not used: finetune.%s.stages sets them for each stage",
                       phase, ", ".join(keys) + (" is" if len(keys) == 1 else " are"), phase)
    return cfg


def ingest_images(
    images: sources.ImageSource, config: FinetuneConfig
) -> tuple[pd.DataFrame, pd.DataFrame, Metrics, str]:
    """The images (a folder or CSV, local or remote) as a manifest (path, label, split), or the
    earlier run's manifest ``finetune.data.manifest`` names; the files left out (path,
    reason); their counts as metrics; and the name of what was trained on (the folder's or
    CSV's own name).

    Every image is decoded once here (remote images through the local cache; files found
    decodable by an earlier run, unchanged since, not again).
    """
    manifest, skipped = manifests.ingest(
        images, config.data.val_fraction, config.data.test_fraction, config.seed
    )
    counts = {"images": len(manifest), "skipped_images": len(skipped)}
    return manifest, skipped, metrics_points(counts), images.name


def load_base(
    pretrained: keras.Model, config: FinetuneConfig
) -> tuple[keras.Model, dict[str, Any], FinetuneConfig]:
    """The pretrained network cut below its old classifier, taking raw pixels; the report of
    the weights loaded into it by layer name from ``weights_file`` (if any); and the
    parameters with ``data.image_size`` resolved (unset: the pretrained base's own input
    size), which every later node takes."""
    config = config.with_image_size(bases.image_size_for(pretrained, config.data.image_size))
    base = config.base
    if base.source == "keras_applications":
        model, origin = pretrained, f"keras.applications {base.name}, weights: {base.weights}"
    elif base.source == "keras_hub":
        model, origin = pretrained, f"keras-hub preset {base.path}"
    else:
        model = bases.cut_model(pretrained, base.cut_at)
        origin = f"model file {base.path}, cut at {base.cut_at}"
    bases.check_image_size(model, config.data.image_size)
    about = {"base": origin, "base_params": model.count_params()}
    if base.weights_file is None:
        return model, {**about, "weights_file": None}, config
    report = weights.load_weights_by_name(model, base.weights_file, base.allow_unsafe)
    logger.info(weights.summarise(report))
    return model, {**about, **report}, config


def check_data_quality(
    manifest: pd.DataFrame, skipped: pd.DataFrame, base_model: keras.Model,
    config: FinetuneConfig,
) -> tuple[dict[str, Any], pd.DataFrame, Figure, Metrics]:
    """The data-quality check before training (``finetune.data.quality``): exact and near
    duplicates (within a class, with conflicting labels, across splits: leakage), images whose
    label the base's frozen features dispute (out-of-fold predictions, confident learning),
    class balance and the unreadable files. Returns the report (counts, ``problems``,
    ``warnings``, the class weights ``class_weight: auto`` uses), the findings (not the whole
    folder), a figure, and the counts as metrics."""
    started = time.perf_counter()
    duplicates = pd.DataFrame(columns=quality.DUPLICATE_COLUMNS)
    issues = pd.DataFrame(columns=quality.LABEL_ISSUE_COLUMNS)
    if config.data.quality != "off":
        local = dict(zip(manifest["path"], sources.local_paths(manifest["path"].tolist()),
                         strict=True))  # remote images: their cached copies, fetched by ingest
        duplicates = quality.find_duplicates(manifest, read=lambda p: Path(local[p]).read_bytes())
        try:
            issues = quality.find_label_issues(
                manifest, _features(base_model, manifest, config), config.seed)
        except InputError as err:  # too few images per class to cross-validate
            logger.info("No label-issue check: %s", err)
    balance = quality.class_balance(manifest)
    report = quality.quality_report(manifest, skipped, duplicates, issues, balance)
    table = quality.findings_table(skipped, duplicates, issues)
    for line in report["problems"] + report["warnings"]:
        logger.warning("Data quality: %s", line)
    logger.info("Data-quality check of %s images in %.1f s: %s problem(s), %s warning(s); "
                "findings in data_quality_findings", len(manifest),
                time.perf_counter() - started, len(report["problems"]),
                len(report["warnings"]))
    counts = {"duplicate_pairs": report["duplicate_pairs"],
              "leakage_pairs": report["leakage_pairs"],
              "conflicting_label_pairs": report["conflicting_label_pairs"],
              "label_issues": report["label_issues"]}
    return report, table, quality.quality_figure(balance[0], report), metrics_points(counts)


def _features(base: keras.Model, manifest: pd.DataFrame, config: FinetuneConfig) -> np.ndarray:
    """The base's pooled features of every image, in the manifest's order."""
    channels = input_spec(base)[2]
    features = None
    for split in sources.SPLITS:
        rows = np.flatnonzero(manifest["split"].to_numpy() == split)
        if not len(rows):
            continue
        batches = data.make_dataset(manifest, split, config.data.image_size, channels,
                                    config.data.batch_size, resize=config.data.resize)
        split_features, _ = evaluation.pooled_features(base, batches, config.head.pooling)
        if features is None:
            features = np.zeros((len(manifest), split_features.shape[1]), "float32")
        features[rows] = split_features
    return features


def swap_head(
    base_model: keras.Model, manifest: pd.DataFrame, config: FinetuneConfig
) -> keras.Model:
    """Attach a new head sized for the manifest's classes (after augmentation layers, if any)."""
    return heads.swap_head(base_model, manifests.class_names(manifest), config.head,
                           config.training.augmentation, config.seed)


def train_phase(
    model: keras.Model, manifest: pd.DataFrame, config: FinetuneConfig,
    data_quality: dict[str, Any], *before: History, phase: str,
) -> tuple[keras.Model, History]:
    """One named phase of the recipe (``config.phases()[phase]``: phase 1, the new head with
    the base frozen unless a stage opens part of it; phase 2, part or all of the base opened,
    BatchNormalization kept in inference mode), trained by :func:`headswap.core.fine_tune`,
    its epochs continuing the phase ``before`` it. Each epoch's metrics reach the MLflow run
    as it ends. Every phase is a node of its own, so the phases before a failure keep their
    saved model and history.

    With ``data.quality: stop``, a data-quality report with problems (leakage across splits,
    conflicting labels) stops the run before any training, its report already saved; with
    ``training.class_weight: auto`` the report's recommended weights are used."""
    if config.data.quality == "stop" and data_quality["problems"]:
        raise InputError(
            "The data-quality check found " + " ".join(data_quality["problems"])
            + " See data/08_reporting/data_quality_findings.csv, fix the images, or set "
            "`quality`: warn to train anyway."
        )
    options = config.fit_options()
    if config.training.class_weight == "auto":
        options = replace(options, class_weight=data_quality["class_weight_auto"])
    history = tracking.fit_phase(model, manifest, config.phases()[phase], options, phase,
                                 next_epoch(before[-1]) if before else 0)
    return model, history


def evaluate_head_only(
    model: keras.Model, manifest: pd.DataFrame, config: FinetuneConfig
) -> tuple[dict[str, Any], Metrics]:
    """The phase-1 model on the test split, to show what phase 2 adds."""
    result = evaluation.evaluate(model, manifest, config.data.image_size, config.data.batch_size,
                                 top_k=config.evaluation.top_k, resize=config.data.resize)
    metrics = result["metrics"]
    logger.info("Phase 1 (head only): test accuracy %.4f, macro F1 %.4f",
                metrics["accuracy"], metrics["macro_f1"])
    return result["report"], metrics_points(metrics)


def evaluate(
    predictions: pd.DataFrame, manifest: pd.DataFrame, config: FinetuneConfig
) -> tuple[dict[str, Any], str, Figure, Metrics]:
    """The fine-tuned model on the test split: report (dict and text), confusion matrix, metrics."""
    names = manifests.class_names(manifest)
    result = evaluation.summarise(predictions, names, config.evaluation.top_k)
    logger.info("Classification report on %s test images:\n%s", len(predictions), result["text"])
    _, y_true, probabilities = evaluation.predictions_arrays(predictions, names)
    figure = evaluation.confusion_matrix_figure(y_true, probabilities.argmax(axis=1), names)
    return result["report"], result["text"], figure, metrics_points(result["metrics"])


def evaluate_details(
    predictions: pd.DataFrame, manifest: pd.DataFrame, config: FinetuneConfig
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, Figure]:
    """Confusion matrix (counts, row-normalised), per-class metrics, and the most confidently
    misclassified test images (table and image grid)."""
    names = manifests.class_names(manifest)
    paths, y_true, probabilities = evaluation.predictions_arrays(predictions, names)
    y_pred = probabilities.argmax(axis=1)
    counts, shares = evaluation.confusion_tables(y_true, y_pred, names)
    per_class = evaluation.per_class_table(evaluation.report(y_true, y_pred, names), names)
    errors = evaluation.confident_errors(paths, y_true, probabilities, names,
                                         config.evaluation.misclassified)
    return counts, shares, per_class, errors, evaluation.confident_errors_figure(errors)


def summarise_training(*histories: History) -> tuple[Figure, dict[str, list[dict[str, float]]]]:
    """Learning curves over the phases, in order (their per-epoch metrics reached MLflow as
    each epoch ended), and each phase's trainable and frozen parameter counts."""
    phases = [(f"phase {i}", history) for i, history in enumerate(histories, start=1)]
    metrics: dict[str, list[dict[str, float]]] = {}
    for label, history in ((f"phase{i}", h) for i, h in enumerate(histories, start=1)):
        for key, value in history.get("parameter_counts", {}).items():
            metrics[f"{label}.{key}"] = [{"step": 0, "value": float(value)}]
    return evaluation.learning_curves_figure(phases), metrics


def export_model(
    model: keras.Model, manifest: pd.DataFrame, config: FinetuneConfig,
    test_predictions: pd.DataFrame | None = None,
) -> tuple[dict[str, bytes], pd.DataFrame, Metrics]:
    """The fine-tuned model exported in ``finetune.export.formats`` (SavedModel, TFLite
    float32, dynamic-range and full-integer int8, ONNX), each with its ``labels.txt`` and
    ``preprocessing.json`` (image size, channels, resize mode); each export scored against the
    model on ``export.check_images`` test images at most (accuracy, top-1 agreement, largest
    probability difference, size, latency, the seconds its export and check took; the model's
    own probabilities read from ``test_predictions``), as a table and as metrics
    ``export.<format>.<figure>``. An export outside its tolerance, or that
    could not be written or run, is logged as a warning (the other formats are written)."""
    export, size, resize = config.export, config.data.image_size, config.data.resize
    if not export.formats:
        logger.info("No export: finetune.export.formats is empty.")
        return {}, pd.DataFrame(columns=export_check.COLUMNS), {}
    representative = None
    if "tflite_int8" in export.formats:
        representative = export_check.representative_images(
            manifest, size, input_spec(model)[2], export.representative_images, resize,
            config.seed)
    timings: dict[str, float] = {}
    failures: dict[str, str] = {}
    # each export is checked as soon as it is written, while the next are converted
    checks = export_check.split_checks(model, manifest, size, export.check_images,
                                       config.data.batch_size, resize, config.seed,
                                       predictions=test_predictions)
    with tempfile.TemporaryDirectory(prefix="headswap_export_") as tmp:
        exports.export_model(model, tmp, manifests.class_names(manifest), export.formats,
                             resize, size, representative, timings, failures, checks.add)
        table = checks.table(failures, timings)
        files = {p.relative_to(tmp).as_posix(): p.read_bytes()
                 for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
    for line in export_check.summaries(table):
        logger.info("Export %s", line)
    for line in export_check.disagreements(table):
        logger.warning("Export check: %s", line)
    return files, table, metrics_points(export_check.figures(table))


def publish_model(
    model: keras.Model, manifest: pd.DataFrame, report: dict[str, Any],
    images_name: str, config: FinetuneConfig, calibration: dict[str, Any],
    ood_statistics: dict[str, Any],
) -> dict[str, Any]:
    """Log the fine-tuned model to the MLflow run as ``model``, an MLflow model that takes
    images (paths or base64 bytes) and answers with class names (``unknown`` below the
    calibration's ``min_confidence``) and an ``ood_score``, and as ``keras_model``, the plain
    Keras model; register ``model`` as a new version of ``finetune.registry.name``, tagged
    with its test results, and move the ``champion`` alias to it if it beats the current
    champion on the same test split."""
    run = mlflow.active_run()
    if run is None:
        logger.info("MLflow tracking is off for this run: the model is neither logged nor "
                    "registered.")
        return {"logged": False, "registered_model": None}
    classifier = Classifier(model, tuple(manifests.class_names(manifest)), config.data.image_size,
                            config.data.resize, calibration["min_confidence"]["threshold"],
                            ood.from_settings(ood_statistics))
    name = config.registry.model_name(images_name)
    examples = sources.local_paths(manifests.split_arrays(manifest, "test")[0][:2])
    serving.log_keras_model(model, data.decode_all(examples, classifier.image_size,
                                                   classifier.channels, resize=config.data.resize))
    info = serving.log_classifier(classifier, examples[0], name)
    result: dict[str, Any] = {"logged": True, "model_uri": info.model_uri,
                              "registered_model": name}
    if name is None:
        return result
    version = str(info.registered_model_version)
    digest = registry.test_split_digest(manifest)
    accuracy = float(report["accuracy"])
    registry.tag_version(name, version, {
        "test_accuracy": registry.score_tag(accuracy),
        "test_macro_f1": registry.score_tag(report["macro avg"]["f1-score"]),
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
                                               champion.image_size, config.data.batch_size,
                                               champion.resize)
        return float((predictions["true"] == predictions["predicted"]).mean())

    return {**result, **registry.elect_champion(name, version, accuracy, digest, score)}


def describe_preprocessing(
    model: keras.Model, config: FinetuneConfig, calibration: dict[str, Any],
    ood_statistics: dict[str, Any],
) -> dict[str, Any]:
    """How the fine-tuned model reads images (image size, channels, resize mode), the top
    probability below which its answer is ``unknown`` (``min_confidence``, null: none) and
    what its ``ood_score`` needs (``ood_threshold``, ``ood``: none for a model without),
    versioned beside it so that predicting with it later reads images the same way."""
    return {"image_size": list(config.data.image_size), "channels": input_spec(model)[2],
            "resize": config.data.resize,
            "min_confidence": calibration["min_confidence"]["threshold"], **ood_statistics}


def write_model_card(
    manifest: pd.DataFrame, base_report: dict[str, Any], config: FinetuneConfig,
    phase1_history: History, phase2_history: History, report: dict[str, Any],
    phase1_report: dict[str, Any], images_name: str, calibration: dict[str, Any],
    export_checks: pd.DataFrame,
) -> str:
    """The run's model card (Markdown): data, base and head, each phase, results with the
    weakest classes, calibration and the ``unknown`` threshold, the exports checked against
    the model, intended use and limits."""
    name = config.registry.model_name(images_name) or images_name
    histories = {"phase1": phase1_history, "phase2": phase2_history}
    phases = {name.replace("phase", "Phase "): (_with_found_rates(stages, histories[name]),
                                                histories[name])
              for name, stages in config.phases().items()}
    return model_card(name, manifest, base_report, config.head.model_dump(), phases, report,
                      phase1_report, config.data.image_size, calibration=calibration,
                      exports=export_checks, resize=config.data.resize)


def _with_found_rates(stages: list[Stage], history: History) -> list[dict[str, Any]]:
    """The stages as dicts, ``learning_rate: auto`` shown with the rate the range test found."""
    found = history.get("found_learning_rates") or [None] * len(stages)
    return [s.model_dump() | ({"learning_rate": f"auto ({rate:.3g})"} if rate else {})
            for s, rate in zip(stages, found, strict=True)]


def explain_predictions(
    model: keras.Model, predictions: pd.DataFrame, manifest: pd.DataFrame,
    config: FinetuneConfig,
) -> Figure:
    """Grad-CAM heatmaps over the most confidently misclassified test images and the most
    confidently right ones: where the base's features drove the predicted class. A base
    without a feature map gets a figure that says why instead."""
    names = manifests.class_names(manifest)
    paths, y_true, probabilities = evaluation.predictions_arrays(predictions, names)
    count = min(config.evaluation.misclassified, 8)
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
    images = data.decode_all(np.asarray(chosen), config.data.image_size, input_spec(model)[2],
                             resize=config.data.resize)
    try:
        cams = explain.grad_cam(model, images, y_pred[rows])
    except InputError as err:
        logger.info("No Grad-CAM heatmaps: %s", err)
        return explain.message_figure(f"No Grad-CAM heatmaps: {err}")
    return explain.grad_cam_figure(
        images, cams, titles,
        title="Grad-CAM: where the predicted class came from (misclassified first, "
              "then right)")
