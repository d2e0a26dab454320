"""Test-set evaluation: scikit-learn's classification report, confusion matrix, curves."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import classification_report, confusion_matrix


def predict(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """True labels and predicted class probabilities over a (labelled, unshuffled) dataset."""
    labels, probabilities = [], []
    for images, y in dataset:
        probabilities.append(model.predict_on_batch(images))
        labels.append(np.asarray(y))
    return np.concatenate(labels), np.concatenate(probabilities)


def report(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """scikit-learn's classification report as a dict, keyed by class name."""
    return classification_report(
        y_true,
        y_pred,
        labels=list(range(len(class_names))),
        target_names=class_names,
        output_dict=True,
        zero_division=0,
    )


def report_text(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> str:
    """The same report as scikit-learn's text table."""
    return classification_report(
        y_true,
        y_pred,
        labels=list(range(len(class_names))),
        target_names=class_names,
        digits=4,
        zero_division=0,
    )


def metric_key(name: str) -> str:
    """A class name made safe as an MLflow metric key."""
    return re.sub(r"[^\w\-. /]", "_", name)


def test_metrics(
    report_dict: dict[str, Any], class_names: list[str], prefix: str = ""
) -> dict[str, float]:
    """The headline metrics of a report: accuracy, macro F1, weighted F1 and per-class F1."""
    metrics = {
        f"{prefix}accuracy": float(report_dict["accuracy"]),
        f"{prefix}macro_f1": float(report_dict["macro avg"]["f1-score"]),
        f"{prefix}weighted_f1": float(report_dict["weighted avg"]["f1-score"]),
    }
    for name in class_names:
        metrics[f"{prefix}f1.{metric_key(name)}"] = float(report_dict[name]["f1-score"])
    return metrics


def confusion_matrix_figure(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]
) -> Figure:
    """A confusion-matrix plot: counts, with rows (true classes) coloured by their share."""
    counts = confusion_matrix(y_true, y_pred, labels=list(range(len(class_names))))
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.7 * len(class_names) + 2)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    for i in ticks:
        for j in ticks:
            ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                    color="white" if shares[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix (test, n={counts.sum()})")
    fig.tight_layout()
    return fig


def learning_curves_figure(phases: list[tuple[str, dict[str, Any]]]) -> Figure:
    """Loss and accuracy, train and validation, over consecutive phases on one epoch axis.

    A dotted line marks where each phase after the first begins, and each stage of a phase
    after its first (``stage_starts`` in its history).
    """
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            epochs = [e + 1 for _, h in phases for e in h.get("epoch", [])]
            values = [v for _, h in phases for v in h.get(key, [])]
            if values:
                ax.plot(epochs, values, style, marker="o", markersize=3,
                        label="train" if key == metric else "validation")
        for index, (name, history) in enumerate(phases):
            starts = history.get("stage_starts") or history.get("epoch", [])[:1]
            marks = [(s, f"{name} starts") for s in starts[:1] if index > 0]
            marks += [(s, f"stage {k}") for k, s in enumerate(starts[1:], start=2)]
            for start, text in marks:
                ax.axvline(start + 0.5, color="grey", linestyle=":")
                ax.annotate(text, (start + 0.5, 0.98), xycoords=("data", "axes fraction"),
                            ha="left", va="top", fontsize=8, color="grey")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Learning curves: " + " then ".join(name for name, _ in phases))
    fig.tight_layout()
    return fig
