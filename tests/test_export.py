"""Exports of a small trained classifier (SavedModel, float32, dynamic-range and full-integer
int8 TFLite, ONNX) give the Keras model's predictions, with the class names beside them, run by
the real TFLite interpreter and onnxruntime; their check scores each against the Keras model
and flags one that disagrees."""

from __future__ import annotations

import os
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from headswap.core.converters import (
    HELPER_MIN_WEIGHTS,
    helper_result,
    helpers,
    offload,
    timed_tflite,
)
from headswap.core.evaluation import predict_split
from headswap.core.export import FORMATS, export_model, export_saved_model
from headswap.core.export_check import (
    LATENCY_IMAGES,
    ExportChecks,
    check_exports,
    disagreements,
    figures,
    split_checks,
    summaries,
)
from headswap.core.predict import LABELS_FILE, read_labels
from headswap.core.runtimes import TFLiteModel, onnx_predict, tflite_predict

pytestmark = pytest.mark.slow

CLASS_NAMES = ["circle", "square", "stripes"]
SIZE = 32


def shapes(count: int, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` noisy pictures (raw pixels, float32) of a filled circle, a filled square or
    horizontal stripes, in a random bright colour when ``channels`` is 3, and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % len(CLASS_NAMES))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.integers(SIZE // 3, 2 * SIZE // 3, (2, count, 1, 1))
    r = rng.integers(SIZE // 6, SIZE // 4, (count, 1, 1))
    phase = rng.integers(0, 6, (count, 1, 1))
    circle = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    square = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
    stripes = ((yy + phase) // 3) % 2 == 0
    kind = labels[:, None, None]
    mask = np.where(kind == 0, circle, np.where(kind == 1, square, stripes))[..., None]
    background = rng.normal(40, 15, (count, SIZE, SIZE, channels))
    colour = rng.uniform(150, 255, (count, 1, 1, channels)) if channels == 3 else 220
    images = np.clip(np.where(mask, colour, background), 0, 255).astype("float32")
    return images, labels


def classifier(channels: int) -> keras.Model:
    """A small Functional CNN taking raw pixels, shaped like this project's models: an
    augmentation layer, rescaling, a nested ``base`` model with BatchNormalization, pooling,
    dropout and a softmax layer named ``predictions``. The augmentation layer is there on
    purpose: called without ``training``, Keras 3 would run the whole model in training mode,
    so an export that does not ask for inference gives other probabilities."""
    layers = keras.layers
    base_inputs = keras.Input(shape=(SIZE, SIZE, channels))
    x = base_inputs
    for i, filters in enumerate((16, 32, 64), start=1):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
        if i < 3:
            x = layers.MaxPooling2D(name=f"pool{i}")(x)
    base = keras.Model(base_inputs, x, name="base")
    inputs = keras.Input(shape=(SIZE, SIZE, channels), name="image")
    x = layers.RandomFlip("horizontal", seed=1, name="augment_flip")(inputs)
    x = layers.Rescaling(1 / 255, name="rescale")(x)
    x = base(x)
    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    x = layers.Dense(64, activation="relu", name="head_dense1")(x)
    x = layers.Dropout(0.3, name="head_dropout1")(x)
    outputs = layers.Dense(len(CLASS_NAMES), activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="headswapped")


@dataclass
class Exported:
    model: keras.Model
    images: np.ndarray  # held-out raw pixels
    labels: np.ndarray
    keras_probs: np.ndarray  # the Keras model's probabilities for them
    paths: dict[str, Path]
    timings: dict[str, float]
    written: list[tuple[str, Path, float, bool]]  # export_model's calls of `written`


@pytest.fixture(scope="module", params=[1, 3], ids=["gray", "rgb"])
def exported(request, tmp_path_factory) -> Exported:
    """A classifier trained for a few epochs on drawn shapes, exported in every format."""
    channels = request.param
    keras.utils.set_random_seed(0)
    train_x, train_y = shapes(600, channels, seed=1)
    model = classifier(channels)
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train_x, train_y, batch_size=32, epochs=4, verbose=0)
    # A few epochs are too few for BatchNormalization's moving statistics to catch up with
    # the weights: recompute them with forward passes in training mode (weights unchanged).
    for _ in range(3):
        for start in range(0, len(train_x), 100):
            model(train_x[start : start + 100], training=True)
    images, labels = shapes(300, channels, seed=2)
    keras_probs = model.predict(images, batch_size=100, verbose=0)
    accuracy = float(np.mean(keras_probs.argmax(axis=1) == labels))
    assert accuracy >= 0.9, f"the test model did not learn the shapes ({accuracy:.2f})"
    folder = tmp_path_factory.mktemp(f"export_{channels}")
    timings: dict[str, float] = {}
    written: list[tuple[str, Path, float, bool]] = []
    paths = export_model(model, folder, CLASS_NAMES, FORMATS, representative=train_x[:100],
                         timings=timings, written=lambda name, path, seconds: written.append(
                             (name, path, seconds, path.exists())))
    return Exported(model, images, labels, keras_probs, paths, timings, written)


def test_export_model_writes_every_format(exported):
    folder = exported.paths["saved_model"].parent
    assert list(exported.paths) == list(FORMATS)
    # `written` was told of each file once it was there (a model this small has no helpers)
    assert exported.written == [(name, exported.paths[name], exported.timings[name], True)
                                for name in FORMATS]
    assert exported.paths == {
        "saved_model": folder / "saved_model",
        "tflite": folder / "model.tflite",
        "tflite_quantized": folder / "model_quantized.tflite",
        "tflite_int8": folder / "model_int8.tflite",
        "onnx": folder / "model.onnx",
    }
    assert (folder / "saved_model" / "saved_model.pb").is_file()
    assert list(exported.timings) == list(FORMATS)
    assert all(seconds > 0 for seconds in exported.timings.values())


def test_float32_tflite_matches_keras(exported):
    probs = tflite_predict(exported.paths["tflite"], exported.images[:32])
    assert probs.shape == (32, len(CLASS_NAMES))
    assert np.abs(probs - exported.keras_probs[:32]).max() <= 1e-4


def test_quantized_tflite_is_smaller_and_agrees_on_top1(exported):
    float_size = exported.paths["tflite"].stat().st_size
    quantized_size = exported.paths["tflite_quantized"].stat().st_size
    assert quantized_size < float_size / 2
    probs = tflite_predict(exported.paths["tflite_quantized"], exported.images)
    agreement = np.mean(probs.argmax(axis=1) == exported.keras_probs.argmax(axis=1))
    assert len(exported.images) >= 300
    assert agreement >= 0.98


def test_int8_tflite_is_integer_only_and_agrees_on_top1(exported):
    path = exported.paths["tflite_int8"]
    assert path.stat().st_size < exported.paths["tflite"].stat().st_size / 2
    model = TFLiteModel(path)
    assert model.input["dtype"] == np.int8 and model.output["dtype"] == np.int8
    # the input covers the pixel range 0-255 whatever the training images' own range
    scale, zero_point = model.input["quantization"]
    assert zero_point == -128 and scale == pytest.approx(1.0, abs=1e-6)
    assert exported.images.max() < 255  # the drawn shapes never reach white
    probs = model.predict(exported.images)
    assert probs.dtype == np.float32 and np.allclose(probs.sum(axis=1), 1, atol=0.02)
    agreement = np.mean(probs.argmax(axis=1) == exported.keras_probs.argmax(axis=1))
    assert agreement >= 0.97
    assert np.abs(probs - exported.keras_probs).max() <= 0.25


def test_onnx_matches_keras_in_onnxruntime(exported):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(exported.paths["onnx"]))
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["probabilities"]
    for count in (1, 7):  # any batch size
        probs = onnx_predict(exported.paths["onnx"], exported.images[:count])
        assert probs.shape == (count, len(CLASS_NAMES))
        assert np.abs(probs - exported.keras_probs[:count]).max() <= 1e-4


def test_check_scores_every_export_against_keras(exported):
    batches = [(exported.images[i : i + 64], exported.labels[i : i + 64])
               for i in range(0, len(exported.images), 64)]
    table = check_exports(exported.model, exported.paths, batches, exported.timings)
    assert list(table["format"]) == ["keras", *FORMATS]
    rows = table.set_index("format")
    keras_accuracy = np.mean(exported.keras_probs.argmax(axis=1) == exported.labels)
    assert rows.loc["keras", "accuracy"] == pytest.approx(keras_accuracy)
    assert (rows["images"] == len(exported.images)).all()
    for name in ("saved_model", "tflite", "onnx"):
        assert rows.loc[name, "agreement"] == 1.0
        assert rows.loc[name, "max_prob_diff"] <= 1e-4
        assert rows.loc[name, "accuracy"] == pytest.approx(keras_accuracy)
    for name in ("tflite_quantized", "tflite_int8"):
        assert rows.loc[name, "agreement"] >= 0.97
        assert abs(rows.loc[name, "accuracy"] - keras_accuracy) <= 0.03
    exports = rows.drop(index="keras")
    assert exports["within_tolerance"].all() and disagreements(table) == []
    assert (exports["size_mb"] > 0).all() and (exports["latency_ms"] > 0).all()
    assert (exports["check_s"] > 0).all()
    assert exports["export_s"].to_dict() == exported.timings
    assert rows.loc["tflite_int8", "size_mb"] < rows.loc["tflite", "size_mb"] / 2
    assert rows.loc["tflite", "file"] == "model.tflite"
    lines = summaries(table)  # what the run logs, a line per export
    assert [line.split(":")[0] for line in lines] == list(FORMATS)
    assert f"on {len(exported.images)} test images" in lines[0]
    tracked = figures(table)
    assert tracked["tflite_int8.agreement"] == rows.loc["tflite_int8", "agreement"]
    assert tracked["keras.accuracy"] == rows.loc["keras", "accuracy"]
    assert "keras.latency_ms" not in tracked  # no NaN figures


def test_check_flags_exports_that_disagree(exported):
    """Scored against another model (untrained), every export disagrees: each is flagged,
    its line naming the format and its figures."""
    other = classifier(exported.images.shape[-1])
    batches = [(exported.images[:LATENCY_IMAGES + 40], exported.labels[:LATENCY_IMAGES + 40])]
    table = check_exports(other, exported.paths, batches)
    lines = disagreements(table)
    flagged = table[~table["within_tolerance"].astype(bool)]
    assert set(flagged["format"]) == set(FORMATS)
    assert len(lines) == len(FORMATS)
    line = next(line for line in lines if line.startswith("tflite_int8 "))
    row = table.set_index("format").loc["tflite_int8"]
    assert f"top-1 agreement {row['agreement']:.4f}" in line
    assert f"largest probability difference {row['max_prob_diff']:.4f}" in line
    assert "on 60 test images" in line and "(tolerance: at least 0.95)" in line


def test_saved_model_serves_keras_outputs(exported):
    loaded = tf.saved_model.load(str(exported.paths["saved_model"]))
    assert {"serve", "serving_default"} <= set(loaded.signatures)
    serving = loaded.signatures["serving_default"]
    (input_name,) = serving.structured_input_signature[1]
    outputs = serving(**{input_name: tf.constant(exported.images)})
    assert list(outputs) == ["output_0"]
    np.testing.assert_allclose(outputs["output_0"].numpy(), exported.keras_probs, atol=1e-5)
    np.testing.assert_allclose(
        loaded.serve(tf.constant(exported.images[:8])).numpy(),
        exported.keras_probs[:8], atol=1e-5,
    )


def test_labels_hold_the_class_names_in_order(exported):
    folder = exported.paths["saved_model"].parent
    for labels in (folder / LABELS_FILE, folder / "saved_model" / LABELS_FILE):
        assert labels.read_text(encoding="utf-8") == "circle\nsquare\nstripes\n"
        assert read_labels(labels) == CLASS_NAMES


def test_tflite_predict_takes_one_image_and_any_batch_size(exported):
    path = exported.paths["tflite"]
    one = tflite_predict(path, exported.images[0])
    assert one.shape == (1, len(CLASS_NAMES))
    by_one = tflite_predict(path, exported.images[:5], batch_size=1)
    by_four = tflite_predict(path, exported.images[:5], batch_size=4)
    np.testing.assert_allclose(by_one[:1], one, atol=1e-6)
    np.testing.assert_allclose(by_one, by_four, atol=1e-6)
    np.testing.assert_allclose(by_one, exported.keras_probs[:5], atol=1e-4)


def test_tflite_predict_refuses_images_of_another_shape(exported):
    channels = exported.images.shape[-1]
    with pytest.raises(ValueError, match=rf"takes images of shape \(32, 32, {channels}\)"):
        tflite_predict(exported.paths["tflite"], np.zeros((2, 16, 16, channels)))
    with pytest.raises(FileNotFoundError, match="export_model"):
        tflite_predict(exported.paths["tflite"].with_name("missing.tflite"), exported.images)


def test_unknown_format_is_refused(exported, tmp_path):
    with pytest.raises(ValueError) as refused:
        export_model(exported.model, tmp_path, CLASS_NAMES, ["tflite", "coreml"])
    message = str(refused.value)
    assert "'coreml'" in message
    assert all(name in message for name in FORMATS)
    assert not any(tmp_path.iterdir())


def test_single_exports_and_their_checks(tmp_path):
    model = classifier(channels=1)  # untrained: these checks need no trained weights
    images, _ = shapes(4, channels=1, seed=3)
    paths = export_model(model, tmp_path / "edge", CLASS_NAMES, "tflite")
    assert list(paths) == ["tflite"] and not (tmp_path / "edge" / "saved_model").exists()
    assert read_labels(tmp_path / "edge" / LABELS_FILE) == CLASS_NAMES
    np.testing.assert_allclose(tflite_predict(paths["tflite"], images),
                               model.predict(images, verbose=0), atol=1e-4)
    with pytest.raises(ValueError, match="gives 3 class probabilities but 2 class names"):
        export_model(model, tmp_path / "other", CLASS_NAMES[:2], "tflite")
    with pytest.raises(ValueError, match="tflite_int8 needs representative images"):
        export_model(model, tmp_path / "other", CLASS_NAMES, ["onnx", "tflite_int8"])
    assert not (tmp_path / "other").exists()

    folder = export_saved_model(model, tmp_path / "serving", CLASS_NAMES)
    again = export_saved_model(model, folder, ["a", "b", "c"])  # a previous export is replaced
    assert read_labels(again / LABELS_FILE) == ["a", "b", "c"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        export_saved_model(model, tmp_path / "notes", CLASS_NAMES)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


class BesselLayer(keras.layers.Layer):
    """A layer computing an op TFLite has no built-in kernel for."""

    def call(self, inputs):
        return tf.math.bessel_i1e(inputs)


def dense_stack(first: keras.layers.Layer | None = None) -> keras.Model:
    """A model of 8x8x1 images large enough for helper processes (``HELPER_MIN_WEIGHTS``
    weight tensors), ``first`` its first layer."""
    inputs = keras.Input(shape=(8, 8, 1))
    x = keras.layers.Flatten()(first(inputs) if first else inputs)
    for _ in range(HELPER_MIN_WEIGHTS // 2):
        x = keras.layers.Dense(4)(x)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))


def test_op_without_tflite_or_onnx_kernel_is_named(tmp_path):
    model = dense_stack(BesselLayer())
    with pytest.raises(ValueError, match="TFLite's built-in ops lack: BesselI1e"):
        export_model(model, tmp_path / "raised", ["a", "b"], "tflite")
    with pytest.raises(RuntimeError, match="ONNX conversion failed: No Op registered for "
                                           "BesselI1e"):
        export_model(model, tmp_path / "raised", ["a", "b"], "onnx")
    # with `failures`, the formats that fail are left out and the others still written; the
    # first of two TFLite files is converted by a helper process (given two CPUs)
    failures: dict[str, str] = {}
    written: list[str] = []
    paths = export_model(model, tmp_path / "kept", ["a", "b"],
                         ["tflite", "saved_model", "tflite_quantized", "onnx"], failures=failures,
                         written=lambda name, *_: written.append(name))
    assert list(paths) == written == ["saved_model"]
    assert list(failures) == ["tflite", "tflite_quantized", "onnx"]
    assert failures["tflite"] == failures["tflite_quantized"]
    del failures["tflite_quantized"]
    assert not (tmp_path / "kept" / "model.onnx").exists()
    images = np.random.default_rng(0).uniform(0, 255, (6, 8, 8, 1)).astype("float32")
    table = check_exports(model, paths, [(images, np.zeros(6, int))], failures=failures)
    assert list(table["format"]) == ["keras", "saved_model", "tflite", "onnx"]
    assert list(table["within_tolerance"][1:]) == [True, False, False]
    lines = disagreements(table)
    assert len(lines) == 2 and lines[0].startswith("tflite was not written: The model uses")
    assert "onnx was not written: ONNX conversion failed: No Op registered" in lines[1]


def test_each_export_is_checked_as_soon_as_it_is_written(tmp_path):
    """With a helper process (two CPUs), `written` gets the SavedModel first, then the files
    this process converts, then the helper's; checked one by one as they come, the exports
    get the table that checking them all afterwards gives."""
    model = dense_stack()
    rng = np.random.default_rng(0)
    batches = [(rng.uniform(0, 255, (30, 8, 8, 1)).astype("float32"), rng.integers(0, 2, 30))]
    checks, order, timings = ExportChecks(model, batches), [], {}

    def written(name: str, path: Path, seconds: float) -> None:
        assert path.exists() and seconds > 0
        order.append(name)
        checks.add(name, path, seconds)

    given = ["tflite", "saved_model", "tflite_quantized", "onnx"]
    paths = export_model(model, tmp_path / "x", ["a", "b"], given, timings=timings,
                         written=written)
    assert list(paths) == list(timings) == given
    helped = len(os.sched_getaffinity(0)) > 1
    assert order == (["saved_model", "tflite_quantized", "onnx", "tflite"] if helped
                     else ["saved_model", "tflite", "tflite_quantized", "onnx"])
    table = checks.table(export_seconds=timings)
    after = check_exports(model, paths, batches, timings)
    same = ["format", "file", "size_mb", "images", "accuracy", "agreement", "max_prob_diff",
            "export_s", "within_tolerance"]
    pd.testing.assert_frame_equal(table[same], after[same])
    assert table["within_tolerance"][1:].all() and (table["check_s"][1:] > 0).all()


def test_a_conversion_is_made_here_when_the_helper_process_died(exported):
    saved_model = exported.paths["saved_model"]
    with helpers(1) as pool:
        if pool is None:
            pytest.skip("a single CPU: no helper process")
        converted, _ = pool.submit(timed_tflite, saved_model, "tflite", None).result()
        assert converted == exported.paths["tflite"].read_bytes()
        assert isinstance(pool.submit(os._exit, 1).exception(), BrokenProcessPool)
        assert offload(pool, saved_model, ["tflite"], None) == {}
    died: Future = Future()
    died.set_exception(BrokenProcessPool("a helper died"))
    content, seconds = helper_result(died, saved_model, "tflite", None)
    assert content == exported.paths["tflite"].read_bytes() and seconds > 0


def test_the_check_on_a_split_takes_the_models_probabilities_from_its_predictions(
    exported, tmp_path
):
    """With the run's test predictions, the check reads the Keras probabilities from them
    (the same table as computing them) instead of running the model again."""
    rows = []
    for i, (image, label) in enumerate(zip(exported.images[:60], exported.labels[:60],
                                           strict=True)):
        path = tmp_path / CLASS_NAMES[label] / f"{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        pixels = image.round().astype("uint8")
        Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)
        rows.append((str(path), CLASS_NAMES[label], "test"))
    manifest = pd.DataFrame(rows, columns=["path", "label", "split"])
    predictions = predict_split(exported.model, manifest, "test", (SIZE, SIZE))
    computed = split_checks(exported.model, manifest, (SIZE, SIZE), 250).scored(exported.paths)
    read = split_checks(exported.model, manifest, (SIZE, SIZE), 250,
                        predictions=predictions).scored(exported.paths)
    same = ["format", "images", "accuracy", "agreement", "within_tolerance"]
    pd.testing.assert_frame_equal(read[same], computed[same])
    np.testing.assert_allclose(read["max_prob_diff"], computed["max_prob_diff"], atol=1e-5)
    assert (read["images"] == 60).all() and read["within_tolerance"][1:].all()
    # the reference is the table's: probabilities moved one class over disagree with every
    # export, and the Keras row's accuracy is the table's
    columns = [f"p[{name}]" for name in CLASS_NAMES]
    moved = predictions.copy()
    moved[columns] = np.roll(predictions[columns].to_numpy(), 1, axis=1)
    table = split_checks(exported.model, manifest, (SIZE, SIZE), 250,
                         predictions=moved).scored(exported.paths).set_index("format")
    labels = manifest["label"].map(CLASS_NAMES.index).to_numpy()
    assert table.loc["keras", "accuracy"] == pytest.approx(
        np.mean(moved[columns].to_numpy().argmax(axis=1) == labels))
    assert (table.loc[list(FORMATS), "agreement"] < 0.5).all()
    assert not table.loc[list(FORMATS), "within_tolerance"].any()
