"""The conversions of a trained Keras classifier into TFLite and ONNX files, for
:func:`headswap.core.export.export_model`.

How the TFLite file is made: ``tf.lite.TFLiteConverter.from_saved_model`` converts the
exported SavedModel's ``serving_default`` with TFLite's built-in ops only. On TensorFlow 2.21 with
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
  SavedModel serves, and ``export_model`` converts the SavedModel it has just written
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
(``quantization``); :func:`headswap.core.runtimes.tflite_predict` applies them.

How the ONNX file is made: ``tf2onnx.convert.from_function`` converts the SavedModel's own
inference function (``model(images, training=False)``, traced once for both), with the
model's batch size (free, as the project's models have it), to ONNX opset
:data:`ONNX_OPSET`; run it with onnxruntime
(:func:`headswap.core.runtimes.onnx_predict`)::

    import onnxruntime
    session = onnxruntime.InferenceSession("model.onnx")
    probabilities = session.run(["probabilities"], {"images": batch})[0]  # float32, 0-255

Each conversion runs on one CPU, most of it in Python (the TFLite converter loads the
SavedModel twice), so for a model of :data:`HELPER_MIN_WEIGHTS` weight tensors or more
:func:`helpers` starts processes that convert TFLite files beside the exporting one, one per
other CPU: on two CPUs the five formats of MobileNetV2 take about two thirds of the time they
take one after the other (``benchmarks/export_cost.py``).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from headswap.core.errors import first_line

HELPER_MIN_WEIGHTS = 100
"""Weight tensors of the smallest model whose TFLite files :func:`helpers` convert: a helper
takes about 5 s to import TensorFlow, as long as a conversion of MobileNetV2 (262 weight
tensors) takes; the example's model (17) converts in well under a second a file."""
SERVING_SIGNATURE = "serving_default"
ONNX_OPSET = 17
ONNX_INPUT, ONNX_OUTPUT = "images", "probabilities"


class ConversionFailed(Exception):
    """A format's conversion failed (``error``: its ValueError or RuntimeError) after
    ``seconds``."""

    def __init__(self, error: Exception, seconds: float):
        super().__init__(error, seconds)  # its arguments: a helper's failure is pickled
        self.error, self.seconds = error, seconds


def timed(convert: Any, *args: Any) -> tuple[bytes, float]:
    """``convert(*args)`` and the seconds it took; :class:`ConversionFailed` if it fails."""
    started = time.perf_counter()
    try:
        return convert(*args), time.perf_counter() - started
    except (ValueError, RuntimeError) as err:
        raise ConversionFailed(err, time.perf_counter() - started) from err


def timed_tflite(folder: Path, name: str, representative: np.ndarray | None
                      ) -> tuple[bytes, float]:
    """:func:`convert_tflite`, timed (:func:`timed`): also what a helper runs."""
    return timed(convert_tflite, folder, name, representative)


def offload(pool: ProcessPoolExecutor, folder: Path, names: list[str],
            representative: np.ndarray | None) -> dict[str, Future]:
    """The TFLite conversions ``names`` of the SavedModel ``folder``, handed to ``pool``'s
    helpers; those it cannot take (its helper died starting) are left out."""
    futures: dict[str, Future] = {}
    for name in names:
        try:
            futures[name] = pool.submit(timed_tflite, folder, name, representative)
        except BrokenProcessPool:
            break
    return futures


def helper_result(future: Future, folder: Path, name: str, representative: np.ndarray | None
            ) -> tuple[bytes, float]:
    """A helper's conversion; converted here if the helper process died (out of memory)."""
    try:
        return future.result()
    except BrokenProcessPool:
        return timed_tflite(folder, name, representative)


@contextmanager
def helpers(wanted: int) -> Iterator[ProcessPoolExecutor | None]:
    """Up to ``wanted`` helper processes that convert TFLite files beside this one (each
    conversion runs on one CPU, most of it in Python), one per other CPU; None with a single
    CPU or none wanted. They start at once, so that they import TensorFlow (seconds) while
    this process writes the SavedModel, and they see no GPU."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(wanted, (cpus or 1) - 1)
    if workers < 1:
        yield None
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_without_gpus)
    try:
        for _ in range(workers):
            pool.submit(int)
        yield pool
    finally:
        # without waiting for the helpers to exit (a second or so of TensorFlow's teardown)
        pool.shutdown(wait=False, cancel_futures=True)


def _without_gpus() -> None:
    tf.config.set_visible_devices([], "GPU")


def inference_function(model: keras.Model) -> Any:
    """``model(images, training=False)`` as a traced ``tf.function`` of the model's input
    (its shape and name): the SavedModel's endpoint and the function ONNX is converted from,
    traced once for both."""
    spec = model.inputs[0]
    signature = [tf.TensorSpec(tuple(spec.shape), spec.dtype, name=spec.name)]
    serve = tf.function(lambda images: model(images, training=False),
                        input_signature=signature, autograph=False)
    serve.get_concrete_function()
    return serve


def convert_tflite(
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


def convert_onnx(model: keras.Model, serve: Any = None) -> bytes:
    """The ONNX model (opset :data:`ONNX_OPSET`) of ``model(images, training=False)``
    (``serve``, :func:`inference_function`, whose trace is reused, when given), input
    ``images`` (the model's batch size), output ``probabilities``, converted by tf2onnx."""
    import onnx
    import tf2onnx

    try:
        serve = serve or inference_function(model)
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
