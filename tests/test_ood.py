"""The out-of-distribution score (``headswap.core.ood``): the Mahalanobis distance of the head
features to the nearest training class mean, stored with the model in ``preprocessing.json``
and computed by the :class:`~headswap.core.predict.Classifier`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from headswap.core import bases, calibration, heads, manifests, ood
from headswap.core.errors import InputError
from headswap.core.fit import FitOptions, fit
from headswap.core.predict import Classifier, read_preprocessing, write_labels, write_preprocessing
from headswap.core.recipe import Stage
from tests.conftest import make_image_folder, small_cnn


def _clusters(rng: np.random.Generator, dimensions: int, per_class: int = 200):
    """Three Gaussian classes of ``dimensions`` features with a shared, correlated spread."""
    means = rng.normal(0, 4, (3, dimensions))
    mixing = rng.normal(0, 1, (dimensions, dimensions)) / np.sqrt(dimensions)
    labels = np.repeat(np.arange(3), per_class)
    return means[labels] + rng.normal(size=(len(labels), dimensions)) @ mixing, labels, means


def test_the_score_is_the_distance_to_the_nearest_class_mean_in_units_of_the_spread():
    rng = np.random.default_rng(0)
    features, labels, _ = _clusters(rng, 8)
    statistics = ood.fit(features, labels)
    assert statistics.means.shape == (3, 8) and statistics.precision.shape == (8, 8)
    # at a class mean the score is 0; elsewhere the Mahalanobis distance to the nearest one
    assert statistics.score(statistics.means) == pytest.approx(np.zeros(3), abs=1e-6)
    x = features[:5] + 3.0
    gaps = x[:, None, :] - statistics.means[None]
    expected = np.sqrt(np.einsum("ncd,de,nce->nc", gaps, statistics.precision, gaps).min(1))
    np.testing.assert_allclose(statistics.score(x), expected, rtol=1e-9)
    # the training images themselves score about sqrt(D); far points far above
    assert np.median(statistics.score(features)) == pytest.approx(np.sqrt(8), rel=0.25)
    assert statistics.score(features.mean(0, keepdims=True) + 50).item() > 10
    # the validation reference: the 95% quantile of the scores it is given
    reference = statistics.with_threshold(features)
    assert reference.threshold == pytest.approx(np.quantile(statistics.score(features), 0.95))
    assert statistics.with_threshold(features[:0]).threshold is None
    # no spread within the classes (one image each): nothing to scale a distance by
    assert ood.fit(features[[0, 200, 400]], labels[[0, 200, 400]]) is None
    assert ood.fit(np.zeros((0, 8)), np.zeros(0)) is None


def test_the_statistics_round_trip_through_json_rounded_and_refuse_a_malformed_file():
    rng = np.random.default_rng(1)
    features, labels, _ = _clusters(rng, 6)
    statistics = ood.fit(features, labels).with_threshold(features[:50])
    settings = json.loads(json.dumps(ood.to_settings(statistics)))  # as a file holds them
    assert set(settings) == {"ood_threshold", "ood"} and set(settings["ood"]) == {
        "means", "precision"}
    back = ood.from_settings(settings)
    assert back.threshold == pytest.approx(statistics.threshold, rel=1e-5)
    np.testing.assert_allclose(back.score(features), statistics.score(features), rtol=1e-4)
    assert ood.to_settings(None) == {} and ood.from_settings({"resize": "stretch"}) is None
    with pytest.raises(InputError, match="ood statistics are malformed"):
        ood.from_settings({"ood": {"means": [[1.0, 2.0]], "precision": [[1.0]]}})
    with pytest.raises(InputError, match="cannot be read"):
        ood.from_settings({"ood": {"means": [[1.0]]}})


def test_past_256_features_only_the_covariance_diagonal_is_kept():
    rng = np.random.default_rng(2)
    features, labels, _ = _clusters(rng, ood.MAX_FULL_DIMENSIONS + 1, per_class=40)
    features[:, 0] = 0.0  # a feature that never varies (a dead unit) stays finite
    statistics = ood.fit(features, labels)
    assert statistics.diagonal and statistics.precision.shape == (257,)
    assert np.isfinite(statistics.precision).all() and (statistics.precision > 0).all()
    x = features[:4] + 1.0
    gaps = x[:, None, :] - statistics.means[None]
    expected = np.sqrt((gaps ** 2 * statistics.precision).sum(-1).min(1))
    np.testing.assert_allclose(statistics.score(x), expected, rtol=1e-9)
    stored = ood.to_settings(statistics)["ood"]
    assert np.asarray(stored["precision"]).shape == (257,)  # D numbers, not D x D
    back = ood.from_settings(json.loads(json.dumps(ood.to_settings(statistics))))
    assert back.diagonal
    np.testing.assert_allclose(back.score(x), expected, rtol=1e-4)
    small = ood.fit(features[:, :ood.MAX_FULL_DIMENSIONS], labels)
    assert not small.diagonal  # up to 256: the full covariance


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow  # trains a model for seconds
def test_a_class_left_out_of_training_and_noise_score_above_the_test_split(tmp_path: Path):
    """A small CNN trained on circles and squares: held-out stripes (a class it never saw)
    and random noise get a higher ``ood_score`` than every test image of its own classes,
    though it gives them a class with some confidence; the statistics travel with the model
    in preprocessing.json, and a model without them scores NaN."""
    folder = make_image_folder(tmp_path / "images", per_class=20, classes=("circle", "square"))
    unseen = make_image_folder(tmp_path / "unseen", per_class=8, seed=1, classes=("stripes",))
    manifest, _ = manifests.ingest_image_folder(folder, seed=0)
    model = heads.attach_head(bases.cut_model(small_cnn()), 2, dense=[], dropout=0.0, seed=0)
    fit(model, manifest, [Stage(epochs=8, learning_rate=3e-3, train="all")],
        FitOptions(image_size=(32, 32), batch_size=8, seed=0, verbose=0))
    _, features, labels = calibration.split_outputs(model, manifest, "train", (32, 32))
    statistics = ood.fit(features, labels)
    names = ("circle", "square")
    seen = manifests.split_arrays(manifest, "test")[0].tolist()
    noise = [_png(np.random.default_rng(i).integers(0, 256, (32, 32), dtype=np.uint8))
             for i in range(8)]
    images = seen + [str(p) for p in sorted((unseen / "stripes").glob("*.png"))] + noise
    table, problems = Classifier(model, names, ood=statistics).predict(images)
    assert problems == {} and len(table) == len(seen) + 16
    scores = table["ood_score"].to_numpy()
    assert scores[len(seen):].min() > scores[:len(seen)].max()
    # through preprocessing.json, as a run stores them (a model's own file and labels)
    model.save(tmp_path / "model.keras")
    write_labels(tmp_path / "labels.txt", names)
    write_preprocessing(tmp_path / "preprocessing.json", (32, 32), 1,
                        ood_statistics=statistics.with_threshold(features))
    stored = json.loads((tmp_path / "preprocessing.json").read_text())
    assert stored["ood_threshold"] > 0 and len(stored["ood"]["means"]) == 2
    assert read_preprocessing(tmp_path / "preprocessing.json")["ood"].threshold \
        == stored["ood_threshold"]
    reloaded, _ = Classifier.from_file(tmp_path / "model.keras").predict(images)
    np.testing.assert_allclose(reloaded["ood_score"], scores, rtol=1e-3)  # 6 digits kept
    # without the statistics (a bare .keras file), one meaning per column: no score
    (tmp_path / "preprocessing.json").unlink()
    bare = Classifier.from_file(tmp_path / "model.keras")
    assert bare.ood is None and bare.predict(images[:2])[0]["ood_score"].isna().all()
    # statistics of another model's head features are refused
    with pytest.raises(InputError, match="they belong to another model"):
        Classifier(model, names, ood=ood.fit(np.c_[features, features], labels))
    softmax_last = keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Flatten(),
                                     keras.layers.Dense(2), keras.layers.Softmax()])
    with pytest.raises(InputError, match="no Dense softmax last layer"):
        Classifier(softmax_last, names, ood=statistics)
