"""The finetune pipeline recorded on a real MLflow tracking server over HTTP.

The test starts ``mlflow server`` (SQLite backend, artifacts served by the server) on
127.0.0.1 on a free port, points the test environment of a project copy at it, runs the
pipeline through a real KedroSession, and reads the run back through ``MlflowClient``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import free_port, run_finetune, serve, stop, variable_kept
from tests.test_faults import IMAGES, MESSY_CLASSES, PER_CLASS, make_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A running ``mlflow server``: its URI and its folder (database, artifacts, log)."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    uri = f"http://127.0.0.1:{free_port()}"
    process = serve(
        [sys.executable, "-m", "mlflow", "server",
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "artifacts"),
         "--host", "127.0.0.1", "--port", uri.rsplit(":", 1)[1], "--workers", "1",
         "--uvicorn-opts", "--timeout-graceful-shutdown 3"],
        folder, f"{uri}/health", folder / "server.log")
    try:
        yield uri, folder
    finally:
        stop(process)  # the server's process group: it and its workers, only them


def test_a_finetune_run_is_recorded_on_the_tracking_server(server, tmp_path: Path):
    uri, folder = server
    project = make_project(tmp_path)
    (project / "conf" / "test" / "mlflow.yml").write_text(
        yaml.safe_dump({"server": {"mlflow_tracking_uri": uri}})
    )
    version = run_finetune(project)
    assert not (project / "mlflow.db").exists()

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("headswap")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["run_id"] == version

    params = run.data.params
    assert params["finetune.seed"] == "7"
    assert params["finetune.base.path"] == "models/user_cnn.keras"
    assert params["finetune.data.path"] == IMAGES
    assert params["finetune.phase1.epochs"] == "3" and params["finetune.phase2.epochs"] == "2"

    metrics = run.data.metrics
    assert metrics["data.images"] == len(MESSY_CLASSES) * PER_CLASS
    assert metrics["data.skipped_images"] == 6
    assert 0.0 <= metrics["test.accuracy"] <= 1.0 and "phase1.test.macro_f1" in metrics
    history = client.get_metric_history(run.info.run_id, "epoch.val_accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]

    artifacts = {a.path for top in ("data", "reports", "training")
                 for a in client.list_artifacts(run.info.run_id, top)}
    assert {"data/manifest.csv", "data/skipped_images.csv", "reports/classification_report.json",
            "reports/confusion_matrix_plot.png", "training/phase1_history.json"} <= artifacts
    skipped = pd.read_csv(client.download_artifacts(
        run.info.run_id, "data/skipped_images.csv", str(tmp_path)))
    assert len(skipped) == 6 and skipped["reason"].str.len().min() > 10
    # The artifacts went to the server's store, not to a folder of the project.
    assert list((folder / "artifacts").rglob("skipped_images.csv"))

    # The model comes back from the server's store and answers with the class names.
    check_logged_model(run.info.run_id, project, uri)


def check_logged_model(run_id: str, project: Path, tracking_uri: str) -> None:
    """The run's ``model``, read back with ``mlflow.pyfunc.load_model`` from the tracking
    server ``tracking_uri``, answers a few of the project's images with its class names."""
    # Another test may have set this process's tracking URI; set_tracking_uri also writes
    # MLFLOW_TRACKING_URI, which the next `kedro run` subprocess inherits: both restored.
    previous = mlflow.get_tracking_uri()
    with variable_kept("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(tracking_uri)
        try:
            model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
        finally:
            mlflow.set_tracking_uri(previous)
    files = sorted((project / IMAGES / "filled circle").glob("img 0[0-3].png"))
    answer = model.predict(pd.DataFrame({"image": [str(f) for f in files]}))
    assert set(answer["top_1"]) <= set(MESSY_CLASSES) and len(answer) == len(files)
    assert set(answer["predicted"]) <= {*MESSY_CLASSES, "unknown"}  # below min_confidence
    probabilities = answer[[f"p[{name}]" for name in sorted(MESSY_CLASSES)]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
