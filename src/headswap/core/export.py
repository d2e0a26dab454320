"""Export a trained Keras classifier for serving (TensorFlow SavedModel) and for phones and
edge devices (a LiteRT/TFLite flatbuffer, float32 or with dynamic-range quantization).

The models take raw pixels (float32, 0-255, shape ``(batch, height, width, channels)``) and
do their own preprocessing inside, so every exported file takes images as they are decoded
and resized and gives class probabilities in the order of ``class_names``, which are written
one a line to a ``labels.txt`` file beside them.

Decoding and resizing stay outside the exported files: beside each ``labels.txt`` a
``preprocessing.json`` says how to bring an image to the model's input, as in training::

    {"image_size": [224, 224], "channels": 3, "resize": "pad"}

``image_size`` is [height, width], ``channels`` 1 (grayscale) or 3 (RGB), and ``resize`` one
of :data:`headswap.core.images.RESIZE_MODES`: ``stretch`` (resize to exactly that size),
``pad`` (fit inside keeping the aspect ratio, centred, black bands: ``tf.image.resize_with_pad``)
or ``crop`` (cover keeping the aspect ratio, then cut the centre). JPEGs are turned upright by
their EXIF orientation first. :func:`headswap.core.data.decode_bytes` does all of it;
:meth:`headswap.core.predict.Classifier.from_file` reads the file.

:func:`export_model` writes the chosen formats into one folder::

    folder/
        saved_model/            "saved_model": TensorFlow SavedModel (+ its labels.txt)
        model.tflite            "tflite": float32 LiteRT/TFLite file
        model_quantized.tflite  "tflite_quantized": dynamic-range quantized weights
        labels.txt              class names of the .tflite files, in output order
        preprocessing.json      image size, channels and resize mode of the .tflite files

How the SavedModel is made: Keras' public ``keras.export.ExportArchive`` writes one
endpoint, ``serve``, that calls ``model(images, training=False)``: the inference graph, with
Dropout off, BatchNormalization on its moving statistics and random augmentation layers
passing images through; Keras adds ``serving_default`` for it. Plain
``model.export(folder, format="tf_saved_model")`` is not enough: it calls the model without
``training``, and Keras 3 then takes each layer's own default, passed on to the layers after
it; augmentation layers (``RandomFlip``, ...) default to training, so a model with them
would be exported augmenting its input, with Dropout on and BatchNormalization on batch
statistics (and the TFLite converter then refuses their random ops).

How the TFLite file is made: ``tf.lite.TFLiteConverter.from_saved_model`` converts that
SavedModel's ``serving_default`` with TFLite's built-in ops only. On TensorFlow 2.21 with
Keras 3 this is the path that both ``TFLiteConverter.from_keras_model`` and Keras' own
``model.export(format="litert")`` take inside (an ``ExportArchive`` with ``training=False``,
then ``from_saved_model``), but:

- ``from_keras_model`` reaches into Keras' private modules for that step and, if it fails,
  falls back silently to its Keras 2 converter, which hides the real error;
- ``format="litert"`` also allows Select TF ops, so a model with an op that TFLite lacks
  gives a file that needs the Flex delegate, which a plain LiteRT runtime on a device
  does not include. With built-in ops only, such a model fails here, at export, with the
  names of the ops;
- converting the SavedModel gives a .tflite file that computes exactly what the exported
  SavedModel serves, and :func:`export_model` converts the SavedModel it has just written
  instead of exporting the model again.

Dynamic-range quantization (``tf.lite.Optimize.DEFAULT`` without a representative dataset)
stores the weights of large enough layers as int8 (a file 3-4x smaller); inputs and outputs
stay float32, and activations are quantized on the fly, so the file is used exactly like
the float32 one.

How the TFLite file is run (:func:`tflite_predict`): TensorFlow 2.21 still ships
``tf.lite.Interpreter``, but it warns that it is deprecated in favour of the interpreter of
the ``ai-edge-litert`` package (``from ai_edge_litert.interpreter import Interpreter``, the
same API). That package (2.3.0) installs from PyPI beside TensorFlow 2.21 and gives the
same probabilities on these files; it has no SavedModel converter, so converting stays with
``tf.lite.TFLiteConverter``. This module runs files with TensorFlow's interpreter, silencing
its deprecation warning: it needs no extra dependency and is the release of the converter
that wrote the file. Where a later TensorFlow no longer has ``tf.lite.Interpreter``, it
uses ``ai_edge_litert``'s instead (``pip install ai-edge-litert``).

On a device, or anywhere with ``ai-edge-litert``::

    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path="model.tflite")
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    interpreter.set_tensor(inp["index"], image[None].astype("float32"))  # (1, H, W, C), 0-255
    interpreter.invoke()
    probabilities = interpreter.get_tensor(out["index"])[0]
    labels = open("labels.txt").read().splitlines()
"""

