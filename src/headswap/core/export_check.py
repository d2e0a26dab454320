"""Run the exported files (:mod:`headswap.core.export`) and score each against the Keras model
it was exported from, on the same labelled images: accuracy, top-1 agreement with the Keras
model, largest absolute difference of a class probability, file size and latency.

An export is trusted when its top-1 agreement and its largest probability difference are
within :data:`TOLERANCES`. The float formats give Keras' probabilities to float rounding: they
are held to 0.99 agreement and 0.05. ``tflite_quantized`` computes with 8-bit weights but
float activations: 0.97 and 0.25 (a borderline image may change class). ``tflite_int8`` also
rounds every activation to 8 bits and its probabilities to steps of 1/256: 0.95 and 0.3. An
export that disagrees more is broken, or (int8) its representative images were unlike these.

Latency is the median wall time of one image (batch 1) over :data:`LATENCY_IMAGES` images, in
milliseconds, after one warm-up call, each runtime with its default number of threads.

How a TFLite file is run (:class:`TFLiteModel`): with TensorFlow's ``tf.lite.Interpreter``
(deprecated in favour of ``ai_edge_litert.interpreter.Interpreter``, the same API, which gives
the same probabilities on these files; its warning is silenced), the release of the converter
that wrote the file; where a TensorFlow has none, ``ai_edge_litert``'s
(``pip install ai-edge-litert``). An ONNX file is run with onnxruntime on the CPU
(:class:`OnnxModel`), a SavedModel with TensorFlow (:class:`SavedModelModel`, its
``serving_default`` signature, as TensorFlow Serving does).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from headswap.core import data, evaluation, manifests
from headswap.core.bases import input_spec
from headswap.core.converters import ONNX_OUTPUT, SERVING_SIGNATURE
from headswap.core.errors import first_line
from headswap.core.export import FORMATS

LATENCY_IMAGES = 20
"""Images timed one at a time (batch 1) for an export's latency."""

TOLERANCES: dict[str, tuple[float, float]] = {
    "saved_model": (0.99, 0.05), "tflite": (0.99, 0.05), "onnx": (0.99, 0.05),
    "tflite_quantized": (0.97, 0.25), "tflite_int8": (0.95, 0.3),
}
"""Per format: the least top-1 agreement with the Keras model and the largest absolute
difference of a class probability that it is trusted with."""

COLUMNS = ["format", "file", "size_mb", "images", "accuracy", "agreement", "max_prob_diff",
           "latency_ms", "export_s", "check_s", "min_agreement", "max_diff_allowed",
           "within_tolerance", "error"]


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


