"""A model card: what a fine-tuned model was trained on and how, how well it does, where it is
weak, and what it is for, as Markdown."""

from __future__ import annotations

from typing import Any

import pandas as pd

from headswap.core import data
from headswap.core.evaluation import markdown_table


def model_card(
    name: str,
    manifest: pd.DataFrame,
    base: dict[str, Any],
    head: dict[str, Any],
    phases: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]],
    report: dict[str, Any],
    phase1_report: dict[str, Any],
    image_size: tuple[int, int],
    weakest: int = 2,
) -> str:
    """The card of model ``name``: the data (classes, images per split), the base and its
    cut, the head, each phase's stages with what trained, the test results with the
    per-class table and the ``weakest`` classes, and its intended use and limits.

    ``phases`` maps a phase's name to its stages' settings and its history (as
    :func:`headswap.core.fit.fit` returns it); ``base`` is the base's description (``base``,
    ``base_params``, ``weights_file``).
    """
    names = data.class_names(manifest)
    counts = pd.crosstab(manifest["label"], manifest["split"]).reindex(
        index=names, columns=list(data.SPLITS), fill_value=0)
    per_class = pd.DataFrame([
        {"class": n, "precision": report[n]["precision"], "recall": report[n]["recall"],
         "f1": report[n]["f1-score"], "support": int(report[n]["support"])} for n in names
    ])
    weak = per_class.nsmallest(min(weakest, len(names)), "f1")
    lines = [
        f"# Model card: {name}", "",
        "## Data", "",
        f"{len(names)} classes, {len(manifest)} images, split once at file level "
        f"(train {int(counts['train'].sum())}, validation {int(counts['val'].sum())}, "
        f"test {int(counts['test'].sum())}); images resized to {image_size[0]}x{image_size[1]}.",
        "", markdown_table(counts.reset_index().rename(columns={"label": "class"})), "",
        "## Model", "",
        f"- Base: {base.get('base')} ({base.get('base_params', 0):,} parameters)"
        + (f"; weights loaded by layer name from {base['weights_file']}"
           if base.get("weights_file") else ""),
        f"- Head: {head.get('pooling')} pooling, dense {head.get('dense')}, dropout "
        f"{head.get('dropout')}, softmax over the {len(names)} classes",
        "",
        "## Training", "",
    ]
    for phase, (stages, history) in phases.items():
        counts_ = history.get("parameter_counts", {})
        trained = sorted({layer for stage in history.get("trainable_layers", [])
                          for layer in stage})
        epochs = len(history.get("epoch", []))
        lines.append(
            f"- {phase}: {epochs} epochs in {len(stages)} stage(s); "
            + "; ".join(f"{s.get('optimizer')} at {s.get('learning_rate')}" for s in stages)
            + f"; {counts_.get('trainable_params', 0):,} trainable parameters; base layers "
            f"trained: {', '.join(trained) if trained else 'none (head only)'}")
    lines += [
        "", "## Results (test split)", "",
        f"Accuracy **{report['accuracy']:.4f}**, macro F1 "
        f"{report['macro avg']['f1-score']:.4f} (head only, after phase 1: accuracy "
        f"{phase1_report['accuracy']:.4f}).", "",
        markdown_table(per_class.round(4)), "",
        "Weakest classes: " + ", ".join(
            f"{row['class']} (F1 {row['f1']:.4f}, recall {row['recall']:.4f})"
            for _, row in weak.iterrows()) + ".",
        "", "## Intended use and limits", "",
        f"- Classifies images into one of these {len(names)} classes: "
        f"{', '.join(names)}. It always answers with one of them, also for an image of "
        "something else: check the confidence, and keep images of other things away from it.",
        "- The figures hold for images like the test split's (same source, framing and "
        f"resolution); they come from {int(counts['test'].sum())} test images, so a "
        "difference of a point or so between two models can be noise.",
        f"- Images are resized to {image_size[0]}x{image_size[1]} without keeping the aspect "
        "ratio, as in training.",
        "- Look at the weakest classes and the misclassified images before relying on it.",
    ]
    return "\n".join(lines) + "\n"

