"""The README's "Your own images, in three steps", run exactly as written, in a fresh copy of
the project that never ran the example: an RGB folder of JPEG, PNG and WebP photos of mixed
sizes, a Keras base file of the user's in the Keras guide's shape (a keras.applications
network nested as one layer, with its own classifier on top), settings in conf/local/, then
`kedro run` and `kedro run --pipeline predict`."""

from __future__ import annotations

import re
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import (
    COLOURS,
    copy_project,
    kedro_cli,
    mlflow_runs,
    small_base,
    versions,
    write_photos,
)
from tests.documented import run_documented

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_steps() -> tuple[str, list[str]]:
    """The YAML block and the commands of the README's "Your own images, in three steps"."""
    text = README.read_text()
    section = text.split("## Your own images, in three steps", 1)[1].split("\n## ", 1)[0]
    settings = re.findall(r"```yaml\n(.*?)```", section, re.S)
    commands = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(settings) == 1 and len(commands) == 2, "the section's blocks changed"
    return settings[0], [c.strip() for c in commands]


def guide_shaped_base(path: Path) -> Path:
    """A user's model as the Keras transfer-learning guide builds it: input, rescaling, a
    keras.applications network as one layer, pooling, dropout, its own 10-class classifier."""
    inputs = keras.Input((224, 224, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    app = keras.applications.MobileNetV2(input_shape=(224, 224, 3), include_top=False,
                                         weights=None, alpha=0.35)
    x = app(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    keras.Model(inputs, outputs).save(path)
    return path


@pytest.fixture(scope="module")
def user_project(tmp_path_factory):
    """A fresh project copy, the user's photos and base, the README's steps run in it."""
    root = tmp_path_factory.mktemp("user")
    project = copy_project(root / "project")
    flowers = root / "flowers"
    write_photos(flowers, per_class=16, seed=0)
    new = write_photos(root / "new_photos", per_class=3, seed=1, flat=True)
    base = guide_shaped_base(root / "my_base.keras")
    settings, commands = readme_steps()
    settings = settings.replace("/data/flowers", str(flowers))
    settings = settings.replace("/models/my_base.keras", str(base))
    # one key more than the README's, as a user may add: a short phase 2 keeps the suite fast
    settings += "  phase2: {epochs: 3}\n"
    assert yaml.safe_load(settings)["finetune"]["phase2"] == {"epochs": 3}
    (project / "conf" / "local" / "parameters_finetune.yml").write_text(settings)
    results = []
    for command, replace in zip(commands, ({}, {"/data/new_photos": str(root / "new_photos")}),
                                strict=True):
        results.append(run_documented(project, command, replace, env=None, timeout=900))
    return project, flowers, new, results


def test_kedro_run_trains_the_configured_folder_on_the_configured_base(user_project):
    project, flowers, _, (run, _) = user_project
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # model after model run on small splits, none traced twice: TensorFlow warns of nothing
    assert "triggered tf.function retracing" not in run.stdout + run.stderr
    version = versions(project, "data/02_intermediate/manifest.csv")[-1]
    manifest = pd.read_csv(project / "data/02_intermediate/manifest.csv" / version /
                           "manifest.csv", dtype=str)
    assert len(manifest) == 3 * 16
    assert all(path.startswith(str(flowers)) for path in manifest["path"])
    assert set(manifest["label"]) == set(COLOURS)
    assert not (project / "data/01_raw/fashion-mnist-target").exists()  # no example trained
    report = (project / "data/08_reporting/classification_report.txt" / version /
              "classification_report.txt").read_text()
    assert all(name in report for name in COLOURS)
    card = (project / "data/08_reporting/model_card.md" / version / "model_card.md").read_text()
    assert card.startswith("# Model card: flowers")
    assert "my_base.keras" in card


def test_the_run_and_the_registered_model_name_what_was_trained(user_project):
    project = user_project[0]
    client, runs = mlflow_runs(project)  # kedro run, then the predict run
    names = [run.data.tags["mlflow.runName"] for run in runs]
    assert names == ["finetune - my_base - flowers", "predict - latest fine-tuned model - "
                                                     "new_photos"]
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    versions_ = client.search_model_versions("name='flowers'")
    assert [v.run_id for v in versions_] == [runs[0].info.run_id]


def test_the_base_was_cut_below_the_users_own_classifier(user_project):
    project = user_project[0]
    version = versions(project, "data/06_models/base_model.keras")[-1]
    base = keras.saving.load_model(project / "data/06_models/base_model.keras" / version /
                                   "base_model.keras", compile=False)
    assert len(base.outputs[0].shape) == 4  # a feature map: pooling and Dense(10) cut off
    phase2 = keras.saving.load_model(
        project / "data/06_models/phase2_model.keras" / version / "phase2_model.keras",
        compile=False)
    assert phase2.outputs[0].shape[-1] == len(COLOURS)


def test_predict_classifies_the_new_photos(user_project):
    project, _, new, (_, predict) = user_project
    assert predict.returncode == 0, predict.stdout[-3000:] + predict.stderr[-3000:]
    version = versions(project, "data/07_model_output/predictions.csv")[-1]
    table = pd.read_csv(project / "data/07_model_output/predictions.csv" / version /
                        "predictions.csv", dtype={"path": str})
    assert sorted(table["path"]) == sorted(map(str, new))
    assert set(table["top_1"]) <= set(COLOURS)
    assert set(table["predicted"]) <= {*COLOURS, "unknown"}  # below min_confidence
    assert "true" not in table  # a flat folder: nothing to score against


def test_plain_kedro_run_without_settings_says_what_to_set(tmp_path: Path):
    project = copy_project(tmp_path / "project")
    result = kedro_cli(project, "run")
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines()
              if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "finetune.base.path is not set" in errors[0] or "finetune.data.path" in errors[0]
    assert "conf/local/parameters_finetune.yml" in errors[0]
    assert "Traceback" not in result.stderr


def test_a_csv_of_paths_and_labels_trains_and_predict_scores_it(tmp_path: Path):
    """A CSV instead of folders: relative paths from the CSV's folder, an optional split
    column; predict on a labelled CSV writes the classification report."""
    project = copy_project(tmp_path / "project")
    photos = write_photos(tmp_path / "photos" / "all", per_class=12, seed=2, flat=True)
    rows = [{"path": str(p.relative_to(tmp_path / "photos")), "label": p.name.split("_")[0]}
            for p in photos]
    pd.DataFrame(rows).to_csv(tmp_path / "photos" / "labels.csv", index=False)
    base = small_base(tmp_path / "base.keras")
    settings = {"finetune": {  # data.path and base.path: on the command line below
        "data": {"image_size": 48, "resize": "pad"},
        "phase1": {"epochs": 5}, "phase2": {"epochs": 2},
        "export": {"formats": []},
    }}
    (project / "conf/local/parameters_finetune.yml").write_text(yaml.safe_dump(settings))
    run = run_documented(  # docs/your-own-data.md's command
        project, 'kedro run --params '
                 '"finetune.data.path=/data/flowers,finetune.base.path=/models/my_base.keras"',
        replace={"/data/flowers": str(tmp_path / "photos" / "labels.csv"),
                 "/models/my_base.keras": str(base)}, env=None, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    version = versions(project, "data/02_intermediate/manifest.csv")[-1]
    manifest = pd.read_csv(project / "data/02_intermediate/manifest.csv" / version /
                           "manifest.csv", dtype=str)
    assert sorted(manifest["path"]) == sorted(map(str, photos))
    assert set(manifest["split"]) == {"train", "val", "test"}
    predict = kedro_cli(project, "run", "--pipeline", "predict", "--params",
                        f"predict.path={tmp_path / 'photos' / 'labels.csv'}", timeout=900)
    assert predict.returncode == 0, predict.stderr[-3000:]
    version = versions(project, "data/08_reporting/prediction_report.txt")[-1]
    report = (project / "data/08_reporting/prediction_report.txt" / version /
              "prediction_report.txt").read_text()
    assert "accuracy" in report and all(name in report for name in COLOURS)
    # predict reads images as training did (resize: pad): the test images get the run's own
    # probabilities
    run_version = versions(project, "data/06_models/preprocessing.json")[-1]
    how = project / "data/06_models/preprocessing.json" / run_version / "preprocessing.json"
    assert yaml.safe_load(how.read_text())["resize"] == "pad"
    card = (project / "data/08_reporting/model_card.md" / run_version / "model_card.md")
    assert "resized to 48x48 keeping the aspect ratio, with black bands" in card.read_text()
    tested = pd.read_csv(project / "data/08_reporting/test_predictions.csv" / run_version /
                         "test_predictions.csv").set_index("path")
    predicted = pd.read_csv(project / "data/07_model_output/predictions.csv" /
                            versions(project, "data/07_model_output/predictions.csv")[-1] /
                            "predictions.csv").set_index("path").loc[tested.index]
    columns = [f"p[{name}]" for name in sorted(COLOURS)]
    assert np.abs(tested[columns].to_numpy() - predicted[columns].to_numpy()).max() < 1e-4
