"""Bad input, faults and reproducibility, through real runs of the finetune pipeline.

A copy of the project in a temporary folder fine-tunes a small saved Keras model of the user's
on a small, messy image folder (every format and colour mode users have, with corrupt,
truncated, empty, unsupported, hidden and non-image files among the images), at the test
environment's tiny sizes. Runs go through a real KedroSession (or the ``kedro`` CLI) with a
real MLflow SQLite store; every faulty file is made here.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.conftest import (
    copy_project,
    draw,
    free_port,
    kedro_cli,
    mlflow_runs,
    run_finetune,
    small_cnn,
    versions,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Class folders named as users name them: spaces, non-ASCII letters, digits.
MESSY_CLASSES = {"filled circle": "circle", "Quadrat größer": "square", "007": "stripes"}
PER_CLASS = 10
IMAGES = "data/01_raw/my images"
MANIFEST = "data/02_intermediate/manifest.csv"
# Tiny runs on top of conf/test: the user's model, the messy folder, a seed of its own.
FAULT_PARAMS = {
    "finetune": {
        "seed": 7,
        "data": {"path": IMAGES, "image_size": [32, 32], "batch_size": 8},
        "base": {"source": "file", "path": "models/user_cnn.keras"},
    }
}
# Same parameters and seed on CPU: the split is identical; per-epoch losses and accuracies
# and test metrics agree to this tolerance (float32 sums may be reordered between threads).
RTOL, ATOL = 1e-4, 1e-5


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def make_messy_folder(root: Path) -> tuple[Path, dict[str, str]]:
    """``PER_CLASS`` readable images per class in every format and colour mode, mixed sizes,
    plus faulty and ignored files. Returns the folder and ``{file name: reason fragment}`` of
    the files ingest must skip and list."""
    rng = np.random.default_rng(0)
    kinds = [
        ("png", "PNG", "L"), ("PNG", "PNG", "RGB"), ("png", "PNG", "RGBA"), ("png", "PNG", "P"),
        ("jpg", "JPEG", "RGB"), ("JPEG", "JPEG", "L"), ("bmp", "BMP", "RGB"), ("gif", "GIF", "P"),
        ("webp", "WEBP", "RGB"), ("png", "PNG", "LA"),
    ]
    for label, kind in MESSY_CLASSES.items():
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            extension, fmt, mode = kinds[i % len(kinds)]
            size = (24 + 4 * (i % 4), 28 + 6 * (i % 3))
            image = Image.fromarray(draw(kind, rng)).resize(size).convert(mode)
            (folder / f"img {i:02d}.{extension}").write_bytes(_encode(image, fmt))
    sample = Image.fromarray(draw("circle", rng))
    png, jpeg = _encode(sample, "PNG"), _encode(sample.convert("RGB"), "JPEG")
    first, second, third = (root / label for label in MESSY_CLASSES)
    faulty = {
        first / "empty.png": (b"", "empty file"),
        first / "scan.tiff": (_encode(sample, "TIFF"), "unsupported format '.tiff'"),
        second / "truncated.jpg": (jpeg[: len(jpeg) // 2], "cannot be decoded"),
        second / "corrupt.PNG": (rng.bytes(500), "cannot be decoded"),
        third / "fake.gif": (b"GIF89a but then nothing of an image", "cannot be decoded"),
        third / "truncated.png": (png[: len(png) // 2], "cannot be decoded"),
    }
    for path, (content, _) in faulty.items():
        path.write_bytes(content)
    for ignored in (".hidden.png", ".DS_Store", "notes.txt", "Thumbs.db", ".thumbs/x.png"):
        (first / ignored).parent.mkdir(exist_ok=True)
        (first / ignored).write_bytes(b"\x00 not an image")
    return root, {path.name: reason for path, (_, reason) in faulty.items()}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both else value
    return merged


def make_project(root: Path) -> Path:
    """A copy of the project whose test environment fine-tunes a small saved model of the
    user's on a messy image folder (see :data:`FAULT_PARAMS`)."""
    project = copy_project(root / "project")
    test_params = project / "conf" / "test" / "parameters.yml"
    merged = _merge(yaml.safe_load(test_params.read_text()), FAULT_PARAMS)
    test_params.write_text(yaml.safe_dump(merged, allow_unicode=True, sort_keys=False))
    make_messy_folder(project / IMAGES)
    (project / "models").mkdir()
    small_cnn((32, 32, 1), num_classes=4).save(project / "models" / "user_cnn.keras")
    return project


def manifest_file(project: Path, version: str) -> Path:
    """The manifest a run saved."""
    return project / MANIFEST / version / "manifest.csv"


