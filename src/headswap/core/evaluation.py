"""Test-set evaluation: scikit-learn's classification report, confusion matrix, top-k accuracy,
per-class tables, the most confident errors, curves, and the comparison of training variants
(also across labels-per-class counts)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import classification_report, confusion_matrix

from headswap.core import data, inference, manifests, sources
from headswap.core.bases import input_spec


def predict(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """True labels and predicted class probabilities over a (labelled, unshuffled) dataset."""
    labels, probabilities = [], []
    for out, y in inference.outputs(model, dataset):
        probabilities.append(out)
        labels.append(np.asarray(y))
    return np.concatenate(labels), np.concatenate(probabilities)


def predictions_table(
    paths: np.ndarray, y_true: np.ndarray, probabilities: np.ndarray, class_names: list[str]
) -> pd.DataFrame:
    """One row per image: ``path``, ``true`` and ``predicted`` class, the predicted class's
    ``confidence``, then each class's probability in a column ``p[<class name>]``."""
    y_pred = probabilities.argmax(axis=1)
    table = pd.DataFrame({
        "path": np.asarray(paths).astype(str),
        "true": [class_names[i] for i in y_true],
        "predicted": [class_names[i] for i in y_pred],
        "confidence": probabilities[np.arange(len(y_pred)), y_pred].astype(float),
    })
    columns = pd.DataFrame(probabilities.astype(float), columns=[f"p[{n}]" for n in class_names])
    return pd.concat([table, columns], axis=1)


def predict_split(
    model, manifest: pd.DataFrame, split: str, image_size: tuple[int, int], batch_size: int = 32,
    resize: str = "stretch",
) -> pd.DataFrame:
    """The model's :func:`predictions_table` over one split of a manifest (images resized to
    ``image_size`` as ``resize`` says)."""
    dataset = data.make_dataset(manifest, split, image_size, input_spec(model)[2], batch_size,
                                resize=resize)
    y_true, probabilities = predict(model, dataset)
    paths = manifests.split_arrays(manifest, split)[0]
    return predictions_table(paths, y_true, probabilities, manifests.class_names(manifest))


def summarise(predictions: pd.DataFrame, class_names: list[str], top_k: int = 2) -> dict[str, Any]:
    """A predictions table's ``report`` (scikit-learn's, as a dict), its ``text`` table, and
    its headline ``metrics`` (accuracy, macro and weighted F1, per-class F1, top-k accuracy)."""
    _, y_true, probabilities = predictions_arrays(predictions, class_names)
    y_pred = probabilities.argmax(axis=1)
    result = report(y_true, y_pred, class_names)
    metrics = test_metrics(result, class_names)
    k, accuracy = top_k_accuracy(y_true, probabilities, top_k)
    metrics[f"top_{k}_accuracy"] = accuracy
    return {"report": result, "text": report_text(y_true, y_pred, class_names),
            "metrics": metrics}


def evaluate(
    model, manifest: pd.DataFrame, image_size: tuple[int, int], batch_size: int = 32,
    split: str = "test", top_k: int = 2, resize: str = "stretch",
) -> dict[str, Any]:
    """The model on one split: :func:`summarise` of its predictions, with the ``predictions``."""
    predictions = predict_split(model, manifest, split, image_size, batch_size, resize)
    return {**summarise(predictions, manifests.class_names(manifest), top_k),
            "predictions": predictions}


def predictions_arrays(
    table: pd.DataFrame, class_names: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(paths, y_true, probabilities)`` back from a :func:`predictions_table`, also when the
    table was read as text (the catalog reads it so, to keep class names such as ``007``)."""
    index = {name: i for i, name in enumerate(class_names)}
    y_true = table["true"].astype(str).map(index).to_numpy(dtype=int)
    probabilities = table[[f"p[{n}]" for n in class_names]].astype(np.float32).to_numpy()
    return table["path"].astype(str).to_numpy(), y_true, probabilities


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


def _confusion(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Confusion counts (rows: true classes) and the same counts as shares of each row."""
    counts = confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))
    return counts, counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def confusion_matrix_figure(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]
) -> Figure:
    """A confusion-matrix plot: counts, with rows (true classes) coloured by their share."""
    counts, shares = _confusion(y_true, y_pred, len(class_names))
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
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
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


