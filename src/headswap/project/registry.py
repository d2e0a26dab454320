"""The MLflow Model Registry: every finetune run's model is a new version of one registered
model, tagged with its test results; the alias ``champion`` marks the best version.

The alias moves to a new version only when its test accuracy beats the champion's on the
same test split. When the champion was tested on another split (another image folder, seed
or split fraction), it is scored again on the new version's test split before comparing;
a champion with other classes is not comparable and stays.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

logger = logging.getLogger(__name__)

CHAMPION = "champion"
SCORE_DIGITS = 6
"""Decimals of the scores tagged on a version: a new version is compared with the champion's
tag at that precision, so that an equal accuracy (1/3 against its tag 0.333333) is a tie."""


def score_tag(score: float) -> str:
    """``score`` as it is tagged on a version (:data:`SCORE_DIGITS` decimals)."""
    return f"{score:.{SCORE_DIGITS}f}"


def test_split_digest(manifest: pd.DataFrame) -> str:
    """A digest of a manifest's test split (paths and labels): equal digests, same test."""
    rows = manifest.loc[manifest["split"] == "test", ["path", "label"]].astype(str)
    text = "\n".join(sorted(f"{p}\t{label}" for p, label in rows.itertuples(index=False)))
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_digest(manifest: pd.DataFrame) -> str:
    """A digest of the whole manifest (every image, label and split)."""
    return hashlib.sha256(manifest.to_csv(index=False).encode()).hexdigest()


def tag_version(name: str, version: str, tags: dict[str, Any]) -> None:
    """Set ``tags`` on version ``version`` of the registered model ``name``."""
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def elect_champion(
    name: str, version: str, accuracy: float, digest: str,
    score: Callable[[str], float | None],
) -> dict[str, Any]:
    """Move the ``champion`` alias of ``name`` to ``version`` (test ``accuracy`` on the test
    split ``digest``) if it beats the current champion, and say what happened and why.

    ``score(model_uri)`` gives the champion's accuracy on this version's test split, or None
    when it cannot be compared (other classes); it is called only when the champion's
    ``test_split_digest`` tag differs from ``digest``.
    """
    client = mlflow.MlflowClient()
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    decision: dict[str, Any] = {
        "registered_model": name, "version": str(version), "test_accuracy": accuracy,
        "previous_champion": str(champion.version) if champion else None,
        "champion_test_accuracy": None,
    }
    if champion is None:
        promote, reason = True, "there was no champion yet"
    else:
        if champion.tags.get("test_split_digest") == digest:
            theirs = float(champion.tags["test_accuracy"])
            where = "the same test split"
        else:
            theirs = score(f"models:/{name}/{champion.version}")
            where = "this run's test split (the champion was tested on another)"
        decision["champion_test_accuracy"] = theirs
        if theirs is None:
            promote = False
            reason = (f"version {champion.version} has other classes, so the two cannot be "
                      "compared; set finetune.registry.name to keep models of different "
                      "classes apart")
        else:
            promote = float(score_tag(accuracy)) > float(score_tag(theirs))
            verb = "beats" if promote else "does not beat"
            reason = (f"test accuracy {accuracy:.4f} {verb} version {champion.version}'s "
                      f"{theirs:.4f} on {where}")
    if promote:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    decision.update(champion=str(version if promote else champion.version), promoted=promote,
                    reason=reason)
    logger.info("Model registry: %s version %s %s champion: %s.", name, version,
                "is the new" if promote else "is not the", reason)
    return decision
