"""Kedro nodes of the ``predict`` pipeline: list a folder's images, classify them with the
catalog's ``classifier``, and report against the class sub-folders' labels if there are."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import pandas as pd

from headswap.core import calibration, evaluation, manifests, predict, sources
from headswap.core.predict import Classifier
from headswap.pipelines import metrics_points
from headswap.project.config import PredictConfig, parse_predict

logger = logging.getLogger(__name__)


def check_parameters(params: dict[str, Any]) -> PredictConfig:
    """The ``predict`` parameters, validated."""
    return parse_predict(params)


def list_images(images: sources.ImageSource) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The images of the catalog's ``prediction_images`` (``predict.path``: a folder, flat or
    of class sub-folders, or a CSV; local or remote): path, label (the class sub-folder or the
    CSV's label, else empty); and the files that cannot be classified (path, reason)."""
    table, unsupported = predict.list_images(images)
    labelled = int((table["label"] != "").sum())
    logger.info("%s images to classify under %s%s", len(table), images.location,
                f" ({labelled} labelled)" if labelled else "")
    return table, unsupported


def classify_images(
    classifier: Classifier, images: pd.DataFrame, unsupported: pd.DataFrame,
    config: PredictConfig,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per image: path, the true class (if the folder has class sub-folders),
    predicted class (``unknown`` below ``predict.min_confidence``), confidence, the
    out-of-distribution score, the top-k classes and each class's probability; and the files
    that could not be classified (path, reason)."""
    paths = images["path"].tolist()
    classifier = replace(classifier, min_confidence=min_confidence(classifier, config))
    table, problems = classifier.predict(list(sources.local_paths(paths)), config.batch_size,
                                         config.top_k)
    front = images.iloc[table.index][["path"]].reset_index(drop=True)
    if (images["label"] != "").any():
        front["true"] = images["label"].iloc[table.index].to_numpy()
    predictions = pd.concat([front, table.reset_index(drop=True)], axis=1)
    skipped = pd.concat([unsupported, pd.DataFrame(
        [(paths[i], reason) for i, reason in sorted(problems.items())],
        columns=sources.SKIPPED_COLUMNS)], ignore_index=True)
    manifests.log_skipped(skipped, len(images) + len(unsupported))
    return predictions, skipped


def min_confidence(classifier: Classifier, config: PredictConfig) -> float | None:
    """The threshold ``predict.min_confidence`` asks for: ``auto``, the one stored with the
    model (None for a model without one), a number, or None (off)."""
    if config.min_confidence == "auto":
        return classifier.min_confidence
    return config.min_confidence


def report(
    predictions: pd.DataFrame, skipped: pd.DataFrame, classifier: Classifier,
    config: PredictConfig,
) -> tuple[dict[str, Any], str, dict[str, dict[str, float]]]:
    """scikit-learn's classification report of the images in class sub-folders named after
    the model's classes (empty without any; an image labelled ``unknown`` counts as a miss
    of its class, and ``unknown`` is how many were), and the counts (``unknown`` included)
    and accuracy as metrics."""
    threshold = min_confidence(classifier, config)
    refused = int((predictions["predicted"] == calibration.UNKNOWN).sum())
    counts = {"images": len(predictions), "skipped_images": len(skipped), "unknown": refused}
    note = (f"{refused} of {len(predictions)} images labelled {calibration.UNKNOWN} (top "
            f"probability below min_confidence {threshold:.4g}).\n"
            if threshold is not None else "")
    names = list(classifier.class_names)
    labelled = (predictions[predictions["true"].isin(names)] if "true" in predictions
                else predictions.iloc[:0])
    if labelled.empty:
        text = "No image is in a sub-folder named after one of the model's classes: no report."
        logger.info(text)
        return {}, text + "\n" + note, metrics_points(counts)
    others = sorted(set(predictions["true"]) - set(names) - {""})
    if others:
        logger.warning("Left out of the report: sub-folders %s are not classes of the model "
                       "(%s).", ", ".join(others), ", ".join(names))
    _, y_true, probabilities = evaluation.predictions_arrays(labelled, names)
    result, text = calibration.report_with_unknown(y_true, labelled["predicted"], names)
    result["min_confidence"] = threshold
    metrics = evaluation.test_metrics(result, names)
    k, accuracy = evaluation.top_k_accuracy(y_true, probabilities, 2)  # as summarise
    metrics[f"top_{k}_accuracy"] = accuracy
    text += note
    logger.info("Classification report on %s labelled images:\n%s", len(labelled), text)
    return result, text, metrics_points({**counts, **metrics})
