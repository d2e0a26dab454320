"""Shared fixtures: small real image folders and small real models, made by the tests."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
# gcsfs asks a gRPC control API for a bucket's layout first; the local GCS server speaks only
# the JSON API that the plain GCSFileSystem uses.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import keras
import mlflow
import numpy as np
import pytest
from PIL import Image

CLASSES = ("circle", "square", "stripes")


@contextlib.contextmanager
def variable_kept(name: str):
    """Leave the environment variable ``name`` as the block found it (set or not)."""
    before = os.environ.get(name)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@pytest.fixture(autouse=True, scope="module")
def _tracking_uri_variable_kept():
    """``mlflow.set_tracking_uri`` (which several modules call for their project's store) also
    writes ``MLFLOW_TRACKING_URI`` into this process's environment, which every later
    subprocess (``kedro run``, servers) would inherit: each module leaves it as it found it."""
    with variable_kept("MLFLOW_TRACKING_URI"):
        yield


@pytest.fixture(autouse=True, scope="session")
def _cache_of_the_session(tmp_path_factory):
    """Remote images and the memo of decodable files go to a folder of the test session (the
    runs and servers the tests start inherit it), not to the user's ``~/.cache/headswap``; a
    test that needs its own cache sets ``HEADSWAP_CACHE`` itself."""
    with variable_kept("HEADSWAP_CACHE"):
        os.environ["HEADSWAP_CACHE"] = str(tmp_path_factory.mktemp("headswap-cache"))
        yield


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


def kill_in_phase2(command: list[str], project: Path, env: dict[str, str]) -> None:
    """Run a finetune ``command`` in ``project`` and kill it (SIGKILL) once phase 2 has backed
    up an epoch in the resume folder; fail if it ends before."""
    state = project / "data/05_model_input/resume"
    process = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while process.poll() is None:
            assert time.monotonic() < deadline, "phase 2 never backed up an epoch"
            if list(state.glob("*/phase2_stage1/backup/epoch-*")):
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it was killed"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, below the ephemeral range:
    kedro-viz refuses ports above 49151, and a port there is not handed out to clients."""
    rng = random.Random()
    for _ in range(500):
        port = rng.randint(20000, 49151)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("No free TCP port on 127.0.0.1 between 20000 and 49151.")


SERVER_TIMEOUT_S = 120


def answers(url: str) -> bool:
    """Whether ``url`` answers HTTP 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def serve(command: list[str], cwd: Path, ready: str, log: Path,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a server (its own process group, unbuffered output to ``log``); return once
    ``ready`` answers HTTP 200, or fail the test with the log's end."""
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=cwd, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + SERVER_TIMEOUT_S
    while not answers(ready):
        if server.poll() is not None or time.monotonic() > deadline:
            stop(server)
            pytest.fail(f"{' '.join(command)} did not start:\n" + log.read_text()[-3000:])
        time.sleep(0.5)
    return server


def stop(server: subprocess.Popen) -> None:
    """Stop a server started by :func:`serve` and wait for it; its worker processes (same
    process group) that outlive it are killed, so that nothing answers on its port after."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    with contextlib.suppress(ProcessLookupError):  # the group is empty: all are gone
        os.killpg(server.pid, signal.SIGKILL)


def browser_page(url: str, expected: list[str] = (), attempts: int = 3) -> str:
    """The DOM of ``url`` once headless Chromium (Debian's package) has run its scripts: loaded
    again (up to ``attempts`` times) until it holds every text of ``expected``, for a page
    whose scripts had not finished rendering on a busy machine."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is missing: `make install-test` installs Debian's chromium."
    for _ in range(attempts):
        page = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
             "--virtual-time-budget=30000", "--dump-dom", url],
            capture_output=True, text=True, timeout=120, check=True).stdout
        if all(text in page for text in expected):
            break
    return page


#: The classes of the users' photo folders (:func:`write_photos`) and their colours.
COLOURS = {"poppy": (200, 40, 40), "fern": (40, 170, 60), "iris": (60, 70, 210)}


def write_photos(folder: Path, per_class: int, seed: int, flat: bool = False) -> list[Path]:
    """RGB photos of each class (its colour and noise), mixed sizes, JPEG/PNG/WebP; every
    other JPEG is stored turned, with the EXIF orientation tag (6) that turns it back, as a
    phone camera stores a portrait photo."""
    rng = np.random.default_rng(seed)
    written = []
    for name, colour in COLOURS.items():
        for i in range(per_class):
            height, width = (int(v) for v in rng.integers(60, 160, 2))
            pixels = (np.array(colour)[None, None] + rng.normal(0, 45, (height, width, 3)))
            image = Image.fromarray(pixels.clip(0, 255).astype("uint8"))
            fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
            target = (folder if flat else folder / name) / f"{name}_{i:03d}.{ext}"
            target.parent.mkdir(parents=True, exist_ok=True)
            if fmt == "JPEG" and i % 2:
                exif = Image.Exif()
                exif[0x0112] = 6  # shown turned 90 degrees clockwise
                image.transpose(Image.Transpose.ROTATE_90).save(target, format=fmt, exif=exif)
            else:
                image.save(target, format=fmt)
            written.append(target)
    return written


def small_base(path: Path) -> Path:
    """A small functional CNN of the user's, taking 48x48 RGB images."""
    inputs = keras.Input((48, 48, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, activation="softmax")(x)
    keras.Model(inputs, outputs).save(path)
    return path


def gcs_server(folder: Path) -> tuple[str, subprocess.Popen]:
    """A Google Cloud Storage server (gcp-storage-emulator) on 127.0.0.1, in memory, started
    in ``folder`` (its log there): its endpoint URL and process (stop it with :func:`stop`)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = serve([sys.executable, "-m", "gcp_storage_emulator", "start", "--host",
                     "127.0.0.1", "--port", str(port), "--in-memory"], folder,
                    f"{endpoint}/storage/v1/b", folder / "gcs.log")
    return endpoint, process


def s3_server(folder: Path) -> tuple[str, subprocess.Popen]:
    """moto's S3 server on 127.0.0.1, started in ``folder`` (its log there): its endpoint URL
    and process (stop it with :func:`stop`)."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    process = serve([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                     endpoint.rsplit(":", 1)[1]], folder, f"{endpoint}/moto-api/",
                    folder / "moto.log")
    return endpoint, process
