"""The new head: pooling, dense layers with dropout, and a softmax classifier."""

from __future__ import annotations

import logging
from typing import Any

import keras

from headswap.core.bases import BASE_NAME, input_spec

logger = logging.getLogger(__name__)

OUTPUT_NAME = "predictions"
AUGMENT_PREFIX = "augment_"
#: The new head's hidden Dense layers and dropout when none are given.
DENSE = (64,)
DROPOUT = 0.3


def swap_head(
    base: keras.Model, class_names: list[str], head: Any, augmentation: Any, seed: int | None
) -> keras.Model:
    """``base`` with a new head for ``class_names``: ``head`` gives its ``pooling``, ``dense``
    and ``dropout`` (see :func:`attach_head`), ``augmentation`` its random layers (an
    :class:`~headswap.core.recipe.Augmentation`); seeded, so the head starts the same from run
    to run."""
    model = attach_head(
        base, len(class_names), head.pooling, head.dense, head.dropout,
        augmentation=augmentation_layers(
            augmentation.flip, augmentation.rotation, augmentation.zoom,
            augmentation.contrast, augmentation.translation, seed=seed,
        ),
        seed=seed,
    )
    logger.info("New head for %s classes: %s", len(class_names), ", ".join(class_names))
    return model


def attach_head(
    base: keras.Model,
    num_classes: int,
    pooling: str = "avg",
    dense: list[int] | tuple[int, ...] = DENSE,
    dropout: float = DROPOUT,
    name: str = "headswapped",
    augmentation: list[keras.layers.Layer] | None = None,
    seed: int | None = None,
) -> keras.Model:
    """Put a new, randomly initialised head on ``base`` (kept as one nested layer).

    The head is pooling (``avg``, ``max`` or ``flatten``, skipped if the base already gives
    vectors), then ``Dense(units, relu) -> Dropout(dropout)`` for each entry of ``dense``,
    then ``Dense(num_classes, softmax)``. ``augmentation`` layers (see
    :func:`augmentation_layers`) go between the input and the base. Train it with a loss on
    probabilities (``from_logits=False``), as :func:`headswap.core.train.compile_model` does.
    With ``seed``, Keras' random generators are seeded first, so the new head's initial weights
    are the same from run to run.
    """
    if num_classes < 2:
        raise ValueError(f"A classifier needs at least 2 classes; got {num_classes}.")
    if seed is not None:
        keras.utils.set_random_seed(seed)
    if base.name != BASE_NAME:  # one output as a tensor, not a list of one (Sequential bases)
        base = keras.Model(base.inputs, base.outputs[0], name=BASE_NAME)
    height, width, channels = input_spec(base)
    layers = keras.layers
    inputs = keras.Input(shape=(height, width, channels), name="image")
    x = inputs
    for layer in augmentation or []:
        x = layer(x)
    x = base(x)
    if len(x.shape) == 4:
        pool = {
            "avg": layers.GlobalAveragePooling2D,
            "max": layers.GlobalMaxPooling2D,
            "flatten": layers.Flatten,
        }[pooling]
        x = pool(name="head_pool")(x)
    for i, units in enumerate(dense, start=1):
        x = layers.Dense(units, activation="relu", name=f"head_dense{i}")(x)
        if dropout:
            x = layers.Dropout(dropout, name=f"head_dropout{i}")(x)
    if not dense and dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name=name)


def augmentation_layers(
    flip: str | None = None,
    rotation: float = 0.0,
    zoom: float = 0.0,
    contrast: float = 0.0,
    translation: float = 0.0,
    seed: int | None = None,
) -> list[keras.layers.Layer]:
    """Random Keras preprocessing layers; they act in training only and pass images through
    unchanged at inference. Factors are fractions (rotation of a full turn, zoom and
    translation of the image size, contrast of the pixel range)."""
    layers = keras.layers
    chosen: list[keras.layers.Layer] = []
    if flip:
        chosen.append(layers.RandomFlip(flip, seed=seed, name=f"{AUGMENT_PREFIX}flip"))
    if rotation:
        chosen.append(layers.RandomRotation(rotation, seed=seed, name=f"{AUGMENT_PREFIX}rotation"))
    if zoom:
        chosen.append(layers.RandomZoom(zoom, seed=seed, name=f"{AUGMENT_PREFIX}zoom"))
    if translation:
        chosen.append(
            layers.RandomTranslation(translation, translation, seed=seed,
                                     name=f"{AUGMENT_PREFIX}translation")
        )
    if contrast:
        chosen.append(
            layers.RandomContrast(contrast, value_range=(0, 255), seed=seed,
                                  name=f"{AUGMENT_PREFIX}contrast")
        )
    return chosen


def has_augmentation(model: keras.Model) -> bool:
    """Whether ``model`` has the random layers of :func:`augmentation_layers`."""
    return any(layer.name.startswith(AUGMENT_PREFIX) for layer in model.layers)


def split_at_head(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """(features, head): two models sharing ``model``'s layers, split after the base.

    ``features`` maps images to what the first trainable head layer sees (the base's output,
    through the parameter-free pooling layer); ``head`` maps those features to predictions.
    Training ``head`` trains ``model``'s head in place. Only for models made by
    :func:`attach_head` without augmentation.
    """
    names = [layer.name for layer in model.layers]
    after = model.layers[names.index(BASE_NAME) + 1 :]
    if has_augmentation(model):
        raise ValueError("A model with augmentation layers cannot train on cached features.")
    cut = after[0].input
    if after[0].name == "head_pool":
        cut, after = after[0].output, after[1:]
    features = keras.Model(model.inputs, cut, name="features")
    inputs = keras.Input(shape=tuple(cut.shape[1:]), name="features")
    x = inputs
    for layer in after:
        x = layer(x)
    return features, keras.Model(inputs, x, name="head")
