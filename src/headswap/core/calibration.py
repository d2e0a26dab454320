"""Confidence that means what it says, and images the model should not answer for.

**Temperature scaling** (Guo et al., 2017, "On Calibration of Modern Neural Networks"): one
number ``T`` > 0, fitted on the validation split by minimising the negative log-likelihood of
``softmax(z / T)``, where ``z`` are the classifier's logits (its last Dense layer's output
before the softmax). ``T`` > 1 softens over-confident probabilities, ``T`` < 1 sharpens
under-confident ones; the most probable class, hence accuracy, never changes.
:func:`fold_temperature` divides the last Dense layer's kernel and bias by ``T``, so the
saved model itself gives ``softmax(z / T)``: every user of the file (evaluation, prediction,
serving, exports, Grad-CAM) gets calibrated probabilities without knowing of it.

**Expected calibration error** (:func:`expected_calibration_error`): the images binned by
their top probability into :data:`BINS` equal-width bins over [0, 1]; the mean over images
of ``|accuracy - mean confidence|`` of their bin. 0 for a perfectly calibrated model.

**Unknown images**: :func:`confidence_threshold` is the lowest top probability at which the
images kept (those at or above it) are still right at least ``target_precision`` of the
time on the validation split; below it a prediction is refused (labelled
:data:`UNKNOWN`). How unusual an image is, is another score: :mod:`headswap.core.ood`.

::

    from headswap.core import calibration
    logits, labels = calibration.split_logits(model, manifest, "val", (224, 224))
    t = calibration.fit_temperature(logits, labels)
    calibration.fold_temperature(model, t)          # the model now gives softmax(z / t)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.metrics import classification_report

from headswap.core import data, inference
from headswap.core.bases import input_spec
from headswap.core.errors import InputError

#: Equal-width bins of the top probability for the calibration error and reliability diagram.
BINS = 15
#: The label of an image whose top probability is below the threshold.
UNKNOWN = "unknown"
#: The temperatures searched (log scale): far beyond what a trained classifier needs.
_LOG_T_BOUNDS = (np.log(1e-2), np.log(1e2))


def classifier_layer(model: keras.Model) -> keras.layers.Dense:
    """The final ``Dense(classes, softmax)`` layer of ``model`` (the new head's), whose input
    gives the logits; :class:`InputError` when the last layer is something else."""
    layer = model.layers[-1] if model.layers else None
    if not (isinstance(layer, keras.layers.Dense)
            and keras.activations.serialize(layer.activation) == "softmax"):
        name = type(layer).__name__ if layer is not None else "none"
        raise InputError(
            f"Model {model.name!r} does not end in a Dense layer with a softmax (its last "
            f"layer: {name}), so its logits cannot be read nor its temperature folded in. "
            "Put a new head on the base (finetune does) to calibrate it."
        )
    return layer


def with_features(model: keras.Model) -> keras.Model | None:
    """``model`` with two outputs: its probabilities and the input of its final Dense softmax
    layer (turned into logits by :func:`logits_of`); None when the last layer is not one."""
    try:
        layer = classifier_layer(model)
        return keras.Model(model.inputs, [model.outputs[0], layer.input],
                           name=f"{model.name}_features")
    except (InputError, ValueError, AttributeError):  # no such layer, or called more than once
        return None


def logits_of(model: keras.Model, features: np.ndarray) -> np.ndarray:
    """The logits ``features @ kernel + bias`` of ``model``'s final Dense layer (float64)."""
    weights = classifier_layer(model).get_weights()
    logits = np.asarray(features, dtype=np.float64) @ weights[0].astype(np.float64)
    return logits + weights[1] if len(weights) > 1 else logits


def split_logits(
    model: keras.Model, manifest: pd.DataFrame, split: str, image_size: tuple[int, int],
    batch_size: int = 32, resize: str = "stretch",
) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, labels)`` of one split of a manifest, in its order: the logits of the final
    Dense softmax layer, or, for a model without one, the log-probabilities (which give the
    same softmax, but cannot be folded)."""
    logits, _, labels = split_outputs(model, manifest, split, image_size, batch_size, resize)
    return logits, labels


def split_outputs(
    model: keras.Model, manifest: pd.DataFrame, split: str, image_size: tuple[int, int],
    batch_size: int = 32, resize: str = "stretch", *, two: keras.Model | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``(logits, features, labels)`` of one split, in one pass: :func:`split_logits` with
    the input of the final Dense softmax layer (float32, images x D) between them; None for
    a model without one. ``two``, ``with_features(model)`` made once, serves several splits
    (a new one for each would trace its predict function again, and TensorFlow warns of
    retracing)."""
    batches = data.make_dataset(manifest, split, image_size, input_spec(model)[2], batch_size,
                                resize=resize)
    two = two if two is not None else with_features(model)
    outputs, features, labels = [], [], []
    for out, y in inference.outputs(model if two is None else two, batches):
        if two is None:
            probabilities = out.astype(np.float64)
            outputs.append(np.log(np.maximum(probabilities, np.finfo(np.float64).tiny)))
        else:
            features.append(out[1].astype(np.float32))
            outputs.append(logits_of(model, features[-1]))
        labels.append(np.asarray(y))
    classes = model.outputs[0].shape[-1]
    if not outputs:
        width = None if two is None else classifier_layer(model).input.shape[-1]
        return (np.zeros((0, classes)), None if two is None else np.zeros((0, width), "float32"),
                np.zeros(0, dtype=int))
    return (np.concatenate(outputs), np.concatenate(features) if features else None,
            np.concatenate(labels).astype(int))


