"""Bases with known weights: any ``keras.applications`` architecture (its ImageNet weights from
Keras's cache or a local file, never a download during a run) and keras-hub preset folders.

Each base returned here takes raw pixels (0-255): the architecture's own preprocessing (or the
preset's image converter) is built in from built-in layers (:func:`preprocessing_layers`), so
saved models load in Keras safe mode.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
import socket
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from headswap.core.bases import (
    BASE_NAME,
    PREPROCESS_PREFIX,
    BaseLoadError,
    check_image_size,
    image_size_for,
)
from headswap.core.errors import first_line

logger = logging.getLogger(__name__)


def _keras_architectures() -> dict[str, Callable[..., keras.Model]]:
    """Every model constructor ``keras.applications`` exports (``ResNet50``, ...), by name."""
    return {
        name: member
        for name, member in sorted(vars(keras.applications).items())
        if name[:1].isupper() and callable(member)
    }


# Read from the installed Keras, so each architecture it has can be named.
ARCHITECTURES: dict[str, Callable[..., keras.Model]] = _keras_architectures()


# Seconds a socket may wait while Keras downloads weights, so that a blocked network fails
# instead of hanging.
DOWNLOAD_TIMEOUT_S = 30.0


def _constructor(name: str) -> Callable[..., keras.Model]:
    if name not in ARCHITECTURES:
        raise BaseLoadError(
            f"`name`={name!r} is not a known architecture. keras.applications "
            f"{keras.__version__} has: " + ", ".join(ARCHITECTURES)
        )
    return ARCHITECTURES[name]


def _family(name: str) -> str:
    """The ``keras.applications`` module of an architecture: ``resnet`` for ``ResNet50``."""
    return _constructor(name).__module__.rsplit(".", 1)[-1]


def preprocess_input(name: str) -> Callable[[Any], Any]:
    """Keras' own ``preprocess_input`` for an architecture (``keras.applications.resnet``'s
    for ``ResNet50``)."""
    module = getattr(keras.applications, _family(name), None) or importlib.import_module(
        _constructor(name).__module__
    )
    return module.preprocess_input


def pixel_map(preprocess: Callable[[Any], Any], what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(matrix, offset)`` with ``preprocess(pixels) == pixels @ matrix + offset`` for RGB
    pixels (0-255), measured on plain-coloured probe images: black, pure red, green and blue
    give the map, random colours check that it is one."""
    colours = np.concatenate([
        np.zeros((1, 3)), 255 * np.eye(3), np.random.default_rng(0).uniform(0, 255, (8, 3))
    ])
    probes = np.broadcast_to(colours[:, None, None, :], (len(colours), 4, 4, 3))
    out = keras.ops.convert_to_numpy(preprocess(probes.astype("float32")))
    out = out[:, 0, 0, :].astype("float64")
    offset = out[0]
    matrix = (out[1:4] - offset) / 255
    if not np.allclose(colours[4:] @ matrix + offset, out[4:], rtol=1e-4, atol=1e-4):
        raise BaseLoadError(
            f"The preprocessing of {what} is not a per-channel affine map of the pixels, so it "
            "cannot be built into the model from built-in layers. Choose another base."
        )
    return matrix, offset


def affine_layers(matrix: np.ndarray, offset: np.ndarray) -> list[keras.layers.Layer]:
    """Built-in layers computing ``pixels @ matrix + offset`` on RGB pixels (safe to reload in
    Keras safe mode): none for the identity, ``Rescaling`` for one scale and offset,
    ``Normalization`` for one per channel, else a fixed 1x1 ``Conv2D`` (a channel flip such as
    RGB -> BGR, with its offset)."""
    layers = keras.layers
    scale = np.diag(matrix)
    if np.abs(matrix - np.diag(scale)).max() <= 1e-7 * np.abs(scale).max():
        if np.allclose(scale, 1) and np.allclose(offset, 0, atol=1e-6):
            return []
        if np.allclose(scale, scale[0]) and np.allclose(offset, offset[0]):
            return [layers.Rescaling(float(scale[0]), offset=float(offset[0]),
                                     name=f"{PREPROCESS_PREFIX}_scale")]
        if (scale > 0).all():  # (x - mean) / std
            return [layers.Normalization(mean=(-offset / scale).tolist(),
                                         variance=(1 / scale**2).tolist(),
                                         name=f"{PREPROCESS_PREFIX}_normalize")]
    conv = layers.Conv2D(3, 1, name=f"{PREPROCESS_PREFIX}_affine", trainable=False)
    conv.build((None, None, None, 3))
    conv.set_weights([matrix[None, None].astype("float32"), offset.astype("float32")])
    return [conv]


def preprocessing_layers(name: str) -> list[keras.layers.Layer]:
    """Built-in layers doing the architecture's ``preprocess_input`` on raw RGB pixels."""
    return affine_layers(*_preprocessing_map(name))


@functools.lru_cache
def _preprocessing_map(name: str) -> tuple[np.ndarray, np.ndarray]:
    return pixel_map(preprocess_input(name), f"keras.applications {name}")