from __future__ import annotations

import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from headswap.core.bases import check_image_size, input_spec
from headswap.core.images import check_resize
from headswap.core.predict import (
    LABELS_FILE,
    PREPROCESSING_FILE,
    check_classifier,
    write_labels,
    write_preprocessing,
)

FORMATS: tuple[str, ...] = ("saved_model", "tflite", "tflite_quantized")
"""The format names :func:`export_model` accepts."""

SERVING_SIGNATURE = "serving_default"
SAVED_MODEL_FOLDER = "saved_model"
TFLITE_FILES = {"tflite": "model.tflite", "tflite_quantized": "model_quantized.tflite"}

# What Keras' SavedModel export and :func:`export_saved_model` put in a folder: a folder
# holding only these is a previous export, which a new export replaces.
_SAVED_MODEL_ENTRIES = {"saved_model.pb", "fingerprint.pb", "variables", "assets", LABELS_FILE,
                        PREPROCESSING_FILE}


def export_saved_model(
    model: keras.Model,
    folder: str | Path,
    class_names: Sequence[str],
    resize: str = "stretch",
    image_size: tuple[int, int] | None = None,
) -> Path:
    """Export ``model`` for inference as a TensorFlow SavedModel in ``folder``, with
    ``labels.txt`` and ``preprocessing.json`` in it (:func:`_write_metadata`); return ``folder``.

    The SavedModel has the signatures ``serve`` and ``serving_default``, taking a float32
    batch of raw pixels of the model's input shape and giving the class probabilities
    (``serving_default`` names them ``output_0``). Load it with ``tf.saved_model.load``, as
    TensorFlow Serving does, or in Keras with ``keras.layers.TFSMLayer``. ``folder`` must be
    new, empty, or a previous export, which is replaced.
    """
    _check(model, class_names, resize, image_size)
    folder = _prepare_folder(folder)
    _write_saved_model(model, folder)
    _write_metadata(folder, model, class_names, resize, image_size)
    return folder


def export_tflite(
    model: keras.Model,
    path: str | Path,
    class_names: Sequence[str],
    quantize: bool = False,
    resize: str = "stretch",
    image_size: tuple[int, int] | None = None,
) -> Path:
    """Convert ``model`` to a LiteRT/TFLite file at ``path`` (ending in ``.tflite``), with
    ``labels.txt`` and ``preprocessing.json`` beside it (in the same folder, replacing those
    already there; :func:`_write_metadata`); return ``path``.

    ``quantize=False`` keeps float32 weights: the file gives Keras' probabilities to float
    rounding. ``quantize=True`` applies dynamic-range quantization (int8 weights, float32
    inputs and outputs): a file 3-4x smaller whose probabilities differ slightly.
    The file's input is a float32 batch of raw pixels of the model's input shape, its
    output the class probabilities; run it with :func:`tflite_predict`.
    """
    path = _check_tflite_path(path)
    _check(model, class_names, resize, image_size)
    with tempfile.TemporaryDirectory(prefix="headswap_export_") as tmp:
        saved_model = _write_saved_model(model, Path(tmp) / SAVED_MODEL_FOLDER)
        path.write_bytes(_convert_saved_model(saved_model, quantize))
    _write_metadata(path.parent, model, class_names, resize, image_size)
    return path