def tempered(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` per row."""
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def negative_log_likelihood(
    logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0
) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    log_p = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-log_p[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature ``T`` that minimises the negative log-likelihood of ``labels`` under
    ``softmax(logits / T)`` (a bounded 1-D search in ``log T``; the loss is convex in
    ``1 / T``). 1.0 when there are no labels to fit on."""
    labels = np.asarray(labels, dtype=int)
    if not len(labels):
        return 1.0
    found = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t))),
        bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6},
    )
    return float(np.exp(found.x))


def fold_temperature(model: keras.Model, temperature: float) -> keras.Model:
    """Divide the kernel and bias of ``model``'s final Dense softmax layer by ``temperature``
    (in place), so that it gives ``softmax(logits / temperature)``; return ``model``.
    :class:`InputError` when it has no such layer (:func:`classifier_layer`)."""
    if not temperature > 0:
        raise ValueError(f"A temperature must be above 0; got {temperature}.")
    layer = classifier_layer(model)
    layer.set_weights([w / np.asarray(temperature, dtype=w.dtype)
                       for w in layer.get_weights()])
    return model


def _bins(confidence: np.ndarray, bins: int) -> np.ndarray:
    """The bin (0 .. bins-1) of each top probability: [0, 1/bins), ..., [(bins-1)/bins, 1]."""
    return np.minimum((confidence * bins).astype(int), bins - 1)


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = BINS) -> pd.DataFrame:
    """One row per bin of the top probability: ``low``, ``high``, ``images``, mean
    ``confidence`` and ``accuracy`` of the images in it (NaN for an empty bin)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    right = probabilities.argmax(axis=1) == np.asarray(labels)
    which = _bins(confidence, bins)
    rows = []
    for b in range(bins):
        inside = which == b
        rows.append({"low": b / bins, "high": (b + 1) / bins, "images": int(inside.sum()),
                     "confidence": float(confidence[inside].mean()) if inside.any() else np.nan,
                     "accuracy": float(right[inside].mean()) if inside.any() else np.nan})
    return pd.DataFrame(rows)


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = BINS
) -> float:
    """The expected calibration error: the images' mean ``|accuracy - confidence|`` of their
    bin of the top probability (``bins`` equal-width bins). NaN without images."""
    table = reliability(probabilities, labels, bins)
    filled = table[table["images"] > 0]
    if filled.empty:
        return float("nan")
    gaps = (filled["accuracy"] - filled["confidence"]).abs()
    return float((gaps * filled["images"]).sum() / filled["images"].sum())


def confidence_threshold(
    probabilities: np.ndarray, labels: np.ndarray, target_precision: float
) -> float | None:
    """The lowest top probability ``t`` such that the images with a top probability of at
    least ``t`` are classified right at least ``target_precision`` of the time (0.0 when all
    of them already are); None when no such ``t`` exists or there are no images."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if not len(probabilities):
        return None
    confidence = probabilities.max(axis=1)
    right = probabilities.argmax(axis=1) == np.asarray(labels)
    order = np.argsort(-confidence, kind="stable")
    confidence, right = confidence[order], right[order]
    precision = np.cumsum(right) / np.arange(1, len(right) + 1)
    # a threshold keeps every image of its confidence: only the last of a tie can end a prefix
    ends = np.append(confidence[1:] < confidence[:-1], True)
    meets = np.flatnonzero(ends & (precision >= target_precision))
    if not len(meets):
        return None
    if meets[-1] == len(confidence) - 1:
        return 0.0
    return float(confidence[meets[-1]])


def coverage_and_precision(
    probabilities: np.ndarray, labels: np.ndarray, threshold: float | None
) -> tuple[float, float]:
    """The share of images kept at ``threshold`` (top probability at least it; all when
    None) and how many of those are right (NaN when none is kept)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    kept = probabilities.max(axis=1) >= (threshold or 0.0)
    right = probabilities.argmax(axis=1) == np.asarray(labels)
    share = float(kept.mean()) if len(kept) else float("nan")
    return share, float(right[kept].mean()) if kept.any() else float("nan")


def refuse(names: np.ndarray, confidence: np.ndarray, threshold: float | None) -> np.ndarray:
    """``names`` (the best class of each image) with :data:`UNKNOWN` where ``confidence`` is
    below ``threshold`` (None: none refused)."""
    names = np.asarray(names, dtype=object).copy()
    if threshold is not None:
        names[np.asarray(confidence) < threshold] = UNKNOWN
    return names


def check_threshold(threshold: float | None, class_names: Sequence[str]) -> float | None:
    """``threshold`` checked to be a probability below 1, with no class named
    :data:`UNKNOWN` for refused images to be confused with."""
    if threshold is None:
        return None
    if not 0 <= threshold < 1:
        raise InputError(f"`min_confidence` must be a probability from 0 to below 1; got "
                         f"{threshold}.")
    if UNKNOWN in class_names:
        raise InputError(
            f"A class is named {UNKNOWN!r}, the label of images below `min_confidence`: "
            "rename that class, or set `min_confidence` to null to label every image.")
    return float(threshold)


def report_with_unknown(
    y_true: np.ndarray, predicted: Sequence[str], class_names: Sequence[str]
) -> tuple[dict, str]:
    """scikit-learn's classification report (dict and text) of ``predicted`` class names,
    where :data:`UNKNOWN` counts as a miss of the true class (lowering its recall, not any
    class's precision); ``accuracy`` is the share of all images labelled right, and
    ``unknown`` the number labelled :data:`UNKNOWN`."""
    names = list(class_names)
    index = {name: i for i, name in enumerate(names)}
    y_pred = np.asarray([index.get(name, len(names)) for name in predicted], dtype=int)
    y_true = np.asarray(y_true, dtype=int)
    unknown = int((y_pred == len(names)).sum())
    labels = list(range(len(names)))
    report = classification_report(y_true, y_pred, labels=labels, target_names=names,
                                   output_dict=True, zero_division=0)
    text = classification_report(y_true, y_pred, labels=labels, target_names=names, digits=4,
                                 zero_division=0)
    if unknown:  # scikit-learn then reports a micro average in place of the accuracy
        report.pop("micro avg", None)
        report["accuracy"] = float((y_pred == y_true).mean())
        text += (f"\naccuracy {report['accuracy']:.4f} (the {unknown} images labelled "
                 f"{UNKNOWN} counted as wrong)\n")
    report[UNKNOWN] = unknown
    return report, text


def reliability_figure(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], bins: int = BINS, title: str = ""
) -> Figure:
    """A reliability diagram: accuracy against mean confidence per bin, one line per entry of
    ``curves`` (``{label: (probabilities, labels)}``, its ECE in the legend), the diagonal
    being perfect calibration; below, how many images each bin holds."""
    fig = Figure(figsize=(6.4, 6.4))
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="perfectly calibrated")
    width = 1 / bins / (len(curves) + 1)
    for i, (label, (probs, labels)) in enumerate(curves.items()):
        table = reliability(probs, labels, bins)
        filled = table[table["images"] > 0]
        ece = expected_calibration_error(probs, labels, bins)
        top.plot(filled["confidence"], filled["accuracy"], marker="o",
                 label=f"{label} (ECE {ece:.3f})")
        bottom.bar(table["low"] + (i + 0.5) * width, table["images"], width=width, label=label)
    top.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy",
            title=title or f"Reliability ({bins} bins of the top probability)")
    top.legend(loc="upper left")
    bottom.set(xlabel="confidence (top probability)", ylabel="images")
    fig.tight_layout()
    return fig
