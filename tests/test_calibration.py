"""Calibrated confidence and unknown images (``headswap.core.calibration``): the temperature
fit, the expected calibration error, the threshold that keeps a precision, the report that
counts refused images, and what a model without a Dense softmax top gets."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from headswap.core import calibration
from headswap.core.errors import InputError


def _labels_drawn_from(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A class per row, drawn with that row's probabilities: a perfectly calibrated model."""
    draws = rng.random(len(probabilities))[:, None]
    return (draws > np.cumsum(probabilities, axis=1)).sum(axis=1)


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_the_fitted_temperature_is_the_one_that_made_the_labels(true_t: float):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20000, 5))
    labels = _labels_drawn_from(calibration.tempered(logits, true_t), rng)
    fitted = calibration.fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_t, rel=0.05)
    assert (calibration.negative_log_likelihood(logits, labels, fitted)
            < calibration.negative_log_likelihood(logits, labels))
    assert calibration.fit_temperature(logits[:0], labels[:0]) == 1.0


def test_the_ece_of_a_calibrated_model_is_near_zero_and_of_an_overconfident_one_is_not():
    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.full(4, 0.5), 50000)
    labels = _labels_drawn_from(probabilities, rng)
    assert calibration.expected_calibration_error(probabilities, labels) < 0.01
    sharpened = calibration.tempered(np.log(probabilities), 0.3)  # overconfident
    assert calibration.expected_calibration_error(sharpened, labels) > 0.1
    table = calibration.reliability(probabilities, labels)
    assert len(table) == calibration.BINS and table["images"].sum() == 50000
    # by hand: two bins, each 0.1 off its accuracy
    hand = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    assert calibration.expected_calibration_error(hand, np.array([0, 0, 1, 0]), bins=10) \
        == pytest.approx((2 * 0.1 + 2 * 0.1) / 4)


