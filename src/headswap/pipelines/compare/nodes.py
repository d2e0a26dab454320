"""Thin Kedro nodes of the ``compare`` pipeline (the variants' training reuses the finetune
nodes; these start and summarise each variant and draw the comparison)."""

from __future__ import annotations

import logging
import time
from typing import Any

import keras
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from headswap.config import (
    HeadConfig,
    ParameterError,
    from_scratch_parameters,
    merge_parameters,
    parse_finetune,
)
from headswap.core import data, evaluation
from headswap.core.fit import FitOptions

logger = logging.getLogger(__name__)


def start_variant(
    finetune: dict[str, Any],
    overrides: dict[str, Any],
    *after: Any,
    variant: str,
    from_scratch: bool = False,
) -> tuple[dict[str, Any], float]:
    """The variant's finetune parameters (``compare.variants.<variant>`` merged into
    ``finetune``), checked, and the time it starts. ``after`` orders variants one by one."""
    params = merge_parameters(finetune, overrides)
    if from_scratch:
        params = from_scratch_parameters(params)
    try:
        parse_finetune(params)
    except ParameterError as err:
        raise ParameterError(
            f"{err}\n(the finetune parameters with compare.variants.{variant} merged in: correct "
            "either, see conf/base/parameters_compare.yml)"
        ) from None
    logger.info("Variant %s starts", variant)
    return params, time.perf_counter()


def reinitialise_base(base: keras.Model, options: FitOptions) -> keras.Model:
    """The base's architecture with fresh random weights (seeded): training from scratch."""
    keras.utils.set_random_seed(options.seed)
    return keras.models.clone_model(base)


def extract_features(
    base: keras.Model, manifest: pd.DataFrame, options: FitOptions, head: HeadConfig
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The pretrained base as a fixed feature extractor: pooled features of every split, once."""
    channels = base.inputs[0].shape[-1]
    return {
        split: evaluation.pooled_features(
            base,
            data.make_dataset(manifest, split, options.image_size, channels, options.batch_size),
            head.pooling,
        )
        for split in data.SPLITS
    }


def fit_logistic_regression(
    features: dict[str, tuple[np.ndarray, np.ndarray]],
    manifest: pd.DataFrame,
    options: FitOptions,
    regression: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Logistic regression on the fixed features: the test report and a one-point history."""
    predicted, val_accuracy, size = evaluation.logistic_regression_baseline(
        features, float(regression["C"]), int(regression["max_iter"]), options.seed
    )
    report = evaluation.report(features["test"][1], predicted, data.class_names(manifest))
    history = {"epoch": [], "val_accuracy": [val_accuracy],
               "parameter_counts": {"trainable_params": size, "non_trainable_params": 0}}
    return report, history


def summarise_variant(
    started: float, report: dict[str, Any], *histories: dict[str, Any], variant: str
) -> tuple[dict[str, Any], dict[str, list[dict[str, float]]]]:
    """The variant's row of the comparison and its metrics (logged to its nested MLflow run)."""
    summary = evaluation.variant_summary(
        variant, report, list(histories), time.perf_counter() - started
    )
    logger.info(
        "Variant %s: test accuracy %.4f, macro F1 %.4f, %s trainable parameters, %.1f s",
        variant, summary["test_accuracy"], summary["macro_f1"],
        f"{summary['trainable_params']:,}", summary["wall_time_s"],
    )
    metrics = {k: [{"step": 0, "value": float(summary[k])}]
               for k in evaluation.TABLE_COLUMNS[1:]}
    metrics["val_accuracy"] = [
        {"step": step, "value": value}
        for step, value in zip(summary["epoch"] or [0], summary["val_accuracy"])
    ]
    return summary, metrics


def compare_variants(
    *summaries: dict[str, Any],
) -> tuple[pd.DataFrame, list[dict[str, Any]], str, Figure]:
    """The comparison table (CSV, JSON records, Markdown) and every variant's validation curve."""
    table = evaluation.comparison_table(list(summaries))
    logger.info("Comparison of the variants:\n%s", table.to_string(index=False))
    return (
        table,
        table.to_dict(orient="records"),
        evaluation.markdown_table(table),
        evaluation.validation_curves_figure(list(summaries)),
    )