def check_exports(
    model: keras.Model,
    paths: Mapping[str, Path],
    batches: Iterable[tuple[Any, Any]],
    export_seconds: Mapping[str, float] | None = None,
    failures: Mapping[str, str] | None = None,
    latency_images: int = LATENCY_IMAGES,
) -> pd.DataFrame:
    """Each export of ``paths`` (``{format: path}``, as ``export_model`` returns them) scored
    against ``model`` on ``batches`` of (raw pixels, label indices): one row per format
    (:data:`COLUMNS`), after a ``keras`` row, the reference, with the Keras model's accuracy.

    A batch may hold a third array, the model's own probabilities for its images (e.g. read
    from the run's test predictions): they are the reference then, and ``model`` is not run.
    ``export_seconds`` (as ``export_model``'s ``timings``) fills ``export_s``; ``check_s`` is
    the time each file took to load, predict every image and time its latency (the first
    ``latency_images`` images, one at a time). A format in ``failures`` (as ``export_model``'s:
    not written) or that its runtime cannot load or run gets a row with its ``error``.
    """
    loaded, seconds = {}, {}
    errors = {name: f"was not written: {reason}" for name, reason in (failures or {}).items()}
    for name, path in paths.items():
        started = time.perf_counter()
        try:
            loaded[name] = load_export(name, path)
        except Exception as err:  # each runtime raises its own kinds
            errors[name] = f"could not be loaded: {first_line(err)}"
        seconds[name] = time.perf_counter() - started
    tallies = {name: _Tally() for name in ["keras", *paths]}
    timed: list[np.ndarray] = []  # the first images, for the latency
    for images, labels, *given in batches:
        images, labels = np.asarray(images, dtype=np.float32), np.asarray(labels)
        timed.extend(images[: latency_images - len(timed)])
        reference = np.asarray(given[0] if given else model.predict_on_batch(images))
        tallies["keras"].add(reference, reference, labels)
        for name, export in list(loaded.items()):
            started = time.perf_counter()
            try:
                probabilities = export.predict(images)
            except Exception as err:  # each runtime raises its own kinds
                errors[name] = f"could not be run: {first_line(err)}"
                del loaded[name]
                continue
            finally:
                seconds[name] += time.perf_counter() - started
            tallies[name].add(probabilities, reference, labels)
    rows = [tallies["keras"].row("keras", "", float("nan"), float("nan"))]
    for name in sorted({*paths, *errors}, key=FORMATS.index):
        row = {"format": name, "file": Path(paths[name]).name if name in paths else "",
               "export_s": (export_seconds or {}).get(name, float("nan"))}
        if name in errors:
            rows.append({**row, "error": errors[name], "within_tolerance": False})
            continue
        started = time.perf_counter()
        latency = _latency_ms(loaded[name], np.stack(timed)) if timed else float("nan")
        seconds[name] += time.perf_counter() - started
        least, most = TOLERANCES[name]
        scored = tallies[name].row(name, row["file"], _size_mb(paths[name]), latency)
        rows.append({**row, **scored, "check_s": seconds[name], "min_agreement": least,
                     "max_diff_allowed": most, "within_tolerance": bool(
                         scored["agreement"] >= least and scored["max_prob_diff"] <= most)
                     if scored["images"] else None})
    return pd.DataFrame(rows, columns=COLUMNS)