def export_model(
    model: keras.Model,
    folder: str | Path,
    class_names: Sequence[str],
    formats: str | Iterable[str] = FORMATS,
    resize: str = "stretch",
    image_size: tuple[int, int] | None = None,
) -> dict[str, Path]:
    """Export ``model`` in each of ``formats`` (names from :data:`FORMATS`) into ``folder``
    and return ``{format: path}`` in the order given.

    ``saved_model`` goes to ``folder/saved_model/`` (see :func:`export_saved_model`),
    ``tflite`` to ``folder/model.tflite`` and ``tflite_quantized`` to
    ``folder/model_quantized.tflite`` (see :func:`export_tflite`), with ``labels.txt`` and
    ``preprocessing.json`` in ``folder`` beside them (:func:`_write_metadata`). The model is
    exported to a SavedModel once, and the TFLite files are converted from it.
    """
    chosen = _check_formats(formats)
    _check(model, class_names, resize, image_size)
    folder = Path(folder)
    if folder.is_file():
        raise FileExistsError(f"{folder} is a file. Give a folder path to export into.")
    paths: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="headswap_export_") as tmp:
        if "saved_model" in chosen:
            saved_model = export_saved_model(model, folder / SAVED_MODEL_FOLDER, class_names,
                                             resize, image_size)
            paths["saved_model"] = saved_model
        else:
            saved_model = _write_saved_model(model, Path(tmp) / SAVED_MODEL_FOLDER)
        for name in chosen:
            if name in TFLITE_FILES:
                path = folder / TFLITE_FILES[name]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(_convert_saved_model(saved_model, name == "tflite_quantized"))
                paths[name] = path
    if any(name in TFLITE_FILES for name in chosen):
        _write_metadata(folder, model, class_names, resize, image_size)
    return {name: paths[name] for name in chosen}


def _write_metadata(
    folder: str | Path,
    model: keras.Model,
    class_names: Sequence[str],
    resize: str = "stretch",
    image_size: tuple[int, int] | None = None,
) -> None:
    """Write ``labels.txt`` (``class_names``, one a line) and ``preprocessing.json``
    (``image_size``, by default the model's input size; the model's channels; ``resize``)
    into ``folder``: what a user of the exported files needs to read images for them."""
    height, width, channels = input_spec(model)
    write_labels(Path(folder) / LABELS_FILE, class_names)
    write_preprocessing(Path(folder) / PREPROCESSING_FILE, image_size or (height, width),
                        channels, resize)


def tflite_predict(
    path: str | Path, images: np.ndarray | Sequence[np.ndarray], batch_size: int = 32
) -> np.ndarray:
    """Class probabilities, shape ``(number of images, number of classes)``, that the
    TFLite file at ``path`` gives for ``images``: raw pixels (0-255) of shape
    ``(n, height, width, channels)``, or one image ``(height, width, channels)``.

    Images go through the interpreter ``batch_size`` at a time (the input tensor is resized
    to each batch); a file whose batch size is fixed gets batches of that size.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No TFLite file at {path}. Write one with export_tflite or export_model."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
    interpreter = _interpreter(path)
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(
            f"{path} has {len(inputs)} inputs and {len(outputs)} outputs; tflite_predict runs "
            "classifiers with one image input and one output, as export_tflite writes."
        )
    inp, out = inputs[0], outputs[0]
    if inp["dtype"] != np.float32:
        raise ValueError(
            f"{path} takes {np.dtype(inp['dtype']).name} input; tflite_predict runs files with "
            "float32 input (raw pixels), as export_tflite writes with or without quantize."
        )
    signature = [int(d) for d in inp["shape_signature"]]
    given = np.asarray(images, dtype=np.float32)
    batch = given[None] if given.ndim == len(signature) - 1 else given
    if batch.ndim != len(signature) or any(
        want not in (-1, got) for want, got in zip(signature[1:], batch.shape[1:], strict=True)
    ):
        wanted = ", ".join("any" if d == -1 else str(d) for d in signature[1:])
        raise ValueError(
            f"{path.name} takes images of shape ({wanted}) (height, width, channels), as a "
            f"batch (n, {wanted}); got an array of shape {given.shape}. Resize the images to "
            "the model's input size and give them its number of channels (a grayscale batch "
            "of shape (n, height, width) gets its channel axis with images[..., None])."
        )
    fixed = signature[0] if signature[0] > 0 else None
    step = fixed or batch_size
    results = []
    for start in range(0, len(batch), step):
        chunk = batch[start : start + step]
        count = len(chunk)
        if fixed and count < fixed:
            padding = np.zeros((fixed - count, *chunk.shape[1:]), dtype=np.float32)
            chunk = np.concatenate([chunk, padding])
        if tuple(interpreter.get_input_details()[0]["shape"]) != chunk.shape:
            interpreter.resize_tensor_input(inp["index"], list(chunk.shape))
            interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], chunk)
        interpreter.invoke()
        results.append(interpreter.get_tensor(out["index"])[:count].copy())
    if not results:
        return np.zeros((0, int(out["shape_signature"][-1])), dtype=np.float32)
    return np.concatenate(results)


def _interpreter(path: Path) -> Any:
    """An allocated interpreter for the TFLite file at ``path``: TensorFlow's, or where this
    TensorFlow has none, ``ai_edge_litert``'s."""
    interpreter_class = getattr(tf.lite, "Interpreter", None)
    if interpreter_class is None:
        try:
            from ai_edge_litert.interpreter import Interpreter as interpreter_class
        except ImportError as err:
            raise ImportError(
                "This TensorFlow has no TFLite interpreter (tf.lite.Interpreter). "
                "Install LiteRT's: pip install ai-edge-litert"
            ) from err
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
            interpreter = interpreter_class(model_path=str(path))
    except ValueError as err:
        raise ValueError(
            f"{path} is not a TFLite model the interpreter can read ({_first_line(err)}). "
            "Write it with export_tflite or export_model."
        ) from err
    interpreter.allocate_tensors()
    return interpreter