@functools.lru_cache
def minimum_image_size(name: str) -> int:
    """The smallest image side Keras builds the architecture (without top) for."""
    try:
        _constructor(name)(include_top=False, weights=None, input_shape=(1, 1, 3))
    except ValueError as err:
        if found := _minimum_in(err):
            return found
        raise
    return 1


def _minimum_in(err: BaseException) -> int | None:
    """The minimum side in Keras' "Input size must be at least 32x32" refusal."""
    found = re.search(r"at least (\d+)x\d+", str(err))
    return int(found[1]) if found else None


@functools.lru_cache
def native_image_size(name: str) -> tuple[int, int]:
    """The image size the architecture is made for (and its ImageNet weights trained at):
    224x224 for most, 299x299 for InceptionV3 and Xception, 600x600 for EfficientNetB7, ...

    Keras states it when refused a top with ImageNet weights on another size (a check made
    before anything is built or downloaded); otherwise the size of the built model with its
    top, or 224x224 when that takes any size (MobileNetV3).
    """
    constructor = _constructor(name)
    try:
        constructor(include_top=True, weights="imagenet", input_shape=(1, 1, 3))
    except ValueError as err:
        if found := re.search(r"should be \((\d+), (\d+), 3\)", str(err)):
            return int(found[1]), int(found[2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        height, width = constructor(include_top=True, weights=None).input_shape[1:3]
    return (height, width) if height and width else (224, 224)


def keras_application(
    name: str, image_size: tuple[int, int] | None, weights: str | None = "imagenet"
) -> keras.Model:
    """A ``keras.applications`` feature extractor (no top) taking raw RGB pixels of
    ``image_size`` (None: the size the architecture was made for, :func:`native_image_size`).

    ``name`` is any architecture the installed Keras has (:data:`ARCHITECTURES`); its own
    ``preprocess_input`` is built in from built-in layers (:func:`preprocessing_layers`).
    ``weights`` is ``"imagenet"`` (Keras downloads the no-top file into its cache folder once,
    or finds it there), ``None`` (random initialisation), or the path of that same file: a
    legacy ``.h5`` weights file of this architecture, which Keras loads layer by layer in order
    and checks. Weights from any other file (another head, ``.weights.h5``, ``.keras``) are
    loaded by layer name and shape with :func:`headswap.core.weights.load_weights_by_name`.
    Grayscale images are fed with three channels (the data pipeline decodes them so).
    """
    constructor = _constructor(name)
    height, width = image_size or native_image_size(name)
    shape = (height, width, 3)
    if weights not in ("imagenet", None):
        _check_weights_path(name, weights)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        app = _construct(constructor, shape, weights)
    except ValueError as err:
        if minimum := _minimum_in(err):
            raise BaseLoadError(
                f"{name} needs images of at least {minimum}x{minimum} pixels; `image_size` is "
                f"{height}x{width}. Raise `image_size` (it was made for "
                f"{'x'.join(map(str, native_image_size(name)))})."
            ) from None
        if weights in ("imagenet", None):
            raise
        raise BaseLoadError(_weights_file_message(name, weights, err)) from err
    except Exception as err:  # Keras reports a failed download as a bare Exception
        if weights == "imagenet" and (isinstance(err, OSError) or "URL fetch failure" in str(err)):
            # the reason is in the message; the HTTP client's traceback says no more
            raise BaseLoadError(_download_message(name, err)) from None
        if weights is not None and isinstance(err, OSError):
            raise BaseLoadError(_weights_file_message(name, weights, err)) from err
        raise
    finally:
        socket.setdefaulttimeout(previous)
    preprocessing = preprocessing_layers(name)
    inputs = keras.Input(shape=shape, name="image")
    x = inputs
    for layer in preprocessing:
        x = layer(x)
    return keras.Model(inputs, app(x), name=BASE_NAME)


def keras_cache_folder() -> Path:
    """Where Keras keeps downloaded weights: ``$KERAS_HOME/models`` or ``~/.keras/models``."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def _construct(
    constructor: Callable[..., keras.Model], shape: tuple[int, int, int], weights: str | None
) -> keras.Model:
    """The architecture without its top. Keras' warnings while building go to the log: that
    a size other than those it has ImageNet weights for gets the 224-pixel weights is worth
    knowing, not a fault."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = constructor(include_top=False, weights=weights, input_shape=shape)
    for warning in caught:
        logger.info("Keras, building %s: %s", model.name, warning.message)
    return model


def _download_message(name: str, err: BaseException) -> str:
    """What to fetch and where to put it, read from Keras' own "URL fetch failure on URL:
    errno -- reason" (a raw socket error names no URL: Keras printed it before)."""
    text = " ".join(str(err).split())
    found = re.search(r"URL fetch failure on (\S+): ", text)
    wanted = (
        f"Keras wanted the file {found[1].rsplit('/', 1)[-1]} from {found[1]}" if found
        else "Keras printed the URL it wanted above (\"Downloading data from ...\")"
    )
    return (
        f"Could not download the ImageNet weights of {name} ({text.rsplit(' -- ', 1)[-1][:300]}"
        f"). {wanted}. Without network, fetch that file elsewhere and either copy it into the "
        f"Keras cache folder {keras_cache_folder()}/ (set KERAS_HOME to use another folder) "
        "and keep `weights`: imagenet, or set `weights` to its local path."
    )


def _weights_file_message(name: str, weights: str, err: BaseException) -> str:
    return (
        f"Keras could not load {weights} into {name} without its top: {first_line(err)}. "
        "`weights` takes the no-top ImageNet file of this architecture (the file named when "
        "`weights`: imagenet cannot download it). To take weights from a file of another model "
        f"or with another head, set `weights`: null and `weights_file`: {weights} (matched by "
        "layer name and shape, with a report)."
    )


def _check_weights_path(name: str, weights: str) -> None:
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
            "position, not by layer name. `weights` takes the legacy no-top .h5 file Keras "
            f"downloads for {name}. For this file set `weights`: null and `weights_file`: "
            f"{weights} (matched by layer name and shape, with a report)."
        )
    if _family(name) == "efficientnet":
        # Keras adds the input rescaling these need for their ImageNet weights only then.
        logger.warning(
            "%s adds the input rescaling its ImageNet weights expect only with weights: "
            "imagenet. If %s is the ImageNet file, copy it into %s/ and use weights: imagenet.",
            name, path, keras_cache_folder(),
        )


# --- keras-hub presets ----------------------------------------------------------------------


def keras_hub_base(preset: str | Path, image_size: tuple[int, int] | None) -> keras.Model:
    """A keras-hub image backbone from a local preset folder, taking raw RGB pixels of
    ``image_size`` (None: the size of the preset's image converter, else its fixed input).

    The folder is one keras-hub wrote with ``save_to_preset`` (``config.json``, the weights,
    and ``image_converter.json`` when the preset has its own image preprocessing). The
    converter's scale and offset are built in from built-in layers, so the base takes raw
    0-255 pixels like the others; images are resized to ``image_size`` by the data pipeline,
    not by the converter. The backbone is kept as a plain Functional model of its layers.
    Presets are only read from a local folder: a Kaggle or Hugging Face handle or a preset
    name is refused at once, with how to fetch it (no network is tried during a run).
    """
    folder = Path(preset).expanduser()
    if not (folder / "config.json").is_file():
        raise BaseLoadError(_fetch_preset_message(str(preset), folder.is_dir()))
    try:
        import keras_hub
    except ImportError:
        raise BaseLoadError(
            "`finetune.base.source`: keras_hub needs the keras-hub package: "
            "pip install keras-hub."
        ) from None
    try:
        backbone = keras_hub.models.Backbone.from_preset(str(folder))
        converter = (
            keras_hub.layers.ImageConverter.from_preset(str(folder))
            if (folder / "image_converter.json").is_file() else None
        )
    except (ValueError, TypeError, KeyError, OSError) as err:
        raise BaseLoadError(
            f"keras-hub could not load the preset in {folder}: {first_line(err)}. Save it "
            "again with save_to_preset (from the same keras-hub version)."
        ) from err
    if image_size is None and converter is not None and converter.image_size:
        image_size = tuple(converter.image_size)
    if len(backbone.inputs) != 1 or len(backbone.inputs[0].shape) != 4:
        raise BaseLoadError(
            f"The preset in {folder} ({type(backbone).__name__}) does not take images alone "
            f"(its inputs: {[tuple(t.shape) for t in backbone.inputs]}); give an image "
            "backbone's preset."
        )
    features = keras.Model(backbone.inputs, backbone.outputs[0], name=backbone.name)
    if len(features.outputs[0].shape) != 4:
        raise BaseLoadError(
            f"The preset in {folder} ({type(backbone).__name__}) outputs "
            f"{tuple(features.outputs[0].shape)}, not a feature map (height, width, "
            "channels); give a convolutional image backbone's preset."
        )
    height, width = image_size or image_size_for(features, None)
    check_image_size(features, (height, width))
    inputs = keras.Input(shape=(height, width, 3), name="image")
    x = inputs
    if converter is not None:
        logger.info("Preset %s: images of %s, preprocessing built in", folder,
                    converter.image_size)
        for layer in affine_layers(*pixel_map(converter, f"the preset in {folder}")):
            x = layer(x)
    return keras.Model(inputs, features(x), name=BASE_NAME)


def _fetch_preset_message(preset: str, is_folder: bool) -> str:
    if is_folder:
        return (
            f"{preset} has no config.json: it is not a keras-hub preset folder. Give a folder "
            "written by keras-hub's save_to_preset as `finetune.base.path`."
        )
    return (
        f"`finetune.base.path`={preset!r} is not a local folder: keras-hub presets are read "
        "only from a local folder, never downloaded during a run. On a machine with network "
        "(and keras-hub), save it into a folder once: python -c \"import keras_hub as h; "
        f"h.models.Backbone.from_preset('{preset}').save_to_preset('FOLDER'); "
        f"h.layers.ImageConverter.from_preset('{preset}').save_to_preset('FOLDER')\" (the "
        "second call only if the preset has an image converter), copy FOLDER here and set "
        "`finetune.base.path` to it."
    )
