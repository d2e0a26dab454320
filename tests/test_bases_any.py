"""Any base a Keras user has: every keras.applications architecture by its Keras name (with its
own preprocessing, minimum and native sizes read from Keras), a model in the Keras
transfer-learning guide's shape (a keras.applications model nested as one layer), and a
keras-hub preset folder. All on tiny models the tests make themselves; no network."""

from __future__ import annotations

import json
import socket
import sys
import time
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from headswap.core import applications, bases, heads, train


def _one_fit_step(model: keras.Model, pixels: np.ndarray, labels: list[int]) -> None:
    """Compile as the product does and train one step (eagerly: tracing costs more here)."""
    train.compile_model(model, keras.optimizers.RMSprop(1e-3), jit_compile=False)
    model.run_eagerly = True
    before = model.get_layer("predictions").get_weights()[0].copy()
    model.fit(pixels, np.array(labels), epochs=1, batch_size=len(labels), verbose=0)
    assert not np.allclose(model.get_layer("predictions").get_weights()[0], before)


def _outputs(model: keras.Model, pixels: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(pixels, training=False))


# --- every keras.applications architecture ------------------------------------------------

# Architectures of each preprocess_input mode and the built-in layer doing it.
MODE_EXAMPLES = {
    "MobileNetV2": ["Rescaling"],  # tf: [-1, 1]
    "InceptionV3": ["Rescaling"],
    "DenseNet121": ["Normalization"],  # torch: ImageNet mean and std
    "ResNet50": ["Conv2D"],  # caffe: RGB -> BGR, minus the ImageNet mean
    "VGG19": ["Conv2D"],
    "EfficientNetB0": [],  # none: the model rescales inside itself
    "ConvNeXtTiny": [],
}


def test_every_architecture_keras_has_is_known():
    exported = {name for name in dir(keras.applications) if name[:1].isupper()}
    assert set(applications.ARCHITECTURES) == exported
    assert {"NASNetLarge", "EfficientNetV2L", "ConvNeXtXLarge", "InceptionResNetV2"} <= exported
    with pytest.raises(bases.BaseLoadError, match="not a known architecture.*NASNetMobile"):
        applications.keras_application("ResNet7", (32, 32), weights=None)


@pytest.mark.parametrize("name", list(applications.ARCHITECTURES))
def test_built_preprocessing_equals_keras_preprocess_input(name):
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 5, 7, 3)).astype("float32")
    expected = applications.preprocess_input(name)(pixels.copy())
    out = pixels
    for layer in applications.preprocessing_layers(name):
        out = layer(out)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name, layers", MODE_EXAMPLES.items())
def test_each_mode_is_one_built_in_layer(name, layers):
    built = applications.preprocessing_layers(name)
    assert [type(layer).__name__ for layer in built] == layers
    assert all(layer.name.startswith(bases.PREPROCESS_PREFIX) for layer in built)
    module = applications.ARCHITECTURES[name].__module__.rsplit(".", 1)[-1]
    preprocess = getattr(keras.applications, module).preprocess_input
    assert applications.preprocess_input(name) is preprocess


def test_native_and_minimum_sizes_come_from_keras():
    native = {"MobileNetV2": 224, "ResNet50": 224, "InceptionV3": 299, "Xception": 299,
              "EfficientNetB7": 600, "EfficientNetV2S": 384, "NASNetLarge": 331,
              "MobileNetV3Small": 224}
    for name, side in native.items():
        assert applications.native_image_size(name) == (side, side), name
    start = time.monotonic()
    for name in applications.ARCHITECTURES:  # cheap: Keras refuses before building anything
        height, width = applications.native_image_size(name)
        assert height == width >= applications.minimum_image_size(name) >= 32, name
    assert time.monotonic() - start < 20
    assert applications.minimum_image_size("InceptionV3") == 75
    assert applications.minimum_image_size("Xception") == 71
    assert applications.native_image_size.cache_info().hits >= len(native)


def test_an_image_below_the_minimum_names_image_size_and_the_minimum():
    with pytest.raises(bases.BaseLoadError) as error:
        applications.keras_application("InceptionV3", (74, 96), weights=None)
    message = str(error.value)
    assert "InceptionV3 needs images of at least 75x75 pixels" in message
    assert "`image_size` is 74x96" in message and "299x299" in message
    assert error.value.__cause__ is None


