"""Classifying new images with ``headswap.core.predict``: a small real model trained on real
images, paths and encoded bytes read as in training, top-k tables and refused inputs."""

from __future__ import annotations

import base64
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from headswap.core import bases, data, evaluation, heads, manifests, sources
from headswap.core.errors import InputError
from headswap.core.fit import FitOptions, fit
from headswap.core.predict import (
    Classifier,
    encoded_image,
    label_table,
    list_images,
    write_labels,
)
from headswap.core.recipe import Stage
from tests.conftest import CLASSES, small_cnn


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[keras.Model, pd.DataFrame]:
    """A classifier trained for a few epochs on the three-class shapes folder."""
    from tests.conftest import make_image_folder

    folder = make_image_folder(tmp_path_factory.mktemp("shapes") / "images", per_class=20)
    manifest, _ = manifests.ingest_image_folder(folder, seed=0)
    base = bases.cut_model(small_cnn())
    model = heads.attach_head(base, len(CLASSES), dense=[], dropout=0.0, seed=0)
    options = FitOptions(image_size=(32, 32), batch_size=8, seed=0, verbose=0)
    fit(model, manifest, [Stage(epochs=8, learning_rate=3e-3, train="all")], options)
    return model, manifest


def test_paths_and_bytes_give_the_probabilities_of_the_training_decoder(trained):
    model, manifest = trained
    classifier = Classifier(model, tuple(CLASSES))
    expected = evaluation.predict_split(model, manifest, "test", (32, 32), batch_size=8)
    paths = expected["path"].tolist()
    raw = [Path(p).read_bytes() for p in paths]
    encoded = [base64.b64encode(r).decode("ascii") for r in raw]
    uri = [f"data:image/png;base64,{e}" for e in encoded]
    for items in (paths, raw, encoded, uri):
        table, problems = classifier.predict(items, batch_size=3)
        assert problems == {}
        assert table["predicted"].tolist() == expected["predicted"].tolist()
        for name in CLASSES:
            np.testing.assert_allclose(table[f"p[{name}]"], expected[f"p[{name}]"], atol=1e-5)


def test_unreadable_images_are_set_apart_with_the_reason(trained, tmp_path: Path):
    model, manifest = trained
    good = manifests.split_arrays(manifest, "test")[0][:2].tolist()
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not a jpeg")
    items = [good[0], str(tmp_path / "missing.png"), str(empty), str(corrupt), good[1]]
    table, problems = Classifier(model, tuple(CLASSES)).predict(items)
    assert table.index.tolist() == [0, 4]
    assert sorted(problems) == [1, 2, 3]
    assert "neither an image file that exists nor base64" in problems[1]
    assert problems[2] == "empty file (0 bytes)"
    assert problems[3].startswith("cannot be decoded")


def test_label_table_lists_the_top_k_classes_most_probable_first():
    probabilities = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], dtype="float32")
    table = label_table(probabilities, ["a", "b", "c"], top_k=2)
    assert table.columns.tolist() == ["predicted", "confidence", "top_1", "top_1_probability",
                                      "top_2", "top_2_probability", "p[a]", "p[b]", "p[c]"]
    assert table["predicted"].tolist() == ["b", "a"]
    assert table["top_2"].tolist() == ["c", "c"]
    np.testing.assert_allclose(table["confidence"], [0.7, 0.5])
    assert label_table(probabilities, ["a", "b", "c"], top_k=9).columns.tolist()[-5:-3] == [
        "top_3", "top_3_probability"]


def test_list_images_labels_class_sub_folders_and_sets_apart_unsupported(tmp_path: Path):
    from PIL import Image

    for relative in ("cat/a.png", "dog/b.jpg", "loose.png"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (4, 4)).save(tmp_path / relative)
    (tmp_path / "dog" / "c.tiff").write_bytes(b"II*\x00")
    (tmp_path / "notes.txt").write_text("no image")
    images, unsupported = list_images(sources.open_images(str(tmp_path)))
    assert dict(zip(images["path"].map(lambda p: Path(p).name), images["label"],
                    strict=True)) == {"a.png": "cat", "b.jpg": "dog", "loose.png": ""}
    assert [Path(p).name for p in unsupported["path"]] == ["c.tiff"]
    with pytest.raises(sources.MissingDataError, match="does not exist"):
        sources.open_images(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(sources.DataError, match="No images found"):
        list_images(sources.open_images(str(tmp_path / "empty")))


def test_a_classifier_needs_one_class_name_per_output_and_a_classifier_model(trained,
                                                                             tmp_path: Path):
    model, _ = trained
    with pytest.raises(InputError, match="gives 3 class probabilities but 2 class names"):
        Classifier(model, ("circle", "square"))
    with pytest.raises(InputError, match="repeated: 'circle'"):
        Classifier(model, ("circle", "circle", "square"))
    features = model.get_layer("base")  # the cut base: a feature map, no classes
    with pytest.raises(InputError, match="it is not a classifier"):
        Classifier(features, tuple(CLASSES))
    file = tmp_path / "model.keras"
    model.save(file)
    with pytest.raises(InputError, match="labels.txt does not exist"):
        Classifier.from_file(file)
    write_labels(tmp_path / "labels.txt", CLASSES)
    assert Classifier.from_file(file).class_names == tuple(CLASSES)


def test_encoded_image_tells_paths_from_base64(tmp_path: Path):
    file = tmp_path / "x.png"
    file.write_bytes(b"abc")
    assert encoded_image(str(file)) == b"abc"
    assert encoded_image(base64.b64encode(b"abcdef").decode()) == b"abcdef"
    assert encoded_image(b"raw") == b"raw"
    with pytest.raises(InputError, match="neither an image file"):
        encoded_image("no/such/file.png")


def test_grad_cam_gives_one_heatmap_per_image_and_needs_a_feature_map(trained):
    from matplotlib.figure import Figure

    from headswap.core import explain

    model, manifest = trained
    paths = manifests.split_arrays(manifest, "test")[0][:3]
    images = data.decode_all(paths, (32, 32), 1)
    classes = np.asarray(model.predict_on_batch(images)).argmax(axis=1)
    cams = explain.grad_cam(model, images, classes)
    assert cams.shape == (3, 32, 32)
    assert cams.min() >= 0.0 and cams.max() <= 1.0 + 1e-6
    assert (cams.reshape(3, -1).max(axis=1) > 0.5).all()  # each map peaks somewhere
    assert isinstance(explain.grad_cam_figure(images, cams, ["a", "b", "c"]), Figure)
    vector_base = keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Conv2D(4, 3),
                                    keras.layers.GlobalAveragePooling2D()])
    pooled = heads.attach_head(vector_base, 3, dense=[], seed=0)
    with pytest.raises(InputError, match="not a feature map"):
        explain.grad_cam(pooled, images, classes)