def _write_saved_model(model: keras.Model, folder: Path) -> Path:
    """Write ``model(images, training=False)`` as a SavedModel in ``folder`` (signatures
    ``serve`` and ``serving_default``, input named as the model's input); return ``folder``."""
    spec = model.inputs[0]
    signature = [tf.TensorSpec(tuple(spec.shape), spec.dtype, name=spec.name)]

    def serve(images: tf.Tensor) -> tf.Tensor:
        return model(images, training=False)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve, input_signature=signature)
    archive.write_out(str(folder), verbose=False)
    return folder


def _convert_saved_model(folder: Path, quantize: bool) -> bytes:
    """The TFLite flatbuffer of the SavedModel's ``serving_default`` signature, with
    TFLite's built-in ops only; dynamic-range quantized if ``quantize``."""
    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(folder), signature_keys=[SERVING_SIGNATURE]
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    try:
        return converter.convert()
    except Exception as err:  # tf.lite's ConverterError is not public
        ops = sorted(set(re.findall(r"'tf\.(\w+)' op is neither", str(err))))
        if ops:
            raise ValueError(
                "The model uses TensorFlow ops that TFLite's built-in ops lack: "
                f"{', '.join(ops)}. Replace the layers that use them with built-in Keras "
                "layers, or convert the SavedModel yourself with "
                "tf.lite.OpsSet.SELECT_TF_OPS (the file then needs the Flex delegate on the "
                "device)."
            ) from err
        raise RuntimeError(f"TFLite conversion failed: {_first_line(err)}") from err


def _check(
    model: keras.Model,
    class_names: Sequence[str],
    resize: str,
    image_size: tuple[int, int] | None,
) -> None:
    """Refuse a model that is no classifier of ``class_names``, an unknown ``resize`` mode
    and an ``image_size`` other than the model's fixed input size."""
    check_classifier(model, class_names)
    check_resize(resize)
    if image_size is not None:
        check_image_size(model, image_size)


def _check_formats(formats: str | Iterable[str]) -> list[str]:
    """``formats`` as a list without repeats, each one of :data:`FORMATS`."""
    chosen = [formats] if isinstance(formats, str) else list(formats)
    allowed = ", ".join(FORMATS)
    unknown = [name for name in chosen if name not in FORMATS]
    if unknown:
        raise ValueError(
            f"Unknown export format(s): {', '.join(map(repr, unknown))}. "
            f"Allowed formats: {allowed}."
        )
    if not chosen:
        raise ValueError(f"No export format chosen. Choose one or more of: {allowed}.")
    return list(dict.fromkeys(chosen))


def _check_tflite_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder. Give the path of a .tflite file in it.")
    if path.suffix != ".tflite":
        raise ValueError(
            f"A TFLite file's name ends in .tflite; got {path}. Use e.g. {path.stem}.tflite."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _prepare_folder(folder: str | Path) -> Path:
    """``folder``, ready for a SavedModel: created if new, emptied if it holds a previous
    export; refused if it is a file or holds anything else."""
    folder = Path(folder)
    if folder.is_file():
        raise FileExistsError(f"{folder} is a file. Give a folder path for the SavedModel.")
    if folder.is_dir() and any(folder.iterdir()):
        entries = {entry.name for entry in folder.iterdir()}
        if "saved_model.pb" not in entries or not entries <= _SAVED_MODEL_ENTRIES:
            raise FileExistsError(
                f"{folder} is not empty and is not a previous SavedModel export, so it is "
                "not overwritten. Export to a new or empty folder."
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