def _digests(project: Path, version: str) -> dict[str, str]:
    found = {}
    for path in sorted((project / "data").rglob("*")):
        if path.is_file() and version in path.parts:
            found[str(path.relative_to(project))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


# how long an export and its check took, and the exports' file sizes (SavedModel and ONNX
# graphs name their traced functions with counters of the process, so the same model's file
# differs by some bytes): not results of the training
NOT_RESULTS = (".latency_ms", ".export_s", ".check_s", ".size_mb")


def _metrics(client: mlflow.MlflowClient, run) -> dict[str, list[float]]:
    return {
        key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key),
                                       key=lambda m: m.step)]
        for key in run.data.metrics
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def twin_runs(project: Path) -> dict[str, Any]:
    """The same parameters and seed run twice: in this process, then through the CLI."""
    first = run_finetune(project)
    before = _digests(project, first)
    cli = kedro_cli(project, "run", "--pipelines", "finetune", "--env", "test")
    assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
    return {
        "first": first,
        "digests_before": before,
        "cli": cli.stdout + cli.stderr,
    }


# --- 1. parameters ------------------------------------------------------------------------


def test_cli_prints_one_readable_message_for_bad_parameters(project: Path):
    result = kedro_cli(project, "run", "--pipeline", "finetune", "--env", "test",
                       "--params", "finetune.phase1.epochs=-1")
    assert result.returncode == 1
    assert "Error: Invalid parameters:\n  finetune.phase1.epochs: got -1;" in result.stderr
    assert "greater than or equal to 0" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "Mlflow run" not in result.stdout + result.stderr  # stopped before MLflow started


@pytest.mark.parametrize(
    "params, message",
    [
        ({"base": {"source": "keras_applications", "name": "MobileNetV9"}},
         r"finetune.base.name: got 'MobileNetV9'; .* Allowed: .*MobileNetV2, .*ResNet50"),
        ({"phase2": {"optimizer": "adamm"}},
         r"finetune.phase2.optimizer: got 'adamm'; unknown optimizer .*adam, adamw, rmsprop, sgd"),
        ({"data": {"batch_size": "many"}}, r"finetune.data.batch_size: got 'many'; .*integer"),
        ({"head": {"dropuot": 0.1}},
         r"finetune.head.dropuot: unknown key \(given 0.1\); allowed keys here: pooling, dense"),
    ],
)
def test_bad_parameters_stop_before_any_node(project: Path, params, message):
    from headswap.project.hooks import RunStopped

    runs, manifests = len(mlflow_runs(project)[1]), versions(project, MANIFEST)
    with pytest.raises(RunStopped, match=message):
        run_finetune(project, {"finetune": params})
    assert len(mlflow_runs(project)[1]) == runs  # stopped before an MLflow run started
    assert versions(project, MANIFEST) == manifests


# --- 2. image folders ---------------------------------------------------------------------


def test_faulty_files_are_skipped_listed_logged_and_counted(project: Path, twin_runs):
    client, runs = mlflow_runs(project)
    run = next(r for r in runs if r.data.tags["run_id"] == twin_runs["first"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["data.skipped_images"] == 6
    assert run.data.metrics["data.images"] == len(MESSY_CLASSES) * PER_CLASS
    folder = project / "data/02_intermediate/skipped_images.csv" / twin_runs["first"]
    skipped = pd.read_csv(folder / "skipped_images.csv")
    assert list(skipped.columns) == ["path", "reason"]
    assert sorted(Path(p).name for p in skipped["path"]) == sorted(
        ["empty.png", "scan.tiff", "truncated.jpg", "corrupt.PNG", "fake.gif", "truncated.png"]
    )
    logged = client.download_artifacts(
        run.info.run_id, "data/skipped_images.csv", str(folder.parent)
    )
    pd.testing.assert_frame_equal(pd.read_csv(logged), skipped)
    manifest = pd.read_csv(
        manifest_file(project, twin_runs["first"]),
        dtype=str, keep_default_na=False,
    )
    assert set(manifest["label"]) == set(MESSY_CLASSES)
    assert not set(manifest["path"]) & set(skipped["path"])
    report = client.download_artifacts(run.info.run_id, "reports/classification_report.json",
                                       str(folder.parent))
    assert set(MESSY_CLASSES) <= set(pd.read_json(report, typ="series").index)
    # what the user's terminal shows (the same run again, through the CLI)
    assert "Skipped 6 of 36 image files" in twin_runs["cli"]
    assert "truncated.jpg: cannot be decoded" in twin_runs["cli"]
    assert "Run summary: 30 images used, 6 image files skipped" in twin_runs["cli"]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: shutil.rmtree(p), "Image folder .* does not exist. Give finetune.data.path"),
        (lambda p: [shutil.rmtree(c) for c in p.iterdir()], "No images found"),
        (lambda p: [shutil.rmtree(p / c) for c in ("007", "filled circle")], "Only one class"),
        (lambda p: [f.unlink() for f in sorted((p / "007").glob("img*"))[:6]],
         r"Too few images .*'007' \(4 images\)"),
    ],
)
def test_unusable_folders_stop_before_training_and_fail_the_run(
    project: Path, tmp_path: Path, setup, message
):
    from headswap.project.hooks import RunStopped

    folder = Path(shutil.copytree(project / IMAGES, tmp_path / "images"))
    setup(folder)
    with pytest.raises(RunStopped, match="Node ingest_images stopped: " + message):
        run_finetune(project, {"finetune": {"data": {"path": str(folder)}}})
    failed = mlflow_runs(project)[1][-1]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["run_id"] not in versions(project, "data/06_models/phase1_model.keras")


