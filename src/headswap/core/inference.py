"""A model's outputs over a pass of batches, the one way every evaluation, calibration,
feature extraction and prediction runs a Keras model.

A short pass (fewer than :data:`TRACED_FROM` batches: a small user folder's validation or
test split, a handful of new photos) runs the model eagerly. Tracing a graph for it would take
longer than the pass (MobileNetV2 at 224 px on this 2-core machine: the trace 1.2 s, a batch of
32 0.14 s traced, 0.40 s eagerly), and TensorFlow warns of "excessive retracing" when five
of its last ten predict calls traced, which a run of several models called once or twice each
does although each is traced once. A longer pass uses the model's own predict function
(``predict_on_batch``), its smaller last batch padded to the size of the first, so that each
model is traced once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

TRACED_FROM = 3  # batches in a pass from which the model's predict function is traced


def outputs(model: keras.Model, batches: Iterable[tuple[Any, ...]],
            count: int | None = None) -> Iterator[tuple[Any, ...]]:
    """``(outputs, *rest)`` for each ``(images, *rest)`` of ``batches``: ``model``'s outputs
    on the images (inference mode) as NumPy, a list of arrays for a model with several.
    ``count``, the number of batches, decides eager or traced (:data:`TRACED_FROM`); a
    ``tf.data`` dataset gives its own; unknown counts as long."""
    if count is None and isinstance(batches, tf.data.Dataset):
        known = int(batches.cardinality())
        count = known if known >= 0 else None
    eager = count is not None and count < TRACED_FROM
    full = None
    for images, *rest in batches:
        n = len(images)
        if eager:
            out = model(images, training=False)
        else:
            images = np.asarray(images)
            full = full or n
            if n < full:
                images = np.concatenate([images, np.zeros((full - n, *images.shape[1:]),
                                                          images.dtype)])
            out = model.predict_on_batch(images)
        yield (keras.tree.map_structure(lambda a, n=n: np.asarray(a)[:n], out), *rest)
