from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pytest
from matplotlib.figure import Figure

from headswap.core import FitOptions, Stage, bases, evaluation, fit, heads, manifests, train
from headswap.project.tracking import history_metrics
from tests.conftest import small_cnn


@pytest.fixture
def setup(image_folder: Path):
    keras.utils.set_random_seed(0)
    manifest = manifests.ingest_image_folder(image_folder, seed=0)[0]
    model = heads.attach_head(bases.cut_model(small_cnn()), 3, dense=[16], dropout=0.2)
    return model, manifest


OPTIONS = FitOptions(image_size=(32, 32), batch_size=8, seed=0, verbose=0)


def _weights(layers):
    return [w.copy() for layer in layers for w in layer.get_weights()]


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("cache", [True, False])
def test_phase1_trains_only_the_head(setup, cache):
    model, manifest = setup
    base = model.get_layer("base")
    before_base, before_head = _weights([base]), _weights([model.get_layer("head_dense1")])
    stage = Stage(epochs=2, learning_rate=1e-3, optimizer="rmsprop")
    history = fit(model, manifest, [stage], replace(OPTIONS, cache_features=cache))
    assert history["epoch"] == [0, 1] and len(history["val_accuracy"]) == 2
    assert history["learning_rate"] == pytest.approx([1e-3, 1e-3])
    assert _same(before_base, _weights([base]))
    assert not _same(before_head, _weights([model.get_layer("head_dense1")]))


@pytest.mark.slow  # trains a model for seconds
def test_phase2_trains_the_base_but_keeps_batchnorm_statistics(setup):
    model, manifest = setup
    frozen = fit(model, manifest, [Stage(epochs=1, learning_rate=1e-3)], OPTIONS)
    base = model.get_layer("base")
    bns = [layer for layer in train.iter_layers(base)
           if isinstance(layer, keras.layers.BatchNormalization)]
    convs = [base.get_layer("conv1"), base.get_layer("conv2")]
    stats, kernels = _weights(bns), _weights(convs)
    history = fit(model, manifest, [Stage(epochs=2, learning_rate=1e-4, train="all")], OPTIONS,
                  first_epoch=3)
    assert (history["parameter_counts"]["trainable_params"]
            > frozen["parameter_counts"]["trainable_params"])
    assert history["epoch"] == [3, 4]
    assert _same(stats, _weights(bns)), "BatchNormalization weights or statistics moved"
    assert not _same(kernels, _weights(convs)), "the unfrozen base did not train"


def test_batchnorm_may_train_when_asked(setup):
    model, manifest = setup
    bn = model.get_layer("base").get_layer("bn1")
    moving_mean = bn.moving_mean.numpy().copy()
    stage = Stage(epochs=1, learning_rate=1e-2, optimizer="sgd", train="all",
                  train_batchnorm=True)
    fit(model, manifest, [stage], OPTIONS)
    assert not np.allclose(moving_mean, bn.moving_mean.numpy())


def test_history_metrics_put_both_phases_on_one_step_axis():
    p1 = {"epoch": [0, 1], "loss": [2.0, 1.0], "parameter_counts": {"trainable_params": 3}}
    p2 = {"epoch": [2, 3], "loss": [0.5, 0.4]}
    metrics = history_metrics([p1, p2])
    assert [m["step"] for m in metrics["loss"]] == [0, 1, 2, 3]
    assert [m["value"] for m in metrics["loss"]] == [2.0, 1.0, 0.5, 0.4]
    assert set(metrics) == {"loss"}


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="adam, adamw, rmsprop, sgd"):
        train.make_optimizer("adagrad-ish", 1e-3)


def test_any_keras_optimizer_by_name():
    from headswap.core import Stage

    assert Stage(epochs=1, learning_rate=1e-3, optimizer="Lion").optimizer == "lion"
    lion = train.make_optimizer("lion", 1e-3, weight_decay=0.01)
    assert isinstance(lion, keras.optimizers.Lion) and lion.weight_decay == 0.01
    sgd = train.make_optimizer("sgd", 1e-2, momentum=0.8)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == 0.8
    assert train.make_optimizer("adamw", 1e-3).weight_decay == 0.004  # AdamW's own default


def test_report_confusion_matrix_and_curves():
    names = ["a", "b c", "d"]
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    report = evaluation.report(y_true, y_pred, names)
    assert set(names) <= set(report) and report["accuracy"] == pytest.approx(4 / 6)
    assert report["b c"]["precision"] == pytest.approx(2 / 3)
    text = evaluation.report_text(y_true, y_pred, names)
    assert "macro avg" in text and "b c" in text
    metrics = evaluation.test_metrics(report, names)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert "f1.b c" in metrics
    assert "test_macro_f1" in evaluation.test_metrics(report, names, prefix="test_")
    fig = evaluation.confusion_matrix_figure(y_true, y_pred, names)
    assert isinstance(fig, Figure)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["1", "1", "0", "0", "2", "0", "1", "0", "1"]
    curves = evaluation.learning_curves_figure(
        [("phase 1", {"epoch": [0, 1], "loss": [1, 0.5], "val_loss": [1, 0.7],
                      "accuracy": [0.5, 0.6], "val_accuracy": [0.4, 0.5]}),
         ("phase 2", {"epoch": [2], "loss": [0.3], "val_loss": [0.6],
                      "accuracy": [0.8], "val_accuracy": [0.7]})])
    loss_axis = curves.axes[0]
    assert [tuple(line.get_xdata()) for line in loss_axis.lines[:2]] == [(1, 2, 3), (1, 2, 3)]
    assert any("phase 2 starts" in t.get_text() for t in loss_axis.texts)


def test_history_metrics_skip_what_is_not_one_number_per_epoch():
    history = {"epoch": [0, 1], "loss": [1.0, 0.5], "stage_starts": [0],
               "trainable_layers": [["a"], ["a", "b"]]}
    assert set(history_metrics([history])) == {"loss"}


@pytest.mark.slow
def test_metrics_history_dataset_logs_every_value_in_batches(tmp_path: Path):
    """1,500 epoch values (two MLflow batches) land in a real SQLite-backed run with their
    steps, exactly as kedro-mlflow's own dataset would put them there."""
    import mlflow
    from kedro_mlflow.io.metrics import MlflowMetricsHistoryDataset
    from mlflow.tracking import MlflowClient

    from headswap.project.datasets import MetricsHistoryDataset

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # an experiment of this store: earlier tests in the process may have left another active
    mlflow.set_experiment("metrics-history")
    history = {
        "loss": [{"step": s, "value": 1.0 / (s + 1)} for s in range(750)],
        "val_accuracy": [{"step": s, "value": s / 750} for s in range(750)],
        "test": {"step": 0, "value": 0.5},
    }
    try:
        with mlflow.start_run() as batched:
            MetricsHistoryDataset(prefix="epoch").save(history)
        with mlflow.start_run() as one_by_one:
            MlflowMetricsHistoryDataset(prefix="epoch").save(history)
        client = MlflowClient()
        for key, count in (("epoch.loss", 750), ("epoch.val_accuracy", 750), ("epoch.test", 1)):
            runs = [client.get_metric_history(r.info.run_id, key) for r in (batched, one_by_one)]
            assert len(runs[0]) == count
            assert sorted((m.step, m.value) for m in runs[0]) == sorted(
                (m.step, m.value) for m in runs[1]
            )
        loaded = MetricsHistoryDataset(run_id=batched.info.run_id, prefix="epoch").load()
        assert len(loaded["epoch.loss"]) == 750
    finally:
        mlflow.set_tracking_uri(None)
