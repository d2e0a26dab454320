"""The ``finetune`` pipeline's calibration node: temperature scaling fitted on the validation
split after the last phase and folded into the model, the ``unknown`` threshold, the
statistics of the out-of-distribution score, and their report
(:mod:`headswap.core.calibration`, :mod:`headswap.core.ood`)."""

from __future__ import annotations

import logging
import time
from typing import Any

import keras
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from headswap.core import calibration, evaluation, manifests, ood
from headswap.core.errors import InputError
from headswap.pipelines import metrics_points
from headswap.project.config import FinetuneConfig

logger = logging.getLogger(__name__)


def calibrate(
    model: keras.Model, manifest: pd.DataFrame, config: FinetuneConfig
) -> tuple[keras.Model, dict[str, Any], Figure, dict[str, list[dict[str, float]]],
           dict[str, Any], pd.DataFrame]:
    """The last phase's model with its temperature folded in (``finetune.calibration.method:
    temperature``; fitted on the validation split by the negative log-likelihood; the
    predicted classes stay the same), or as it is (``none``, or a model whose last layer is
    not a Dense softmax layer); the report (temperature, ECE and NLL before and after on the
    validation and test splits, the ``min_confidence`` threshold that keeps
    ``target_precision`` on the validation split, the ``ood_score``'s validation reference),
    the reliability diagram of the test split before and after, the figures as metrics
    (``calibration.test_ece``, ...), and the statistics of the ``ood_score`` fitted on the
    train split's head features, as a model's settings hold them
    (:func:`headswap.core.ood.to_settings`; empty for a model without a Dense softmax last
    layer); and, from the same pass over the test split, the calibrated model's prediction for
    every test image (path, true and predicted class, confidence, each class's probability),
    which the evaluation nodes read."""
    started = time.perf_counter()
    settings = config.calibration
    read = (config.data.image_size, config.data.batch_size, config.data.resize)
    two = calibration.with_features(model)  # one for every split's pass
    val_logits, val_features, val_y = calibration.split_outputs(model, manifest, "val", *read,
                                                                two=two)
    test_logits, test_features, test_y = calibration.split_outputs(model, manifest, "test",
                                                                   *read, two=two)
    temperature, note = _fold(model, val_logits, val_y, settings.method)
    val_p = calibration.tempered(val_logits, temperature)
    test_p = calibration.tempered(test_logits, temperature)
    names = manifests.class_names(manifest)
    threshold = _threshold(val_p, val_y, settings.target_precision, names)
    kept = {split: dict(zip(("kept", "precision"),
                            map(_number, calibration.coverage_and_precision(p, y, threshold)),
                            strict=True))
            for split, p, y in (("validation", val_p, val_y), ("test", test_p, test_y))}
    before = calibration.tempered(test_logits)
    report = {
        "method": settings.method if note is None else "none",
        "temperature": temperature,
        "note": note,
        "bins": calibration.BINS,
        "validation": _summary(val_logits, val_y, temperature),
        "test": _summary(test_logits, test_y, temperature),
        "min_confidence": {"threshold": threshold,
                           "target_precision": settings.target_precision, **kept},
        "ood_score": {"description": ood.DESCRIPTION, "quantile": ood.QUANTILE,
                      "threshold": None},
        "reliability_test": {"before": _records(calibration.reliability(before, test_y)),
                             "after": _records(calibration.reliability(test_p, test_y))},
    }
    statistics = _ood_statistics(model, two, manifest, read, val_features, test_features,
                                 report["ood_score"])
    test = report["test"]
    logger.info(
        "Calibration: %s; test ECE %s -> %s (%s bins); min_confidence %s keeps %s of the test "
        "images (%.1f s)",
        f"temperature {temperature:.3g}, fitted on {len(val_y)} validation images"
        if report["method"] == "temperature" else "none",
        _shown(test["ece_before"], ".4f"), _shown(test["ece"], ".4f"), calibration.BINS,
        _shown(threshold, ".4g"), _shown(kept["test"]["kept"], ".1%"),
        time.perf_counter() - started)
    figure = calibration.reliability_figure(
        {"before": (before, test_y), f"after (T = {temperature:.3g})": (test_p, test_y)},
        title=f"Reliability on the test split ({calibration.BINS} bins)")
    metrics = {"temperature": temperature, "val_ece_before": report["validation"]["ece_before"],
               "val_ece": report["validation"]["ece"], "test_ece_before": test["ece_before"],
               "test_ece": test["ece"], "min_confidence": threshold,
               "test_kept": kept["test"]["kept"],
               "ood_threshold": report["ood_score"].get("threshold")}
    predictions = evaluation.predictions_table(manifests.split_arrays(manifest, "test")[0],
                                               test_y, test_p, names)
    return (model, report, figure, metrics_points({k: v for k, v in metrics.items()
                                                   if v is not None}),
            ood.to_settings(statistics), predictions)


