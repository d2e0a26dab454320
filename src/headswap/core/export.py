"""Export a trained Keras classifier for serving (TensorFlow SavedModel), for phones and edge
devices (a LiteRT/TFLite flatbuffer: float32, with dynamic-range quantization, or full-integer
int8) and for other runtimes (ONNX).

The models take raw pixels (float32, 0-255, shape ``(batch, height, width, channels)``; the
int8 file: int8, see :mod:`headswap.core.converters`) and do their own preprocessing inside,
so every exported file takes images as they are decoded and resized and gives class
probabilities in the order of ``class_names``, which are written one a line to a
``labels.txt`` file beside them.
:mod:`headswap.core.runtimes` runs the files, :mod:`headswap.core.export_check` scores them
against the Keras model.

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

How the TFLite and ONNX files are made, and the int8 file's input and output:
:mod:`headswap.core.converters`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from headswap.core.bases import check_image_size, input_spec
from headswap.core.converters import (
    HELPER_MIN_WEIGHTS,
    ConversionFailed,
    convert_onnx,
    helper_result,
    helpers,
    inference_function,
    offload,
    timed,
    timed_tflite,
)
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

SAVED_MODEL_FOLDER = "saved_model"
TFLITE_FILES = {"tflite": "model.tflite", "tflite_quantized": "model_quantized.tflite",
                "tflite_int8": "model_int8.tflite"}
ONNX_FILE = "model.onnx"

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
    written: Callable[[str, Path, float], Any] | None = None,
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
    ``written``, if given, is called with each format's name, path and seconds as soon as it
    is written: the SavedModel's once the helpers have their conversions, then those of this
    process, then the helpers' (e.g. :meth:`headswap.core.export_check.ExportChecks.add`,
    which checks the first files while the helpers convert the last).
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
    tflite = [name for name in chosen if name in TFLITE_FILES]
    with tempfile.TemporaryDirectory(prefix="headswap_export_") as tmp, \
            helpers(len(tflite) - 1 if len(model.weights) >= HELPER_MIN_WEIGHTS else 0) as pool:
        started = time.perf_counter()
        # one trace for the SavedModel and ONNX; ONNX alone traces in its own conversion
        serve = (inference_function(model)
                 if any(name != "onnx" for name in chosen) else None)
        if "saved_model" in chosen:
            saved_model = _saved_model_with_metadata(model, folder / SAVED_MODEL_FOLDER,
                                                     class_names, resize, image_size, serve)
            paths["saved_model"] = saved_model
            timings["saved_model"] = time.perf_counter() - started
        elif tflite:
            saved_model = _write_saved_model(model, Path(tmp) / SAVED_MODEL_FOLDER, serve)
        # all TFLite files but the last are converted by the helpers, if any, meanwhile
        offloaded = offload(pool, saved_model, tflite[:-1], representative) if pool else {}
        if written and "saved_model" in paths:
            written("saved_model", paths["saved_model"], timings["saved_model"])
        for name in sorted(chosen, key=lambda name: name in offloaded):
            if name == "saved_model":
                continue
            path = folder / TFLITE_FILES.get(name, ONNX_FILE)
            try:
                if name in offloaded:
                    content, timings[name] = helper_result(offloaded[name], saved_model,
                                                           name, representative)
                else:
                    content, timings[name] = (
                        timed_tflite(saved_model, name, representative)
                        if name in TFLITE_FILES else timed(convert_onnx, model, serve))
            except ConversionFailed as failed:
                if failures is None:
                    raise failed.error from failed.error.__cause__
                failures[name], timings[name] = str(failed.error), failed.seconds
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            paths[name] = path
            if written:
                written(name, path, timings[name])
    for name in chosen:  # in the order given, as the paths
        for given in (timings, failures or {}):
            if name in given:
                given[name] = given.pop(name)
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
    """Write ``model(images, training=False)`` (``serve``, :func:`inference_function`, made
    if not given) as a SavedModel in ``folder`` (signatures ``serve`` and
    ``serving_default``, input named as the model's input); return ``folder``."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve or inference_function(model))
    archive.write_out(str(folder), verbose=False)
    return folder


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
