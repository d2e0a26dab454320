"""Weights loaded by layer name and shape, with a report; never into the wrong layer."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format

from headswap.core import applications, bases, heads, weights
from headswap.pipelines.finetune.nodes import load_base
from headswap.project.config import parameter_keys, parse_finetune
from headswap.project.datasets import BaseModelDataset
from tests.conftest import small_cnn


def _net(hidden: str, head: str, seed: int) -> keras.Model:
    """Conv -> pooling -> Dense(8) -> Dense(5), with the two Dense layers named as given."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((16, 16, 3), name="image")
    x = layers.Conv2D(4, 3, name="conv")(inputs)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(8, name=hidden)(x)
    return keras.Model(inputs, layers.Dense(5, name=head)(x))


def _save(model: keras.Model, path: Path) -> Path:
    if path.name.endswith(".weights.h5"):
        model.save_weights(path)
    else:
        model.save(path)
    return path


@pytest.mark.parametrize("file_name", ["old.keras", "old.weights.h5", "old.h5"])
def test_new_head_never_receives_the_old_heads_weights(file_name, tmp_path: Path):
    old = _net("fc", "old_head", seed=1)
    path = _save(old, tmp_path / file_name)
    new = _net("new_fc", "predictions", seed=2)
    fresh = {name: new.get_layer(name).get_weights() for name in ("new_fc", "predictions")}

    # What Keras 3 does: by structure, the n-th Dense gets the n-th Dense's weights.
    if file_name.endswith(".weights.h5"):
        naive = _net("new_fc", "predictions", seed=2)
        naive.load_weights(path)
        np.testing.assert_array_equal(naive.get_layer("new_fc").get_weights()[0],
                                      old.get_layer("fc").get_weights()[0])

    report = weights.load_weights_by_name(new, path)
    np.testing.assert_array_equal(new.get_layer("conv").get_weights()[0],
                                  old.get_layer("conv").get_weights()[0])
    for name, values in fresh.items():
        for got, want in zip(new.get_layer(name).get_weights(), values, strict=True):
            np.testing.assert_array_equal(got, want)
    assert [m["layer"] for m in report["matched"]] == ["conv"]
    assert [m["layer"] for m in report["missing"]] == ["new_fc", "predictions"]
    assert [m["layer"] for m in report["unexpected"]] == ["fc", "old_head"]
    assert report["params"] == {"matched": 3 * 3 * 3 * 4 + 4, "missing": 4 * 8 + 8 + 8 * 5 + 5,
                                "unexpected": 4 * 8 + 8 + 8 * 5 + 5, "shape_mismatched": 0}
    json.dumps(report)  # a JSON artifact as it is


def test_same_name_with_another_shape_is_reported_and_not_loaded(tmp_path: Path):
    old = small_cnn(num_classes=4)
    path = _save(old, tmp_path / "old.keras")
    new = small_cnn(num_classes=7)
    before = new.get_layer("output").get_weights()[0].copy()
    report = weights.load_weights_by_name(new, path)
    (mismatch,) = report["shape_mismatched"]
    assert mismatch["layer"] == "output" and mismatch["shapes"] == [[32, 7], [7]]
    assert mismatch["file_shapes"] == [[32, 4], [4]] and mismatch["file_params"] == 132
    assert report["params"]["shape_mismatched"] == 32 * 7 + 7
    np.testing.assert_array_equal(new.get_layer("output").get_weights()[0], before)
    np.testing.assert_array_equal(new.get_layer("bn2").get_weights()[3],
                                  old.get_layer("bn2").get_weights()[3])
    assert "shape mismatch, not loaded: output [[32, 7], [7]]" in weights.summarise(report)


