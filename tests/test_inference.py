"""How models are run over a pass of batches (``headswap.core.inference``): a short pass
eagerly, a longer one through the model's predict function traced once, whatever the size of
its last batch; the same outputs either way."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from headswap.core import evaluation, inference


def _model(seed: int) -> keras.Model:
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu",
                            kernel_initializer=keras.initializers.GlorotUniform(seed))(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def _batches(images: int, batch_size: int = 8) -> tf.data.Dataset:
    rng = np.random.default_rng(images)
    x = rng.uniform(0, 255, (images, 16, 16, 3)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, np.arange(images) % 3)).batch(batch_size)


def _traces(model: keras.Model) -> int:
    return 0 if model.predict_function is None else \
        model.predict_function.experimental_get_tracing_count()


def test_a_short_pass_traces_nothing_and_gives_the_predict_functions_outputs():
    dataset = _batches(12)  # two batches: 8 and 4 images
    for seed in range(6):  # a run evaluates model after model, each on a small split
        model = _model(seed)
        labels, probabilities = evaluation.predict(model, dataset)
        assert _traces(model) == 0
        expected = np.concatenate([model.predict_on_batch(x) for x, _ in dataset])
        np.testing.assert_allclose(probabilities, expected, atol=1e-6)
        assert labels.tolist() == [i % 3 for i in range(12)]


def test_a_long_pass_traces_each_model_once_despite_a_smaller_last_batch():
    dataset = _batches(8 * inference.TRACED_FROM + 3)  # the last batch: 3 images
    for seed in range(6):
        model = _model(seed)
        labels, probabilities = evaluation.predict(model, dataset)
        assert _traces(model) == 1
        assert len(probabilities) == len(labels) == 8 * inference.TRACED_FROM + 3
        eager = np.concatenate([np.asarray(model(x, training=False)) for x, _ in dataset])
        np.testing.assert_allclose(probabilities, eager, atol=1e-6)


def test_a_model_with_two_outputs_gives_both_for_each_image():
    model = _model(0)
    two = keras.Model(model.inputs, [model.outputs[0], model.layers[-2].output])
    for count in (1, 2 * inference.TRACED_FROM):
        passed = list(inference.outputs(two, _batches(8 * count)))
        assert len(passed) == count
        for (probabilities, features), labels in passed:
            assert probabilities.shape == (8, 3) and features.shape == (8, 4)
            assert isinstance(probabilities, np.ndarray) and len(labels) == 8
