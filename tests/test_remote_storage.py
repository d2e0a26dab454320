"""Images, base and every artifact in object storage: a real S3 endpoint (moto's server on
127.0.0.1), the project configured as the README's "Remote storage" tells a user, and plain
`kedro run` / `kedro run --pipeline predict`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pandas as pd
import pytest
import s3fs
import yaml

from tests.conftest import (
    COLOURS,
    copy_project,
    gcs_server,
    kedro_cli,
    s3_server,
    small_base,
    stop,
    write_photos,
)

pytestmark = pytest.mark.slow

BUCKET = "photos"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[tuple[str, s3fs.S3FileSystem]]:
    """moto's S3 server with a bucket holding a photo folder, new photos and a base."""
    folder = tmp_path_factory.mktemp("s3")
    endpoint, process = s3_server(folder)
    try:
        fs = s3fs.S3FileSystem(key=KEYS["AWS_ACCESS_KEY_ID"],
                               secret=KEYS["AWS_SECRET_ACCESS_KEY"],
                               client_kwargs={"endpoint_url": endpoint})
        fs.mkdir(BUCKET)
        write_photos(folder / "flowers", per_class=12, seed=0)
        write_photos(folder / "new", per_class=2, seed=1, flat=True)
        small_base(folder / "base.keras")
        for name in ("flowers", "new"):
            fs.put(str(folder / name), f"{BUCKET}/{name}", recursive=True)
        fs.put(str(folder / "base.keras"), f"{BUCKET}/models/base.keras")
        yield endpoint, fs
    finally:
        stop(process)


@pytest.fixture(scope="module")
def remote_run(s3, tmp_path_factory):
    """A project whose images, base and artifacts are all in the bucket; `kedro run` and
    `kedro run --pipeline predict` on it, with credentials from the environment."""
    endpoint, _ = s3
    root = tmp_path_factory.mktemp("remote")
    project = copy_project(root / "project")
    settings = {"finetune": {
        "data": {"path": f"s3://{BUCKET}/flowers", "image_size": 48},
        "base": {"path": f"s3://{BUCKET}/models/base.keras"},
        "phase1": {"epochs": 5}, "phase2": {"epochs": 2},
        "export": {"formats": ["saved_model"]},
    }}
    (project / "conf/local/parameters_finetune.yml").write_text(yaml.safe_dump(settings))
    (project / "conf/local/globals.yml").write_text(f"data: s3://{BUCKET}/out\n")
    env = {**KEYS, "AWS_ENDPOINT_URL": endpoint, "HEADSWAP_CACHE": str(root / "cache")}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # kedro_cli passes the environment on, as a shell would
    try:
        run = kedro_cli(project, "run", timeout=900)
        predict = kedro_cli(project, "run", "--pipeline", "predict", "--params",
                            f"predict.path=s3://{BUCKET}/new", timeout=900)
        missing = kedro_cli(project, "run", "--params",
                            "finetune.data.path=s3://no-such-bucket/flowers", timeout=300)
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    return project, root / "cache", run, predict, missing


def _newest(fs: s3fs.S3FileSystem, prefix: str) -> str:
    """The newest version's file of a versioned dataset in the bucket."""
    return sorted(fs.find(f"{BUCKET}/out/{prefix}"))[-1]


def test_kedro_run_reads_images_and_base_from_s3_and_writes_every_artifact_there(s3,
                                                                              remote_run):
    _, fs = s3
    project, cache, run, _, _ = remote_run
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    fs.invalidate_cache()
    manifest = pd.read_csv(fs.open(_newest(fs, "02_intermediate/manifest.csv")), dtype=str)
    assert len(manifest) == 3 * 12
    assert all(p.startswith(f"s3://{BUCKET}/flowers/") for p in manifest["path"])
    assert set(manifest["label"]) == set(COLOURS)
    for artifact in ("06_models/phase2_model.keras", "08_reporting/classification_report.txt",
                     "08_reporting/confusion_matrix.png", "08_reporting/model_card.md"):
        assert fs.find(f"{BUCKET}/out/{artifact}"), artifact
    assert any(p.endswith("saved_model.pb") for p in fs.find(f"{BUCKET}/out/06_models/exports"))
    local = [p for p in (project / "data").rglob("*") if p.is_file()]
    assert local == [], local[:5]  # nothing written into the project's data/
    cached = [p for p in cache.rglob("*") if p.suffix in (".jpg", ".png", ".webp")]
    assert len(cached) == 36 + 6  # each image once: the run's 36, predict's 6 new ones


