"""Grad-CAM from the class score before the softmax (``headswap.core.explain``), on a small
real classifier trained on the shapes: informative where the softmax saturates, and the
gradient it takes is the logit's, checked against the one written out by hand."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from headswap.core import bases, data, explain, heads, manifests
from headswap.core.bases import BASE_NAME
from headswap.core.fit import FitOptions, fit
from headswap.core.recipe import Stage
from tests.conftest import CLASSES, make_image_folder, small_cnn


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[keras.Model, np.ndarray]:
    """A new head (global average pooling straight into the Dense softmax) on a small CNN,
    trained for 6 epochs on the three-class shapes folder; and six test images."""
    folder = make_image_folder(tmp_path_factory.mktemp("shapes") / "images", per_class=20)
    manifest, _ = manifests.ingest_image_folder(folder, seed=0)
    model = heads.attach_head(bases.cut_model(small_cnn()), len(CLASSES), dense=[],
                              dropout=0.0, seed=0)
    options = FitOptions(image_size=(32, 32), batch_size=8, seed=0, verbose=0)
    fit(model, manifest, [Stage(epochs=6, learning_rate=3e-3, train="all")], options)
    paths = manifests.split_arrays(manifest, "test")[0][:6]
    return model, data.decode_all(paths, (32, 32), 1)


def _saturated(model: keras.Model, images: np.ndarray) -> keras.Model:
    """A copy of ``model`` whose class scores are scaled up until each image's best one leads
    the next by 200: the same predictions, with the softmax pinned at 0 and 1 (exp(-200)
    is 0 in float32)."""
    classifier = model.layers[-1]
    kernel, bias = classifier.get_weights()
    hidden = np.asarray(keras.Model(model.inputs, classifier.input).predict_on_batch(images))
    top2 = np.sort(hidden @ kernel + bias, axis=1)[:, -2:]
    factor = 200 / (top2[:, 1] - top2[:, 0]).min()
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    copy.layers[-1].set_weights([kernel * factor, bias * factor])
    return copy


def _softmax_gradient(model: keras.Model, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The gradient of each image's probability of its class with respect to the base's
    feature map (what Grad-CAM took before)."""
    names = [layer.name for layer in model.layers]
    feature_map = model.layers[names.index(BASE_NAME) + 1].input
    probe = keras.Model(model.inputs, [feature_map, model.outputs[0]])
    with tf.GradientTape() as tape:
        features, probabilities = probe(tf.constant(images, tf.float32), training=False)
        chosen = tf.gather(probabilities, tf.constant(classes, tf.int32), batch_dims=1)
    return tape.gradient(chosen, features).numpy()


def test_heatmaps_stay_informative_where_the_softmax_saturates(trained):
    model, images = trained
    classes = np.asarray(model.predict_on_batch(images)).argmax(axis=1)
    saturated = _saturated(model, images)
    probabilities = np.asarray(saturated.predict_on_batch(images))
    assert (probabilities.argmax(axis=1) == classes).all()
    assert (probabilities.max(axis=1) == 1.0).all()  # float32 rounds to exactly 1
    # the softmax gives Grad-CAM nothing to work with there: its gradient is (about) zero
    assert np.abs(_softmax_gradient(saturated, images, classes)).max() < 1e-6
    cams = explain.grad_cam(saturated, images, classes)
    assert cams.shape == (6, 32, 32) and cams.min() >= 0.0
    assert (cams.reshape(6, -1).max(axis=1) > 0.5).all()  # each map peaks somewhere
    assert (cams.reshape(6, -1).std(axis=1) > 0.05).all()  # and is not flat
    # scaling the class scores scales their gradient only: the same heatmaps as the model's own
    np.testing.assert_allclose(cams, explain.grad_cam(model, images, classes), atol=1e-4)


def test_the_gradient_is_the_class_score_before_the_softmax(trained):
    """With average pooling straight into the Dense layer, the class score is
    ``mean(A) @ W[:, c] + b[c]``: its gradient with respect to the feature map ``A`` is
    ``W[:, c] / (h * w)`` at every place, so Grad-CAM's map is ``relu(A @ W[:, c])``,
    normalised and resized to the image."""
    model, images = trained
    probabilities = np.asarray(model.predict_on_batch(images))
    classes = probabilities.argmin(axis=1)  # the least likely class: a score, not a probability
    base = model.get_layer(BASE_NAME)
    features = np.asarray(base.predict_on_batch(images))
    kernel, _ = model.layers[-1].get_weights()
    maps = np.maximum(np.einsum("nhwk,kn->nhw", features, kernel[:, classes]), 0)
    maps = maps / (maps.max(axis=(1, 2), keepdims=True) + 1e-8)
    expected = tf.image.resize(maps[..., None], (32, 32))[..., 0].numpy()
    np.testing.assert_allclose(explain.grad_cam(model, images, classes), expected, atol=1e-4)
    assert explain.feature_map_model(model).outputs[1].shape == (None, len(CLASSES))