@pytest.mark.slow  # trains a model for seconds
def test_a_new_architecture_takes_raw_pixels_and_trains():
    base = applications.keras_application("NASNetMobile", (32, 32), weights=None)
    assert [layer.name for layer in base.layers[1:-1]] == ["preprocess_scale"]
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    _one_fit_step(heads.attach_head(base, num_classes=2, dense=[]), pixels, [0, 1])


# --- a model in the Keras transfer-learning guide's shape ---------------------------------


def _guide_model() -> keras.Model:
    """inputs -> Rescaling -> keras.applications model (one nested layer) -> pooling ->
    Dropout -> Dense(classes), as in the Keras guide "Transfer learning & fine-tuning"."""
    app = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), include_top=False, weights=None, alpha=0.35
    )
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1, name="rescaling")(inputs)
    x = app(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pooling")(x)
    x = keras.layers.Dropout(0.2, name="dropout")(x)
    outputs = keras.layers.Dense(5, name="classes")(x)
    return keras.Model(inputs, outputs, name="guide")


@pytest.fixture(scope="module")
def guide_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("guide")
    model = _guide_model()
    files = {suffix: folder / f"guide{suffix}" for suffix in (".keras", ".h5")}
    for file in files.values():
        model.save(file)
    return files


@pytest.mark.slow  # trains a model for seconds
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_guide_shaped_model_is_cut_at_its_nested_base_and_trains(suffix, guide_files, tmp_path):
    user = keras.saving.load_model(guide_files[suffix], safe_mode=True, compile=False)
    nested = user.layers[2]
    assert isinstance(nested, keras.Model)
    base = bases.cut_model(user, "auto")
    assert base.name == bases.BASE_NAME
    assert [layer.name for layer in base.layers[1:]] == ["rescaling", nested.name]
    assert tuple(base.outputs[0].shape) == (None, 1, 1, 1280)
    assert base.layers[-1] is nested  # the pretrained weights themselves, not a copy

    model = heads.attach_head(base, num_classes=3, dense=[4], dropout=0.2)
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    _one_fit_step(model, pixels, [0, 1, 2, 0])
    path = tmp_path / "tuned.keras"
    model.save(path)
    again = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(_outputs(again, pixels), _outputs(model, pixels), atol=1e-5)


def test_guide_shaped_model_is_cut_by_name_or_index_at_its_own_level(guide_files):
    user = keras.saving.load_model(guide_files[".keras"], safe_mode=True, compile=False)
    nested = user.layers[2].name
    for cut_at in (nested, 2, -4, "2"):
        assert bases.cut_model(user, cut_at).layers[-1].name == nested, cut_at
    assert tuple(bases.cut_model(user, "rescaling").outputs[0].shape) == (None, 32, 32, 3)
    assert tuple(bases.cut_model(user, -2).outputs[0].shape) == (None, 1280)
    with pytest.raises(bases.BaseLoadError, match=f"inside the nested model '{nested}'"):
        bases.cut_model(user, "out_relu")
    with pytest.raises(bases.BaseLoadError, match="input: nothing to keep"):
        bases.cut_model(user, 0)


def test_sequential_guide_model_is_cut_at_its_nested_base():
    app = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), include_top=False, weights=None, alpha=0.35
    )
    user = keras.Sequential([keras.Input((32, 32, 3)), app,
                             keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    base = bases.cut_model(user)
    assert base.layers[-1] is app
    assert tuple(base.outputs[0].shape) == (None, 1, 1, 1280)


def test_plain_cnn_with_its_own_flatten_classifier_is_cut_below_it(tmp_path: Path):
    layers = keras.layers
    inputs = keras.Input((16, 16, 3), batch_size=1)  # a batch size fixed by the user
    x = layers.Conv2D(4, 3, activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Conv2D(8, 3, activation="relu", name="conv2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(6, activation="relu", name="fc")(x)
    outputs = layers.Dense(3, activation="softmax", name="old_head")(x)
    keras.Model(inputs, outputs).save(tmp_path / "cnn.keras")
    user = bases.load_model_file(tmp_path / "cnn.keras")
    base = bases.cut_model(user)
    assert base.layers[-1].name == "conv2"
    assert tuple(base.outputs[0].shape) == (None, 5, 5, 8)
    assert tuple(bases.cut_model(user, "fc").outputs[0].shape) == (None, 6)
    new = heads.attach_head(base, num_classes=2, dense=[])
    assert _outputs(new, np.zeros((3, 16, 16, 3), "float32")).shape == (3, 2)


# --- keras-hub presets --------------------------------------------------------------------

SCALE = [1 / (255 * 0.229), 1 / (255 * 0.224), 1 / (255 * 0.225)]
OFFSET = [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]


def _preset(folder: Path, converter: bool = True) -> Path:
    """A tiny keras-hub ResNet preset saved by keras-hub itself (with an image converter)."""
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64],
        stackwise_num_blocks=[1], stackwise_num_strides=[1], block_type="basic_block",
        use_pre_activation=False, image_shape=(None, None, 3),
    )
    backbone.save_to_preset(str(folder))
    if converter:
        keras_hub.layers.ResNetImageConverter(
            image_size=(24, 24), scale=SCALE, offset=OFFSET
        ).save_to_preset(str(folder))
    return folder


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _preset(tmp_path_factory.mktemp("hub") / "tiny_resnet")


def test_keras_hub_preset_folder_is_a_base_on_raw_pixels(preset: Path, tmp_path: Path):
    keras_hub = pytest.importorskip("keras_hub")
    base = applications.keras_hub_base(str(preset), (32, 32))
    assert base.name == bases.BASE_NAME
    assert bases.input_spec(base) == (32, 32, 3)
    assert len(base.outputs[0].shape) == 4
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    scaled = pixels * np.array(SCALE, "float32") + np.array(OFFSET, "float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(base.layers[1](pixels)), scaled, rtol=1e-5, atol=1e-4
    )
    backbone = keras_hub.models.Backbone.from_preset(str(preset))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(base(pixels)),
                               keras.ops.convert_to_numpy(backbone(scaled)), atol=1e-4)

    model = heads.attach_head(base, num_classes=2, dense=[])
    _one_fit_step(model, pixels, [0, 1])
    path = tmp_path / "tuned.keras"
    model.save(path)
    with zipfile.ZipFile(path) as archive:  # built-in layers only: loads without keras-hub
        assert "keras_hub" not in json.dumps(json.loads(archive.read("config.json")))
    again = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(_outputs(again, pixels), _outputs(model, pixels), atol=1e-5)


def test_keras_hub_preset_without_a_converter_has_no_preprocessing(tmp_path: Path):
    folder = _preset(tmp_path / "bare", converter=False)
    base = applications.keras_hub_base(folder, (16, 16))
    assert not [layer for layer in base.layers if layer.name.startswith("preprocess")]
    with pytest.raises(bases.BaseLoadError, match=r"any size, so `image_size` has no default"):
        applications.keras_hub_base(folder, None)  # neither a converter's size nor a fixed input


# --- image_size unset: the base's own ------------------------------------------------------


def test_unset_image_size_is_the_bases_own(preset: Path):
    assert bases.input_spec(applications.keras_hub_base(preset, None)) == (24, 24, 3)  # converter's
    app = applications.keras_application("MobileNetV2", None, weights=None)
    assert bases.input_spec(app) == (224, 224, 3)  # the size it was made for
    assert bases.image_size_for(app, None) == (224, 224)
    assert bases.image_size_for(app, (160, 128)) == (160, 128)  # a set size wins
    free = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(2, 3)])
    with pytest.raises(bases.BaseLoadError, match="set it, e.g. `image_size`: \\[224, 224\\]"):
        bases.image_size_for(free, None)


@pytest.mark.parametrize(
    "handle", ["kaggle://keras/resnetv2/keras/resnet_50_imagenet", "hf://keras/resnet_50",
               "resnet_50_imagenet"],
)
def test_remote_keras_hub_handle_is_refused_at_once_with_how_to_fetch_it(
    handle, monkeypatch: pytest.MonkeyPatch
):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was tried")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    start = time.monotonic()
    with pytest.raises(bases.BaseLoadError) as error:
        applications.keras_hub_base(handle, (32, 32))
    assert time.monotonic() - start < 2
    message = str(error.value)
    assert f"from_preset('{handle}').save_to_preset('FOLDER')" in message
    assert "set `finetune.base.path` to it" in message


def test_folder_that_is_not_a_preset_says_so(tmp_path: Path):
    with pytest.raises(bases.BaseLoadError, match="no config.json: it is not a keras-hub preset"):
        applications.keras_hub_base(tmp_path, (32, 32))


def test_preset_folder_without_keras_hub_installed_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # as if not installed
    with pytest.raises(bases.BaseLoadError, match="needs the keras-hub package: pip install"):
        applications.keras_hub_base(tmp_path, (32, 32))
