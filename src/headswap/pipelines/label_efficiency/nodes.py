"""Thin Kedro nodes of the ``label_efficiency`` pipeline (the variants themselves are the
``compare`` pipeline's nodes)."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from headswap.core import comparison, evaluation, manifests, sources
from headswap.project.config import merge_parameters
from headswap.project.example import target_folder

logger = logging.getLogger(__name__)


def write_example_folder(
    example: dict[str, Any], overrides: dict[str, Any], *, labels_per_class: int
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The example's target folder (``example`` with ``label_efficiency.example`` merged in)
    holding ``labels_per_class`` labelled images per class, the largest count, and all the
    official test images of the target classes: its files and its summary."""
    params = merge_parameters(
        example, {**(overrides or {}), "labels_per_class": labels_per_class}
    )
    return target_folder(params)


def ingest_parameters(finetune: dict[str, Any], folder: dict[str, Any]) -> dict[str, Any]:
    """The finetune parameters that ingest the folder just written (its own split, no earlier
    manifest)."""
    return merge_parameters(
        finetune, {"data": {"path": folder["path"], "manifest": None}}
    )


def select_labels(
    manifest: pd.DataFrame, seed: int, *, labels_per_class: int
) -> tuple[pd.DataFrame, dict[str, dict[str, float]]]:
    """The manifest with ``labels_per_class`` labelled images per class (nested across counts,
    see :func:`headswap.core.manifests.labelled_subset`) and its image counts as metrics."""
    subset = manifests.labelled_subset(manifest, labels_per_class, seed)
    counts = {"labels_per_class": labels_per_class,
              **{f"{split}_images": int((subset["split"] == split).sum())
                 for split in sources.SPLITS}}
    logger.info("%s labelled images per class: %s", labels_per_class,
                ", ".join(f"{k} {v}" for k, v in counts.items() if k != "labels_per_class"))
    return subset, {k: {"value": float(v), "step": 0} for k, v in counts.items()}


def collect_counts(
    *tables: pd.DataFrame, labels_per_class: tuple[int, ...]
) -> tuple[pd.DataFrame, list[dict[str, Any]], str, Figure]:
    """Every count's comparison in one long table (CSV, JSON records, Markdown), and test
    accuracy against labels per class for each variant."""
    table = comparison.label_efficiency_table(dict(zip(labels_per_class, tables, strict=True)))
    logger.info("Label efficiency:\n%s", table.to_string(index=False))
    return (
        table,
        table.to_dict(orient="records"),
        evaluation.markdown_table(table),
        comparison.label_efficiency_figure(table),
    )
