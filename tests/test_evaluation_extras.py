"""Evaluation beyond the report: top-k accuracy, confusion tables, per-class table, confident
errors and their image grid, on hand-made predictions and on a small model trained for real."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from kedro_datasets.pandas import CSVDataset
from sklearn.metrics import confusion_matrix, top_k_accuracy_score

from headswap.core import bases, data, evaluation, heads, manifests, train
from headswap.pipelines.finetune import calibration_nodes, nodes
from headswap.project.config import ParameterError, parse_finetune
from tests.conftest import small_cnn

NAMES = ["cat", "dog", "owl"]


def _predictions(seed: int = 0, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y_true] += 1.0  # better than chance, not perfect
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, probabilities


@pytest.mark.parametrize("k", [1, 2])
def test_top_k_accuracy_agrees_with_scikit_learn(k):
    y_true, probabilities = _predictions()
    used, value = evaluation.top_k_accuracy(y_true, probabilities, k)
    assert used == k
    assert value == pytest.approx(top_k_accuracy_score(y_true, probabilities, k=k))
    if k == 1:
        assert value == pytest.approx(np.mean(probabilities.argmax(axis=1) == y_true))


def test_top_k_is_capped_at_the_class_count_and_k_zero_is_refused():
    y_true, probabilities = _predictions()
    assert evaluation.top_k_accuracy(y_true, probabilities, 7) == (3, 1.0)
    with pytest.raises(ValueError, match="`top_k`"):
        evaluation.top_k_accuracy(y_true, probabilities, 0)
    with pytest.raises(ParameterError, match="finetune.evaluation.top_k: got 0"):
        parse_finetune({"data": {"path": "x"}, "base": {"path": "m.keras"},
                        "evaluation": {"top_k": 0}})


def test_confusion_tables_count_and_normalise_each_true_class():
    y_true, probabilities = _predictions()
    y_pred = probabilities.argmax(axis=1)
    counts, shares = evaluation.confusion_tables(y_true, y_pred, NAMES)
    assert list(counts.columns) == ["true_class", *NAMES]
    assert counts["true_class"].tolist() == NAMES
    np.testing.assert_array_equal(counts[NAMES].to_numpy(), confusion_matrix(y_true, y_pred))
    np.testing.assert_allclose(shares[NAMES].sum(axis=1), 1.0)
    np.testing.assert_allclose(
        shares[NAMES].to_numpy() * np.bincount(y_true, minlength=3)[:, None],
        counts[NAMES].to_numpy(),
    )


def test_a_class_absent_from_the_test_split_has_a_row_of_zeros():
    counts, shares = evaluation.confusion_tables(np.array([0, 0, 1]), np.array([0, 1, 1]), NAMES)
    assert counts.loc[2, NAMES].sum() == 0 and shares.loc[2, NAMES].sum() == 0


def test_per_class_table_matches_the_report():
    y_true, probabilities = _predictions()
    report = evaluation.report(y_true, probabilities.argmax(axis=1), NAMES)
    table = evaluation.per_class_table(report, NAMES)
    assert list(table.columns) == ["class", "precision", "recall", "f1", "support"]
    for row in table.itertuples():
        assert row.f1 == report[row[1]]["f1-score"] and row.support == report[row[1]]["support"]
    assert table["support"].sum() == len(y_true)


def test_confident_errors_are_wrong_and_sorted_by_confidence():
    y_true, probabilities = _predictions()
    paths = np.array([f"img_{i}.png" for i in range(len(y_true))])
    errors = evaluation.confident_errors(paths, y_true, probabilities, NAMES, count=5)
    wrong = probabilities.argmax(axis=1) != y_true
    assert len(errors) == min(5, wrong.sum())
    assert (errors["true"] != errors["predicted"]).all()
    assert errors["confidence"].is_monotonic_decreasing
    most = np.max(probabilities[wrong].max(axis=1))
    assert errors["confidence"].iloc[0] == pytest.approx(most)


def _trained_model_and_manifest(folder: Path):
    manifest, _ = manifests.ingest_image_folder(folder, 0.2, 0.4, seed=1)
    params = parse_finetune({"data": {"path": str(folder), "image_size": 32, "batch_size": 8},
                             "base": {"path": "unused.keras"},
                             "evaluation": {"top_k": 2, "misclassified": 6}})
    model = heads.attach_head(bases.cut_model(small_cnn()), 3, dense=[8], dropout=0.0)
    train.compile_model(model, keras.optimizers.Adam())
    images = data.make_dataset(manifest, "train", (32, 32), 1, 8, shuffle=True, seed=1)
    model.fit(images, epochs=1, verbose=0, shuffle=False)
    return model, manifest, params


def test_evaluate_details_node_on_a_trained_model_reads_the_images(image_folder: Path):
    model, manifest, params = _trained_model_and_manifest(image_folder)
    calibrated, *_, predictions = calibration_nodes.calibrate(model, manifest, params)
    # the test predictions calibrate makes from its pass are the calibrated model's own
    own = evaluation.predict_split(calibrated, manifest, "test", (32, 32), 8)
    pd.testing.assert_frame_equal(predictions[["path", "true", "predicted"]],
                                  own[["path", "true", "predicted"]])
    np.testing.assert_allclose(predictions.iloc[:, 3:].to_numpy(float),
                               own.iloc[:, 3:].to_numpy(float), atol=1e-5)
    counts, shares, per_class, errors, figure = nodes.evaluate_details(
        predictions, manifest, params
    )
    test_size = int((manifest["split"] == "test").sum())
    assert len(predictions) == test_size
    assert counts[sorted(set(manifest["label"]))].to_numpy().sum() == test_size
    assert per_class["support"].sum() == test_size
    np.testing.assert_allclose(shares.iloc[:, 1:].to_numpy().sum(axis=1), 1.0, rtol=1e-6)
    wrong = test_size - int(np.trace(counts.iloc[:, 1:].to_numpy()))
    assert len(errors) == min(6, wrong)
    assert set(errors["path"]) <= set(manifest["path"])
    shown = [ax for ax in figure.axes if ax.images]
    assert len(shown) == len(errors)

    _, metrics = nodes.evaluate_head_only(model, manifest, params)
    assert metrics["accuracy"]["value"] <= metrics["top_2_accuracy"]["value"] <= 1.0


def test_predictions_table_survives_its_csv_file(tmp_path: Path):
    """The test predictions written by one node and read by the next: same labels, same
    probabilities, class names that look like numbers or missing values kept as text."""
    names = ["007", "NA", "Ankle boot, left"]
    y_true, probabilities = _predictions(seed=3)
    probabilities = probabilities.astype(np.float32)
    paths = np.array([f"{tmp_path}/img_{i}.png" for i in range(len(y_true))])
    table = evaluation.predictions_table(paths, y_true, probabilities, names)
    assert list(table.columns[:4]) == ["path", "true", "predicted", "confidence"]
    assert (table["confidence"] == probabilities.max(axis=1)).all()
    dataset = CSVDataset(
        filepath=str(tmp_path / "test_predictions.csv"), save_args={"index": False},
        load_args={"dtype": str, "keep_default_na": False},
    )
    dataset.save(table)
    back_paths, back_true, back_probabilities = evaluation.predictions_arrays(
        dataset.load(), names
    )
    assert (back_paths == paths).all()
    assert (back_true == y_true).all()
    np.testing.assert_array_equal(back_probabilities, probabilities)


def test_a_grid_without_errors_says_so():
    figure = evaluation.confident_errors_figure(
        evaluation.confident_errors(np.array([]), np.array([], int), np.zeros((0, 3)), NAMES, 4)
    )
    assert "no misclassified" in figure.axes[0].texts[0].get_text()