def test_a_folded_temperature_gives_softmax_of_the_logits_over_it_and_keeps_the_classes(
    trained, tmp_path: Path
):
    from headswap.core import calibration

    model, manifest = trained
    logits, labels = calibration.split_logits(model, manifest, "test", (32, 32), batch_size=8)
    before = evaluation.predict_split(model, manifest, "test", (32, 32), batch_size=8)
    np.testing.assert_allclose(before[[f"p[{n}]" for n in CLASSES]],
                               calibration.tempered(logits), atol=1e-5)
    model.save(tmp_path / "model.keras")  # folded in a copy: the fixture's model stays
    folded = calibration.fold_temperature(keras.saving.load_model(tmp_path / "model.keras"), 2.5)
    folded.save(tmp_path / "folded.keras")
    reloaded = keras.saving.load_model(tmp_path / "folded.keras")
    after = evaluation.predict_split(reloaded, manifest, "test", (32, 32), batch_size=8)
    np.testing.assert_allclose(after[[f"p[{n}]" for n in CLASSES]],
                               calibration.tempered(logits, 2.5), atol=1e-5)
    assert after["predicted"].tolist() == before["predicted"].tolist()  # accuracy unchanged
    assert after["confidence"].max() < before["confidence"].max()
    refit, _ = calibration.split_logits(reloaded, manifest, "test", (32, 32), batch_size=8)
    np.testing.assert_allclose(refit, logits / 2.5, atol=1e-4)
    # fitted on the validation split, the temperature lowers its negative log-likelihood
    val_logits, val_labels = calibration.split_logits(model, manifest, "val", (32, 32))
    t = calibration.fit_temperature(val_logits, val_labels)
    assert (calibration.negative_log_likelihood(val_logits, val_labels, t)
            <= calibration.negative_log_likelihood(val_logits, val_labels))


def test_images_below_min_confidence_are_unknown_with_their_best_class_and_ood_score(
    trained, tmp_path: Path
):
    from headswap.core import calibration, ood
    from headswap.core.predict import write_preprocessing

    model, manifest = trained
    paths = manifests.split_arrays(manifest, "test")[0].tolist()
    plain, _ = Classifier(model, tuple(CLASSES)).predict(paths)
    threshold = float(np.median(plain["confidence"]))
    _, features, labels = calibration.split_outputs(model, manifest, "train", (32, 32))
    statistics = ood.fit(features, labels)
    table, _ = Classifier(model, tuple(CLASSES), min_confidence=threshold,
                          ood=statistics).predict(paths)
    assert table.columns.tolist()[:4] == ["predicted", "confidence", "ood_score", "top_1"]
    low = table["confidence"] < threshold
    assert low.any() and (~low).any()
    assert (table.loc[low, "predicted"] == "unknown").all()
    assert (table.loc[~low, "predicted"] == table.loc[~low, "top_1"]).all()
    assert table["top_1"].tolist() == plain["predicted"].tolist()
    assert (plain["predicted"] != "unknown").all()  # no threshold: every image gets a class
    _, test_features, _ = calibration.split_outputs(model, manifest, "test", (32, 32))
    np.testing.assert_allclose(table["ood_score"], statistics.score(test_features), rtol=1e-4)
    assert plain["ood_score"].isna().all()  # no statistics given: no score
    with pytest.raises(InputError, match="A class is named 'unknown'"):
        Classifier(model, ("circle", "unknown", "stripes"), min_confidence=0.5)
    model.save(tmp_path / "model.keras")
    write_labels(tmp_path / "labels.txt", CLASSES)
    write_preprocessing(tmp_path / "preprocessing.json", (32, 32), 1, min_confidence=0.7)
    assert Classifier.from_file(tmp_path / "model.keras").min_confidence == 0.7