# --- 3. reproducibility -------------------------------------------------------------------


def test_same_parameters_and_seed_give_the_same_split_and_metrics(project: Path, twin_runs):
    client, runs = mlflow_runs(project)
    tags = [r.data.tags["run_id"] for r in runs]
    first, second = runs[tags.index(twin_runs["first"])], runs[tags.index(twin_runs["first"]) + 1]
    assert second.data.tags["kedro_command"] == first.data.tags["kedro_command"]
    manifests = [manifest_file(project, r.data.tags["run_id"]).read_bytes()
                 for r in (first, second)]
    assert manifests[0] == manifests[1]
    assert first.data.params == second.data.params
    metrics = _metrics(client, first), _metrics(client, second)
    assert metrics[0].keys() == metrics[1].keys()
    assert {"epoch.loss", "epoch.val_accuracy", "test.accuracy"} <= metrics[0].keys()
    for key, values in metrics[0].items():
        if key.endswith(NOT_RESULTS):
            continue
        np.testing.assert_allclose(metrics[1][key], values, rtol=RTOL, atol=ATOL, err_msg=key)


def test_a_different_seed_gives_a_different_split(project: Path, twin_runs):
    version = run_finetune(project, {"finetune": {"seed": 8}}, to_nodes=["ingest_images"])
    test_paths = [
        set(pd.read_csv(manifest_file(project, v)).query("split == 'test'")["path"])
        for v in (twin_runs["first"], version)
    ]
    assert test_paths[0] != test_paths[1]


def test_a_manifest_is_reused_by_a_later_run(project: Path, twin_runs):
    source = f"{MANIFEST}/{twin_runs['first']}/manifest.csv"  # relative, as a user gives it
    version = run_finetune(
        project, {"finetune": {"seed": 99, "data": {"manifest": source, "path": "nowhere"}}},
        to_nodes=["ingest_images"],
    )
    reused = manifest_file(project, version)
    assert reused.read_bytes() == (project / source).read_bytes()


def test_a_reused_manifest_that_is_gone_or_lists_missing_images_stops_clearly(
    project: Path, twin_runs, tmp_path: Path
):
    from headswap.project.hooks import RunStopped

    with pytest.raises(RunStopped, match="manifest .*nowhere.csv .*does not exist"):
        run_finetune(project, {"finetune": {"data": {"manifest": str(tmp_path / "nowhere.csv")}}},
                     to_nodes=["ingest_images"])
    source = manifest_file(project, twin_runs["first"])
    manifest = pd.read_csv(source)
    manifest.loc[3, "path"] = f"{IMAGES}/007/moved away.png"
    manifest.to_csv(tmp_path / "stale.csv", index=False)
    with pytest.raises(RunStopped, match="1 of 30 images .* no longer exist.*moved away.png"):
        run_finetune(project, {"finetune": {"data": {"manifest": str(tmp_path / "stale.csv")}}},
                     to_nodes=["ingest_images"])
    assert [r.info.status for r in mlflow_runs(project)[1][-2:]] == ["FAILED", "FAILED"]


# --- 4. nothing lost ----------------------------------------------------------------------


def test_runs_are_versioned_and_never_overwrite_earlier_artifacts(project: Path, twin_runs):
    assert _digests(project, twin_runs["first"]) == twin_runs["digests_before"]
    for relative in (MANIFEST, "data/02_intermediate/skipped_images.csv",
                     "data/06_models/phase2_model.keras",
                     "data/08_reporting/classification_report.json"):
        assert len(versions(project, relative)) >= 2, relative


