"""Score each export (:mod:`headswap.core.export`, run by :mod:`headswap.core.runtimes`)
against the Keras model it was exported from, on the same labelled images: accuracy, top-1
agreement with the Keras model, largest absolute difference of a class probability, file size
and latency.

An export is trusted when its top-1 agreement and its largest probability difference are
within :data:`TOLERANCES`. The float formats give Keras' probabilities to float rounding: they
are held to 0.99 agreement and 0.05. ``tflite_quantized`` computes with 8-bit weights but
float activations: 0.97 and 0.25 (a borderline image may change class). ``tflite_int8`` also
rounds every activation to 8 bits and its probabilities to steps of 1/256: 0.95 and 0.3. An
export that disagrees more is broken, or (int8) its representative images were unlike these.

Latency is the median wall time of one image (batch 1) over :data:`LATENCY_IMAGES` images, in
milliseconds, after one warm-up call, each runtime with its default number of threads.

:class:`ExportChecks` scores the exports one at a time, as ``export_model`` writes each
(its ``written`` callback), so that the first are checked while the last are converted.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from headswap.core import data, evaluation, inference, manifests
from headswap.core.bases import input_spec
from headswap.core.errors import first_line
from headswap.core.export import FORMATS
from headswap.core.runtimes import OnnxModel, SavedModelModel, TFLiteModel, load_export

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


class ExportChecks:
    """Exports scored against ``model`` one at a time (:meth:`add`) on the same ``batches`` of
    (raw pixels, label indices), held in memory (250 images of 224x224x3: 150 MB); then
    :meth:`table`, one row per format (:data:`COLUMNS`) after a ``keras`` row, the reference,
    with the Keras model's accuracy.

    A batch may hold a third array, the model's own probabilities for its images (e.g. read
    from the run's test predictions): they are the reference then, and ``model`` is not run.
    ``check_s`` is the time each file took to load, predict every image and time its latency
    (the first ``latency_images`` images, one at a time). A format that its runtime cannot
    load or run gets a row with its ``error``."""

    def __init__(self, model: keras.Model, batches: Iterable[tuple[Any, ...]],
                 latency_images: int = LATENCY_IMAGES):
        self.batches = []
        reference_tally = _Tally()
        timed: list[np.ndarray] = []  # the first images, for the latency
        rows = [(np.asarray(images, dtype=np.float32), np.asarray(labels), *given)
                for images, labels, *given in batches]
        passed = [(row[0],) for row in rows if len(row) == 2]  # no reference given
        computed = (out for (out,) in inference.outputs(model, passed, len(passed)))
        for images, labels, *given in rows:
            timed.extend(images[: latency_images - len(timed)])
            reference = np.asarray(given[0] if given else next(computed))
            reference_tally.add(reference, reference, labels)
            self.batches.append((images, labels, reference))
        self.timed = np.stack(timed) if timed else np.zeros((0,))
        self.rows = {"keras": reference_tally.row("keras", "", float("nan"), float("nan"))}

    def add(self, name: str, path: str | Path, export_s: float = float("nan")) -> None:
        """Score the export ``name`` (a format of ``FORMATS``) at ``path``, written in
        ``export_s`` seconds (as ``export_model``'s ``written`` callback gives them)."""
        row = {"format": name, "file": Path(path).name, "export_s": export_s}
        started, tally = time.perf_counter(), _Tally()
        try:
            export = load_export(name, path)
        except Exception as err:  # each runtime raises its own kinds
            self.rows[name] = {**row, "error": f"could not be loaded: {first_line(err)}",
                               "within_tolerance": False}
            return
        try:
            for images, labels, reference in self.batches:
                tally.add(export.predict(images), reference, labels)
            latency = _latency_ms(export, self.timed) if len(self.timed) else float("nan")
        except Exception as err:  # each runtime raises its own kinds
            self.rows[name] = {**row, "error": f"could not be run: {first_line(err)}",
                               "within_tolerance": False}
            return
        least, most = TOLERANCES[name]
        scored = tally.row(name, row["file"], _size_mb(path), latency)
        self.rows[name] = {
            **row, **scored, "check_s": time.perf_counter() - started, "min_agreement": least,
            "max_diff_allowed": most, "within_tolerance": bool(
                scored["agreement"] >= least and scored["max_prob_diff"] <= most)
            if scored["images"] else None}

    def scored(self, paths: Mapping[str, Path], failures: Mapping[str, str] | None = None,
               export_seconds: Mapping[str, float] | None = None) -> pd.DataFrame:
        """:meth:`add` each export of ``paths`` (``{format: path}``), then :meth:`table`."""
        for name, path in paths.items():
            self.add(name, path)
        return self.table(failures, export_seconds)

    def table(self, failures: Mapping[str, str] | None = None,
              export_seconds: Mapping[str, float] | None = None) -> pd.DataFrame:
        """The rows so far, in the order of ``FORMATS``, with a row for each format in
        ``failures`` (as ``export_model``'s: not written) naming its reason."""
        rows = dict(self.rows)
        for name, reason in (failures or {}).items():
            rows[name] = {"format": name, "file": "", "error": f"was not written: {reason}",
                          "within_tolerance": False}
        for name, seconds in (export_seconds or {}).items():
            if name in rows:
                rows[name] = {**rows[name], "export_s": seconds}
        order = ["keras", *FORMATS]
        return pd.DataFrame(sorted(rows.values(), key=lambda row: order.index(row["format"])),
                            columns=COLUMNS)


def check_exports(
    model: keras.Model,
    paths: Mapping[str, Path],
    batches: Iterable[tuple[Any, Any]],
    export_seconds: Mapping[str, float] | None = None,
    failures: Mapping[str, str] | None = None,
    latency_images: int = LATENCY_IMAGES,
) -> pd.DataFrame:
    """Each export of ``paths`` (``{format: path}``, as ``export_model`` returns them) scored
    against ``model`` on ``batches`` (:class:`ExportChecks`); ``export_seconds`` (as
    ``export_model``'s ``timings``) fills ``export_s``, ``failures`` (as its ``failures``)
    gives the formats not written."""
    return ExportChecks(model, batches, latency_images).scored(paths, failures, export_seconds)


def split_checks(
    model: keras.Model,
    manifest: pd.DataFrame,
    image_size: tuple[int, int],
    count: int,
    batch_size: int = 32,
    resize: str = "stretch",
    seed: int = 42,
    split: str = "test",
    predictions: pd.DataFrame | None = None,
) -> ExportChecks:
    """:class:`ExportChecks` on ``count`` images at most of one split of a manifest (a
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
    return ExportChecks(model, batches if len(chosen) else [])


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
