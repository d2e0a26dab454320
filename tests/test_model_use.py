"""Using the fine-tuned model, as the README's "Using the model" section tells a user: the
``predict`` pipeline, the MLflow model that answers with class names (in Python and behind
``mlflow models serve``), the Model Registry's ``champion`` alias, and the exports.

A copy of the project runs the whole example once (``kedro run``, env test, a real MLflow
SQLite backend); the tests then run the CLI, servers and models in that folder.
"""

from __future__ import annotations

import base64
import json
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from kedro.io import DatasetError

from headswap.core import data
from headswap.core.predict import write_labels
from headswap.project import registry
from headswap.project.datasets import ClassifierDataset
from tests.conftest import (
    copy_project,
    free_port,
    kedro_cli,
    mlflow_runs,
    run_finetune,
    run_sessions,
    serve,
    stop,
    versions,
)
from tests.documented import run_documented

pytestmark = pytest.mark.slow

CLASSES = ["Ankle boot", "Bag", "Sandal", "Shirt", "Sneaker"]
TEST_FOLDER = "data/01_raw/fashion-mnist-target/test"
REGISTERED = "fashion-mnist-target"  # the image folder's name (finetune.registry.name: auto)
SERVE_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project in which the whole example ran once (`kedro run`, env test)."""
    path = copy_project(tmp_path_factory.mktemp("project"))
    run_sessions(path, ["example"])
    mlflow.set_tracking_uri(f"sqlite:///{path / 'mlflow.db'}")  # for runs:/ and models:/
    return path


def latest(project: Path, relative: str) -> Path:
    """The file (or folder) of the latest version of a versioned dataset."""
    folder = project / relative
    return folder / sorted(p.name for p in folder.iterdir())[-1] / folder.name


def read_table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"path": str, "true": str, "predicted": str},
                       keep_default_na=False)


def finetune_run(project: Path):
    return next(r for r in mlflow_runs(project)[1]
                if r.data.tags.get("mlflow.runName", "").startswith("example - "))


def test_predict_pipeline_on_the_test_split_gives_the_evaluations_predictions(project: Path):
    result = run_documented(  # docs/pipelines/predict.md's command
        project, 'kedro run --pipeline predict --params "predict.path=/some/folder"',
        replace={"/some/folder": TEST_FOLDER})
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr  # the model is read once for the nodes that take it
    assert log.count("Model: the fine-tuned model of run") == 1, log[-3000:]
    predictions = read_table(latest(project, "data/07_model_output/predictions.csv"))
    expected = read_table(latest(project, "data/08_reporting/test_predictions.csv"))
    assert len(predictions) == len(expected) == 5000
    merged = expected.merge(predictions, on="path", suffixes=("_eval", ""))
    assert len(merged) == 5000
    assert (merged["top_1"] == merged["predicted_eval"]).all()
    assert (merged["true"] == merged["true_eval"]).all()
    for name in CLASSES:
        np.testing.assert_allclose(merged[f"p[{name}]"], merged[f"p[{name}]_eval"], atol=1e-5)
    np.testing.assert_allclose(predictions["top_1_probability"], predictions["confidence"])
    assert {"top_3", "top_3_probability"} <= set(predictions.columns)
    assert np.isfinite(predictions["ood_score"]).all()
    # its validation reference: the test images, like the validation's, are rarely above it
    ood_threshold = json.loads(latest(project, "data/06_models/preprocessing.json").read_text())[
        "ood_threshold"]
    assert 0 < (predictions["ood_score"] > ood_threshold).mean() < 0.25
    # min_confidence: auto, the threshold the finetune run stored with the model
    threshold = json.loads(latest(project, "data/06_models/preprocessing.json").read_text())[
        "min_confidence"]
    refused = predictions["confidence"] < threshold
    assert refused.any()  # the test-size model is rarely sure
    assert (predictions["predicted"] == predictions["top_1"].where(~refused, "unknown")).all()
    report = json.loads(latest(project, "data/08_reporting/prediction_report.json").read_text())
    assert report["unknown"] == refused.sum() and report["min_confidence"] == threshold
    right = float((predictions["predicted"] == predictions["true"]).mean())
    assert report["accuracy"] == pytest.approx(right)  # an unknown image counts as a miss
    text = latest(project, "data/08_reporting/prediction_report.txt").read_text()
    assert f"{refused.sum()} of 5000 images labelled unknown" in text
    client, runs = mlflow_runs(project)
    run = runs[-1]
    assert run.data.tags["mlflow.runName"] == "predict - latest fine-tuned model - test"
    assert run.data.metrics["predict.images"] == 5000
    assert run.data.metrics["predict.unknown"] == refused.sum()
    assert run.data.metrics["predict.accuracy"] == pytest.approx(right)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "predictions")}
    assert "predictions/predictions.csv" in logged


def test_predict_a_flat_folder_with_a_corrupt_file_through_the_champion(project: Path):
    folder = project / "new_images"
    folder.mkdir()
    sources = sorted((project / TEST_FOLDER / "Bag").glob("*.png"))[:3]
    sources += sorted((project / TEST_FOLDER / "Sneaker").glob("*.png"))[:3]
    for i, source in enumerate(sources):
        (folder / f"photo_{i}.png").write_bytes(source.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    result = kedro_cli(project, "run", "--pipelines", "predict", "--env", "test", "--params",
                       f"predict.path=new_images,predict.model=models:/{REGISTERED}@champion,"
                       "predict.min_confidence=0.99")
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = read_table(latest(project, "data/07_model_output/predictions.csv"))
    assert sorted(Path(p).name for p in predictions["path"]) == [
        f"photo_{i}.png" for i in range(6)]
    assert "true" not in predictions.columns
    assert set(predictions["top_1"]) <= set(CLASSES)
    refused = predictions["confidence"] < 0.99
    assert refused.any()
    assert (predictions["predicted"] == predictions["top_1"].where(~refused, "unknown")).all()
    expected = read_table(latest(project, "data/08_reporting/test_predictions.csv"))
    by_path = dict(zip(expected["path"], expected["predicted"], strict=True))
    for i, source in enumerate(sources):
        row = predictions[predictions["path"].str.endswith(f"photo_{i}.png")].iloc[0]
        assert row["top_1"] == by_path[str(source)]  # the catalog gives absolute paths
    skipped = pd.read_csv(latest(project, "data/07_model_output/prediction_skipped_images.csv"))
    assert [Path(p).name for p in skipped["path"]] == ["broken.png"]
    assert "cannot be decoded" in skipped["reason"].iloc[0]
    assert "Skipped 1 of 7 image files" in result.stdout + result.stderr
    text = latest(project, "data/08_reporting/prediction_report.txt").read_text()
    assert text.startswith("No image is in a sub-folder")
    assert (f"{refused.sum()} of 6 images labelled unknown (top probability below "
            "min_confidence 0.99)") in text
    assert mlflow_runs(project)[1][-1].data.metrics["predict.unknown"] == refused.sum()


def test_bad_predict_inputs_stop_with_one_error_line(project: Path, tmp_path: Path):
    runs_before = len(mlflow_runs(project)[1])
    missing = kedro_cli(project, "run", "--pipelines", "predict", "--env", "test",
                        "--params", "predict.path=no/such/folder")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    errors = [line for line in missing.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "no/such/folder does not exist" in errors[0], missing.stderr
    assert errors[0].startswith("Error: Node list_images stopped: Image folder ")
    assert "Give predict.path as an existing folder of images" in errors[0]
    # kedro-mlflow says once (not once per node it re-entered the run for) that it closed it
    assert (missing.stdout + missing.stderr).count("was closed because of an error") == 1
    # A base cut below its head is a model file, but not a classifier.
    base = tmp_path / "features" / "base.keras"
    base.parent.mkdir()
    base.write_bytes(latest(project, "data/06_models/base_model.keras").read_bytes())
    write_labels(base.parent / "labels.txt", CLASSES)
    not_classifier = kedro_cli(project, "run", "--pipelines", "predict", "--env", "test",
                               "--params", f"predict.path={TEST_FOLDER},predict.model={base}")
    assert not_classifier.returncode == 1 and "Traceback" not in not_classifier.stderr
    assert "it is not a classifier" in not_classifier.stderr
    no_path = kedro_cli(project, "run", "--pipelines", "predict", "--env", "test")
    assert no_path.returncode == 1 and "Traceback" not in no_path.stderr
    assert "predict.path: got None; give the folder of images to classify" in no_path.stderr
    # the parameter error stopped the third before MLflow started a run
    assert len(mlflow_runs(project)[1]) == runs_before + 2


def test_a_version_a_model_file_and_a_run_uri_name_the_same_classifier(project: Path,
                                                                        tmp_path: Path):
    version = versions(project, "data/06_models/calibrated_model.keras")[-1]
    stored = {"fine_tuned_model": str(project / "data/06_models/calibrated_model.keras"),
              "manifest": str(project / "data/02_intermediate/manifest.csv"),
              "preprocessing": str(project / "data/06_models/preprocessing.json")}
    file = tmp_path / "model.keras"
    file.write_bytes(latest(project, "data/06_models/calibrated_model.keras").read_bytes())
    write_labels(tmp_path / "labels.txt", CLASSES)
    run_id = finetune_run(project).info.run_id
    classifiers = [ClassifierDataset(**stored, model=model).load()
                   for model in (None, version, str(file), f"runs:/{run_id}/model")]
    # a version that is not there, or no fine-tuned model at all: what to run or give instead
    wrong = "2000-01-01T00.00.00.000Z"
    with pytest.raises(DatasetError, match=f"There is no version {wrong} of the fine-tuned "
                                           "model in .*calibrated_model.keras: run `kedro run`"):
        ClassifierDataset(**stored, model=wrong).load()
    with pytest.raises(DatasetError, match="There is no fine-tuned model in .*none.keras: run"):
        ClassifierDataset(**{**stored, "fine_tuned_model": str(tmp_path / "none.keras")}).load()
    images = [str(p) for p in sorted((project / TEST_FOLDER / "Shirt").glob("*.png"))[:4]]
    first = classifiers[0].probabilities(images)[0]
    for classifier in classifiers:
        assert classifier.class_names == tuple(CLASSES)
        np.testing.assert_allclose(classifier.probabilities(images)[0], first, atol=1e-6)
    # the run's min_confidence travels with the model (a bare .keras file has none)
    threshold = json.loads(latest(project, "data/08_reporting/calibration_report.json")
                           .read_text())["min_confidence"]["threshold"]
    assert [c.min_confidence for c in classifiers] == [threshold, threshold, None, threshold]
    # so do the ood_score's statistics: the same scores, or none (NaN) for the bare file
    scores = [c.predict(images)[0]["ood_score"].to_numpy() for c in classifiers]
    assert np.isfinite(scores[0]).all() and np.isnan(scores[2]).all()
    for other in (scores[1], scores[3]):
        np.testing.assert_allclose(other, scores[0], rtol=1e-5)


def test_the_logged_model_answers_with_class_names_for_paths_and_base64(project: Path):
    run = finetune_run(project)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert model.metadata.get_input_schema().input_names() == ["image"]
    assert model.metadata.saved_input_example_info is not None
    expected = read_table(latest(project, "data/08_reporting/test_predictions.csv"))
    sample = expected.groupby("true").head(2).reset_index(drop=True)
    paths = [str(project / p) for p in sample["path"]]
    encoded = [base64.b64encode(Path(p).read_bytes()).decode("ascii") for p in paths]
    threshold = json.loads(latest(project, "data/08_reporting/calibration_report.json")
                           .read_text())["min_confidence"]["threshold"]
    for column in (paths, encoded):
        answer = model.predict(pd.DataFrame({"image": column}))
        assert answer["top_1"].tolist() == sample["predicted"].tolist()
        np.testing.assert_allclose(answer["confidence"], sample["confidence"].astype(float),
                                   atol=1e-5)
        assert [c for c in answer.columns if c.startswith("p[")] == [f"p[{n}]" for n in CLASSES]
        # below the run's min_confidence: unknown, with an out-of-distribution score
        refused = answer["confidence"] < threshold
        assert (answer["predicted"] == answer["top_1"].where(~refused, "unknown")).all()
        assert np.isfinite(answer["ood_score"]).all()
    everything = model.predict(pd.DataFrame({"image": paths}), params={"min_confidence": 0.0})
    assert everything["predicted"].tolist() == sample["predicted"].tolist()
    strict = model.predict(pd.DataFrame({"image": paths}), params={"min_confidence": 0.99})
    assert (strict["predicted"] == strict["top_1"].where(strict["confidence"] >= 0.99,
                                                         "unknown")).all()
    # the plain Keras model stays in the run beside it
    keras_model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/keras_model")
    pixels = data.decode_all(np.asarray(paths), (28, 28), 1)
    probabilities = np.asarray(keras_model.predict(pixels))
    assert [CLASSES[i] for i in probabilities.argmax(axis=1)] == sample["predicted"].tolist()


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_mlflow_models_serve_answers_rest_requests_with_the_same_labels(project: Path):
    run_id = finetune_run(project).info.run_id
    port = free_port()
    server = serve(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/model",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        project, f"http://127.0.0.1:{port}/ping", project / "serve.log",
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"})
    try:
        expected = read_table(latest(project, "data/08_reporting/test_predictions.csv"))
        sample = expected.groupby("true").head(2).reset_index(drop=True)
        encoded = [base64.b64encode((project / p).read_bytes()).decode("ascii")
                   for p in sample["path"]]
        answer = _post(f"http://127.0.0.1:{port}/invocations",
                       {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]},
                        "params": {"min_confidence": 0.99}})
        rows = answer["predictions"]
        assert [row["top_1"] for row in rows] == sample["predicted"].tolist()
        assert len(rows) == 10 and all(np.isfinite(row["ood_score"]) for row in rows)
        assert [row["predicted"] for row in rows] == [
            row["top_1"] if row["confidence"] >= 0.99 else "unknown" for row in rows]
        assert any(row["predicted"] == "unknown" for row in rows)
    finally:
        stop(server)


def _version(project: Path, number: str):
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    return client.get_model_version(REGISTERED, number)


def _champion(project: Path) -> str:
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    return str(client.get_model_version_by_alias(REGISTERED, "champion").version)


def _decision(project: Path) -> dict:
    return json.loads(latest(project, "data/08_reporting/model_registry.json").read_text())


def test_an_equal_accuracy_does_not_take_the_alias_from_the_champion(tmp_path: Path):
    """The champion's accuracy comes back from its tag, rounded: 1/3 is a tie with 0.333333,
    on the same test split and when the champion is scored again on another."""
    earlier = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        client.create_registered_model("thirds")
        for _ in range(3):
            client.create_model_version("thirds", source=str(tmp_path))
        registry.tag_version("thirds", "1", {"test_accuracy": registry.score_tag(1 / 3),
                                             "test_split_digest": "split-a"})
        client.set_registered_model_alias("thirds", registry.CHAMPION, "1")

        def unused(uri: str) -> float:
            raise AssertionError(f"the champion was scored again ({uri}) on its own split")

        tie = registry.elect_champion("thirds", "2", 1 / 3, "split-a", unused)
        assert tie["promoted"] is False and tie["champion"] == "1"
        assert "0.3333 does not beat version 1's 0.3333" in tie["reason"]
        rescored = registry.elect_champion("thirds", "2", 1 / 3, "split-b", lambda uri: 1 / 3)
        assert rescored["promoted"] is False
        better = registry.elect_champion("thirds", "3", 1 / 3 + 1 / 300, "split-a", unused)
        assert better["promoted"] is True
        assert str(client.get_model_version_by_alias("thirds", registry.CHAMPION).version) == "3"
    finally:
        mlflow.set_tracking_uri(earlier)


def test_the_champion_alias_moves_only_to_a_better_model(project: Path):
    first = _version(project, "1")
    assert _champion(project) == "1"
    tags = first.tags
    run = finetune_run(project)
    assert float(tags["test_accuracy"]) == pytest.approx(run.data.metrics["test.accuracy"])
    assert float(tags["test_macro_f1"]) == pytest.approx(run.data.metrics["test.macro_f1"])
    assert tags["kedro_run_id"] == run.data.tags["run_id"]
    assert len(tags["manifest_digest"]) == len(tags["test_split_digest"]) == 64
    no_exports = {"export": {"formats": []}}
    # Longer training: a better model on the same test split takes the alias.
    run_finetune(project, {"finetune": {**no_exports, "phase1": {"epochs": 12},
                                        "phase2": {"epochs": 6}}})
    second = _version(project, "2")
    assert float(second.tags["test_accuracy"]) > float(tags["test_accuracy"])
    assert second.tags["test_split_digest"] == tags["test_split_digest"]
    assert _champion(project) == "2"
    assert _decision(project)["promoted"] is True
    # A barely trained model, tested on another split (a folder with half of each class's
    # test images), registered under the same name: the champion is scored again on the new
    # test split, wins, and keeps the alias.
    other = project / "other_split"
    for path in (project / "data/01_raw/fashion-mnist-target").rglob("*.png"):
        split, label = path.parent.parent.name, path.parent.name
        if split == "train" or int(path.stem.split("_")[-1]) % 2:
            target = other / split / label / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    run_finetune(project, {"finetune": {
        **no_exports, "data": {"path": str(other)}, "registry": {"name": REGISTERED},
        "phase1": {"epochs": 1, "learning_rate": 1e-6}, "phase2": {"epochs": 0}}})
    third = _version(project, "3")
    assert third.tags["test_split_digest"] != tags["test_split_digest"]
    decision = _decision(project)
    assert decision["promoted"] is False and decision["champion"] == "2"
    assert "on this run's test split" in decision["reason"]
    assert decision["champion_test_accuracy"] > float(third.tags["test_accuracy"])
    assert _champion(project) == "2"
