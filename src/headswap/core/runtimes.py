"""Run the exported files of :func:`headswap.core.export.export_model`, each with its own
runtime, on raw pixels (float32, 0-255, shape ``(n, height, width, channels)``), giving class
probabilities in the order of the export's ``labels.txt``.

A TFLite file (:class:`TFLiteModel`) is run with TensorFlow's ``tf.lite.Interpreter``
(deprecated in favour of ``ai_edge_litert.interpreter.Interpreter``, the same API, which gives
the same probabilities on these files; its warning is silenced), the release of the converter
that wrote the file; where a TensorFlow has none, ``ai_edge_litert``'s
(``pip install ai-edge-litert``). An ONNX file is run with onnxruntime on the CPU
(:class:`OnnxModel`), a SavedModel with TensorFlow (:class:`SavedModelModel`, its
``serving_default`` signature, as TensorFlow Serving does). :func:`load_export` opens any of
them by its format's name. :mod:`headswap.core.export_check` scores them against the Keras
model.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from headswap.core.converters import ONNX_OUTPUT, SERVING_SIGNATURE
from headswap.core.errors import first_line


class TFLiteModel:
    """A TFLite file, ready to run: float32 input (raw pixels), or int8/uint8 input and
    output (a full-integer file), which :meth:`predict` quantizes and dequantizes with the
    file's own scale and zero point."""

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"No TFLite file at {path}. Write one with export_model.")
        self.interpreter = _interpreter(path)
        inputs = self.interpreter.get_input_details()
        outputs = self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(
                f"{path} has {len(inputs)} inputs and {len(outputs)} outputs; TFLiteModel runs "
                "classifiers with one image input and one output, as export_model writes.")
        self.input, self.output = inputs[0], outputs[0]
        if self.input["dtype"] != np.float32 and not self.input["quantization"][0]:
            raise ValueError(
                f"{path} takes {np.dtype(self.input['dtype']).name} input without a scale; "
                "TFLiteModel runs files with float32 input (raw pixels) or quantized input, "
                "as export_model writes.")
        self.signature = [int(d) for d in self.input["shape_signature"]]

    def predict(self, images: np.ndarray | Sequence[np.ndarray],
                batch_size: int = 32) -> np.ndarray:
        """Class probabilities, shape ``(number of images, number of classes)``, for
        ``images``: raw pixels (0-255) of shape ``(n, height, width, channels)``, or one image
        ``(height, width, channels)``. Images go through the interpreter ``batch_size`` at a
        time (the input tensor is resized to each batch); a file whose batch size is fixed
        gets batches of that size."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
        batch = self._batch(images)
        fixed = self.signature[0] if self.signature[0] > 0 else None
        step = fixed or batch_size
        results = []
        for start in range(0, len(batch), step):
            chunk = batch[start : start + step]
            count = len(chunk)
            if fixed and count < fixed:
                padding = np.zeros((fixed - count, *chunk.shape[1:]), dtype=np.float32)
                chunk = np.concatenate([chunk, padding])
            results.append(self._invoke(chunk)[:count])
        if not results:
            return np.zeros((0, int(self.output["shape_signature"][-1])), dtype=np.float32)
        return np.concatenate(results)

    def _batch(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        signature = self.signature
        given = np.asarray(images, dtype=np.float32)
        batch = given[None] if given.ndim == len(signature) - 1 else given
        if batch.ndim != len(signature) or any(
            want not in (-1, got) for want, got in zip(signature[1:], batch.shape[1:],
                                                       strict=True)
        ):
            wanted = ", ".join("any" if d == -1 else str(d) for d in signature[1:])
            raise ValueError(
                f"{self.path.name} takes images of shape ({wanted}) (height, width, "
                f"channels), as a batch (n, {wanted}); got an array of shape {given.shape}. "
                "Resize the images to the model's input size and give them its number of "
                "channels (a grayscale batch of shape (n, height, width) gets its channel "
                "axis with images[..., None]).")
        return batch

    def _invoke(self, chunk: np.ndarray) -> np.ndarray:
        interpreter, inp, out = self.interpreter, self.input, self.output
        if tuple(interpreter.get_input_details()[0]["shape"]) != chunk.shape:
            interpreter.resize_tensor_input(inp["index"], list(chunk.shape))
            interpreter.allocate_tensors()
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            limits = np.iinfo(inp["dtype"])
            chunk = np.clip(np.round(chunk / scale + zero), limits.min, limits.max)
        interpreter.set_tensor(inp["index"], chunk.astype(inp["dtype"]))
        interpreter.invoke()
        result = interpreter.get_tensor(out["index"])
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            return (result.astype(np.float32) - zero) * scale
        return result.copy()


def tflite_predict(
    path: str | Path, images: np.ndarray | Sequence[np.ndarray], batch_size: int = 32
) -> np.ndarray:
    """Class probabilities, shape ``(number of images, number of classes)``, that the
    TFLite file at ``path`` gives for ``images`` (:meth:`TFLiteModel.predict`)."""
    return TFLiteModel(path).predict(images, batch_size)


class OnnxModel:
    """An ONNX file written by :func:`headswap.core.export.export_model`, run by
    onnxruntime on the CPU."""

    def __init__(self, path: str | Path):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(
            str(path), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities for a batch of raw pixels ``(n, height, width, channels)``."""
        batch = np.asarray(images, dtype=np.float32)
        return self.session.run([ONNX_OUTPUT], {self.input: batch})[0]


def onnx_predict(path: str | Path, images: np.ndarray) -> np.ndarray:
    """Class probabilities that the ONNX file at ``path`` gives for ``images``."""
    return OnnxModel(path).predict(images)


class SavedModelModel:
    """An exported SavedModel's ``serving_default`` signature, loaded by TensorFlow."""

    def __init__(self, path: str | Path):
        self.serving = tf.saved_model.load(str(path)).signatures[SERVING_SIGNATURE]
        (self.input,) = self.serving.structured_input_signature[1]

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities for a batch of raw pixels ``(n, height, width, channels)``."""
        batch = tf.constant(np.asarray(images, dtype=np.float32))
        return next(iter(self.serving(**{self.input: batch}).values())).numpy()


def load_export(name: str, path: str | Path) -> TFLiteModel | OnnxModel | SavedModelModel:
    """The export ``name`` (a format of :data:`headswap.core.export.FORMATS`) at ``path``,
    ready to ``predict``."""
    if name == "saved_model":
        return SavedModelModel(path)
    if name == "onnx":
        return OnnxModel(path)
    return TFLiteModel(path)


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
            f"{path} is not a TFLite model the interpreter can read ({first_line(err)}). "
            "Write it with export_model."
        ) from err
    interpreter.allocate_tensors()
    return interpreter