def _auto_named(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3)(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.Conv2D(6, 3)(x)
    return keras.Model(inputs, layers.Dense(2)(layers.Flatten()(x)))


@pytest.mark.parametrize("file_name", ["auto.keras", "auto.weights.h5", "auto.h5"])
def test_layers_keras_named_are_paired_in_order_of_their_kind(file_name, tmp_path: Path):
    old = _auto_named(seed=1)
    path = _save(old, tmp_path / file_name)
    new = _auto_named(seed=2)  # same layers, new automatic names (conv2d_2 for conv2d, ...)
    assert new.layers[1].name != old.layers[1].name
    report = weights.load_weights_by_name(new, path)
    assert len(report["matched"]) == 4 and not report["missing"] and not report["unexpected"]
    for got, want in zip(new.get_weights(), old.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_weights_of_a_fine_tuned_model_go_back_into_a_new_base(tmp_path: Path):
    tuned = heads.attach_head(bases.cut_model(small_cnn(), "features"), 3, dense=[8])
    path = _save(tuned, tmp_path / "tuned.keras")  # the base is nested in it
    base = bases.cut_model(small_cnn(), "features")
    report = weights.load_weights_by_name(base, path)
    assert {m["layer"] for m in report["matched"]} == {"conv1", "bn1", "conv2", "bn2"}
    assert {m["layer"] for m in report["unexpected"]} == {"head_dense1", "predictions"}
    for got, want in zip(base.get_weights(), tuned.get_layer("base").get_weights(),
                              strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("file_name", ["top.h5", "top.weights.h5"])
def test_weights_only_file_of_an_application_with_its_top(file_name, tmp_path: Path):
    source = keras.applications.EfficientNetB0(
        include_top=True, weights=None, input_shape=(32, 32, 3), classes=5
    )
    path = tmp_path / file_name
    if file_name == "top.h5":
        with h5py.File(path, "w") as file:
            legacy_h5_format.save_weights_to_hdf5_group(file, source)
    else:
        source.save_weights(path)
    base = applications.keras_application("EfficientNetB0", (32, 32), weights=None)
    report = weights.load_weights_by_name(base, path)
    assert [m["layer"] for m in report["unexpected"]] == ["predictions"]
    assert not report["missing"] and not report["shape_mismatched"]
    assert report["params"]["matched"] == base.count_params()
    # EfficientNet's Normalization layer has an automatic name: paired, not lost.
    assert any(m["file_layer"].startswith("normalization") for m in report["matched"])
    for got, want in zip(base.layers[-1].get_weights(), source.get_weights(), strict=False):
        np.testing.assert_array_equal(got, want)


def test_files_that_cannot_be_matched_by_name_are_refused(tmp_path: Path):
    model = small_cnn()
    path = _save(model, tmp_path / "m.weights.h5")
    unnamed = tmp_path / "unnamed.weights.h5"
    shutil.copy(path, unnamed)
    with h5py.File(unnamed, "a") as file:
        file.visititems(lambda key, item: item.attrs.pop("name") if key.endswith("/vars")
                        and "name" in item.attrs else None)
    with pytest.raises(bases.BaseLoadError, match="Give the .keras file"):
        weights.load_weights_by_name(model, unnamed)
    with pytest.raises(bases.BaseLoadError, match="No layer of .* matches"):
        weights.load_weights_by_name(_net("a", "b", seed=0), path)
    with pytest.raises(bases.BaseLoadError, match="No weights file"):
        weights.load_weights_by_name(model, tmp_path / "missing.keras")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(bases.BaseLoadError, match="unknown format"):
        weights.load_weights_by_name(model, tmp_path / "w.npz")


def test_weights_file_with_a_lambda_layer_is_refused_in_safe_mode(tmp_path: Path):
    inputs = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Lambda(lambda t: t / 255.0, name="scale")(inputs)
    path = _save(keras.Model(inputs, keras.layers.Conv2D(4, 3, name="conv")(x)),
                 tmp_path / "lambda.keras")
    model = _net("fc", "head", seed=0)
    with pytest.raises(bases.BaseLoadError, match="allow_unsafe"):
        weights.load_weights_by_name(model, path)
    report = weights.load_weights_by_name(model, path, allow_unsafe=True)
    assert [m["layer"] for m in report["matched"]] == ["conv"]


def _load_base(base: dict, tmp_path: Path):
    """The catalog's pretrained_model and the load_base node on these base parameters."""
    cfg = parse_finetune({"data": {"path": str(tmp_path), "image_size": [32, 32]}, "base": base})
    pretrained = BaseModelDataset(**cfg.base.model_dump(include={
        "source", "path", "name", "weights", "allow_unsafe"}), image_size=[32, 32]).load()
    base, report, resolved = load_base(pretrained, cfg)
    assert resolved.data.image_size == (32, 32)
    return base, report


def test_load_base_node_gives_the_base_own_image_size_when_none_is_set(tmp_path: Path):
    """The base is read once, by load_base: the parameters' unset image size becomes the
    base's own, and a base that takes any size stops with the error naming the key."""
    params = {"data": {"path": str(tmp_path)}, "base": {"path": "user.keras", "cut_at": "fc"}}
    cfg = parse_finetune(params)
    assert cfg.data.image_size is None
    base, _, resolved = load_base(small_cnn(input_shape=(40, 24, 1)), cfg)
    assert resolved.data.image_size == (40, 24) and base.input_shape[1:3] == (40, 24)
    with pytest.raises(bases.BaseLoadError) as err:
        load_base(small_cnn(input_shape=(None, None, 1)), cfg)
    assert parameter_keys(str(err.value), "load_base").endswith(
        "so finetune.data.image_size has no default: set it, e.g. finetune.data.image_size: "
        "[224, 224].")


def test_load_base_node_reports_the_weights_it_loaded(tmp_path: Path, caplog):
    pretrained = small_cnn(num_classes=9)
    model_file = _save(small_cnn(num_classes=4), tmp_path / "user.keras")
    weights_file = _save(pretrained, tmp_path / "pretrained.h5")
    with caplog.at_level(logging.INFO):
        base, report = _load_base({"source": "file", "path": str(model_file), "cut_at": "fc",
                                   "weights_file": str(weights_file)}, tmp_path)
    assert report["base"].startswith("model file") and report["base_params"] > 0
    assert report["weights_file"] == str(weights_file)
    assert [m["layer"] for m in report["unexpected"]] == ["output"]
    np.testing.assert_array_equal(base.get_layer("fc").get_weights()[0],
                                  pretrained.get_layer("fc").get_weights()[0])
    assert "5 layers loaded" in caplog.text and "skipped" in caplog.text
    json.dumps(report)

    _, report = _load_base({"source": "keras_applications", "name": "VGG16", "weights": None},
                           tmp_path)
    assert report["weights_file"] is None
    assert report["base_params"] == 14_714_688 + 3 * 3 + 3  # VGG16 and the BGR 1x1 conv
