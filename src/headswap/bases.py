"""Pretrained bases: a model file of the user's, or a ``keras.applications`` architecture.

Every base returned here takes raw pixels (0-255): the architecture's own preprocessing is
built from built-in layers inside the model, so saved models load in Keras safe mode and the
logged MLflow model can be fed images as they are.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np

logger = logging.getLogger(__name__)

BASE_NAME = "base"
PREPROCESS_PREFIX = "preprocess"


@dataclass(frozen=True)
class Architecture:
    """A ``keras.applications`` constructor with its preprocessing mode and minimum input side.

    ``mode`` follows ``keras.applications.imagenet_utils.preprocess_input``: ``tf`` scales to
    [-1, 1], ``torch`` to ImageNet mean/std, ``caffe`` flips RGB to BGR and subtracts the
    ImageNet mean; ``none`` means the architecture rescales inside itself.
    """

    constructor: Callable[..., keras.Model]
    mode: str
    min_size: int = 32


_APPS = keras.applications
ARCHITECTURES: dict[str, Architecture] = {
    "MobileNetV2": Architecture(_APPS.MobileNetV2, "tf"),
    "MobileNetV3Small": Architecture(_APPS.MobileNetV3Small, "none"),
    "MobileNetV3Large": Architecture(_APPS.MobileNetV3Large, "none"),
    "EfficientNetB0": Architecture(_APPS.EfficientNetB0, "none"),
    "EfficientNetB1": Architecture(_APPS.EfficientNetB1, "none"),
    "EfficientNetB2": Architecture(_APPS.EfficientNetB2, "none"),
    "EfficientNetB3": Architecture(_APPS.EfficientNetB3, "none"),
    "EfficientNetV2B0": Architecture(_APPS.EfficientNetV2B0, "none"),
    "ResNet50": Architecture(_APPS.ResNet50, "caffe"),
    "ResNet50V2": Architecture(_APPS.ResNet50V2, "tf"),
    "VGG16": Architecture(_APPS.VGG16, "caffe"),
    "Xception": Architecture(_APPS.Xception, "tf", min_size=71),
    "DenseNet121": Architecture(_APPS.DenseNet121, "torch"),
    "ConvNeXtTiny": Architecture(_APPS.ConvNeXtTiny, "none"),
}

_IMAGENET_MEAN_RGB = np.array([123.68, 116.779, 103.939], dtype="float32")
_TORCH_MEAN_RGB = np.array([0.485, 0.456, 0.406], dtype="float32")
_TORCH_STD_RGB = np.array([0.229, 0.224, 0.225], dtype="float32")


class BaseLoadError(ValueError):
    """A pretrained base cannot be loaded as asked."""


def resolve_model_path(path: str | Path) -> Path:
    """The model file at ``path``; for a Kedro-versioned folder, its latest version."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        versions = sorted(v / path.name for v in path.iterdir() if (v / path.name).is_file())
        if versions:
            return versions[-1]
    raise BaseLoadError(
        f"No model file at {path}. Set finetune.base.path to a .keras or .h5 file (or run "
        "`kedro run --pipeline pretrain` to make the example's base)."
    )


def load_model_file(path: str | Path, allow_unsafe: bool = False) -> keras.Model:
    """Load a ``.keras`` or ``.h5`` model in Keras safe mode, without its training config."""
    file = resolve_model_path(path)
    try:
        model = keras.saving.load_model(file, compile=False, safe_mode=not allow_unsafe)
    except ValueError as err:
        if "safe_mode" in str(err) or "Lambda" in str(err):
            raise BaseLoadError(
                f"{file} contains a Lambda layer (arbitrary Python code), which is refused in "
                "safe mode. Rebuild the model with built-in layers, or, only if you trust the "
                "file, set finetune.base.allow_unsafe: true."
            ) from err
        raise
    logger.info("Loaded %s (%s layers) from %s", model.name, len(model.layers), file)
    return model


def cut_model(model: keras.Model, cut_at: str | int = "auto") -> keras.Model:
    """The part of ``model`` up to and including the layer ``cut_at``, as a new model.

    ``cut_at`` is a layer name, an index into ``model.layers`` (negative counts from the
    end, so ``-2`` is ``layers[-2].output``), or ``auto``: the last layer with a spatial
    (4-D) output, i.e. the feature map before the old head's pooling.
    """
    layers = model.layers
    if cut_at == "auto":
        spatial = [layer for layer in layers if len(layer.output.shape) == 4]
        if not spatial:
            raise BaseLoadError(
                f"{model.name} has no layer with a spatial output; set finetune.base.cut_at to "
                "the name or index of the layer to keep up to."
            )
        layer = spatial[-1]
    elif isinstance(cut_at, int) or (isinstance(cut_at, str) and cut_at.lstrip("-").isdigit()):
        index = int(cut_at)
        if not -len(layers) <= index < len(layers):
            raise BaseLoadError(
                f"finetune.base.cut_at={index} is out of range: {model.name} has {len(layers)} "
                "layers."
            )
        layer = layers[index]
    else:
        names = [layer.name for layer in layers]
        if cut_at not in names:
            raise BaseLoadError(
                f"finetune.base.cut_at={cut_at!r} is not a layer of {model.name}. Its layers: "
                + ", ".join(names)
            )
        layer = model.get_layer(cut_at)
    logger.info("Cutting %s at layer %r", model.name, layer.name)
    return keras.Model(model.inputs, layer.output, name=BASE_NAME)


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
    """A ``keras.applications`` feature extractor (no top) taking raw RGB pixels."""
    if name not in ARCHITECTURES:
        raise BaseLoadError(
            f"finetune.base.name={name!r} is not a known architecture. Known: "
            + ", ".join(ARCHITECTURES)
        )
    arch = ARCHITECTURES[name]
    height, width = image_size
    if min(height, width) < arch.min_size:
        raise BaseLoadError(
            f"{name} needs images of at least {arch.min_size}x{arch.min_size} pixels; "
            f"finetune.data.image_size is {height}x{width}. Raise finetune.data.image_size."
        )
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise BaseLoadError(
            f"finetune.base.weights={weights!r} is neither 'imagenet', null nor an existing "
            "file. Give the path of the weights file (e.g. a *_notop.h5 file)."
        )
    inputs = keras.Input(shape=(height, width, 3), name="image")
    x = inputs
    for layer in preprocessing_layers(arch.mode, 3):
        x = layer(x)
    try:
        app = arch.constructor(include_top=False, weights=weights, input_shape=(height, width, 3))
    except Exception as err:  # noqa: BLE001 - a network failure surfaces in many types
        if weights == "imagenet":
            raise BaseLoadError(_missing_weights_message(name, err)) from err
        raise
    outputs = app(x)
    return keras.Model(inputs, outputs, name=BASE_NAME)


def _missing_weights_message(name: str, err: Exception) -> str:
    cache = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "models"
    url = re.search(r"https?://\S+?\.h5", str(err))
    wanted = f"the file {url.group(0).rsplit('/', 1)[-1]} (from {url.group(0)})" if url else (
        "its no-top weights file"
    )
    return (
        f"Could not download the ImageNet weights of {name}: {type(err).__name__}. Keras wanted "
        f"{wanted}. Without network, copy that file into {cache}/, or set "
        "finetune.base.weights to its local path."
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
            f"The base takes {height}x{width} images but finetune.data.image_size is "
            f"{image_size[0]}x{image_size[1]}. Set finetune.data.image_size: [{height}, {width}]."
        )
