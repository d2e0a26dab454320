"""A team's tracking setup on real servers: an MLflow tracking server whose backend store is
PostgreSQL and whose artifact store is S3-compatible (moto in server mode), all on 127.0.0.1.

The project is pointed at it as the README tells a team to: `conf/team/mlflow.yml` in the
environment and `MLFLOW_TRACKING_URI` in the shell. The server proxies artifacts to the
bucket, so the project needs no storage credentials of its own.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import boto3
import mlflow
import psycopg2
import pytest

from tests.conftest import free_port, kedro_cli, s3_server, serve, stop
from tests.test_faults import IMAGES, make_project
from tests.test_mlflow_server import check_logged_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "headswap-artifacts"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


def _postgres_bin(name: str) -> str:
    """A PostgreSQL program: on PATH, or where Debian's postgresql package puts it."""
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    assert found, f"PostgreSQL's {name} is missing: `make install-test` installs Debian's " \
                  "postgresql."
    return found


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with an empty database `mlflow`: its URI.

    PostgreSQL refuses to run as root; under root its programs run as the `postgres` user of
    Debian's package, in a folder of their own."""
    folder = Path(tempfile.mkdtemp(prefix="headswap_pg_"))
    as_user = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = folder / "data"

    def pg(*command: str) -> None:
        subprocess.run([*as_user, *command], check=True, capture_output=True, timeout=120)

    pg(_postgres_bin("initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust",
       "--no-sync")
    pg(_postgres_bin("pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w",
       "-t", "60", "-o", f"-h 127.0.0.1 -p {port} -k {folder}", "start")
    try:
        connection = psycopg2.connect(host="127.0.0.1", port=port, user="mlflow",
                                      dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE mlflow")
        connection.close()
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        pg(_postgres_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[str]:
    """An S3-compatible store (moto's server) with an empty bucket: its endpoint URL."""
    endpoint, process = s3_server(tmp_path_factory.mktemp("s3"))
    try:
        boto3.client("s3", endpoint_url=endpoint, **_boto_keys()).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        stop(process)


def _boto_keys() -> dict[str, str]:
    return {"aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_ENV["AWS_DEFAULT_REGION"]}


@pytest.fixture(scope="module")
def team_server(postgres: str, s3: str, tmp_path_factory) -> Iterator[tuple[str, object]]:
    """``mlflow server`` on PostgreSQL, its artifacts proxied to the bucket: its URI and
    process."""
    folder = tmp_path_factory.mktemp("mlflow_team")
    uri = f"http://127.0.0.1:{free_port()}"
    process = serve(
        [sys.executable, "-m", "mlflow", "server",
         "--backend-store-uri", postgres.replace("postgresql://", "postgresql+psycopg2://"),
         "--artifacts-destination", f"s3://{BUCKET}/mlartifacts",
         "--host", "127.0.0.1", "--port", uri.rsplit(":", 1)[1], "--workers", "1",
         "--uvicorn-opts", "--timeout-graceful-shutdown 3"],
        folder, f"{uri}/health", folder / "server.log",
        env={**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3})
    try:
        yield uri, process
    finally:
        stop(process)


def test_a_finetune_run_is_recorded_on_the_team_server(team_server, s3: str, postgres: str,
                                                      tmp_path: Path, monkeypatch):
    uri, process = team_server
    project = make_project(tmp_path)
    # conf/test's sizes with the team's tracking: its mlflow.yml in the environment that runs.
    shutil.copy(ROOT / "conf" / "team" / "mlflow.yml", project / "conf" / "test" / "mlflow.yml")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for key in (*S3_ENV, "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)  # the project needs no storage credentials

    result = kedro_cli(project, "run", "--pipeline", "finetune", "--env", "test", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("headswap").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["finetune.phase1.epochs"] == "3"
    assert run.data.params["finetune.data.path"] == IMAGES
    for key, phase_epochs in (("epoch.loss", [0, 1, 2, 3, 4]),
                              ("epoch.val_accuracy", [0, 1, 2, 3, 4])):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) \
            == phase_epochs  # phase 1 (epochs 0-2) and phase 2 (3-4) on one axis
    assert "test.accuracy" in run.data.metrics and "phase1.test.accuracy" in run.data.metrics
    artifacts = {a.path for top in ("data", "reports", "training")
                 for a in client.list_artifacts(run.info.run_id, top)}
    assert {"data/manifest.csv", "reports/classification_report.json",
            "training/phase2_history.json"} <= artifacts

    # The runs are rows of the PostgreSQL database; the artifacts objects in the bucket.
    connection = psycopg2.connect(postgres)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
            assert cursor.fetchone() == ("FINISHED",)
    finally:
        connection.close()
    objects = boto3.client("s3", endpoint_url=s3, **_boto_keys()).list_objects_v2(
        Bucket=BUCKET, Prefix="mlartifacts/")
    keys = [item["Key"] for item in objects.get("Contents", [])]
    assert any(key.endswith("reports/classification_report.json") for key in keys)
    assert any(key.endswith("MLmodel") for key in keys)

    # The model comes back from the server and answers with the class names.
    check_logged_model(run.info.run_id, project, uri)

    # With the server stopped, the next run stops before anything is trained.
    stop(process)
    models = sorted((project / "data" / "06_models" / "phase1_model.keras").iterdir())
    stopped = kedro_cli(project, "run", "--pipeline", "finetune", "--env", "test", timeout=300)
    assert stopped.returncode == 1
    assert f"Error: The MLflow tracking server {uri} cannot be reached" in stopped.stderr
    assert "correct the environment variable MLFLOW_TRACKING_URI" in stopped.stderr
    assert sorted((project / "data" / "06_models" / "phase1_model.keras").iterdir()) == models
