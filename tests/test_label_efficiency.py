"""The ``label_efficiency`` pipeline: the nested labelled subsets, and the pipeline at test size
(counts 3 and 6, conf/test) through a real KedroSession and MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from headswap.core.manifests import labelled_subset
from headswap.core.sources import DataError
from headswap.pipelines import label_efficiency
from headswap.pipelines.compare.pipeline import VARIANTS
from tests.conftest import copy_project, run_sessions
from tests.documented import run_documented_session
from tests.test_compare import _latest

pytestmark = pytest.mark.slow

COUNTS = (3, 6)


def _manifest(train: dict[str, int], val: dict[str, int], test: int = 7) -> pd.DataFrame:
    """A manifest (no image files needed) with the given train and val images per class."""
    rows = [(f"{split}/{label}/{i:03d}.png", label, split)
            for split, sizes in (("train", train), ("val", val))
            for label, n in sizes.items() for i in range(n)]
    rows += [(f"test/{label}/{i:03d}.png", label, "test") for label in train for i in range(test)]
    return pd.DataFrame(rows, columns=["path", "label", "split"]).sample(frac=1, random_state=0)


def _labelled(subset: pd.DataFrame) -> set[str]:
    return set(subset.loc[subset["split"] != "test", "path"])


def test_subsets_are_nested_stratified_and_keep_the_split_and_the_test_images():
    # "coat" has a larger validation share than the others: each class keeps its own
    manifest = _manifest({"bag": 240, "coat": 200, "shirt": 240}, {"bag": 60, "coat": 100,
                                                                    "shirt": 60})
    subsets = {n: labelled_subset(manifest, n, seed=3) for n in (10, 30, 100, 300)}
    for n, subset in subsets.items():
        labelled = subset[subset["split"] != "test"]
        assert labelled.groupby("label").size().to_dict() == {"bag": n, "coat": n, "shirt": n}
        val = labelled[labelled["split"] == "val"].groupby("label").size()
        assert val["bag"] == val["shirt"] == round(n * 0.2) and val["coat"] == round(n / 3)
        # rows come unchanged from the manifest; the test split is all of it, untouched
        assert set(map(tuple, subset.to_numpy())) <= set(map(tuple, manifest.to_numpy()))
        test = subset[subset["split"] == "test"]
        assert sorted(test["path"]) == sorted(manifest.loc[manifest["split"] == "test", "path"])
    assert _labelled(subsets[10]) < _labelled(subsets[30]) < _labelled(subsets[100])
    assert _labelled(subsets[100]) < _labelled(subsets[300]) == _labelled(manifest)


def test_subsets_are_seeded_samples_not_the_first_files():
    manifest = _manifest({"bag": 80, "coat": 80}, {"bag": 20, "coat": 20})
    first = labelled_subset(manifest, 10, seed=1)
    assert first.equals(labelled_subset(manifest.sample(frac=1, random_state=5), 10, seed=1))
    assert _labelled(first) != _labelled(labelled_subset(manifest, 10, seed=2))
    firsts_by_name = {f"{s}/{c}/{i:03d}.png" for s, k in (("train", 8), ("val", 2))
                      for c in ("bag", "coat") for i in range(k)}
    assert _labelled(first) != firsts_by_name
    # the smallest count still has a training and a validation image of each class
    two = labelled_subset(manifest, 2, seed=1)
    assert two.groupby(["label", "split"]).size().loc[(slice(None), ["train", "val"])].eq(1).all()


def test_too_few_labelled_images_name_the_class_the_count_and_the_fix():
    manifest = _manifest({"bag": 80, "coat": 20}, {"bag": 20, "coat": 5})
    with pytest.raises(DataError, match=r"Class 'coat' has 25 labelled .* 30 per class were "
                                        r"asked for\. Ask for at most 25 per class, or add"):
        labelled_subset(manifest, 30)
    with pytest.raises(DataError, match="at least 2 are needed"):
        labelled_subset(manifest, 1)


def test_counts_are_checked_when_the_pipeline_is_built():
    for counts in ((1, 10), (10, 10, 30), ()):
        with pytest.raises(ValueError, match="distinct integers of at least 2.*pipeline_registry"):
            label_efficiency.create_pipeline(labels_per_class=counts)
    names = {n.name for n in label_efficiency.create_pipeline(labels_per_class=(30, 10)).nodes}
    assert {"labels_10.select_labels", "labels_30.full.train", "collect_counts"} <= names


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project where ``data`` + ``pretrain`` ran, then ``label_efficiency`` with
    the counts 3 and 6 (the registry's counts set before the session; env test)."""
    path = copy_project(tmp_path_factory.mktemp("label_efficiency"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(label_efficiency, "LABELS_PER_CLASS", COUNTS)
        run_sessions(path, ["data", "pretrain"])
        run_documented_session(path, "kedro run --pipeline label_efficiency")
    return path


def test_the_long_table_has_every_count_and_variant_with_sane_numbers(project: Path):
    table = pd.read_csv(_latest(project, "data/08_reporting/label_efficiency.csv"))
    assert list(table.columns) == ["labels_per_class", "variant", "test_accuracy", "macro_f1",
                                   "trainable_params", "wall_time_s"]
    assert list(zip(table["labels_per_class"], table["variant"], strict=True)) == [
        (n, v) for n in COUNTS for v in VARIANTS]
    assert table["test_accuracy"].between(0, 1).all() and table["macro_f1"].between(0, 1).all()
    assert (table["wall_time_s"] > 0).all() and (table["trainable_params"] > 0).all()
    # the architectures do not depend on the count
    assert (table.groupby("variant")["trainable_params"].nunique() == 1).all()
    # each count's rows are that count's comparison table
    for n in COUNTS:
        per_count = pd.read_csv(
            _latest(project, f"data/08_reporting/label_efficiency/labels_{n}/comparison.csv"))
        rows = table[table["labels_per_class"] == n].drop(columns="labels_per_class")
        pd.testing.assert_frame_equal(rows.reset_index(drop=True), per_count)
    # the pretrained features carry over even from 6 labels per class (chance: 0.2)
    best = table[table["labels_per_class"] == COUNTS[-1]].set_index("variant")
    assert best.loc["feature_extraction", "test_accuracy"] > 0.3

    records = json.loads(_latest(project, "data/08_reporting/label_efficiency.json").read_text())
    assert pd.DataFrame(records).equals(table)
    markdown = _latest(project, "data/08_reporting/label_efficiency.md").read_text().splitlines()
    assert markdown[0].startswith("| labels_per_class | variant | test_accuracy")
    assert len(markdown) == 2 + len(COUNTS) * len(VARIANTS)
    png = _latest(project, "data/08_reporting/label_efficiency.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_the_counts_train_on_nested_subsets_of_one_folder_and_test_on_all_of_it(project: Path):
    folder = json.loads(_latest(project, "data/01_raw/label_efficiency_folder.json").read_text())
    assert set(folder["train"].values()) == {COUNTS[-1]}
    full = pd.read_csv(_latest(project, "data/02_intermediate/manifest.csv"))
    subsets = {n: pd.read_csv(_latest(
        project, f"data/02_intermediate/label_efficiency/labels_{n}/manifest.csv"))
        for n in COUNTS}
    for n, subset in subsets.items():
        labelled = subset[subset["split"] != "test"]
        assert (labelled.groupby("label").size() == n).all()
        test = subset[subset["split"] == "test"].reset_index(drop=True)
        assert test.equals(full[full["split"] == "test"].reset_index(drop=True))
    assert _labelled(subsets[COUNTS[0]]) < _labelled(subsets[COUNTS[1]]) == _labelled(full)
    models = project / "data/06_models/label_efficiency/labels_3/full"
    assert (models / "fine_tuned_model.keras").is_dir()


def test_one_mlflow_run_per_count_with_one_per_variant_below_it(project: Path):
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("headswap").experiment_id])
    children = {}
    for run in runs:
        children.setdefault(run.data.tags.get("mlflow.parentRunId"), []).append(run)
    [parent] = [r for r in runs if r.info.run_name.startswith("label_efficiency - ")]
    assert parent.info.status == "FINISHED"
    per_count = {r.info.run_name: r for r in children[parent.info.run_id]}
    assert sorted(per_count) == sorted(f"labels_{n}" for n in COUNTS)
    table = pd.read_csv(_latest(project, "data/08_reporting/label_efficiency.csv"))
    for n in COUNTS:
        count_run = per_count[f"labels_{n}"]
        assert count_run.info.status == "FINISHED"
        assert count_run.data.metrics["data.labels_per_class"] == n
        assert count_run.data.metrics["data.test_images"] == 5000
        variants = {r.info.run_name: r for r in children[count_run.info.run_id]}
        assert sorted(variants) == sorted(f"labels_{n}.{v}" for v in VARIANTS)
        accuracy = table[table["labels_per_class"] == n].set_index("variant")["test_accuracy"]
        for variant in VARIANTS:
            run = variants[f"labels_{n}.{variant}"]
            assert run.info.status == "FINISHED"
            assert run.data.metrics["comparison.test_accuracy"] == pytest.approx(
                accuracy[variant])
        assert "finetune.phase1.epochs" in variants[f"labels_{n}.full"].data.params
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "label_efficiency")}
    assert {"label_efficiency/label_efficiency_table.csv",
            "label_efficiency/label_efficiency_plot.png"} <= artifacts
