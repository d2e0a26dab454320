"""Pretrained bases: a model file of the user's, or a ``keras.applications`` architecture.

Every base returned here takes raw pixels (0-255): the architecture's own preprocessing is
built from built-in layers inside the model, so saved models load in Keras safe mode and the
logged MLflow model can be fed images as they are.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from headswap.core.errors import InputError

logger = logging.getLogger(__name__)

BASE_NAME = "base"
PREPROCESS_PREFIX = "preprocess"


@dataclass(frozen=True)
class Architecture:
    """A ``keras.applications`` constructor, its preprocessing, minimum input side and weights.

    ``mode`` follows ``keras.applications.imagenet_utils.preprocess_input``: ``tf`` scales to
    [-1, 1], ``torch`` to ImageNet mean/std, ``caffe`` flips RGB to BGR and subtracts the
    ImageNet mean; ``none`` means the architecture rescales inside itself. ``min_size`` is the
    smallest image side Keras accepts (checked by building each one at that size).
    ``weights_url`` is where Keras downloads the ImageNet weights without the top (the file
    name is the name Keras caches it under; ``{rows}`` is filled in by
    :func:`imagenet_weights_url`).
    """

    constructor: Callable[..., keras.Model]
    mode: str
    weights_url: str
    min_size: int = 32


_APPS = keras.applications
_KERAS_APPS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
_EFFICIENTNET_URL = "https://storage.googleapis.com/keras-applications/"
ARCHITECTURES: dict[str, Architecture] = {
    "MobileNetV2": Architecture(
        _APPS.MobileNetV2, "tf", _KERAS_APPS_URL + "mobilenet_v2/"
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"),
    "MobileNetV3Small": Architecture(
        _APPS.MobileNetV3Small, "none", _KERAS_APPS_URL + "mobilenet_v3/"
        "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"),
    "MobileNetV3Large": Architecture(
        _APPS.MobileNetV3Large, "none", _KERAS_APPS_URL + "mobilenet_v3/"
        "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5"),
    "EfficientNetB0": Architecture(
        _APPS.EfficientNetB0, "none", _EFFICIENTNET_URL + "efficientnetb0_notop.h5"),
    "EfficientNetB1": Architecture(
        _APPS.EfficientNetB1, "none", _EFFICIENTNET_URL + "efficientnetb1_notop.h5"),
    "EfficientNetB2": Architecture(
        _APPS.EfficientNetB2, "none", _EFFICIENTNET_URL + "efficientnetb2_notop.h5"),
    "EfficientNetB3": Architecture(
        _APPS.EfficientNetB3, "none", _EFFICIENTNET_URL + "efficientnetb3_notop.h5"),
    "EfficientNetV2B0": Architecture(
        _APPS.EfficientNetV2B0, "none",
        _KERAS_APPS_URL + "efficientnet_v2/efficientnetv2-b0_notop.h5"),
    "ResNet50": Architecture(
        _APPS.ResNet50, "caffe",
        _KERAS_APPS_URL + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "ResNet50V2": Architecture(
        _APPS.ResNet50V2, "tf",
        _KERAS_APPS_URL + "resnet/resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "VGG16": Architecture(
        _APPS.VGG16, "caffe",
        _KERAS_APPS_URL + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "Xception": Architecture(
        _APPS.Xception, "tf",
        _KERAS_APPS_URL + "xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
        min_size=71),
    "DenseNet121": Architecture(
        _APPS.DenseNet121, "torch",
        _KERAS_APPS_URL + "densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "ConvNeXtTiny": Architecture(
        _APPS.ConvNeXtTiny, "none", _KERAS_APPS_URL + "convnext/convnext_tiny_notop.h5"),
}
# Keras only adds the rescaling these need for their ImageNet weights when weights="imagenet".
_NEEDS_IMAGENET_KEYWORD = ("EfficientNetB0", "EfficientNetB1", "EfficientNetB2", "EfficientNetB3")
# Seconds a socket may wait while Keras downloads weights, so that a blocked network fails
# instead of hanging.
DOWNLOAD_TIMEOUT_S = 30.0

_IMAGENET_MEAN_RGB = np.array([123.68, 116.779, 103.939], dtype="float32")
_TORCH_MEAN_RGB = np.array([0.485, 0.456, 0.406], dtype="float32")
_TORCH_STD_RGB = np.array([0.229, 0.224, 0.225], dtype="float32")


class BaseLoadError(InputError):
    """A pretrained base cannot be loaded as asked."""


def load_model_file(path: str | Path, allow_unsafe: bool = False) -> keras.Model:
    """Load a ``.keras`` or ``.h5`` model in Keras safe mode, without its training config."""
    file = Path(path)
    if not file.is_file():
        raise BaseLoadError(f"No model file at {file}. Give `path` as a .keras or .h5 model file.")
    try:
        model = keras.saving.load_model(file, compile=False, safe_mode=not allow_unsafe)
    except (TypeError, ValueError, OSError) as err:
        if "safe_mode" in str(err) or "Lambda" in str(err):
            raise BaseLoadError(
                f"{file} contains a Lambda layer (arbitrary Python code), which is refused in "
                "safe mode. Rebuild the model with built-in layers, or, only if you trust the "
                "file, set `allow_unsafe`: true."
            ) from err
        raise BaseLoadError(
            f"Keras could not load the model in {file}: {_first_line(err)}. It must be a "
            "model saved with model.save() as .keras (or legacy .h5); a model using custom "
            "layer classes needs them registered with "
            "@keras.saving.register_keras_serializable and importable."
        ) from err
    logger.info("Loaded %s (%s layers) from %s", model.name, len(model.layers), file)
    return model


def cut_model(model: keras.Model, cut_at: str | int = "auto") -> keras.Model:
    """The part of ``model`` up to and including the layer ``cut_at``, as a new model.

    ``cut_at`` is a layer name, an index into ``model.layers`` (negative counts from the
    end, so ``-2`` is ``layers[-2].output``), or ``auto``: the last layer with a spatial
    (4-D) output, i.e. the feature map before the old head's pooling.
    """
    if not isinstance(model, keras.Sequential) and not _has_graph(model):
        raise BaseLoadError(
            f"{model.name} is a subclassed model ({type(model).__name__}) without a graph of "
            "layers, so it cannot be cut at a layer. Save it as a Functional or Sequential "
            "model (or its feature extractor alone) and use that file."
        )
    layers = model.layers
    if cut_at == "auto":
        spatial = [layer for layer in layers if len(layer.output.shape) == 4]
        if not spatial:
            raise BaseLoadError(
                f"{model.name} has no layer with a spatial output; set `cut_at` to "
                "the name or index of the layer to keep up to."
            )
        layer = spatial[-1]
    elif isinstance(cut_at, int) or (isinstance(cut_at, str) and cut_at.lstrip("-").isdigit()):
        index = int(cut_at)
        if not -len(layers) <= index < len(layers):
            raise BaseLoadError(
                f"`cut_at`={index} is out of range: {model.name} has {len(layers)} "
                "layers."
            )
        layer = layers[index]
    else:
        names = [layer.name for layer in layers]
        if cut_at not in names:
            raise BaseLoadError(
                f"`cut_at`={cut_at!r} is not a layer of {model.name}. Its layers: "
                + ", ".join(names)
            )
        layer = model.get_layer(cut_at)
    logger.info("Cutting %s at layer %r", model.name, layer.name)
    shape = tuple(model.inputs[0].shape)
    if isinstance(model, keras.Sequential):
        # Re-run the kept layers on a new input: this also frees a batch size fixed by a
        # Sequential model that was first called on one batch.
        x = inputs = keras.Input(shape=shape[1:], name="image")
        for kept in layers[: layers.index(layer) + 1]:
            x = kept(x)
        return keras.Model(inputs, x, name=BASE_NAME)
    base = keras.Model(model.inputs, layer.output, name=BASE_NAME)
    if shape[0] is not None:
        inputs = keras.Input(shape=shape[1:], name="image")
        base = keras.Model(inputs, base(inputs), name=BASE_NAME)
    return base


def _has_graph(model: keras.Model) -> bool:
    """Whether ``model`` is a Functional model (symbolic inputs and outputs)."""
    try:
        return bool(model.inputs) and bool(model.outputs)
    except (AttributeError, ValueError):
        return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def preprocessing_layers(mode: str, channels: int) -> list[keras.layers.Layer]:
    """Built-in layers doing ``preprocess_input`` of the given mode on raw RGB pixels."""
    layers = keras.layers
    if mode == "none":
        return []
    if mode == "tf":
        return [layers.Rescaling(1 / 127.5, offset=-1.0, name=f"{PREPROCESS_PREFIX}_scale")]
    if mode == "torch":
        return [
            layers.Rescaling(1 / 255.0, name=f"{PREPROCESS_PREFIX}_scale"),
            layers.Normalization(
                mean=_TORCH_MEAN_RGB.tolist(),
                variance=(_TORCH_STD_RGB**2).tolist(),
                name=f"{PREPROCESS_PREFIX}_normalize",
            ),
        ]
    if mode == "caffe":
        # RGB -> BGR and mean subtraction as one fixed 1x1 convolution.
        kernel = np.zeros((1, 1, channels, channels), dtype="float32")
        for i in range(channels):
            kernel[0, 0, channels - 1 - i, i] = 1.0
        bias = -_IMAGENET_MEAN_RGB[::-1].copy()
        conv = layers.Conv2D(
            channels, 1, name=f"{PREPROCESS_PREFIX}_bgr_mean", trainable=False
        )
        conv.build((None, None, None, channels))
        conv.set_weights([kernel, bias])
        return [conv]
    raise ValueError(f"Unknown preprocessing mode {mode!r}.")


def keras_application(
    name: str, image_size: tuple[int, int], weights: str | None = "imagenet"
) -> keras.Model:
    """A ``keras.applications`` feature extractor (no top) taking raw RGB pixels.

    ``weights`` is ``"imagenet"`` (Keras downloads the no-top file into its cache folder once,
    or finds it there), ``None`` (random initialisation), or the path of that same file: a
    legacy ``.h5`` weights file of this architecture, which Keras loads layer by layer in order
    and checks. Weights from any other file (another head, ``.weights.h5``, ``.keras``) are
    loaded by layer name and shape with :func:`headswap.core.weights.load_weights_by_name`.
    Grayscale images are fed with three channels (the data pipeline decodes them so).
    """
    arch = _architecture(name)
    height, width = image_size
    if min(height, width) < arch.min_size:
        raise BaseLoadError(
            f"{name} needs images of at least {arch.min_size}x{arch.min_size} pixels; "
            f"`image_size` is {height}x{width}. Raise `image_size`."
        )
    shape = (height, width, 3)
    if weights == "imagenet":
        app = _build_with_imagenet_weights(name, arch, shape)
    elif weights is None:
        app = _construct(arch, shape, None)
    else:
        _check_weights_path(name, weights, image_size)
        try:
            app = _construct(arch, shape, weights)
        except (ValueError, OSError) as err:
            raise BaseLoadError(
                f"Keras could not load {weights} into {name} without its top: "
                f"{_first_line(err)}. `weights` takes the no-top ImageNet file of "
                f"this architecture ({imagenet_weights_url(name, image_size).rsplit('/', 1)[-1]}"
                "). To take weights from a file of another model or with another head, set "
                f"`weights`: null and `weights_file`: {weights} "
                "(matched by layer name and shape, with a report)."
            ) from err
    inputs = keras.Input(shape=shape, name="image")
    x = inputs
    for layer in preprocessing_layers(arch.mode, 3):
        x = layer(x)
    return keras.Model(inputs, app(x), name=BASE_NAME)


def _architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise BaseLoadError(
            f"`name`={name!r} is not a known architecture. Known: "
            + ", ".join(ARCHITECTURES)
        )
    return ARCHITECTURES[name]


def imagenet_weights_url(name: str, image_size: tuple[int, int]) -> str:
    """The URL of the no-top ImageNet weights file Keras downloads for ``name``.

    The file name at its end is the name Keras looks for in its cache folder.
    """
    height, width = image_size
    rows = height if height == width and height in (96, 128, 160, 192, 224) else 224
    return _architecture(name).weights_url.format(rows=rows)


def keras_cache_folder() -> Path:
    """Where Keras keeps downloaded weights: ``$KERAS_HOME/models`` or ``~/.keras/models``."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def _construct(arch: Architecture, shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    """The architecture without its top. Keras' warnings while building go to the log: that
    a size other than those it has ImageNet weights for gets the 224-pixel weights is worth
    knowing, not a fault."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = arch.constructor(include_top=False, weights=weights, input_shape=shape)
    for warning in caught:
        logger.info("Keras, building %s: %s", model.name, warning.message)
    return model


