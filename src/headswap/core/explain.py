"""Grad-CAM (Selvaraju et al., 2017): where in an image the base's feature map drove the
model's score for a class, as a heatmap over the image.

The score differentiated is the class's score before the softmax (the final Dense layer's
output without its activation), as in the paper: the softmax probability of a confidently
classified image is flat in every direction (its gradient vanishes as the probability nears
1), so its heatmap would be noise or nothing just where the model is surest."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

from headswap.core.bases import BASE_NAME
from headswap.core.calibration import classifier_layer
from headswap.core.errors import InputError


def feature_map_model(model: keras.Model) -> keras.Model:
    """``model`` with two outputs: the base's feature map and the class scores before the
    softmax (the final Dense layer again, with the same weights and no activation).

    Raises :class:`InputError` for a model not made by ``attach_head``, whose base gives a
    vector (a base cut after its pooling: Grad-CAM needs a convolutional feature map), or
    whose last layer is not a Dense softmax classifier."""
    names = [layer.name for layer in model.layers]
    if BASE_NAME not in names or names.index(BASE_NAME) + 1 >= len(names):
        raise InputError(f"Model {model.name!r} has no base followed by a head; Grad-CAM "
                         "explains models made by swapping the head of a base.")
    feature_map = model.layers[names.index(BASE_NAME) + 1].input
    if len(feature_map.shape) != 4:
        raise InputError(
            f"The base of {model.name!r} gives a vector of shape {tuple(feature_map.shape)}, "
            "not a feature map: Grad-CAM needs a convolutional base cut before its pooling "
            "(`cut_at`: auto cuts at the last feature map).")
    classifier = classifier_layer(model)
    scores = keras.layers.Dense.from_config({**classifier.get_config(), "activation": "linear",
                                             "name": "class_scores"})
    logits = scores(classifier.input)
    scores.set_weights(classifier.get_weights())
    return keras.Model(model.inputs, [feature_map, logits], name="grad_cam")


def grad_cam(model: keras.Model, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Heatmaps in [0, 1], shape ``(n, height, width)``: for each image (raw pixels, as the
    model takes them), how much each place of the base's feature map raised the score (before
    the softmax) of the class in ``classes``, upsampled to the image."""
    cam_model = feature_map_model(model)
    pixels = tf.convert_to_tensor(images, dtype=tf.float32)
    with tf.GradientTape() as tape:
        features, logits = cam_model(pixels, training=False)
        scores = tf.gather(logits, tf.constant(classes, dtype=tf.int32), batch_dims=1)
    gradients = tape.gradient(scores, features)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
    cams = cams / (tf.reduce_max(cams, axis=(1, 2), keepdims=True) + 1e-8)
    return tf.image.resize(cams[..., None], images.shape[1:3])[..., 0].numpy()


def grad_cam_figure(images: np.ndarray, cams: np.ndarray, titles: list[str],
                    columns: int = 4, title: str = "") -> Figure:
    """A grid of images with their heatmaps laid over them."""
    rows = max(1, -(-len(images) // columns))
    fig = Figure(figsize=(2.4 * columns, 2.6 * rows))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, cam, text in zip(axes, images, cams, titles, strict=False):
        pixels = np.clip(image, 0, 255).astype("uint8")
        ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels,
                  cmap="gray" if pixels.shape[-1] == 1 else None)
        ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(text, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def message_figure(text: str) -> Figure:
    """A figure that says why there is no picture."""
    fig = Figure(figsize=(6, 1.5))
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9)
    return fig
