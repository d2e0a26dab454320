"""Kedro nodes of the ``predict`` pipeline: list a folder's images, classify them with the
catalog's ``classifier``, and report against the class sub-folders' labels if there are."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from headswap.core import data, evaluation, predict, sources
from headswap.core.predict import Classifier
from headswap.pipelines import metrics_points
from headswap.project.config import PredictConfig, parse_predict

logger = logging.getLogger(__name__)


def check_parameters(params: dict[str, Any]) -> PredictConfig:
    """The ``predict`` parameters, validated."""
    return parse_predict(params)


def list_images(images: sources.ImageSource) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The images of the catalog's ``prediction_images`` (``predict.path``: a folder, flat or
    of class sub-folders, or a CSV; local or remote): path, label (the class sub-folder or the
    CSV's label, else empty); and the files that cannot be classified (path, reason)."""
    table, unsupported = predict.list_images(images)
    labelled = int((table["label"] != "").sum())
    logger.info("%s images to classify under %s%s", len(table), images.location,
                f" ({labelled} labelled)" if labelled else "")
    return table, unsupported


def classify_images(
    classifier: Classifier, images: pd.DataFrame, unsupported: pd.DataFrame,
    config: PredictConfig,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per image: path, the true class (if the folder has class sub-folders),
    predicted class, confidence, the top-k classes and each class's probability; and the
    files that could not be classified (path, reason)."""
    paths = images["path"].tolist()
    table, problems = classifier.predict(list(sources.local_paths(paths)), config.batch_size,
                                         config.top_k)
    front = images.iloc[table.index][["path"]].reset_index(drop=True)
    if (images["label"] != "").any():
        front["true"] = images["label"].iloc[table.index].to_numpy()
    predictions = pd.concat([front, table.reset_index(drop=True)], axis=1)
    skipped = pd.concat([unsupported, pd.DataFrame(
        [(paths[i], reason) for i, reason in sorted(problems.items())],
        columns=data.SKIPPED_COLUMNS)], ignore_index=True)
    data.log_skipped(skipped, len(images) + len(unsupported))
    return predictions, skipped


def report(
    predictions: pd.DataFrame, skipped: pd.DataFrame, classifier: Classifier
) -> tuple[dict[str, Any], str, dict[str, dict[str, float]]]:
    """scikit-learn's classification report of the images in class sub-folders named after
    the model's classes (empty without any), and the counts and accuracy as metrics."""
    counts = {"images": len(predictions), "skipped_images": len(skipped)}
    names = list(classifier.class_names)
    labelled = (predictions[predictions["true"].isin(names)] if "true" in predictions
                else predictions.iloc[:0])
    if labelled.empty:
        text = "No image is in a sub-folder named after one of the model's classes: no report."
        logger.info(text)
        return {}, text + "\n", metrics_points(counts)
    others = sorted(set(predictions["true"]) - set(names) - {""})
    if others:
        logger.warning("Left out of the report: sub-folders %s are not classes of the model "
                       "(%s).", ", ".join(others), ", ".join(names))
    result = evaluation.summarise(labelled, names)
    logger.info("Classification report on %s labelled images:\n%s", len(labelled),
                result["text"])
    return result["report"], result["text"], metrics_points({**counts, **result["metrics"]})
