"""Export a trained Keras classifier for serving (TensorFlow SavedModel), for phones and edge
devices (a LiteRT/TFLite flatbuffer: float32, with dynamic-range quantization, or full-integer
int8) and for other runtimes (ONNX).

The models take raw pixels (float32, 0-255, shape ``(batch, height, width, channels)``; the
int8 file: int8, see below) and do their own preprocessing inside, so every exported file
takes images as they are decoded and resized and gives class probabilities in the order of
``class_names``, which are written one a line to a ``labels.txt`` file beside them.
:mod:`headswap.core.export_check` runs the files and scores them against the Keras model.

Decoding and resizing stay outside the exported files: beside each ``labels.txt`` a
``preprocessing.json`` says how to bring an image to the model's input, as in training::

    {"image_size": [224, 224], "channels": 3, "resize": "pad"}

``image_size`` is [height, width], ``channels`` 1 (grayscale) or 3 (RGB), and ``resize`` one
of :data:`headswap.core.images.RESIZE_MODES`: ``stretch`` (resize to exactly that size),
``pad`` (fit inside keeping the aspect ratio, centred, black bands: ``tf.image.resize_with_pad``)
or ``crop`` (cover keeping the aspect ratio, then cut the centre). JPEGs are turned upright by
their EXIF orientation first, and one at least twice that size is decoded at 1/2, 1/4 or 1/8
scale (:func:`headswap.core.images.decode_for_size`, PIL's ``Image.draft``).
:func:`headswap.core.data.decode_bytes` does all of it;
:meth:`headswap.core.predict.Classifier.from_file` reads the file.

:func:`export_model` writes the chosen formats into one folder::

    folder/
        saved_model/            "saved_model": TensorFlow SavedModel (+ its labels.txt)
        model.tflite            "tflite": float32 LiteRT/TFLite file
        model_quantized.tflite  "tflite_quantized": dynamic-range quantized weights
        model_int8.tflite       "tflite_int8": full-integer int8 (weights and activations)
        model.onnx              "onnx": ONNX (input ``images``, output ``probabilities``)
        labels.txt              class names of the .tflite and .onnx files, in output order
        preprocessing.json      image size, channels and resize mode of those files

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

Full-integer quantization (``tflite_int8``) also quantizes every activation, with ranges
measured on a representative set of training images (``representative``), and runs on
integer-only hardware (microcontrollers, Edge TPU, NPUs): its built-in int8 ops only, int8
input and output. The input's range is fixed at the pixel range 0-255 (scale 1, zero point
-128: ``int8 = pixel - 128``, exact for 8-bit images); the output is the probabilities in
steps of 1/256 (``probability = (int8 + 128) / 256``). Both are in the file's tensor details
(``quantization``); :func:`headswap.core.export_check.tflite_predict` applies them.

How the ONNX file is made: ``tf2onnx.convert.from_function`` converts the SavedModel's own
inference function (``model(images, training=False)``, traced once for both), with the
model's batch size (free, as the project's models have it), to ONNX opset
:data:`ONNX_OPSET`; run it with onnxruntime
(:func:`headswap.core.export_check.onnx_predict`)::

    import onnxruntime
    session = onnxruntime.InferenceSession("model.onnx")
    probabilities = session.run(["probabilities"], {"images": batch})[0]  # float32, 0-255
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from headswap.core.bases import check_image_size, input_spec
from headswap.core.errors import first_line
from headswap.core.images import check_resize
from headswap.core.predict import (
    LABELS_FILE,
    PREPROCESSING_FILE,
    check_classifier,
    write_labels,
    write_preprocessing,
)

FORMATS: tuple[str, ...] = ("saved_model", "tflite", "tflite_quantized", "tflite_int8", "onnx")
"""The format names :func:`export_model` accepts."""

SERVING_SIGNATURE = "serving_default"
SAVED_MODEL_FOLDER = "saved_model"
TFLITE_FILES = {"tflite": "model.tflite", "tflite_quantized": "model_quantized.tflite",
                "tflite_int8": "model_int8.tflite"}
ONNX_FILE = "model.onnx"
ONNX_OPSET = 17
ONNX_INPUT, ONNX_OUTPUT = "images", "probabilities"

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
    return _saved_model_with_metadata(model, folder, class_names, resize, image_size)


def _saved_model_with_metadata(
    model: keras.Model, folder: str | Path, class_names: Sequence[str], resize: str,
    image_size: tuple[int, int] | None, serve: Any = None,
) -> Path:
    folder = _prepare_folder(folder)
    _write_saved_model(model, folder, serve)
    _write_metadata(folder, model, class_names, resize, image_size)
    return folder


def export_model(
    model: keras.Model,
    folder: str | Path,
    class_names: Sequence[str],
    formats: str | Iterable[str] = FORMATS,
    resize: str = "stretch",
    image_size: tuple[int, int] | None = None,
    representative: np.ndarray | None = None,
    timings: dict[str, float] | None = None,
    failures: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Export ``model`` in each of ``formats`` (names from :data:`FORMATS`) into ``folder``
    and return ``{format: path}`` in the order given.

    ``saved_model`` goes to ``folder/saved_model/`` (see :func:`export_saved_model`), the
    TFLite formats to ``folder/`` + :data:`TFLITE_FILES` and ``onnx`` to ``folder/model.onnx``,
    with ``labels.txt`` and ``preprocessing.json`` in ``folder`` beside them
    (:func:`_write_metadata`). The model is exported to a SavedModel once, and the TFLite
    files are converted from it. ``tflite_int8`` needs ``representative``: raw pixels of a
    few hundred training images at most, of the model's input shape, on which the ranges of
    the activations are measured. ``timings``, if given, gets the seconds each format took.
    ``failures``, if given, gets the reason of each format whose conversion failed, which is
    then left out (the others are still written); without it, such a failure is raised.
    """
    chosen = _check_formats(formats)
    _check(model, class_names, resize, image_size)
    if "tflite_int8" in chosen and (representative is None or not len(representative)):
        raise ValueError("tflite_int8 needs representative images (a few hundred training "
                         "images at most) to measure the ranges of the activations on.")
    folder = Path(folder)
    if folder.is_file():
        raise FileExistsError(f"{folder} is a file. Give a folder path to export into.")
    paths: dict[str, Path] = {}
    timings = {} if timings is None else timings
    with tempfile.TemporaryDirectory(prefix="headswap_export_") as tmp:
        started = time.perf_counter()
        # one trace for the SavedModel and ONNX; ONNX alone traces in its own conversion
        serve = (_inference_function(model)
                 if any(name != "onnx" for name in chosen) else None)
        if "saved_model" in chosen:
            saved_model = _saved_model_with_metadata(model, folder / SAVED_MODEL_FOLDER,
                                                     class_names, resize, image_size, serve)
            paths["saved_model"] = saved_model
            timings["saved_model"] = time.perf_counter() - started
        elif any(name in TFLITE_FILES for name in chosen):
            saved_model = _write_saved_model(model, Path(tmp) / SAVED_MODEL_FOLDER, serve)
        for name in chosen:
            started = time.perf_counter()
            if name == "saved_model":
                continue
            path = folder / TFLITE_FILES.get(name, ONNX_FILE)
            try:
                content = (_convert_saved_model(saved_model, name, representative)
                           if name in TFLITE_FILES else _convert_onnx(model, serve))
            except (ValueError, RuntimeError) as err:
                if failures is None:
                    raise
                failures[name], timings[name] = str(err), time.perf_counter() - started
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            paths[name] = path
            timings[name] = time.perf_counter() - started
    if any(name != "saved_model" for name in paths):
        _write_metadata(folder, model, class_names, resize, image_size)
    return {name: paths[name] for name in chosen if name in paths}


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


