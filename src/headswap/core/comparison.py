"""Comparing training variants on one folder: a logistic regression on the base's pooled features
as the baseline, a summary per variant, their table and validation curves (phase 2 on its own
axis, where the variants differ), and label efficiency (test accuracy against labelled images
per class).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

TABLE_COLUMNS = ["variant", "test_accuracy", "macro_f1", "trainable_params", "wall_time_s"]
LABEL_EFFICIENCY_COLUMNS = ["labels_per_class", *TABLE_COLUMNS]
_LINE_STYLES = ("-", "--", "-.", ":")


def logistic_regression_baseline(
    features: dict[str, tuple[np.ndarray, np.ndarray]], c: float, max_iter: int, seed: int
) -> tuple[np.ndarray, float, int]:
    """Fit scikit-learn's ``LogisticRegression`` (on standardised features) to the ``train``
    features; return its test predictions, validation accuracy and parameter count."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    )
    model.fit(*features["train"])
    fitted = model[-1]
    val_x, val_y = features["val"]
    return (
        model.predict(features["test"][0]),
        float(model.score(val_x, val_y)),
        int(fitted.coef_.size + fitted.intercept_.size),
    )


def variant_summary(
    variant: str, report_dict: dict[str, Any], histories: list[dict[str, Any]], wall_time_s: float
) -> dict[str, Any]:
    """One variant's row of the comparison, with its validation curve.

    The trainable parameter count is the last phase's (from its ``parameter_counts``); the
    curve is ``val_accuracy`` over the phases' one epoch axis.
    """
    counts = next(
        (h["parameter_counts"] for h in reversed(histories) if h.get("parameter_counts")), {}
    )
    return {
        "variant": variant,
        "test_accuracy": float(report_dict["accuracy"]),
        "macro_f1": float(report_dict["macro avg"]["f1-score"]),
        "trainable_params": int(counts.get("trainable_params", 0)),
        "wall_time_s": round(float(wall_time_s), 2),
        "epoch": [int(e) for h in histories for e in h.get("epoch", [])],
        "val_accuracy": [float(v) for h in histories for v in h.get("val_accuracy", [])],
        "phase_starts": [int(h["epoch"][0]) for h in histories if h.get("epoch")],
    }


def comparison_table(summaries: list[dict[str, Any]]) -> pd.DataFrame:
    """The variants side by side: test accuracy, macro F1, trainable parameters, wall time."""
    return pd.DataFrame([{k: s[k] for k in TABLE_COLUMNS} for s in summaries])


def _line_style(index: int) -> dict[str, Any]:
    """The ``index``-th line's style: lines that coincide (variants sharing a phase) stay
    visible, wider ones drawn under narrower ones in other dash patterns."""
    position = index % len(_LINE_STYLES)
    return {"linestyle": _LINE_STYLES[position], "linewidth": 2.5 - 0.4 * position}


def validation_curves_figure(summaries: list[dict[str, Any]], title: str = "") -> Figure:
    """Every variant's validation accuracy per epoch (on the run's epoch axis).

    When a variant has a second phase (``phase_starts`` of its summary), phase 1 and what
    follows are drawn in two panels, each over its own epochs and accuracies, so that the later
    phase, where variants that share phase 1 part, is not squeezed into the end of a long
    axis: on the left, each distinct phase-1 curve once (named after every variant that has
    it); on the right, each such variant's curve from its last phase-1 epoch on, and the last
    value of each one-phase variant as a dotted line. A variant without epochs (the logistic
    regression on fixed features) is a horizontal dashed line at its validation accuracy, in
    each panel.
    """
    split = any(_phase1_epochs(s) is not None for s in summaries)
    fig = Figure(figsize=(12, 4.5) if split else (8, 4.5))
    axes = (list(fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})) if split
            else [fig.subplots()])
    first: dict[tuple, list[Any]] = {}  # each distinct first-panel curve: its line, its names
    for index, summary in enumerate(summaries):
        epochs = [e + 1 for e in summary["epoch"]]
        values = summary["val_accuracy"]
        if not epochs:
            for ax in axes if values else ():
                ax.axhline(values[-1], linestyle="--", color="grey",
                           label=f"{summary['variant']} (no epochs)")
            continue
        line = {"marker": "o", "markersize": 3, "color": f"C{index % 10}",
                **_line_style(len(first))}
        phase1 = _phase1_epochs(summary)
        cut = len(epochs) if phase1 is None else phase1
        key = (tuple(epochs[:cut]), tuple(values[:cut]))
        if key in first:
            first[key][1].append(summary["variant"])
        else:
            first[key] = [axes[0].plot(epochs[:cut], values[:cut], **line)[0],
                          [summary["variant"]]]
        if not split:
            continue
        if phase1 is None:
            axes[1].axhline(values[-1], color=line["color"], linestyle=":", linewidth=1.2,
                            label=f"{summary['variant']} at its end (epoch {epochs[-1]})")
        else:
            axes[1].plot(epochs[max(cut - 1, 0):], values[max(cut - 1, 0):],
                         label=summary["variant"], **line)
    for drawn, names in first.values():
        drawn.set_label(" = ".join(names))
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
    if not split:
        return _finish_axes(fig, axes[0], "epoch", "validation accuracy",
                            title or "Validation accuracy of each variant")
    _finish_axes(fig, axes[0], "epoch", "validation accuracy", "Phase 1")
    _finish_axes(fig, axes[1], "epoch (from each variant's last phase-1 epoch)",
                 "validation accuracy", "After phase 1: where the variants part")
    fig.suptitle(title or "Validation accuracy of each variant")
    fig.tight_layout()
    return fig


def _phase1_epochs(summary: dict[str, Any]) -> int | None:
    """How many of a variant's epochs are its phase 1's; None when it has one phase."""
    starts = summary.get("phase_starts") or []
    if len(starts) < 2:
        return None
    return sum(1 for epoch in summary["epoch"] if epoch < starts[1])


# --- label efficiency: the comparison at several labels-per-class counts -------------------


def label_efficiency_table(tables: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """The comparison tables (:func:`comparison_table`) of several labels-per-class counts as
    one long table: a row per count and variant, counts ascending."""
    return pd.concat(
        [tables[count].assign(labels_per_class=int(count)) for count in sorted(tables)],
        ignore_index=True,
    )[LABEL_EFFICIENCY_COLUMNS]


def label_efficiency_figure(table: pd.DataFrame, title: str = "") -> Figure:
    """Test accuracy against labels per class (log scale), one line per variant, from a
    :func:`label_efficiency_table`."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for index, (variant, rows) in enumerate(table.groupby("variant", sort=False)):
        rows = rows.sort_values("labels_per_class")
        ax.plot(rows["labels_per_class"], rows["test_accuracy"], marker="o", markersize=4,
                label=variant, **_line_style(index))
    counts = sorted(table["labels_per_class"].unique())
    ax.set_xscale("log")
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.minorticks_off()
    return _finish_axes(fig, ax, "labelled images per class (train + validation; log scale)",
                        "test accuracy", title or "Test accuracy against labels per class")


def _finish_axes(fig: Figure, ax: Any, xlabel: str, ylabel: str, title: str) -> Figure:
    """Labels, grid, legend and title of a one-axes comparison figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    return fig
