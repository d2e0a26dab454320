"""Thin Kedro nodes of the ``compare`` pipeline: each variant's parameters, its training (the
recipe as one call, :func:`headswap.project.training.train_recipe`), its summary, and the
comparison."""

from __future__ import annotations

import logging
import time
from typing import Any

import keras
import pandas as pd
from matplotlib.figure import Figure

from headswap.core import comparison, data, evaluation, manifests, sources
from headswap.core.bases import image_size_for
from headswap.project import training
from headswap.project.config import (
    ParameterError,
    from_scratch_parameters,
    merge_parameters,
    parse_finetune,
)

logger = logging.getLogger(__name__)


def start_variant(
    finetune: dict[str, Any], overrides: dict[str, Any], *, variant: str,
    from_scratch: bool = False,
) -> dict[str, Any]:
    """The variant's finetune parameters (``compare.variants.<variant>`` merged into
    ``finetune``), checked."""
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
    return params


def train_variant(
    base: keras.Model, manifest: pd.DataFrame, params: dict[str, Any], *,
    from_scratch: bool = False,
) -> tuple[keras.Model, dict[str, Any], dict[str, Any]]:
    """The whole recipe with the variant's parameters, in one call, on a copy of the base
    (``from_scratch``: fresh random weights): the model, each phase's history, and its test
    split's classification report."""
    model, histories, options = training.train_recipe(base, manifest, params,
                                                      from_scratch=from_scratch)
    result = evaluation.evaluate(model, manifest, options.image_size, options.batch_size,
                                 resize=options.resize)
    return model, histories, result["report"]


def fit_logistic_regression(
    base: keras.Model,
    manifest: pd.DataFrame,
    params: dict[str, Any],
    regression: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pretrained base as a fixed feature extractor (pooled features of every split,
    computed once) and logistic regression on them: a one-point history with the seconds both
    took, and the test report."""
    cfg = parse_finetune(params)
    options = cfg.with_image_size(image_size_for(base, cfg.data.image_size)).fit_options()
    started = time.perf_counter()
    channels = base.inputs[0].shape[-1]
    features = {
        split: evaluation.pooled_features(
            base,
            data.make_dataset(manifest, split, options.image_size, channels, options.batch_size,
                              resize=options.resize),
            cfg.head.pooling,
        )
        for split in sources.SPLITS
    }
    predicted, val_accuracy, size = comparison.logistic_regression_baseline(
        features, float(regression["C"]), int(regression["max_iter"]), options.seed
    )
    report = evaluation.report(features["test"][1], predicted, manifests.class_names(manifest))
    history = {"epoch": [], "val_accuracy": [val_accuracy],
               "seconds": time.perf_counter() - started,
               "parameter_counts": {"trainable_params": size, "non_trainable_params": 0}}
    return {"logistic_regression": history}, report


def summarise_variant(
    histories: dict[str, dict[str, Any]], report: dict[str, Any], *, variant: str
) -> tuple[dict[str, Any], dict[str, list[dict[str, float]]]]:
    """The variant's row of the comparison and its metrics (logged to its nested MLflow run);
    its time is the seconds its training took (its phases' ``seconds``)."""
    phases = list(histories.values())
    seconds = sum(float(h.get("seconds", 0.0)) for h in phases)
    summary = comparison.variant_summary(variant, report, phases, seconds)
    logger.info(
        "Variant %s: test accuracy %.4f, macro F1 %.4f, %s trainable parameters, %.1f s",
        variant, summary["test_accuracy"], summary["macro_f1"],
        f"{summary['trainable_params']:,}", summary["wall_time_s"],
    )
    metrics = {k: [{"step": 0, "value": float(summary[k])}]
               for k in comparison.TABLE_COLUMNS[1:]}
    metrics["val_accuracy"] = [
        {"step": step, "value": value}
        for step, value in zip(summary["epoch"] or [0], summary["val_accuracy"], strict=True)
    ]
    return summary, metrics


def compare_variants(
    *summaries: dict[str, Any],
) -> tuple[pd.DataFrame, list[dict[str, Any]], str, Figure]:
    """The comparison table (CSV, JSON records, Markdown) and every variant's validation curve."""
    table = comparison.comparison_table(list(summaries))
    logger.info("Comparison of the variants:\n%s", table.to_string(index=False))
    return (
        table,
        table.to_dict(orient="records"),
        evaluation.markdown_table(table),
        comparison.validation_curves_figure(list(summaries)),
    )
