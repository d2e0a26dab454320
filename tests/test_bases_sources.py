"""Every source of a pretrained base, on small models and files the tests make themselves.

keras.applications by name (random weights, a local no-top file, ImageNet without network),
a user's own Sequential or Functional model in .keras or legacy .h5 cut at a layer, and the
safe-mode refusal of Lambda layers.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format

from headswap.core import applications, bases, data, heads, manifests
from tests.conftest import make_image_folder, small_cnn

# The preprocessing each architecture's Keras preprocess_input asks for, as built-in layers:
# "tf" scales to [-1, 1], "torch" to ImageNet mean/std, "caffe" flips RGB to BGR and takes off
# the mean, "none" means the architecture rescales inside itself.
PREPROCESSING = {
    "tf": ["preprocess_scale"],
    "torch": ["preprocess_normalize"],
    "caffe": ["preprocess_affine"],
    "none": [],
}
MODES = {
    "MobileNetV2": "tf", "MobileNetV3Small": "none", "MobileNetV3Large": "none",
    "EfficientNetB0": "none", "EfficientNetB1": "none", "EfficientNetB2": "none",
    "EfficientNetB3": "none", "EfficientNetV2B0": "none", "ResNet50": "caffe",
    "ResNet50V2": "tf", "VGG16": "caffe", "Xception": "tf", "DenseNet121": "torch",
    "ConvNeXtTiny": "none",
    # not in the hand-kept list of earlier versions
    "InceptionV3": "tf", "NASNetMobile": "tf", "MobileNet": "tf", "VGG19": "caffe",
}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network, as on a machine without internet: no host name resolves."""

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)


def _legacy_weights_file(model: keras.Model, path: Path) -> Path:
    """Write ``model``'s weights in the legacy .h5 format keras.applications downloads."""
    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, model)
    return path


def _download_refused(name: str, size: int) -> bases.BaseLoadError:
    """The error of ``keras_application(name, weights="imagenet")`` (skips if none: the
    ImageNet file is in the Keras cache, so there is no download to fail)."""
    try:
        applications.keras_application(name, (size, size), weights="imagenet")
    except bases.BaseLoadError as error:
        return error
    pytest.skip("the ImageNet file is in the Keras cache: no download to fail")


# --- keras.applications -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODES))
def test_architecture_runs_at_its_minimum_size_and_imagenet_offline_fails_fast(
    name, offline, capsys
):
    size = applications.minimum_image_size(name)
    base = applications.keras_application(name, (size, size), weights=None)
    assert bases.input_spec(base) == (size, size, 3)
    assert [layer.name for layer in base.layers[1:-1]] == PREPROCESSING[MODES[name]]
    pixels = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype("float32")
    features = keras.ops.convert_to_numpy(base(pixels))
    assert features.ndim == 4 and min(features.shape[1:3]) >= 1
    assert np.isfinite(features).all()
    with pytest.raises(bases.BaseLoadError, match=f"at least {size}x{size} pixels"):
        applications.keras_application(name, (size + 8, size - 1), weights=None)

    start = time.monotonic()
    error = _download_refused(name, size)
    assert time.monotonic() - start < 20
    message = str(error)
    url = re.search(r"Downloading data from (\S+)", capsys.readouterr().out)[1]
    # The file named is the very one Keras tried to download.
    assert f"Keras wanted the file {url.rsplit('/', 1)[-1]} from {url}." in message
    assert str(applications.keras_cache_folder()) in message and "`weights`" in message
    assert error.__cause__ is None and error.__suppress_context__


def test_imagenet_download_that_never_answers_times_out(monkeypatch: pytest.MonkeyPatch):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections, never answers the TLS handshake
    address = silent.getsockname()
    resolve = socket.getaddrinfo
    monkeypatch.setattr(
        socket, "getaddrinfo", lambda host, port, *args, **kw: resolve(*address, *args, **kw)
    )
    monkeypatch.setattr(applications, "DOWNLOAD_TIMEOUT_S", 1.0)
    previous = socket.getdefaulttimeout()
    start = time.monotonic()
    try:
        error = _download_refused("VGG16", 32)
    finally:
        silent.close()
    assert re.search("Could not download .* timed out", str(error))
    assert time.monotonic() - start < 15
    assert socket.getdefaulttimeout() == previous


def test_mobilenet_v2_file_named_follows_the_input_size(offline):
    assert "_1.0_160_no_top.h5 from" in str(_download_refused("MobileNetV2", 160))
    assert "_1.0_224_no_top.h5 from" in str(_download_refused("MobileNetV2", 100))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["MobileNetV2", "EfficientNetB0", "Xception", "InceptionV3"])
