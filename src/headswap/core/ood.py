"""The out-of-distribution score ``ood_score``: how unlike the training images an image looks
to the model. Higher means more unusual.

It is the Mahalanobis distance (Lee et al., 2018, "A Simple Unified Framework for Detecting
Out-of-Distribution Samples and Adversarial Attacks") of an image's *head features*, the
input of the classifier's final Dense softmax layer
(:func:`headswap.core.calibration.with_features`), to the nearest class mean of the training
split::

    ood_score(x) = min over classes c of sqrt((f(x) - mean_c)^T P (f(x) - mean_c))

with ``P`` the inverse (precision) of one covariance shared by the classes: the training
features' spread around their own class mean, a Ledoit-Wolf shrinkage estimate (well
conditioned with few images per dimension, and where some features never vary). 0 at a class
mean; in units of the training spread, so it has no fixed scale across models: compare it
with :attr:`Statistics.threshold`, the validation split's :data:`QUANTILE` quantile of it.

For features of more than :data:`MAX_FULL_DIMENSIONS` dimensions (a head without hidden
layers on a 1280- to 2048-dimensional base), only the covariance's diagonal is kept (``P`` is
one over each dimension's shrunk variance), so that the statistics stay ``(classes + 1) x D``
numbers rather than ``D x D``.

Why not the energy (``-logsumexp(logits)``) or the max logit: on the example, images of the
classes its base was pretrained on got *lower* energy than the model's own test images
(AUROC 0.20); the distance of the features separates them better (AUROC 0.84;
``python benchmarks/unknown_images.py --env example``).

::

    from headswap.core import calibration, ood
    _, features, labels = calibration.split_outputs(model, manifest, "train", (224, 224))
    statistics = ood.fit(features, labels)       # None where the features never vary
    scores = statistics.score(head_features)     # one per image
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from sklearn.covariance import LedoitWolf

from headswap.core.errors import InputError

#: Above this many feature dimensions only the covariance's diagonal is kept.
MAX_FULL_DIMENSIONS = 256
#: The validation split's quantile of the score stored as its reference (``threshold``).
QUANTILE = 0.95
#: Significant digits of the numbers stored.
DIGITS = 6
#: What the score is, in one line (reports, the model card).
DESCRIPTION = ("the Mahalanobis distance of the image's head features (the input of the last "
               "Dense layer) to the nearest class mean of the training split, under their "
               "shared covariance (Ledoit-Wolf); higher means more unusual")


@dataclass(frozen=True, eq=False)
class Statistics:
    """What :meth:`score` needs: the training split's class ``means`` of the head features
    (classes x D) and the ``precision`` of their shared covariance (D x D, or its diagonal,
    D numbers, where D > :data:`MAX_FULL_DIMENSIONS`); and the ``threshold`` users compare
    the score with (the validation split's :data:`QUANTILE` quantile; None: unknown)."""

    means: np.ndarray
    precision: np.ndarray
    threshold: float | None = None

    def __post_init__(self) -> None:
        means = np.asarray(self.means, dtype=np.float64)
        precision = np.asarray(self.precision, dtype=np.float64)
        d = means.shape[-1] if means.ndim == 2 else -1
        if (means.ndim != 2 or not len(means) or precision.shape not in ((d,), (d, d))
                or not (np.isfinite(means).all() and np.isfinite(precision).all())):
            raise InputError(
                f"The ood statistics are malformed (means of shape {means.shape}, precision "
                f"of shape {precision.shape}): expected finite class means (classes x D) and a "
                "D x D or D precision. Run finetune again to write them, or remove the `ood` "
                "key to score no image.")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "precision", precision)

    @property
    def dimensions(self) -> int:
        """D, the number of head features."""
        return int(self.means.shape[1])

    @property
    def diagonal(self) -> bool:
        """Whether only the covariance's diagonal is kept."""
        return self.precision.ndim == 1

    def score(self, features: np.ndarray) -> np.ndarray:
        """The ``ood_score`` of each row of ``features`` (images x D): the smallest
        Mahalanobis distance to a class mean."""
        x = np.asarray(features, dtype=np.float64).reshape(-1, self.dimensions)
        weigh = ((lambda a: a * self.precision) if self.diagonal
                 else (lambda a: a @ self.precision))
        wx, wm = weigh(x), weigh(self.means)
        # |x - m|^2_P = x'Px - 2 x'Pm + m'Pm, for every image and class at once
        squared = ((wx * x).sum(axis=1)[:, None] - 2 * wx @ self.means.T
                   + (wm * self.means).sum(axis=1)[None, :])
        return np.sqrt(np.maximum(squared.min(axis=1), 0.0))

    def with_threshold(self, features: np.ndarray) -> Statistics:
        """These statistics with ``threshold`` the :data:`QUANTILE` quantile of the scores of
        ``features`` (None without any)."""
        scores = self.score(features)
        return replace(self, threshold=float(np.quantile(scores, QUANTILE))
                       if len(scores) else None)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``threshold``, ``means`` and ``precision`` as (nested) lists of numbers
        rounded to :data:`DIGITS` significant digits (:meth:`from_dict` reads it back)."""
        return {"threshold": self.threshold, "means": _rounded(self.means),
                "precision": _rounded(self.precision)}

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any]) -> Statistics:
        """The statistics :meth:`as_dict` wrote; :class:`InputError` when malformed."""
        try:
            means = np.asarray(stored["means"], dtype=np.float64)
            precision = np.asarray(stored["precision"], dtype=np.float64)
            threshold = stored.get("threshold")
            threshold = None if threshold is None else float(threshold)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise InputError(
                f"The ood statistics cannot be read ({type(err).__name__}: {err}): expected "
                "`means` and `precision` lists of numbers. Run finetune again to write them, "
                "or remove the `ood` key to score no image.") from None
        return cls(means, precision, threshold)

def fit(features: np.ndarray, labels: np.ndarray) -> Statistics | None:
    """The :class:`Statistics` of the training split's head ``features`` (images x D) and
    their class ``labels``: the mean of each class present, and the precision of the
    Ledoit-Wolf covariance of the features around their class mean (its diagonal only where
    D > :data:`MAX_FULL_DIMENSIONS`). None when the features do not vary within their classes
    (no image, or one per class), where no distance can be scaled."""
    x = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or not len(x):
        return None
    classes, index = np.unique(labels, return_inverse=True)
    means = np.stack([x[index == c].mean(axis=0) for c in range(len(classes))])
    residuals = x - means[index]
    if not (residuals ** 2).sum() > 0:
        return None
    estimate = LedoitWolf(assume_centered=True).fit(residuals)
    if x.shape[1] > MAX_FULL_DIMENSIONS:  # floored: a variance shrunk to nothing stays finite
        variances = np.diag(estimate.covariance_)
        return Statistics(means, 1.0 / np.maximum(variances, 1e-12 * variances.mean()))
    return Statistics(means, estimate.precision_)


def _rounded(values: np.ndarray) -> list:
    """``values`` as (nested) lists of floats with :data:`DIGITS` significant digits."""
    if values.ndim > 1:
        return [_rounded(row) for row in values]
    return [float(f"{v:.{DIGITS}g}") for v in values]


def to_settings(statistics: Statistics | None) -> dict[str, Any]:
    """How a model's ``preprocessing.json`` holds ``statistics``: ``ood_threshold`` (the
    reference to compare the score with) and ``ood`` (``means`` and ``precision``); nothing
    for None."""
    if statistics is None:
        return {}
    stored = statistics.as_dict()
    return {"ood_threshold": stored.pop("threshold"), "ood": stored}


def from_settings(settings: Mapping[str, Any]) -> Statistics | None:
    """The statistics :func:`to_settings` put in a model's settings; None without them (a
    model written before they were, or one without a Dense softmax last layer)."""
    if not settings.get("ood"):
        return None
    return Statistics.from_dict({**settings["ood"], "threshold": settings.get("ood_threshold")})