def test_predict_classifies_an_s3_folder_into_the_bucket(s3, remote_run):
    _, fs = s3
    _, _, _, predict, _ = remote_run
    assert predict.returncode == 0, predict.stdout[-3000:] + predict.stderr[-3000:]
    fs.invalidate_cache()
    table = pd.read_csv(fs.open(_newest(fs, "07_model_output/predictions.csv")))
    assert sorted(table["path"]) == sorted(f"s3://{BUCKET}/new/{p}"
                                          for p in fs.ls(f"{BUCKET}/new", detail=False)
                                          for p in [p.rsplit("/", 1)[1]])
    assert set(table["top_1"]) <= set(COLOURS)
    assert set(table["predicted"]) <= {*COLOURS, "unknown"}  # below min_confidence


def test_a_missing_bucket_stops_with_one_error_line_naming_the_url(remote_run):
    missing = remote_run[4]
    assert missing.returncode != 0
    output = missing.stdout + missing.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "s3://no-such-bucket/flowers" in errors[0], output[-2000:]
    assert "Traceback" not in output


def test_credentials_from_credentials_yml_reach_the_image_dataset(s3, tmp_path: Path,
                                                                 monkeypatch):
    """No storage settings in the environment: the endpoint and keys come from
    conf/local/credentials.yml, named in conf/local/catalog.yml as the README shows."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    endpoint, _ = s3
    for key in (*KEYS, "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    project = copy_project(tmp_path / "project")
    (project / "conf/local/credentials.yml").write_text(yaml.safe_dump({"my_s3": {
        "key": KEYS["AWS_ACCESS_KEY_ID"], "secret": KEYS["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": endpoint}}}))
    (project / "conf/local/catalog.yml").write_text("images: {credentials: my_s3}\n")
    monkeypatch.chdir(project)
    bootstrap_project(project)
    params = {"finetune": {"data": {"path": f"s3://{BUCKET}/flowers"}}}
    with KedroSession.create(project_path=project, runtime_params=params) as session:
        source = session.load_context().catalog.load("images")
    assert source.location == f"s3://{BUCKET}/flowers"
    assert len(source.files) == 36 and set(source.files["label"]) == set(COLOURS)


# --- Google Cloud Storage ------------------------------------------------------------------


def test_images_and_base_read_from_gs_through_the_catalogs_datasets(tmp_path: Path,
                                                                   monkeypatch):
    """The catalog's `images` and `pretrained_model` on gs:// URLs (a real GCS server on
    127.0.0.1, gcsfs with the catalog entry's credentials): listed, ingested through the local
    cache, batched; the base read; a missing bucket names its URL."""
    from headswap.core import data, manifests, sources
    from headswap.project.datasets import BaseModelDataset, ImageFolderDataset

    endpoint, process = gcs_server(tmp_path)
    try:
        credentials = {"token": "anon", "endpoint_url": endpoint, "project": "test"}
        fs = fsspec.filesystem("gs", **credentials)
        fs.mkdir("photos")
        write_photos(tmp_path / "flowers", per_class=6, seed=0)
        fs.put(str(tmp_path / "flowers"), "photos/flowers", recursive=True)
        fs.put(str(small_base(tmp_path / "base.keras")), "photos/models/base.keras")
        monkeypatch.setenv("HEADSWAP_CACHE", str(tmp_path / "cache"))

        images = ImageFolderDataset("gs://photos/flowers", credentials=credentials).load()
        manifest, skipped = manifests.ingest(images, seed=0)
        assert skipped.empty and len(manifest) == 6 * len(COLOURS)
        assert manifest["path"].str.startswith("gs://photos/flowers/").all()
        assert sorted(manifest["label"].unique()) == sorted(COLOURS)
        batch, labels = next(iter(data.make_dataset(manifest, "train", (32, 32), 3, 4)))
        assert tuple(batch.shape) == (4, 32, 32, 3) and len(labels) == 4

        base = BaseModelDataset(path="gs://photos/models/base.keras",
                                credentials=credentials).load()
        assert tuple(base.inputs[0].shape[1:]) == (48, 48, 3)

        missing = ImageFolderDataset("gs://no-such-bucket/flowers", credentials=credentials)
        with pytest.raises(sources.DataError, match="gs://no-such-bucket/flowers"):
            manifests.ingest(missing.load())
    finally:
        stop(process)