def test_local_no_top_file_loads_like_the_keras_download(name, tmp_path: Path):
    size = applications.minimum_image_size(name)
    source = applications.ARCHITECTURES[name](
        include_top=False, weights=None, input_shape=(size, size, 3)
    )
    file = _legacy_weights_file(source, tmp_path / f"{name.lower()}_notop.h5")
    base = applications.keras_application(name, (size, size), weights=str(file))
    loaded = base.layers[-1].get_weights()
    assert len(loaded) == len(source.get_weights())
    for got, want in zip(loaded, source.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_weights_that_are_not_this_architectures_no_top_file_are_refused(tmp_path: Path):
    with_top = keras.applications.MobileNetV2(
        include_top=True, weights=None, input_shape=(32, 32, 3), classes=3
    )
    top_file = _legacy_weights_file(with_top, tmp_path / "mobilenet_v2_top.h5")
    with pytest.raises(bases.BaseLoadError, match="`weights_file`: .*mobilenet_v2_top.h5"):
        applications.keras_application("MobileNetV2", (32, 32), weights=str(top_file))
    # Keras would match a .weights.h5 file by position: sent to weights_file instead.
    with_top.save_weights(tmp_path / "top.weights.h5")
    with pytest.raises(bases.BaseLoadError, match="by position, not by layer name"):
        applications.keras_application("MobileNetV2", (32, 32), str(tmp_path / "top.weights.h5"))
    with pytest.raises(bases.BaseLoadError, match="neither 'imagenet', null nor an existing"):
        applications.keras_application("MobileNetV2", (32, 32), str(tmp_path / "missing.h5"))


def test_grayscale_images_feed_an_imagenet_architecture(tmp_path: Path):
    folder = make_image_folder(tmp_path / "gray", per_class=4, size=20)
    manifest, _ = manifests.ingest_image_folder(folder, 0.25, 0.25, seed=0)
    base = applications.keras_application("MobileNetV2", (32, 32), weights=None)
    model = heads.attach_head(base, num_classes=3, dense=[4])
    channels = bases.input_spec(model)[2]
    images, _ = next(iter(data.make_dataset(manifest, "train", (32, 32), channels, 4)))
    assert tuple(images.shape) == (4, 32, 32, 3)
    pixels = images.numpy()
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])  # gray repeated as RGB
    probabilities = model.predict(images, verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


# --- a model of the user's ----------------------------------------------------------------


def _layers() -> list[keras.layers.Layer]:
    layers = keras.layers
    return [
        layers.Conv2D(4, 3, name="c1"),
        layers.GlobalAveragePooling2D(name="pool"),
        layers.Dense(6, name="fc"),
        layers.Dense(3, activation="softmax", name="old_head"),
    ]


def _sequential(how: str) -> keras.Sequential:
    """A Sequential model given its input as users do: Input, build(), input_shape, or a call."""
    if how == "input":
        return keras.Sequential([keras.Input((16, 16, 3)), *_layers()])
    if how == "input_shape":
        first, *rest = _layers()
        first = keras.layers.Conv2D(4, 3, name="c1", input_shape=(16, 16, 3))
        return keras.Sequential([first, *rest])
    model = keras.Sequential(_layers())
    if how == "build":
        model.build((None, 16, 16, 3))
    else:  # called once on a batch of one image, which fixes its batch size
        model(np.zeros((1, 16, 16, 3), "float32"))
    return model


@pytest.mark.filterwarnings("ignore:Do not pass an `input_shape`")
@pytest.mark.parametrize("how", ["input", "input_shape", "build", "call"])
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_sequential_file_is_cut_by_name_or_index_and_takes_any_batch(how, suffix, tmp_path):
    model = _sequential(how)
    path = tmp_path / f"seq{suffix}"
    model.save(path)
    loaded = bases.load_model_file(path)
    expected = {"auto": (None, 14, 14, 4), -2: (None, 6), "fc": (None, 6), "-3": (None, 4)}
    for cut_at, shape in expected.items():
        base = bases.cut_model(loaded, cut_at)
        assert tuple(base.outputs[0].shape) == shape, cut_at
    base = bases.cut_model(loaded, -2)  # layers[-2].output, i.e. layers[:-1]
    np.testing.assert_array_equal(base.get_layer("fc").get_weights()[0],
                                  model.get_layer("fc").get_weights()[0])
    new = heads.attach_head(base, num_classes=5, dense=[])
    assert new.predict(np.zeros((3, 16, 16, 3)), verbose=0).shape == (3, 5)


@pytest.mark.parametrize("cut_at, last", [("features", "features"), (-3, "gap"), (2, "conv1")])
def test_functional_h5_file_is_cut_by_name_or_index(cut_at, last, tmp_path: Path):
    path = tmp_path / "user.h5"
    small_cnn().save(path)
    base = bases.cut_model(bases.load_model_file(path), cut_at)
    assert base.layers[-1].name == last
    assert "output" not in [layer.name for layer in base.layers]


def test_subclassed_model_cannot_be_cut_and_says_so():
    class Net(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="net")
            self.conv = keras.layers.Conv2D(2, 3)

        def call(self, x):
            return self.conv(x)

    net = Net()
    net(np.zeros((1, 8, 8, 3), "float32"))
    with pytest.raises(bases.BaseLoadError, match="subclassed model .*Functional or Sequential"):
        bases.cut_model(net)


def test_file_with_an_unknown_custom_layer_names_the_fix(tmp_path: Path):
    @keras.saving.register_keras_serializable(package="headswap_test")
    class Doubler(keras.layers.Layer):
        def call(self, x):
            return x * 2.0

    inputs = keras.Input((8, 8, 1))
    path = tmp_path / "custom.keras"
    keras.Model(inputs, keras.layers.Conv2D(2, 3)(Doubler()(inputs))).save(path)
    del keras.saving.get_custom_objects()["headswap_test>Doubler"]
    with pytest.raises(bases.BaseLoadError, match="register_keras_serializable"):
        bases.load_model_file(path)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_lambda_layer_is_refused_unless_allowed(suffix, tmp_path: Path):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Lambda(lambda t: t * 2.0, name="double")(inputs)
    path = tmp_path / f"lambda{suffix}"
    keras.Model(inputs, keras.layers.Conv2D(2, 3, name="conv")(x)).save(path)
    with pytest.raises(bases.BaseLoadError, match="Lambda layer .*`allow_unsafe`: true"):
        bases.load_model_file(path)
    model = bases.load_model_file(path, allow_unsafe=True)
    assert model.get_layer("double").__class__.__name__ == "Lambda"