def test_a_failure_in_a_later_stage_keeps_earlier_artifacts_and_fails_the_run(
    project: Path, twin_runs
):
    from headswap.project.hooks import RunStopped

    # a user's error, so one readable message (the CLI prints it as one Error: line)
    with pytest.raises(RunStopped, match=r"Node fine_tune stopped: No base layer named "
                                         r"\['no_such_layer'\]. Base layers: rescale, conv1"):
        run_finetune(project, {"finetune": {"phase2": {"train": {"names": ["no_such_layer"]}}}})
    client, runs = mlflow_runs(project)
    failed = runs[-1]
    assert failed.info.status == "FAILED"
    version = failed.data.tags["run_id"]
    for relative in (MANIFEST, "data/06_models/base_model.keras",
                     "data/06_models/phase1_model.keras",
                     "data/07_model_output/phase1_history.json"):
        assert version in versions(project, relative), relative
    assert version not in versions(project, "data/06_models/phase2_model.keras")
    artifacts = {a.path for a in client.list_artifacts(failed.info.run_id, "data")}
    assert "data/manifest.csv" in artifacts
    assert _digests(project, twin_runs["first"]) == twin_runs["digests_before"]


def test_an_unreachable_tracking_server_stops_the_run_before_anything(project: Path):
    from headswap.project.hooks import RunStopped

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    (project / "conf" / "unreachable").mkdir()
    (project / "conf" / "unreachable" / "mlflow.yml").write_text(
        yaml.safe_dump({"server": {"mlflow_tracking_uri": uri}})
    )
    manifests = versions(project, MANIFEST)
    start = time.monotonic()
    with pytest.raises(RunStopped, match=f"MLflow tracking server {uri} cannot be reached"):
        run_finetune(project, env="unreachable")
    assert time.monotonic() - start < 30
    assert versions(project, MANIFEST) == manifests
    result = kedro_cli(project, "run", "--pipelines", "finetune", "--env", "unreachable")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"Error: The MLflow tracking server {uri} cannot be reached" in result.stderr
    assert "conf/unreachable/mlflow.yml" in result.stderr


def _signal_state(pid: int) -> str:
    """The signal masks of a process (blocked, ignored, caught), as Linux reports them."""
    status = Path(f"/proc/{pid}/status")
    lines = status.read_text().splitlines() if status.exists() else []
    return " ".join(line for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def _as_from_a_shell() -> None:
    """In the child, before it runs: Ctrl-C's signal handled and delivered as a shell starts a
    command (a test process may have inherited SIGINT ignored or blocked, as under CI)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def test_an_interrupted_run_is_marked_killed_and_keeps_its_artifacts(project: Path, twin_runs):
    """Ctrl-C in the middle of phase 1 of a ``kedro run``: the run exits with an error, its
    MLflow run is KILLED, what it saved before training is kept and no phase-1 model is
    written. The interrupt is sent once the log shows phase 1's second epoch ending (out of
    so many that the phase cannot end first), so it always lands mid-phase."""
    epochs = 100_000
    # With `training.verbose: epochs`, each epoch's end is logged ("phase1: epoch <n>/<total>").
    second_epoch = re.compile(rf"phase1: epoch 2/{epochs} ")
    log = project / "interrupted.log"
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONUNBUFFERED": "1"}
    earlier_runs = {run.info.run_id for run in mlflow_runs(project)[1]}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "kedro", "run", "--pipelines", "finetune", "--env", "test",
             "--params", f"finetune.phase1.epochs={epochs},finetune.training.verbose=epochs"],
            cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=_as_from_a_shell,
        )
        try:
            deadline = time.monotonic() + 240
            while not second_epoch.search(log.read_text(errors="replace")):
                assert process.poll() is None, (
                    f"exited with {process.returncode} before phase 1's second epoch:\n"
                    + log.read_text(errors="replace")[-3000:]
                )
                assert time.monotonic() < deadline, (
                    "phase 1's second epoch did not start within 240 s:\n"
                    + log.read_text(errors="replace")[-3000:]
                )
                time.sleep(0.2)
            states = _signal_state(process.pid)
            process.send_signal(signal.SIGINT)
            try:
                # A bound, not a wait: in about 1 of 150 tries TensorFlow holds the process's
                # main thread for 17-75 s after a Ctrl-C, freeing a tf.data iterator.
                returncode = process.wait(timeout=300)
            except subprocess.TimeoutExpired:
                pytest.fail(f"kedro run went on after Ctrl-C; its signal state: {states}; "
                            "its log:\n" + log.read_text(errors="replace")[-3000:])
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    output = log.read_text(errors="replace")[-3000:]
    assert returncode != 0, output
    new_runs = [run for run in mlflow_runs(project)[1] if run.info.run_id not in earlier_runs]
    assert len(new_runs) == 1, output
    interrupted = new_runs[0]
    assert interrupted.data.params["finetune.phase1.epochs"] == str(epochs), output
    assert interrupted.info.status == "KILLED", output
    version = interrupted.data.tags["run_id"]
    assert version in versions(project, MANIFEST), output
    assert version in versions(project, "data/06_models/headswapped_model.keras"), output
    phase1_models = versions(project, "data/06_models/phase1_model.keras")
    assert twin_runs["first"] in phase1_models  # where an uninterrupted run writes it
    assert version not in phase1_models, output
