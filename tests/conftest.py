"""Shared fixtures: small real image folders and small real models, made by the tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")

import keras
import mlflow
import numpy as np
import pytest
from PIL import Image

CLASSES = ("circle", "square", "stripes")


def draw(kind: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A noisy grayscale picture of a filled circle, a filled square or horizontal stripes."""
    image = rng.normal(40, 15, (size, size))
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
    r = rng.integers(size // 6, size // 4)
    if kind == "circle":
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = 220
    elif kind == "square":
        image[cy - r : cy + r, cx - r : cx + r] = 220
    else:
        image[(yy // 3) % 2 == 0] = 220
    return np.clip(image, 0, 255).astype("uint8")


def make_image_folder(
    root: Path, per_class: int = 20, classes=CLASSES, seed: int = 0, size: int = 32
) -> Path:
    """``root/<class>/img_<i>.png`` with ``per_class`` images of each class."""
    rng = np.random.default_rng(seed)
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(draw(name, rng, size)).save(folder / f"img_{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


def small_cnn(input_shape=(32, 32, 1), num_classes: int = 4) -> keras.Model:
    """A small Functional CNN with BatchNormalization, like a user's own pretrained model."""
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1 / 255, name="rescale")(inputs)
    x = layers.Conv2D(8, 3, padding="same", name="conv1")(x)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU(name="relu1")(x)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Conv2D(16, 3, padding="same", name="conv2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU(name="features")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(32, activation="relu", name="fc")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="output")(x)
    return keras.Model(inputs, outputs, name="user_cnn")


def copy_project(path: Path) -> Path:
    """A copy of this project (conf/ without local settings, src/, pyproject.toml) at ``path``,
    to run real Kedro sessions in without touching the working tree."""
    root = Path(__file__).resolve().parents[1]
    for name in ("conf", "src"):
        shutil.copytree(root / name, path / name,
                        ignore=shutil.ignore_patterns("local", "__pycache__"))
    (path / "conf" / "local").mkdir()
    shutil.copy(root / "pyproject.toml", path)
    # An absolute SQLite URI for the test environment: MLflow caches one database engine per
    # URI string in a process, so a relative one would keep writing to the first copy's file.
    (path / "conf" / "test" / "mlflow.yml").write_text(
        f"server:\n  mlflow_tracking_uri: sqlite:///{path / 'mlflow.db'}\n"
    )
    return path


def run_sessions(path: Path, *runs: list[str] | None) -> None:
    """Run the project at ``path`` once per entry of ``runs`` (a list of pipeline names, or
    None for the default), each in its own KedroSession with env test, from that folder."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    cwd = os.getcwd()
    os.chdir(path)
    try:
        bootstrap_project(path)
        for pipelines in runs:
            with KedroSession.create(project_path=path, env="test") as session:
                session.run(pipeline_names=pipelines)
    finally:
        os.chdir(cwd)


def kedro_cli(project: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``kedro <args>`` in ``project``, output captured."""
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "kedro", *args], cwd=project, env=env, text=True,
        capture_output=True, timeout=timeout, check=False,
    )


def mlflow_runs(project: Path) -> tuple[mlflow.MlflowClient, list]:
    """The project's MLflow client and runs, oldest first."""
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("headswap")
    if experiment is None:
        return client, []
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return client, runs


def versions(project: Path, relative: str) -> list[str]:
    """The saved versions of a versioned dataset, oldest first."""
    folder = project / relative
    if not folder.is_dir():
        return []
    return sorted(v.name for v in folder.iterdir() if (v / folder.name).is_file())


def run_finetune(
    project: Path, params: dict[str, Any] | None = None, env: str = "test", **run_args: Any
) -> str:
    """Run the finetune pipeline in ``project`` through a real KedroSession; return the run
    version (the session id)."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    cwd = os.getcwd()
    os.chdir(project)
    try:
        bootstrap_project(project)
        with KedroSession.create(project_path=project, env=env, runtime_params=params) as session:
            session.run(pipeline_names=["finetune"], **run_args)
            return session.store["session_id"]
    finally:
        os.chdir(cwd)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