def _ood_statistics(
    model: keras.Model, two: keras.Model | None, manifest: pd.DataFrame, read: tuple,
    val_features: np.ndarray | None, test_features: np.ndarray | None, report: dict[str, Any],
) -> ood.Statistics | None:
    """The ``ood_score``'s statistics, fitted on the train split's head features (one pass),
    with the validation split's reference (``threshold``); None (with a note in ``report``,
    which gets the figures) for a model without a Dense softmax last layer or whose features
    do not vary."""
    started = time.perf_counter()
    if val_features is None:
        report["note"] = "the model's last layer is not a Dense softmax layer"
        return None
    _, features, labels = calibration.split_outputs(model, manifest, "train", *read, two=two)
    statistics = ood.fit(features, labels)
    if statistics is None:
        report["note"] = "the head features of the training images do not vary"
        logger.warning("No ood_score: the head features of the %s training images do not "
                       "vary within their classes.", len(labels))
        return None
    statistics = statistics.with_threshold(val_features)
    threshold = statistics.threshold
    above = (float((statistics.score(test_features) > threshold).mean())
             if threshold is not None and len(test_features) else None)
    report.update(threshold=threshold, test_above_threshold=above,
                  covariance="diagonal" if statistics.diagonal else "full",
                  dimensions=statistics.dimensions, train_images=len(labels))
    logger.info("ood_score: class means and %s covariance of %s head features of %s training "
                "images; validation %.0f%% quantile %s (%s of the test images above it; %.1f s)",
                report["covariance"], statistics.dimensions, len(labels), 100 * ood.QUANTILE,
                _shown(threshold, ".4g"), _shown(above, ".1%"), time.perf_counter() - started)
    return statistics


def _fold(
    model: keras.Model, logits: np.ndarray, labels: np.ndarray, method: str
) -> tuple[float, str | None]:
    """The temperature fitted on ``logits`` and folded into ``model`` (1.0 for ``method``
    none), and why there is none where one was asked for (logged as a warning)."""
    if method == "none":
        return 1.0, None
    if not len(labels):
        note = "not calibrated: the validation split is empty"
    else:
        try:
            temperature = calibration.fit_temperature(logits, labels)
            calibration.fold_temperature(model, temperature)
            return temperature, None
        except InputError as err:
            note = f"not calibrated: {err}"
    logger.warning("Calibration: %s", note)
    return 1.0, note


def _threshold(
    probabilities: np.ndarray, labels: np.ndarray, target: float, class_names: list[str]
) -> float | None:
    """The ``min_confidence`` stored with the model: the validation split's threshold at
    ``target`` precision; None (with a warning) where there is none, or where a class is
    named like the label of refused images."""
    threshold = calibration.confidence_threshold(probabilities, labels, target)
    if threshold is None:
        logger.warning("No top probability keeps a precision of %s on the %s validation "
                       "images: no min_confidence is stored with the model.", target,
                       len(labels))
    elif calibration.UNKNOWN in class_names:
        logger.warning("No min_confidence is stored with the model: a class is named %r, the "
                       "label of refused images.", calibration.UNKNOWN)
        return None
    return threshold


def _summary(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, Any]:
    """A split's images, accuracy, ECE and negative log-likelihood before and after."""
    before, after = calibration.tempered(logits), calibration.tempered(logits, temperature)
    empty = not len(labels)
    return {
        "images": len(labels),
        "accuracy": None if empty else float((after.argmax(axis=1) == labels).mean()),
        "ece_before": None if empty else calibration.expected_calibration_error(before, labels),
        "ece": None if empty else calibration.expected_calibration_error(after, labels),
        "nll_before": None if empty else calibration.negative_log_likelihood(logits, labels),
        "nll": None if empty else calibration.negative_log_likelihood(logits, labels,
                                                                      temperature),
    }


def _shown(value: float | None, spec: str) -> str:
    return "none" if value is None else format(value, spec)


def _number(value: float) -> float | None:
    """``value``, or None (JSON's null) for NaN."""
    return None if np.isnan(value) else float(value)


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """A table's rows as dicts, empty cells as None (JSON's null)."""
    return table.astype(object).where(table.notna(), None).to_dict("records")