def _build_with_imagenet_weights(
    name: str, arch: Architecture, shape: tuple[int, int, int]
) -> keras.Model:
    """Build ``name`` with ``weights="imagenet"``; a failed download raises a clear message."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return _construct(arch, shape, "imagenet")
    except Exception as err:  # Keras reports a failed download as a bare Exception
        if not (isinstance(err, OSError) or "URL fetch failure" in str(err)):
            raise
        url = imagenet_weights_url(name, shape[:2])
        reason = _first_line(err).rsplit(" -- ", 1)[-1]  # Keras' message repeats the URL
        raise BaseLoadError(
            f"Could not download the ImageNet weights of {name} ({reason}). Keras "
            f"wanted the file {url.rsplit('/', 1)[-1]} from {url}. Without network, fetch that "
            f"file elsewhere and either copy it into the Keras cache folder "
            f"{keras_cache_folder()}/ (set KERAS_HOME to use another folder) and keep "
            "`weights`: imagenet, or set `weights` to its local path."
        ) from None  # the reason is in the message; the HTTP client's traceback says no more
    finally:
        socket.setdefaulttimeout(previous)


def _check_weights_path(name: str, weights: str, image_size: tuple[int, int]) -> None:
    """Refuse a ``weights`` value Keras would not load safely as this architecture's file."""
    path = Path(weights)
    if not path.is_file():
        raise BaseLoadError(
            f"`weights`={weights!r} is neither 'imagenet', null nor an existing "
            "file. Give the path of the weights file (e.g. a *_notop.h5 file)."
        )
    if path.name.endswith(".weights.h5") or path.suffix not in (".h5", ".hdf5"):
        raise BaseLoadError(
            f"`weights`={weights!r}: Keras would match this file to {name} by "
            "position, not by layer name. `weights` takes the legacy .h5 file "
            f"Keras downloads ({imagenet_weights_url(name, image_size).rsplit('/', 1)[-1]}). "
            f"For this file set `weights`: null and `weights_file`: "
            f"{weights} (matched by layer name and shape, with a report)."
        )
    if name in _NEEDS_IMAGENET_KEYWORD:
        logger.warning(
            "%s adds the input rescaling its ImageNet weights expect only with weights: "
            "imagenet. If %s is the ImageNet file, copy it into %s/ and use weights: imagenet.",
            name, path, keras_cache_folder(),
        )


def input_spec(model: keras.Model) -> tuple[int | None, int | None, int]:
    """(height, width, channels) of a model's single image input."""
    shape = model.inputs[0].shape
    if len(shape) != 4:
        raise BaseLoadError(
            f"{model.name} takes inputs of shape {tuple(shape)}; an image model takes "
            "(height, width, channels)."
        )
    return shape[1], shape[2], int(shape[3])


def check_image_size(model: keras.Model, image_size: tuple[int, int]) -> None:
    """Raise if the model has a fixed input size other than ``image_size``."""
    height, width, _ = input_spec(model)
    if (height, width) != (None, None) and (height, width) != tuple(image_size):
        raise BaseLoadError(
            f"The base takes {height}x{width} images but `image_size` is "
            f"{image_size[0]}x{image_size[1]}. Set `image_size`: [{height}, {width}]."
        )
