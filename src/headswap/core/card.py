"""A model card: what a fine-tuned model was trained on and how, how well it does, where it is
weak, and what it is for, as Markdown."""

from __future__ import annotations

from typing import Any

import pandas as pd

from headswap.core import manifests, sources
from headswap.core.evaluation import markdown_table
from headswap.core.export_check import LATENCY_IMAGES, TOLERANCES


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
    calibration: dict[str, Any] | None = None,
    exports: pd.DataFrame | None = None,
    resize: str = "stretch",
) -> str:
    """The card of model ``name``: the data (classes, images per split), the base and its
    cut, the head, each phase's stages with what trained, the test results with the
    per-class table and the ``weakest`` classes, and its intended use and limits.

    ``phases`` maps a phase's name to its stages' settings and its history (as
    :func:`headswap.core.fit.fit` returns it); ``base`` is the base's description (``base``,
    ``base_params``, ``weights_file``); ``calibration`` the calibration report (the
    finetune pipeline's ``calibration_report``: temperature, ECE, ``min_confidence``);
    ``exports`` the exports' check (:func:`headswap.core.export_check.check_exports`);
    ``resize`` how images are brought to ``image_size`` (:data:`headswap.core.images.RESIZE_MODES`).
    """
    names = manifests.class_names(manifest)
    counts = pd.crosstab(manifest["label"], manifest["split"]).reindex(
        index=names, columns=list(sources.SPLITS), fill_value=0)
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
        *(_calibration_lines(calibration) if calibration else []),
        *(_export_lines(exports) if exports is not None and len(exports) else []),
        "", "## Intended use and limits", "",
        f"- Classifies images into one of these {len(names)} classes: "
        f"{', '.join(names)}. " + (
            "Below its `min_confidence` it answers `unknown`; above it, it answers with one "
            "of them also for an image of something else: keep images of other things away "
            "from it, or look at their `ood_score`."
            if calibration and calibration["min_confidence"]["threshold"] is not None else
            "It always answers with one of them, also for an image of something else: check "
            "the confidence, and keep images of other things away from it."),
        "- The figures hold for images like the test split's (same source, framing and "
        f"resolution); they come from {int(counts['test'].sum())} test images, so a "
        "difference of a point or so between two models can be noise.",
        f"- Images are resized to {image_size[0]}x{image_size[1]} "
        + _RESIZED[resize] + ", as in training.",
        "- Look at the weakest classes and the misclassified images before relying on it.",
    ]
    return "\n".join(lines) + "\n"



_RESIZED = {"stretch": "without keeping the aspect ratio",
            "pad": "keeping the aspect ratio, with black bands",
            "crop": "keeping the aspect ratio, their edges cropped"}


def _calibration_lines(report: dict[str, Any]) -> list[str]:
    """The card's section on the calibration report: temperature, ECE and NLL before and
    after on each split, and the ``unknown`` threshold."""
    val, test, bins = report["validation"], report["test"], report["bins"]
    if report["method"] == "temperature":
        how = (f"Temperature scaling fitted on the {val['images']} validation images: "
               f"T = {report['temperature']:.4g}, folded into the model's last layer, so every "
               "use of the model (predict, the MLflow model, the exports) gives these "
               "probabilities; the predicted classes are those before it.")
    else:
        how = "Not calibrated" + (f" ({report['note']})." if report.get("note") else
                                  " (`calibration.method`: none).")
    rows = pd.DataFrame([{"split": name, "images": split["images"],
                          "ECE before": split["ece_before"], "ECE after": split["ece"],
                          "NLL before": split["nll_before"], "NLL after": split["nll"]}
                         for name, split in (("validation", val), ("test", test))])
    unknown = report["min_confidence"]
    if unknown["threshold"] is None:
        refusal = (f"No `min_confidence`: no top probability keeps a precision of "
                   f"{unknown['target_precision']} on the validation split, so every image "
                   "gets a class.")
    else:
        refusal = (
            f"`min_confidence` **{unknown['threshold']:.4f}**: the lowest top probability at "
            f"which the validation images kept are right at least "
            f"{unknown['target_precision']:.0%} of the time (it keeps "
            f"{unknown['validation']['kept']:.1%} of them; on the test split it keeps "
            f"{unknown['test']['kept']:.1%}, right {_share(unknown['test']['precision'])} of "
            f"the time). `predict` (`min_confidence: auto`) and the MLflow model label images "
            "below it `unknown`.")
    return [
        "", "## Confidence", "", how, "", markdown_table(rows.round(4)), "",
        f"ECE: expected calibration error over {bins} equal-width bins of the top "
        "probability (0: the confidence is the accuracy); NLL: negative log-likelihood.", "",
        refusal, "", _ood_line(report["ood_score"]),
    ]


def _ood_line(ood: dict[str, Any]) -> str:
    """The card's paragraph on the out-of-distribution score and its validation reference."""
    what = f"Out-of-distribution score (`ood_score` in predictions): {ood['description']}."
    if ood.get("note"):
        return f"{what} This model has none ({ood['note']})."
    if ood.get("threshold") is None:
        return f"{what} No validation images set a reference to compare it with."
    return (
        f"{what} {ood['quantile']:.0%} of the validation images score at most "
        f"**{ood['threshold']:.4g}** (`ood_threshold` in `preprocessing.json`; "
        f"{_share(ood['test_above_threshold'])} of the test images score above it): an image "
        "scoring well above it is unlike the training images. A hint, not a verdict: it ranks "
        "images of classes the model never saw above its own test images only most of the "
        "time (on the headswap example, AUROC well below 1: see the documentation's \"Using "
        "the model\"), so some of them score below it.")


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _export_lines(table: pd.DataFrame) -> list[str]:
    """The card's section on the exports, each scored against the Keras model."""
    failed = table["error"].notna() & (table["error"].astype(str) != "")
    shown = table[["format", "file", "size_mb", "accuracy", "agreement", "max_prob_diff",
                   "latency_ms", "within_tolerance"]].copy()
    shown["within_tolerance"] = shown["within_tolerance"].map(
        {True: "yes", False: "**no**"}).where(~failed, "**failed**").fillna("")
    shown = shown.astype(object).where(shown.notna(), "")
    images = int(table["images"].max())
    errors = [f"- {row.format} {row.error}" for row in table[failed].itertuples()]
    if not images:
        return ["", "## Exports", "", "Not checked against the Keras model "
                "(`export.check_images`: 0).", "",
                markdown_table(shown[["format", "file", "size_mb"]]), "", *errors]
    return [
        "", "## Exports", "",
        f"Each export run by its own runtime (TensorFlow, the TFLite interpreter, onnxruntime) "
        f"on {images:,} test images and compared with the Keras model: top-1 agreement, "
        "largest difference of a class probability; size in MB; latency: median ms per image "
        f"(batch 1, {LATENCY_IMAGES} images, on the machine that trained it, each runtime with "
        "its default threads). Tolerance (least agreement, largest difference): "
        + ", ".join(f"{name} {least}, {most}" for name, (least, most) in TOLERANCES.items())
        + ".", "",
        markdown_table(shown), "", *errors,
    ]
