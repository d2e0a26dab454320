from pathlib import Path

import keras
import numpy as np
import pytest

from headswap.core import applications, bases, heads, train
from headswap.project.datasets import BaseModelDataset
from tests.conftest import small_cnn


def _sequential() -> keras.Model:
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            layers.Conv2D(4, 3, name="c1"),
            layers.GlobalAveragePooling2D(name="pool"),
            layers.Dense(6, name="fc"),
            layers.Dense(3, activation="softmax", name="old_head"),
        ],
        name="seq",
    )


@pytest.mark.parametrize(
    "cut_at, last",
    [("auto", "features"), ("fc", "fc"), (-2, "fc"), ("-3", "gap"), (3, "bn1")],
)
def test_functional_model_is_cut_by_name_index_or_feature_map(cut_at, last):
    model = small_cnn()
    base = bases.cut_model(model, cut_at)
    assert base.name == bases.BASE_NAME
    assert base.layers[-1].name == last
    assert "output" not in [layer.name for layer in base.layers]


@pytest.mark.parametrize(
    "cut_at, shape", [("auto", (None, 14, 14, 4)), (-2, (None, 6)), ("pool", (None, 4))]
)
def test_sequential_model_is_cut(cut_at, shape):
    base = bases.cut_model(_sequential(), cut_at)
    assert tuple(base.outputs[0].shape) == shape


@pytest.mark.parametrize("cut_at, message", [(99, "out of range"), ("nope", "not a layer")])
def test_bad_cut_points_name_the_problem(cut_at, message):
    with pytest.raises(bases.BaseLoadError, match=message):
        bases.cut_model(small_cnn(), cut_at)


def test_model_file_and_kedro_versioned_folder_load(tmp_path: Path):
    model = small_cnn()
    folder = tmp_path / "m.keras"
    for version in ("2026-01-01T00.00.00.000Z", "2026-02-01T00.00.00.000Z"):
        (folder / version).mkdir(parents=True)
    model.save(folder / "2026-02-01T00.00.00.000Z" / "m.keras")
    loaded = BaseModelDataset(path=str(folder), image_size=32).load()
    np.testing.assert_allclose(loaded.get_layer("conv1").get_weights()[0],
                               model.get_layer("conv1").get_weights()[0])
    legacy = tmp_path / "m.h5"
    model.save(legacy)
    assert bases.load_model_file(legacy).get_layer("fc").units == 32
    with pytest.raises(bases.BaseLoadError, match="No model file"):
        bases.load_model_file(tmp_path / "missing.keras")


def test_lambda_layer_is_refused_in_safe_mode_unless_allowed(tmp_path: Path):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Lambda(lambda t: t * 2.0, name="double")(inputs)
    x = keras.layers.Conv2D(2, 3, name="conv")(x)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, x).save(path)
    with pytest.raises(bases.BaseLoadError, match="allow_unsafe"):
        bases.load_model_file(path)
    assert bases.load_model_file(path, allow_unsafe=True).get_layer("double") is not None


def test_keras_application_takes_raw_pixels_and_checks_size():
    base = applications.keras_application("MobileNetV2", (32, 32), weights=None)
    assert bases.input_spec(base) == (32, 32, 3)
    names = [layer.name for layer in base.layers]
    assert names[1] == "preprocess_scale"
    with pytest.raises(bases.BaseLoadError, match="at least 71x71"):
        applications.keras_application("Xception", (32, 32), weights=None)
    with pytest.raises(bases.BaseLoadError, match="not a known architecture"):
        applications.keras_application("ResNet7", (32, 32), weights=None)


def test_image_size_must_match_a_fixed_input():
    with pytest.raises(bases.BaseLoadError, match=r"`image_size`: \[32, 32\]"):
        bases.check_image_size(small_cnn(), (28, 28))
    bases.check_image_size(small_cnn(), (32, 32))


def test_new_head_is_softmax_sized_for_the_classes_and_matches_the_loss():
    model = heads.attach_head(bases.cut_model(small_cnn()), 5, dense=[8], dropout=0.5)
    out = model.get_layer(heads.OUTPUT_NAME)
    assert out.units == 5 and out.activation.__name__ == "softmax"
    assert [layer.name for layer in model.layers][1:] == [
        "base", "head_pool", "head_dense1", "head_dropout1", "predictions"]
    probabilities = model.predict(np.zeros((2, 32, 32, 1)), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    train.compile_model(model, keras.optimizers.RMSprop(1e-3))
    assert model.loss.get_config()["from_logits"] is False
    with pytest.raises(ValueError, match="at least 2 classes"):
        heads.attach_head(bases.cut_model(small_cnn()), 1)
