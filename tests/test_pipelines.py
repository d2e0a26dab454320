"""The pipelines end to end, on the Fashion-MNIST example at test size (conf/test).

A copy of the project (conf/, src/, pyproject.toml) in a temporary folder runs the whole
example through a real KedroSession, with a real MLflow SQLite backend; later tests run the
CLI in that folder.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from headswap.core.export import FORMATS
from tests.conftest import (
    browser_page,
    copy_project,
    free_port,
    kedro_cli,
    kill_in_phase2,
    mlflow_runs,
    serve,
    stop,
    versions,
)
from tests.documented import conf_environment, documented, run_documented, run_documented_session

pytestmark = pytest.mark.slow


TARGET_CLASSES = ["Ankle boot", "Bag", "Sandal", "Shirt", "Sneaker"]
FINETUNE_NODES = [
    "check_parameters", "ingest_images", "load_base", "check_data_quality",
    "swap_head", "train_head", "evaluate_head_only",
    "fine_tune", "calibrate", "evaluate", "evaluate_details", "summarise_training",
    "publish_model", "export_model", "describe_preprocessing", "write_model_card",
    "explain_predictions",
]
VERSIONED = [
    "data/02_intermediate/manifest.csv",
    "data/06_models/pretrained_base.keras",
    "data/06_models/base_model.keras",
    "data/06_models/headswapped_model.keras",
    "data/06_models/phase1_model.keras",
    "data/06_models/phase2_model.keras",
    "data/06_models/calibrated_model.keras",
    "data/06_models/preprocessing.json",
    "data/06_models/ood_statistics.json",
    "data/07_model_output/phase1_history.json",
    "data/07_model_output/phase2_history.json",
    "data/08_reporting/test_predictions.csv",
    "data/08_reporting/classification_report.json",
    "data/08_reporting/classification_report.txt",
    "data/08_reporting/phase1_classification_report.json",
    "data/08_reporting/confusion_matrix.png",
    "data/08_reporting/learning_curves.png",
    "data/08_reporting/confusion_matrix_counts.csv",
    "data/08_reporting/confusion_matrix_normalised.csv",
    "data/08_reporting/per_class_metrics.csv",
    "data/08_reporting/misclassified_images.csv",
    "data/08_reporting/misclassified.png",
    "data/08_reporting/model_registry.json",
    "data/08_reporting/model_card.md",
    "data/08_reporting/data_quality_report.json",
    "data/08_reporting/data_quality_findings.csv",
    "data/08_reporting/data_quality.png",
    "data/08_reporting/grad_cam.png",
    "data/08_reporting/calibration_report.json",
    "data/08_reporting/reliability.png",
    "data/08_reporting/export_checks.csv",
]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project in which the whole example ran once, as documented (its
    conf/example at conf/test's sizes)."""
    path = copy_project(tmp_path_factory.mktemp("project"))
    run_documented_session(path, "kedro run --env example --pipeline example")
    return path


def _run(project: Path):
    # also the process's tracking URI: mlflow.pyfunc reads runs:/ URIs through it
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow_runs(project)


def test_every_stage_artifact_is_versioned_under_the_run_id(project: Path):
    _, runs = _run(project)
    run_id_tag = runs[0].data.tags["run_id"]
    for relative in VERSIONED:
        assert versions(project, relative) == [run_id_tag], relative
    folder = project / "data/01_raw/fashion-mnist-target"
    assert {p.name for p in (folder / "train").iterdir()} == set(TARGET_CLASSES)
    assert len(list((folder / "train").rglob("*.png"))) == 5 * 40
    assert len(list((folder / "test").rglob("*.png"))) == 5 * 1000


def test_report_names_every_class_and_is_consistent(project: Path):
    version = versions(project, "data/08_reporting/classification_report.json")[-1]
    folder = project / "data/08_reporting/classification_report.json" / version
    report = json.loads((folder / "classification_report.json").read_text())
    for name in TARGET_CLASSES:
        assert report[name]["support"] == 1000
        assert 0.0 <= report[name]["f1-score"] <= 1.0
    assert {"accuracy", "macro avg", "weighted avg"} <= set(report)
    text = (project / "data/08_reporting/classification_report.txt" / version /
            "classification_report.txt").read_text()
    assert all(name in text for name in TARGET_CLASSES)
    manifest_dir = project / "data/02_intermediate/manifest.csv" / version
    manifest = (manifest_dir / "manifest.csv").read_text().splitlines()
    assert manifest[0] == "path,label,split" and len(manifest) == 1 + 200 + 5000
    # The head trains on top of what the base learnt: better than chance (0.2) even here.
    assert report["accuracy"] > 0.4


