"""Using the fine-tuned model on the example: predict throughput, serving latency, exports.

In a throw-away copy of the project, ``kedro run --pipeline finetune`` trains the example's
model once (default parameters, MLflow on). Then:

- ``kedro run --pipeline predict`` on the 5,000 test images (wall time of the command), and
  the classifier alone on the same images (images/s, median of ``--repeats``), with their
  agreement with the run's ``test_predictions``;
- ``mlflow models serve`` of the run's ``model``: the latency of ``--requests`` REST
  requests of one base64-encoded image each (median, 90th percentile);
- the exports: file sizes, and the test accuracy of the quantized TFLite file next to the
  Keras model's;
- the cost that decided against kedro-mlflow's ``KedroPipelineModel`` for serving: its
  ``predict`` deep-copies its loaded catalog, Keras model included, on every call. The same
  one-image request through a one-node ``KedroPipelineModel`` and through this project's
  model, for the example's model and for MobileNetV2 at 96 px (random weights).

    python benchmarks/serving.py [--repeats 3] [--requests 50]
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import (
    ENV,
    EXAMPLE,
    argument_parser,
    kedro_command,
    latest_model_file,
    median,
    project_copy,
    run_measured,
    start,
    table,
    write_result,
)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))


def serve_latency(project: Path, model_uri: str, image: bytes, requests: int) -> list[float]:
    """Seconds per ``/invocations`` request of one base64 image, after one warm-up request."""
    port = free_port()
    env = {**os.environ, **ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
         "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
        [base64.b64encode(image).decode("ascii")]]}}).encode()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("mlflow models serve did not start") from None
                time.sleep(0.5)
        seconds = []
        for _ in range(requests + 1):
            request = urllib.request.Request(f"{url}/invocations", body,
                                             {"Content-Type": "application/json"})
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()
            seconds.append(time.perf_counter() - started)
        return seconds[1:]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def per_call(predict, frame, calls: int = 20) -> float:
    """Median seconds of ``predict(None, frame)`` over ``calls`` calls (after one)."""
    predict(None, frame)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        predict(None, frame)
        times.append(time.perf_counter() - started)
    return median(times)


def pipeline_model_against_ours(model, class_names: list[str], image_size, image: str,
                                tmp: Path) -> dict[str, float]:
    """One request through a one-node KedroPipelineModel and through ImageClassifierModel,
    both holding ``model``."""
    import pandas as pd
    from kedro.io import DataCatalog
    from kedro.pipeline import Node, Pipeline
    from kedro_datasets.json import JSONDataset
    from kedro_datasets.tensorflow import TensorFlowModelDataset
    from kedro_mlflow.mlflow import KedroPipelineModel
    from mlflow.pyfunc import PythonModelContext

    from headswap.core.predict import Classifier
    from headswap.project.serving import ImageClassifierModel

    model_file, labels_file = tmp / "model.keras", tmp / "classifier.json"
    model.save(model_file)
    labels_file.write_text(json.dumps({"class_names": class_names,
                                       "image_size": list(image_size)}))

    def classify(images: pd.DataFrame, keras_model, spec: dict) -> pd.DataFrame:
        classifier = Classifier(keras_model, tuple(spec["class_names"]),
                                tuple(spec["image_size"]))
        return classifier.predict(images["image"].tolist())[0]

    catalog = DataCatalog({"keras_model": TensorFlowModelDataset(filepath=str(model_file)),
                           "spec": JSONDataset(filepath=str(labels_file))})
    kpm = KedroPipelineModel(
        Pipeline([Node(classify, ["images", "keras_model", "spec"], "predictions")]),
        catalog, input_name="images")
    artifacts = {"keras_model": str(model_file), "spec": str(labels_file)}
    kpm.load_context(PythonModelContext(artifacts=artifacts, model_config={}))
    ours = ImageClassifierModel()
    ours.load_context(PythonModelContext(
        artifacts={"keras_model": str(model_file), "classifier": str(labels_file)},
        model_config={}))
    frame = pd.DataFrame({"image": [image]})
    return {"kedro_pipeline_model_ms": 1000 * per_call(kpm.predict, frame),
            "headswap_model_ms": 1000 * per_call(ours.predict, frame)}


def main() -> None:
    parser = argument_parser(__doc__, repeats=3)
    parser.add_argument("--requests", type=int, default=50)
    args, load_before = start(parser)

    import keras
    import numpy as np
    import pandas as pd

    from headswap.core import data
    from headswap.core.predict import Classifier
    from headswap.core.runtimes import tflite_predict

    with project_copy() as project:
        run_measured(kedro_command("run", "--pipeline", "finetune"), project).check("finetune")
        test_folder = Path("data") / "01_raw" / EXAMPLE.name / "test"  # as in test_predictions
        predicted = run_measured(kedro_command(
            "run", "--pipeline", "predict", "--params", f"predict.path={test_folder}"),
            project).check("predict")
        reports = project / "data" / "08_reporting"
        expected = pd.read_csv(latest_model_file(reports / "test_predictions.csv"),
                               dtype=str, keep_default_na=False)
        table_ = pd.read_csv(latest_model_file(project / "data/07_model_output/predictions.csv"),
                             dtype=str, keep_default_na=False)
        merged = expected.merge(table_, on="path", suffixes=("_eval", ""))
        agreement = float((merged["top_1"] == merged["predicted_eval"]).mean())

        model = keras.saving.load_model(
            latest_model_file(project / "data/06_models/calibrated_model.keras"))
        names = sorted(set(expected["true"]))
        classifier = Classifier(model, tuple(names))
        cwd = os.getcwd()
        os.chdir(project)  # the manifest's paths are relative to the project
        paths = expected["path"].tolist()
        timings = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            classifier.predict(paths)
            timings.append(time.perf_counter() - started)
        throughput = len(paths) / median(timings)

        runs = json.loads(subprocess.run(
            [sys.executable, "-c", "import mlflow, json; c = mlflow.MlflowClient("
             f"'sqlite:///{project / 'mlflow.db'}'); e = c.get_experiment_by_name('headswap'); "
             "print(json.dumps([r.info.run_id for r in c.search_runs([e.experiment_id], "
             "'tags.`mlflow.runName` LIKE \"finetune%\"')]))"],
            capture_output=True, text=True, check=True, env={**os.environ, **ENV}).stdout)
        image = (project / paths[0]).read_bytes()
        latency = serve_latency(project, f"runs:/{runs[0]}/model", image, args.requests)

        exports = latest_model_file(project / "data/06_models/exports")
        sizes = {name: sum(p.stat().st_size for p in (exports / name).rglob("*")
                           if p.is_file()) if (exports / name).is_dir()
                 else (exports / name).stat().st_size
                 for name in ("saved_model", "model.tflite", "model_quantized.tflite")}
        images = data.decode_all(np.asarray(paths), (28, 28), 1)
        truth = np.asarray([names.index(t) for t in expected["true"]])
        keras_accuracy = float((model.predict(images, batch_size=256, verbose=0)
                                .argmax(axis=1) == truth).mean())
        quantized_accuracy = float((tflite_predict(exports / "model_quantized.tflite", images,
                                                   batch_size=256).argmax(axis=1) == truth).mean())

        with tempfile.TemporaryDirectory() as tmp:
            small = pipeline_model_against_ours(model, names, (28, 28), paths[0], Path(tmp))
            photo = Path(tmp) / "photo.png"
            keras.utils.save_img(photo, np.random.default_rng(0).integers(
                0, 255, (96, 96, 3)).astype("uint8"))
            mobilenet = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3),
                                                       classes=5)
            large = pipeline_model_against_ours(mobilenet, names, (96, 96), str(photo),
                                                Path(tmp))
        os.chdir(cwd)

    print(table(["measure", "value"], [
        ["kedro run --pipeline predict, 5000 test images (s)", predicted.wall_s],
        ["classifier alone (images/s)", throughput],
        ["agreement with test_predictions", agreement],
        ["serve: median latency, one image (ms)", 1000 * median(latency)],
        ["serve: 90th percentile (ms)", 1000 * percentile(latency, 90)],
        *[[f"export size {name} (MB)", size / 1e6] for name, size in sizes.items()],
        ["test accuracy, Keras model", keras_accuracy],
        ["test accuracy, quantized TFLite", quantized_accuracy],
        ["KedroPipelineModel predict, example model (ms)", small["kedro_pipeline_model_ms"]],
        ["headswap model predict, example model (ms)", small["headswap_model_ms"]],
        ["KedroPipelineModel predict, MobileNetV2 96 px (ms)", large["kedro_pipeline_model_ms"]],
        ["headswap model predict, MobileNetV2 96 px (ms)", large["headswap_model_ms"]],
    ]))
    write_result("serving", {
        "predict_pipeline_wall_s": predicted.wall_s, "classifier_images_per_s": throughput,
        "agreement_with_test_predictions": agreement,
        "serve_latency_ms": {"median": 1000 * median(latency),
                             "p90": 1000 * percentile(latency, 90), "requests": len(latency)},
        "export_bytes": sizes, "test_accuracy_keras": keras_accuracy,
        "test_accuracy_quantized_tflite": quantized_accuracy,
        "predict_call_ms": {"example_model": small, "mobilenet_v2_96px": large},
    }, details={"classifier_timings_s": timings},
        libraries=["kedro-mlflow", "kedro-datasets", "pandas"], load_before=load_before)


if __name__ == "__main__":
    main()
