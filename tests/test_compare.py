"""The ``compare`` pipeline at test size (conf/test), through a real KedroSession and MLflow.

A copy of the project prepares the example's folder and base (``data`` and ``pretrain``), then
runs ``compare``: five variants on one manifest and base, each in its nested MLflow run.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from headswap.pipelines.compare.pipeline import VARIANTS
from tests.conftest import copy_project, versions
from tests.documented import run_documented_session

pytestmark = pytest.mark.slow

CLASSES = 5


def _latest(project: Path, relative: str) -> Path:
    folder = project / relative
    return folder / versions(project, relative)[-1] / folder.name


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project where ``data``, ``pretrain``, then ``compare`` ran, each as the
    docs show it (env test)."""
    path = copy_project(tmp_path_factory.mktemp("compare"))
    run_documented_session(path, "kedro run --pipeline data")
    run_documented_session(path, "kedro run --pipeline pretrain")
    run_documented_session(path, "kedro run --pipeline compare")
    return path


def test_the_table_has_every_variant_with_sane_numbers(project: Path):
    table = pd.read_csv(_latest(project, "data/08_reporting/comparison.csv"))
    assert table["variant"].tolist() == list(VARIANTS)
    assert table["test_accuracy"].between(0, 1).all() and table["macro_f1"].between(0, 1).all()
    assert (table["wall_time_s"] > 0).all()
    row = table.set_index("variant")
    # What trains: all of the scratch model (BatchNormalization too) > the whole base with
    # frozen BatchNormalization > its top block > the head alone.
    params = row["trainable_params"]
    assert params["scratch"] > params["full"] > params["partial"] > params["head_only"] > 0
    # Logistic regression: one weight per feature and class, plus one intercept per class.
    assert params["feature_extraction"] % CLASSES == 0
    # The pretrained features carry the source task over: far better than chance (0.2).
    assert row.loc["feature_extraction", "test_accuracy"] > 0.4
    assert row.loc["full", "test_accuracy"] > 0.4

    records = json.loads(_latest(project, "data/08_reporting/comparison.json").read_text())
    assert pd.DataFrame(records).equals(table)
    markdown = _latest(project, "data/08_reporting/comparison.md").read_text().splitlines()
    assert markdown[0].startswith("| variant | test_accuracy")
    assert [line.split("|")[1].strip() for line in markdown[2:]] == list(VARIANTS)
    assert _latest(project, "data/08_reporting/comparison_curves.png").stat().st_size > 0
    for variant in ("head_only", "full", "scratch", "partial"):
        assert (project / f"data/06_models/compare/{variant}/fine_tuned_model.keras").is_dir()


def test_one_nested_mlflow_run_per_variant_under_the_compare_run(project: Path):
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("headswap")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.info.run_name.startswith("compare - ")]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(VARIANTS)
    table = pd.read_csv(_latest(project, "data/08_reporting/comparison.csv")).set_index("variant")
    for child in children:
        assert child.info.status == "FINISHED"
        metrics = child.data.metrics
        assert metrics["comparison.test_accuracy"] == pytest.approx(
            table.loc[child.info.run_name, "test_accuracy"])
        assert "finetune.phase1.epochs" in child.data.params
    scratch = next(c for c in children if c.info.run_name == "scratch")
    # one phase of its own phase-1 epochs (conf/test: 3) and the phase-2 epochs together
    assert scratch.data.params["finetune.phase1.epochs"] == str(
        3 + int(parent.data.params["finetune.phase2.epochs"]))
    full = next(c for c in children if c.info.run_name == "full")
    steps = client.get_metric_history(full.info.run_id, "comparison.val_accuracy")
    assert len(steps) == int(full.data.params["finetune.phase1.epochs"]) + int(
        full.data.params["finetune.phase2.epochs"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    assert {"compare/comparison_table.csv", "compare/comparison_curves_plot.png"} <= artifacts