def _write_saved_model(model: keras.Model, folder: Path, serve: Any = None) -> Path:
    """Write ``model(images, training=False)`` (``serve``, :func:`_inference_function`, made
    if not given) as a SavedModel in ``folder`` (signatures ``serve`` and
    ``serving_default``, input named as the model's input); return ``folder``."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve or _inference_function(model))
    archive.write_out(str(folder), verbose=False)
    return folder


def _inference_function(model: keras.Model) -> Any:
    """``model(images, training=False)`` as a traced ``tf.function`` of the model's input
    (its shape and name): the SavedModel's endpoint and the function ONNX is converted from,
    traced once for both."""
    spec = model.inputs[0]
    signature = [tf.TensorSpec(tuple(spec.shape), spec.dtype, name=spec.name)]
    serve = tf.function(lambda images: model(images, training=False),
                        input_signature=signature, autograph=False)
    serve.get_concrete_function()
    return serve


def _convert_saved_model(
    folder: Path, name: str = "tflite", representative: np.ndarray | None = None
) -> bytes:
    """The TFLite flatbuffer (format ``name``, one of :data:`TFLITE_FILES`) of the
    SavedModel's ``serving_default`` signature, with TFLite's built-in ops only:
    dynamic-range quantized for ``tflite_quantized``, full-integer int8 for ``tflite_int8``
    (ranges measured on ``representative``)."""
    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(folder), signature_keys=[SERVING_SIGNATURE]
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if name != "tflite":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if name == "tflite_int8":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = tf.int8
        converter.representative_dataset = _representative(representative)
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
        raise RuntimeError(f"TFLite conversion failed: {first_line(err)}") from err


def _representative(images: np.ndarray) -> Any:
    """The converter's representative dataset: each image alone, as float32 raw pixels. The
    first one comes once more with a black and a white pixel in its corner, so that the
    input's measured range is the whole pixel range, 0-255, whatever the images' own."""
    images = np.asarray(images, dtype=np.float32)
    extremes = images[0].copy()
    extremes[0, 0], extremes[0, -1] = 0.0, 255.0

    def batches() -> Iterable[list[np.ndarray]]:
        for image in (extremes, *images):
            yield [image[None]]

    return batches


def _convert_onnx(model: keras.Model, serve: Any = None) -> bytes:
    """The ONNX model (opset :data:`ONNX_OPSET`) of ``model(images, training=False)``
    (``serve``, :func:`_inference_function`, whose trace is reused, when given), input
    ``images`` (the model's batch size), output ``probabilities``, converted by tf2onnx."""
    import onnx
    import tf2onnx

    try:
        serve = serve or _inference_function(model)
        proto, _ = tf2onnx.convert.from_function(serve, input_signature=serve.input_signature,
                                                 opset=ONNX_OPSET)
        # tf2onnx keeps an op it cannot convert as it is, which no ONNX runtime can run
        onnx.checker.check_model(proto)
    except Exception as err:  # tf2onnx raises plain exceptions for what it cannot convert
        raise RuntimeError(f"ONNX conversion failed: {first_line(err)}") from err
    # tf2onnx names the input as the function's and the output after the graph (Identity:0)
    renamed = {proto.graph.input[0].name: ONNX_INPUT, proto.graph.output[0].name: ONNX_OUTPUT}
    for node in proto.graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]
    for value in (proto.graph.input[0], proto.graph.output[0]):
        value.name = renamed[value.name]
    return proto.SerializeToString()


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