# --- evaluation beyond the report ----------------------------------------------------------


def top_k_accuracy(y_true: np.ndarray, probabilities: np.ndarray, k: int) -> tuple[int, float]:
    """``(k, accuracy)``: the share of images whose true class is among the ``k`` most probable.

    ``k`` is capped at the number of classes (where every image counts as a hit).
    """
    if k < 1:
        raise ValueError(f"top-k accuracy needs k >= 1; got {k} (`top_k`).")
    k = min(k, probabilities.shape[1])
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return k, float(np.mean(np.any(top == np.asarray(y_true)[:, None], axis=1)))


def confusion_tables(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The confusion matrix as counts and row-normalised (each true class sums to 1).

    One row per true class (first column ``true_class``), one column per predicted class; a
    class without test images has a row of zeros in both.
    """
    counts, shares = _confusion(y_true, y_pred, len(class_names))
    tables = []
    for values in (counts, shares):
        table = pd.DataFrame(values, columns=class_names)
        table.insert(0, "true_class", class_names, allow_duplicates=True)
        tables.append(table)
    return tables[0], tables[1]


def per_class_table(report_dict: dict[str, Any], class_names: list[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class, from a :func:`report` dict."""
    return pd.DataFrame(
        [
            {"class": name, **{key: report_dict[name][key]
                               for key in ("precision", "recall", "f1-score", "support")}}
            for name in class_names
        ]
    ).rename(columns={"f1-score": "f1"}).astype({"support": int})


def confident_errors(
    paths: np.ndarray,
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: list[str],
    count: int,
) -> pd.DataFrame:
    """The ``count`` misclassified images the model was surest of, most confident first.

    Columns: ``path``, ``true``, ``predicted`` and ``confidence`` (the predicted class's
    probability).
    """
    y_pred = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    confidence = probabilities[wrong, y_pred[wrong]]
    order = wrong[np.argsort(-confidence, kind="stable")][:count]
    return pd.DataFrame(
        {
            "path": np.asarray(paths)[order].astype(str),
            "true": [class_names[i] for i in np.asarray(y_true)[order]],
            "predicted": [class_names[i] for i in y_pred[order]],
            "confidence": probabilities[order, y_pred[order]].astype(float),
        }
    )


def confident_errors_figure(errors: pd.DataFrame, columns: int = 4) -> Figure:
    """A grid of the images of :func:`confident_errors`, each titled true -> predicted (p)."""
    from PIL import Image

    rows = max(1, -(-len(errors) // columns))
    fig = Figure(figsize=(2.4 * columns, 2.6 * rows))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, row in zip(axes, errors.itertuples(), strict=False):
        with Image.open(sources.local_paths([row.path])[0]) as image:
            pixels = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
        ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None)
        ax.set_title(f"{row.true} -> {row.predicted}\n(p={row.confidence:.2f})", fontsize=8)
    if errors.empty:
        axes[0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    fig.suptitle("Most confidently misclassified test images (true -> predicted)")
    fig.tight_layout()
    return fig


def pooled_features(model, dataset, pooling: str = "avg") -> tuple[np.ndarray, np.ndarray]:
    """``(features, labels)`` of a labelled dataset through ``model`` (a base), feature maps
    pooled as the head would (``avg``, ``max`` or ``flatten``)."""
    labels, features = [], []
    for out, y in inference.outputs(model, dataset):
        if out.ndim == 4:
            out = {"avg": out.mean(axis=(1, 2)), "max": out.max(axis=(1, 2))}.get(
                pooling, out.reshape(len(out), -1)
            )
        features.append(out.reshape(len(out), -1))
        labels.append(np.asarray(y))
    return np.concatenate(features), np.concatenate(labels)


def markdown_table(table: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table; floats to ``digits`` significant digits, integers
    with thousands separators."""

    def cell(value: Any) -> str:
        if isinstance(value, (int, np.integer)):
            return f"{value:,}"
        return f"{value:.{digits}g}" if isinstance(value, (float, np.floating)) else str(value)

    rows = [list(table.columns), ["---"] * len(table.columns)]
    rows += [[cell(v) for v in row] for row in table.itertuples(index=False)]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"