def test_the_threshold_is_the_lowest_confidence_that_keeps_the_target_precision():
    probabilities = np.array([[0.95, 0.05], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    labels = np.array([0, 0, 0, 1, 0])  # the 0.7 one is wrong
    assert calibration.confidence_threshold(probabilities, labels, 0.8) == 0.0  # all kept
    assert calibration.confidence_threshold(probabilities, labels, 0.9) == pytest.approx(0.8)
    assert calibration.confidence_threshold(probabilities, labels[[0, 1, 2, 4, 4]], 0.9) == 0.0
    assert calibration.confidence_threshold(probabilities, 1 - labels, 0.5) is None
    kept, precision = calibration.coverage_and_precision(probabilities, labels, 0.8)
    assert (kept, precision) == (pytest.approx(0.6), 1.0)
    # on a larger calibrated sample the precision above the threshold holds
    rng = np.random.default_rng(2)
    many = rng.dirichlet(np.full(3, 0.4), 20000)
    truth = _labels_drawn_from(many, rng)
    threshold = calibration.confidence_threshold(many, truth, 0.9)
    assert 0.5 < threshold < 1
    assert calibration.coverage_and_precision(many, truth, threshold)[1] >= 0.9


def test_refused_images_are_unknown_and_the_report_counts_them_as_misses():
    names = calibration.refuse(np.array(["a", "b", "b"]), np.array([0.9, 0.4, 0.6]), 0.5)
    assert names.tolist() == ["a", "unknown", "b"]
    assert calibration.refuse(np.array(["a"]), np.array([0.1]), None).tolist() == ["a"]
    report, text = calibration.report_with_unknown(np.array([0, 1, 1, 0]),
                                                   ["a", "unknown", "b", "b"], ["a", "b"])
    assert report["unknown"] == 1 and report["accuracy"] == 0.5
    assert report["b"]["recall"] == 0.5 and report["a"]["precision"] == 1.0
    assert "accuracy 0.5000 (the 1 images labelled unknown counted as wrong)" in text
    plain, _ = calibration.report_with_unknown(np.array([0, 1]), ["a", "a"], ["a", "b"])
    assert plain["unknown"] == 0 and plain["accuracy"] == 0.5
    with pytest.raises(InputError, match="`min_confidence` must be a probability"):
        calibration.check_threshold(1.0, ["a", "b"])
    with pytest.raises(InputError, match="A class is named 'unknown'"):
        calibration.check_threshold(0.5, ["unknown", "b"])
    assert calibration.check_threshold(None, ["unknown", "b"]) is None


def test_a_model_without_a_dense_softmax_top_is_read_but_not_folded():
    inputs = keras.Input((4,))
    outputs = keras.layers.Softmax()(keras.layers.Dense(3)(inputs))
    model = keras.Model(inputs, outputs)
    with pytest.raises(InputError, match="does not end in a Dense layer with a softmax"):
        calibration.fold_temperature(model, 2.0)
    assert calibration.with_features(model) is None
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    features = calibration.with_features(dense)
    x = np.random.default_rng(3).normal(size=(5, 4)).astype("float32")
    probabilities, inputs_ = features.predict_on_batch(x)
    logits = calibration.logits_of(dense, np.asarray(inputs_))
    np.testing.assert_allclose(calibration.tempered(logits), probabilities, atol=1e-5)


def test_the_calibrate_node_folds_the_temperature_or_says_why_it_cannot(tmp_path, caplog):
    """The finetune pipeline's node on a small real model: folded and reported, with the
    ood_score's statistics of the train split's head features; a model whose last layer is
    not a Dense softmax layer is kept as it is, reported as not calibrated and unscored."""
    from headswap.core import heads, manifests, ood
    from headswap.pipelines.finetune.calibration_nodes import calibrate
    from headswap.project.config import parse_finetune
    from tests.conftest import make_image_folder

    folder = make_image_folder(tmp_path / "images", per_class=12, size=16)
    manifest, _ = manifests.ingest_image_folder(folder, seed=0)
    config = parse_finetune({"data": {"path": str(folder), "image_size": 16},
                             "base": {"path": "base.keras"}})
    base = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Rescaling(1 / 255),
                             keras.layers.Conv2D(4, 3, activation="relu")])
    model = heads.attach_head(base, 3, dense=[], dropout=0.0, seed=0)
    logits, _ = calibration.split_logits(model, manifest, "val", (16, 16))
    folded, report, figure, metrics, statistics, _ = calibrate(model, manifest, config)
    t = report["temperature"]
    assert report["method"] == "temperature" and t != 1.0 and report["note"] is None
    after, _ = calibration.split_logits(folded, manifest, "val", (16, 16))
    np.testing.assert_allclose(after, logits / t, atol=1e-4)
    assert report["validation"]["nll"] <= report["validation"]["nll_before"]
    assert report["test"]["images"] == len(manifest[manifest["split"] == "test"])
    assert metrics["temperature"]["value"] == t and "test_ece" in metrics
    assert len(report["reliability_test"]["after"]) == calibration.BINS
    assert figure.axes
    # the ood_score: class means and precision of the train split's head features (the 4
    # channels the new head pools), the validation split's 95% quantile as its reference
    _, features, labels = calibration.split_outputs(model, manifest, "train", (16, 16))
    _, val_features, _ = calibration.split_outputs(model, manifest, "val", (16, 16))
    stored = ood.from_settings(statistics)
    fitted = ood.fit(features, labels).with_threshold(val_features)
    assert stored.means.shape == (3, 4) and stored.precision.shape == (4, 4)
    assert stored.threshold == pytest.approx(fitted.threshold, rel=1e-4)
    assert report["ood_score"]["threshold"] == pytest.approx(fitted.threshold)
    assert report["ood_score"]["train_images"] == len(labels) == (manifest["split"] ==
                                                                   "train").sum()
    assert report["ood_score"]["covariance"] == "full"
    assert metrics["ood_threshold"]["value"] == report["ood_score"]["threshold"]

    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(inputs))
    softmax_last = keras.Model(inputs, keras.layers.Softmax()(x))
    weights = [w.copy() for w in softmax_last.get_weights()]
    kept, report, _, _, statistics, _ = calibrate(softmax_last, manifest, config)
    assert report["method"] == "none" and report["temperature"] == 1.0
    assert "does not end in a Dense layer with a softmax" in report["note"]
    assert "Calibration: not calibrated" in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(kept.get_weights(), weights, strict=True))
    assert report["test"]["ece"] == report["test"]["ece_before"]
    assert statistics == {} and report["ood_score"]["threshold"] is None
    assert "not a Dense softmax layer" in report["ood_score"]["note"]