def test_mlflow_run_holds_params_metrics_of_both_phases_artifacts_and_model(project: Path):
    client, runs = _run(project)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["finetune.phase1.epochs"] == "3" and params["finetune.base.source"] == "file"
    history = client.get_metric_history(run.info.run_id, "epoch.val_accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]
    assert len(client.get_metric_history(run.info.run_id, "epoch.learning_rate")) == 5
    metrics = run.data.metrics
    for key in ("test.accuracy", "test.macro_f1", "test.top_2_accuracy", "phase1.test.accuracy",
                "epoch.phase2.trainable_params"):
        assert key in metrics, key
    assert all(f"test.f1.{name}" in metrics for name in TARGET_CLASSES)
    assert metrics["epoch.phase2.trainable_params"] > metrics["epoch.phase1.trainable_params"]
    artifacts = {a.path for folder in ("reports", "training", "data")
                 for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"reports/confusion_matrix_plot.png", "reports/learning_curves_plot.png",
            "reports/classification_report.json", "data/manifest.csv",
            "reports/per_class_metrics.csv", "reports/confusion_matrix_normalised.csv",
            "reports/misclassified_plot.png", "reports/grad_cam_plot.png"} <= artifacts
    # logged as the catalog saves it (its save_args: dpi 110), not at Matplotlib's default
    logged = Image.open(client.download_artifacts(run.info.run_id,
                                                  "reports/confusion_matrix_plot.png"))
    version = versions(project, "data/08_reporting/confusion_matrix.png")[-1]
    saved = Image.open(project / "data/08_reporting/confusion_matrix.png" / version /
                       "confusion_matrix.png")
    assert logged.size == saved.size

    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/keras_model")
    files = sorted((project / "data/01_raw/fashion-mnist-target/test/Bag").glob("*.png"))[:4]
    raw = np.stack([np.asarray(Image.open(f), dtype="float32")[..., None] for f in files])
    probabilities = np.asarray(model.predict(raw))
    assert probabilities.shape == (4, 5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)


def test_the_model_card_describes_data_model_training_and_results(project: Path):
    version = versions(project, "data/08_reporting/model_card.md")[-1]
    card = (project / "data/08_reporting/model_card.md" / version / "model_card.md").read_text()
    report = json.loads((project / "data/08_reporting/classification_report.json" / version /
                         "classification_report.json").read_text())
    assert card.startswith("# Model card: fashion-mnist-target")
    assert f"Accuracy **{report['accuracy']:.4f}**" in card
    assert "(train 160, validation 40, test 5000)" in card
    for name in TARGET_CLASSES:
        assert f"| {name} | 32 | 8 | 1,000 |" in card
    weakest = min(TARGET_CLASSES, key=lambda n: report[n]["f1-score"])
    assert f"Weakest classes: {weakest} (F1 {report[weakest]['f1-score']:.4f}" in card
    assert "base layers trained: none (head only)" in card  # phase 1
    assert "## Intended use and limits" in card
    assert "without keeping the aspect ratio" in card  # resize: stretch, the default
    client, runs = _run(project)
    assert "model/model_card.txt" in {a.path for a in client.list_artifacts(
        runs[0].info.run_id, "model")}


def test_every_export_is_checked_against_the_model(project: Path):
    """The exports in every default format, each scored against the Keras model on the test
    split: a versioned table, metrics and an artifact of the MLflow run, in the model card."""
    version = versions(project, "data/08_reporting/export_checks.csv")[-1]
    with open(project / "data/08_reporting/export_checks.csv" / version /
              "export_checks.csv", newline="") as file:
        rows = {row["format"]: row for row in csv.DictReader(file)}
    assert list(rows) == ["keras", *FORMATS]
    for name in FORMATS:
        row = rows[name]
        assert float(row["images"]) == 250  # export.check_images of the 5,000 test images
        assert float(row["size_mb"]) > 0 and float(row["latency_ms"]) > 0
        assert float(row["export_s"]) > 0 and float(row["check_s"]) > 0
        assert abs(float(row["accuracy"]) - float(rows["keras"]["accuracy"])) <= 0.05, name
    for name in ("saved_model", "tflite", "onnx"):
        assert float(rows[name]["agreement"]) == 1.0 and rows[name]["within_tolerance"] == "True"
        assert float(rows[name]["max_prob_diff"]) <= 1e-4
    exports = project / "data/06_models/exports" / version / "exports"
    assert {p.name for p in exports.iterdir()} >= {
        "saved_model", "model.tflite", "model_quantized.tflite", "model_int8.tflite",
        "model.onnx", "labels.txt", "preprocessing.json"}
    card = (project / "data/08_reporting/model_card.md" / version / "model_card.md").read_text()
    assert "## Exports" in card and "on 250 test images" in card
    for name in FORMATS:
        assert re.search(rf"^\| {name} \| \S+ \| [0-9.e-]+ \| ", card, re.MULTILINE), name
    client, runs = _run(project)
    metrics = runs[0].data.metrics
    for name in FORMATS:
        assert metrics[f"export.{name}.agreement"] == float(rows[name]["agreement"])
        assert metrics[f"export.{name}.check_s"] > 0
    assert "reports/export_checks.csv" in {
        a.path for a in client.list_artifacts(runs[0].info.run_id, "reports")}


def test_the_calibration_is_reported_in_the_card_in_mlflow_and_stored_with_the_model(
    project: Path,
):
    """Temperature scaling fitted on the validation split: a lower calibration error and
    negative log-likelihood there, the test split's ECE before and after in the versioned
    report, the model card and the MLflow run (metrics and the reliability diagram), and the
    `unknown` threshold stored with the model beside its preprocessing, with the statistics
    of the ood_score and its validation reference."""
    version = versions(project, "data/08_reporting/calibration_report.json")[-1]
    report = json.loads((project / "data/08_reporting/calibration_report.json" / version /
                         "calibration_report.json").read_text())
    assert report["method"] == "temperature" and report["bins"] == 15
    val, test = report["validation"], report["test"]
    assert val["images"] == 40 and test["images"] == 5000
    assert val["nll"] <= val["nll_before"] and val["ece"] <= val["ece_before"]
    assert report["temperature"] > 0 and report["temperature"] != 1.0
    threshold = report["min_confidence"]["threshold"]
    assert report["min_confidence"]["target_precision"] == 0.95
    assert 0 < threshold < 1 and report["min_confidence"]["validation"]["precision"] >= 0.95
    evaluation = json.loads((project / "data/08_reporting/classification_report.json" /
                             version / "classification_report.json").read_text())
    assert test["accuracy"] == pytest.approx(evaluation["accuracy"])  # the classes kept
    how = json.loads((project / "data/06_models/preprocessing.json" / version /
                      "preprocessing.json").read_text())
    assert how["min_confidence"] == threshold
    ood = report["ood_score"]
    assert ood["threshold"] > 0
    assert how["ood_threshold"] == pytest.approx(ood["threshold"], rel=1e-5)
    assert ood["covariance"] == "full" and ood["train_images"] == 5 * 40 - val["images"]
    assert len(how["ood"]["means"]) == 5 and len(how["ood"]["precision"]) == ood["dimensions"]
    assert 0 <= ood["test_above_threshold"] < 0.25  # the test split is like the validation's
    card = (project / "data/08_reporting/model_card.md" / version / "model_card.md").read_text()
    assert "## Confidence" in card and f"T = {report['temperature']:.4g}" in card
    assert f"| test | 5,000 | {round(test['ece_before'], 4):g} | {round(test['ece'], 4):g} |" \
        in card
    assert f"`min_confidence` **{threshold:.4f}**" in card
    assert f"**{ood['threshold']:.4g}** (`ood_threshold` in `preprocessing.json`" in card
    client, runs = _run(project)
    metrics = runs[0].data.metrics
    assert metrics["calibration.test_ece_before"] == pytest.approx(test["ece_before"])
    assert metrics["calibration.test_ece"] == pytest.approx(test["ece"])
    assert metrics["calibration.temperature"] == pytest.approx(report["temperature"])
    assert metrics["calibration.min_confidence"] == pytest.approx(threshold)
    assert metrics["calibration.ood_threshold"] == pytest.approx(ood["threshold"])
    assert {"reports/calibration_report.json", "reports/calibration_plot.png"} <= {
        a.path for a in client.list_artifacts(runs[0].info.run_id, "reports")}


def test_kedro_mlflow_hook_is_the_plugins_own_registered_once(project: Path):
    """kedro-mlflow's hook is used as the plugin registers it: had a second one been
    registered, every run would be tracked twice over."""
    from kedro.framework.session import KedroSession
    from kedro_mlflow.framework.hooks import MlflowHook

    with KedroSession.create(project_path=project, env="test") as session:
        hooks = [h for h in session._hook_manager.get_plugins() if isinstance(h, MlflowHook)]
    assert [type(h) for h in hooks] == [MlflowHook]


def test_cli_runs_finetune_with_both_pipeline_flags(project: Path):
    """Also the base chosen with --load-versions (the catalog's pretrained_model)."""
    base_version = versions(project, "data/06_models/pretrained_base.keras")[-1]
    for result in (
        run_documented(project, 'kedro run --pipeline finetune --params '
                                '"finetune.phase2.epochs=3,finetune.data.batch_size=16"'),
        kedro_cli(project, "run", "--pipelines", "finetune", "--env", "test", "--load-versions",
                  f"pretrained_model:{base_version}", timeout=600),
    ):
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "Completed node: evaluate" in result.stdout + result.stderr
        # one predict function per model: no TensorFlow warning of retracing in a run
        assert "retracing" not in result.stdout + result.stderr
        for name in FORMATS:  # each export's size and the time its export and check took
            logged = re.search(rf"Export {name}: ([0-9.e-]+) MB, written in ([0-9.]+) s, "
                               r"checked in ([0-9.]+) s on 250 test images",
                               result.stdout + result.stderr)
            assert logged and float(logged[1]) > 0 and float(logged[2]) > 0, name
    assert len(versions(project, "data/06_models/phase2_model.keras")) == 3
    assert len(versions(project, "data/06_models/pretrained_base.keras")) == 1


def test_invalid_parameters_stop_before_any_node(project: Path):
    before = versions(project, "data/02_intermediate/manifest.csv")
    result = run_documented(project,
                            "kedro run --pipeline finetune --params finetune.phase1.epochs=-1")
    assert result.returncode != 0
    assert "finetune.phase1.epochs: got -1" in result.stdout + result.stderr
    assert versions(project, "data/02_intermediate/manifest.csv") == before
    wrong = "2000-01-01T00.00.00.000Z"
    result = kedro_cli(project, "run", "--pipeline", "finetune", "--env", "test",
                       "--load-versions", f"pretrained_model:{wrong}", timeout=600)
    errors = [line for line in (result.stdout + result.stderr).splitlines()
              if line.startswith("Error:")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-2000:]
    assert f"pretrained_base.keras/{wrong}/pretrained_base.keras" in errors[0]


def test_kedro_viz_build_shows_every_finetune_node(project: Path):
    result = kedro_cli(project, "viz", "build", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    graph = json.loads((project / "build/api/pipelines/finetune").read_text())
    names = [n["name"] for n in graph["nodes"] if n["type"] == "task"]
    assert sorted(names) == sorted(FINETUNE_NODES)
    # every dataset is in a layer, and the layers have one order from inputs to reports
    assert [n["name"] for n in graph["nodes"] if n["type"] == "data" and not n["layer"]] == []
    layers = graph["layers"]
    assert layers.index("intermediate") < layers.index("models") < layers.index(
        "model_output") < layers.index("reporting")
    # where the base is an earlier stage's output (layer models) the layers keep one order
    # too (kedro-viz shows none when they form a cycle), and every pipeline reads the base once
    for name, base in (("finetune", "pretrained_model"), ("example", "pretrained_base"),
                       ("label_efficiency", "pretrained_base")):
        graph = json.loads((project / f"build/api/pipelines/{name}").read_text())
        layers = graph["layers"]
        assert layers and layers.index("intermediate") < layers.index("models") < layers.index(
            "reporting"), (name, layers)
        ids = {n["id"]: n["name"] for n in graph["nodes"]}
        readers = [ids[e["target"]] for e in graph["edges"] if ids[e["source"]] == base]
        assert readers == ["load_base"], (name, readers)


def test_kedro_viz_shows_the_finetune_graph_with_its_layers_in_a_browser(project: Path):
    """``kedro viz run`` on 127.0.0.1, opened in headless Chromium (Debian's package): the
    page has every finetune node and the data layers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = serve([sys.executable, "-m", "kedro", "viz", "run", "--host", "127.0.0.1",
                     "--port", str(port), "--no-browser"], project, f"{url}/api/main",
                    project / "viz.log")
    try:
        page = browser_page(f"{url}/?pid=finetune",
                            [f">{name}<" for name in FINETUNE_NODES] + [">reporting<"])
        with urllib.request.urlopen(f"{url}/api/main", timeout=30) as response:
            ids = {n["name"]: n["id"] for n in json.loads(response.read())["nodes"]}
        previews = {}
        for name in ("per_class_metrics", "classification_report", "confusion_matrix_plot"):
            with urllib.request.urlopen(f"{url}/api/nodes/{ids[name]}", timeout=30) as response:
                previews[name] = json.loads(response.read()).get("preview_type")
    finally:
        stop(server)
    # tables, JSON reports and plots of the finished run have previews
    assert previews == {"per_class_metrics": "TablePreview",
                        "classification_report": "JSONPreview",
                        "confusion_matrix_plot": "ImagePreview"}
    for name in FINETUNE_NODES:
        assert f">{name}<" in page, name
    for layer in ("model_input", "intermediate", "models", "model_output", "reporting"):
        assert f">{layer}<" in page, layer


def test_the_mlflow_ui_shows_the_run_by_its_name_with_its_test_accuracy(project: Path):
    """``mlflow server`` on the project's tracking database, the run's page opened in
    headless Chromium: the run's name says what ran, and its metrics include test.accuracy."""
    _, runs = _run(project)
    run = runs[0]
    name = run.data.tags["mlflow.runName"]
    assert name == "example - pretrained_base - fashion-mnist-target"
    assert run.data.tags["mlflow.note.content"].startswith("Test accuracy **")
    assert run.data.tags["base"] == run.data.params["finetune.base.path"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = serve([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                     f"sqlite:///{project / 'mlflow.db'}", "--host", "127.0.0.1", "--port",
                     str(port), "--workers", "1"], project, f"{url}/health",
                    project / "mlflow_ui.log")
    try:
        page = browser_page(
            f"{url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}",
            [name, "test.accuracy"])
    finally:
        stop(server)
    assert name in page
    assert "test.accuracy" in page


def _weights_of(project: Path, version: str) -> list[np.ndarray]:
    import keras

    path = project / "data/06_models/phase2_model.keras" / version / "phase2_model.keras"
    return keras.saving.load_model(path, compile=False).get_weights()


def test_a_killed_run_resumes_into_the_same_mlflow_run_and_matches_an_uninterrupted_one(
    project: Path,
):
    """docs/pipelines/finetune.md's path, its commands as written: a run started without any
    resume flag is killed (SIGKILL) in phase 2; the same command with
    finetune.training.resume=true continues it, in the same MLflow run, to the model an
    uninterrupted run makes. Batches of one image make phase 2 long enough to be killed in."""
    slow = conf_environment(project, "slow", {"finetune": {  # no data check, no exports:
        "data": {"batch_size": 1, "quality": "off"}, "export": {"formats": []},  # not resumed
        "phase1": {"epochs": 2}, "phase2": {"epochs": 4}}})
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONUNBUFFERED": "1", "KEDRO_ENV": slow}
    command = [sys.executable, "-m", *documented("kedro run --pipeline finetune")]
    state = project / "data/05_model_input/resume"
    _, runs_before = _run(project)
    versions_before = versions(project, "data/06_models/phase2_model.keras")

    kill_in_phase2(command, project, env)
    assert versions(project, "data/06_models/phase2_model.keras") == versions_before

    resumed = run_documented(
        project, 'kedro run --pipeline finetune --params "finetune.training.resume=true"',
        env=slow)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert "phase1 finished before the interruption" in output
    assert "Resuming: logging into the interrupted MLflow run" in output
    assert "Resumed at epoch" in output
    client, runs = _run(project)
    assert len(runs) == len(runs_before) + 1, "the resumed run started a new MLflow run"
    run = client.get_run(runs[-1].info.run_id)
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch.loss"))
    assert steps == list(range(6))
    assert not state.exists() or not list(state.iterdir()), "resume state left after success"
    resumed_version = max(set(versions(project, "data/06_models/phase2_model.keras"))
                          - set(versions_before))

    fresh = run_documented(project, "kedro run --pipeline finetune", env=slow)
    assert fresh.returncode == 0, (fresh.stdout + fresh.stderr)[-3000:]
    assert "Resum" not in fresh.stdout + fresh.stderr
    fresh_version = versions(project, "data/06_models/phase2_model.keras")[-1]
    for a, b in zip(_weights_of(project, resumed_version), _weights_of(project, fresh_version),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