def check_on_split(
    model: keras.Model,
    paths: Mapping[str, Path],
    manifest: pd.DataFrame,
    image_size: tuple[int, int],
    count: int,
    batch_size: int = 32,
    resize: str = "stretch",
    seed: int = 42,
    export_seconds: Mapping[str, float] | None = None,
    failures: Mapping[str, str] | None = None,
    split: str = "test",
    predictions: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """:func:`check_exports` on ``count`` images at most of one split of a manifest (a
    seeded sample when the split has more), read as ``resize`` says. ``predictions``, the
    model's ``predictions_table`` of that split, gives the Keras probabilities instead of a
    pass of the model, when it has every image chosen."""
    chosen = manifest_sample(manifest, split, count, seed)
    others = manifest[manifest["split"] != split]  # keeps every class name, in order
    batches: Iterable[tuple[Any, ...]] = data.make_dataset(
        pd.concat([others, chosen]), split, image_size, input_spec(model)[2], batch_size,
        resize=resize)
    reference = _probabilities(predictions, chosen["path"], manifests.class_names(manifest))
    if reference is not None:
        batches = ((images, labels, reference[start : start + len(labels)])
                   for start, (images, labels) in zip(range(0, len(chosen), batch_size),
                                                      batches, strict=True))
    return check_exports(model, paths, batches if len(chosen) else [], export_seconds,
                         failures)


def _probabilities(predictions: pd.DataFrame | None, paths: pd.Series,
                   class_names: list[str]) -> np.ndarray | None:
    """The probabilities of ``paths`` in a predictions table (read by ``predictions_arrays``),
    in ``class_names``' order; None without a table, or when it lacks one of them."""
    if predictions is None or not {f"p[{n}]" for n in class_names} <= set(predictions.columns):
        return None
    listed, _, probabilities = evaluation.predictions_arrays(predictions, class_names)
    rows = pd.Series(np.arange(len(listed)), index=listed).groupby(level=0).first()
    if not paths.isin(rows.index).all():  # then the model is run
        return None
    return probabilities[rows.loc[paths.to_numpy()].to_numpy()]


def representative_images(
    manifest: pd.DataFrame, image_size: tuple[int, int], channels: int, count: int,
    resize: str = "stretch", seed: int = 42,
) -> np.ndarray:
    """Raw pixels of ``count`` training images at most (a seeded sample), on which a
    full-integer TFLite file measures its ranges."""
    chosen = manifest_sample(manifest, "train", count, seed)
    return data.decode_all(chosen["path"].to_numpy(dtype=str), image_size, channels,
                           resize=resize)


def manifest_sample(manifest: pd.DataFrame, split: str, count: int, seed: int) -> pd.DataFrame:
    """The rows of one split, or a seeded sample of ``count`` of them, in manifest order."""
    rows = manifest[manifest["split"] == split]
    return rows if len(rows) <= count else rows.sample(count, random_state=seed).sort_index()


def disagreements(table: pd.DataFrame) -> list[str]:
    """A line for each export of a :func:`check_exports` table outside its tolerance, naming
    the format and its figures, or its error."""
    keras_rows = table.loc[table["format"] == "keras", "accuracy"]
    reference = f" (Keras: {keras_rows.iloc[0]:.4f})" if len(keras_rows) else ""
    return [
        f"{row.format} {row.error}" if isinstance(row.error, str) and row.error else
        f"{row.format} disagrees with the Keras model on {int(row.images)} test images: top-1 "
        f"agreement {row.agreement:.4f} (tolerance: at least {row.min_agreement}), largest "
        f"probability difference {row.max_prob_diff:.4f} (tolerance: at most "
        f"{row.max_diff_allowed}); its accuracy {row.accuracy:.4f}{reference}"
        for row in table[table["within_tolerance"].eq(False)].itertuples()
    ]


def summaries(table: pd.DataFrame) -> list[str]:
    """A line for each export of a :func:`check_exports` table that was written and checked:
    its size, the time its export and its check took, its agreement with the Keras model."""
    rows = table[(table["format"] != "keras") & table["error"].isna()]
    return [
        f"{row.format}: {row.size_mb:.3g} MB, written in {row.export_s:.2f} s, checked in "
        f"{row.check_s:.2f} s on {int(row.images)} test images (agreement with Keras "
        f"{row.agreement:.4f}, largest probability difference {row.max_prob_diff:.3g})"
        for row in rows.itertuples()
    ]


def figures(table: pd.DataFrame) -> dict[str, float]:
    """The figures of a :func:`check_exports` table, ``{"<format>.<figure>": value}`` (those
    it has), for a tracking server."""
    names = ("accuracy", "agreement", "max_prob_diff", "size_mb", "latency_ms", "export_s",
             "check_s")
    return {f"{row['format']}.{name}": float(row[name]) for row in table.to_dict("records")
            for name in names if pd.notna(row[name])}


class _Tally:
    """Running counts of one export's predictions against the reference's."""

    def __init__(self) -> None:
        self.images = self.correct = self.agree = 0
        self.max_diff = 0.0

    def add(self, probabilities: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> None:
        predicted = probabilities.argmax(axis=1)
        self.images += len(labels)
        self.correct += int((predicted == labels).sum())
        self.agree += int((predicted == reference.argmax(axis=1)).sum())
        if len(labels):
            self.max_diff = max(self.max_diff, float(np.abs(probabilities - reference).max()))

    def row(self, name: str, file: str, size_mb: float, latency_ms: float) -> dict[str, Any]:
        count = self.images or float("nan")
        return {"format": name, "file": file, "size_mb": size_mb, "images": self.images,
                "accuracy": self.correct / count, "agreement": self.agree / count,
                "max_prob_diff": self.max_diff if self.images else float("nan"),
                "latency_ms": latency_ms}


def _latency_ms(export: TFLiteModel | OnnxModel | SavedModelModel, images: np.ndarray) -> float:
    """Median milliseconds of one image through ``export`` (batch 1), after a warm-up call."""
    export.predict(images[:1])
    times = []
    for image in images:
        started = time.perf_counter()
        export.predict(image[None])
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


def _size_mb(path: str | Path) -> float:
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


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
