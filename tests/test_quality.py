"""The data-quality checks on small real folders: duplicates, label issues, balance, report."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from headswap.core import fingerprints, quality
from headswap.core.manifests import ingest_image_folder
from headswap.core.train import class_weights

CLASSES = ("ant", "bee", "cat")
SPLIT_OF = {0: "train", 1: "train", 2: "train", 3: "train", 4: "val", 5: "test"}


def picture(seed: int, size: int = 64) -> Image.Image:
    """A smooth RGB picture of a few coloured blobs, different for every seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    pixels = np.zeros((size, size, 3))
    for _ in range(6):
        (cy, cx), spread = rng.random(2), rng.uniform(0.05, 0.25)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * spread**2))
        pixels += blob[..., None] * rng.uniform(0, 255, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype("uint8"))


def write(image: Image.Image, path: Path, **options) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return str(path)


@pytest.fixture
def clean(tmp_path: Path) -> pd.DataFrame:
    """A manifest of 18 distinct PNGs: 3 classes x 6 images (4 train, 1 val, 1 test)."""
    rows = []
    for c, label in enumerate(CLASSES):
        for k in range(6):
            path = write(picture(10 * c + k), tmp_path / label / f"{k}.png")
            rows.append((path, label, SPLIT_OF[k]))
    return pd.DataFrame(rows, columns=["path", "label", "split"])


def add(manifest: pd.DataFrame, path: str, label: str, split: str) -> pd.DataFrame:
    return pd.concat([manifest, pd.DataFrame([(path, label, split)], columns=manifest.columns)],
                     ignore_index=True)


def test_a_clean_folder_has_no_duplicates(clean):
    found = quality.find_duplicates(clean)
    assert found.empty
    assert list(found.columns) == quality.DUPLICATE_COLUMNS
    # nothing found anywhere: an empty findings table, a report without problems, a figure
    nothing = pd.DataFrame(columns=quality.LABEL_ISSUE_COLUMNS)
    skipped = pd.DataFrame(columns=["path", "reason"])
    table = quality.findings_table(skipped, found, nothing)
    assert table.empty and list(table.columns) == quality.FINDING_COLUMNS
    balance = quality.class_balance(clean)
    report = quality.quality_report(clean, skipped, found, nothing, balance)
    assert report["problems"] == [] and report["duplicate_pairs"] == 0
    assert isinstance(quality.quality_figure(balance[0], report), Figure)


def test_an_exact_copy_in_the_test_split_is_leakage(clean, tmp_path):
    source = clean.iloc[0]  # ant, train
    copy = tmp_path / "copies" / "ant_copy.png"
    copy.parent.mkdir()
    copy.write_bytes(Path(source.path).read_bytes())
    found = quality.find_duplicates(add(clean, str(copy), "ant", "test"))
    assert len(found) == 1
    row = found.iloc[0]
    assert (row.kind, row.scope, row.distance) == ("exact", "across_splits", 0)
    assert (row.path, row.split, row.other_path, row.other_split) == (
        source.path, "train", str(copy), "test")


def test_a_resized_jpeg_reencoding_is_a_near_duplicate(clean, tmp_path):
    source = clean.iloc[7]  # bee, train
    image = Image.open(source.path).resize((59, 59), Image.Resampling.BICUBIC)
    copy = write(image, tmp_path / "bee" / "again.jpg", quality=75)
    found = quality.find_duplicates(add(clean, copy, "bee", "train"))
    assert len(found) == 1
    row = found.iloc[0]
    assert (row.kind, row.scope) == ("near", "within_class")
    assert {row.path, row.other_path} == {source.path, copy}
    assert 0 <= row.distance <= fingerprints.NEAR_DISTANCE
    assert quality.find_duplicates(add(clean, copy, "bee", "train"), near_distance=-1).empty


def test_a_copy_under_another_label_is_a_conflict_and_a_problem(clean, tmp_path):
    source = clean.iloc[13]  # cat, train
    copy = tmp_path / "ant" / "stray.png"
    copy.write_bytes(Path(source.path).read_bytes())
    manifest = add(clean, str(copy), "ant", "train")
    found = quality.find_duplicates(manifest)
    assert found[["kind", "scope", "label", "other_label"]].values.tolist() == [
        ["exact", "conflicting_labels", "ant", "cat"]]
    table, summary = quality.class_balance(manifest)
    empty = pd.DataFrame(columns=["path", "reason"])
    report = quality.quality_report(manifest, empty, found, pd.DataFrame(
        columns=quality.LABEL_ISSUE_COLUMNS), summary)
    assert report["conflicting_label_pairs"] == 1 and report["leakage_pairs"] == 0
    assert report["duplicates"]["exact"]["conflicting_labels"] == 1
    assert len(report["problems"]) == 1 and "conflicting labels" in report["problems"][0]
    json.dumps(report)


def test_copies_across_labels_and_splits_show_every_conflict_and_leak(clean, tmp_path):
    raw = Path(clean.iloc[0].path).read_bytes()  # ant, train
    manifest = clean
    for name, label, split in (("a", "ant", "train"), ("b", "ant", "test"), ("c", "bee", "val")):
        (tmp_path / name).write_bytes(raw)
        manifest = add(manifest, str(tmp_path / name), label, split)
    found = quality.find_duplicates(manifest)
    # 4 copies, 3 (label, split) combinations: 1 within + 3 between the combinations
    assert len(found) == 4 and found["group"].nunique() == 1
    assert found["scope"].value_counts().to_dict() == {
        "conflicting_labels": 2, "across_splits": 1, "within_class": 1}
    assert (found["split"] != found["other_split"]).sum() == 3


def test_files_read_through_a_given_reader(clean):
    """``read`` gives the bytes of paths that are no local files (e.g. remote storage)."""
    store = {f"mem://{i}": Path(p).read_bytes() for i, p in enumerate(clean["path"])}
    buffer = io.BytesIO()
    Image.open(clean["path"][2]).save(buffer, format="JPEG", quality=80)
    store["mem://again"] = buffer.getvalue()
    manifest = add(clean.assign(path=list(store)[:-1]), "mem://again", "ant", "test")
    found = quality.find_duplicates(manifest, read=store.__getitem__)
    assert found[["kind", "scope", "path", "other_path"]].values.tolist() == [
        ["near", "across_splits", "mem://2", "mem://again"]]


def test_close_pairs_matches_a_direct_count():
    """Disagreeing bits among those both hashes hold reliably, scaled to 256 bits (at least
    64 compared)."""
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 256, (300, 64), dtype=np.uint8)
    hashes[100, 32] = 0xFF  # the first 8 sign bits reliable
    hashes[7] = hashes[100]
    hashes[7, 0] ^= 0b101  # two of them flipped
    bits = np.unpackbits(hashes, axis=1).astype(bool)
    signs, reliable = bits[:, :256], bits[:, 256:]
    both = reliable[:, None, :] & reliable[None, :, :]
    differ = ((signs[:, None, :] != signs[None, :, :]) & both).sum(axis=2)
    direct = differ * 256 / np.maximum(both.sum(axis=2), 64)
    i, j = np.nonzero(np.triu(direct <= 120, k=1))
    found = fingerprints.close_pairs(hashes, 120)
    assert found[:, :2].astype(int).tolist() == sorted([a, b] for a, b in zip(i, j, strict=True))
    np.testing.assert_allclose(found[:, 2], direct[i, j])
    assert [7, 100] in found[:, :2].astype(int).tolist()
    assert direct[7, 100] == 2 * 256 / reliable[7].sum()  # both flipped bits reliable


def test_label_issues_rank_a_mislabelled_cluster_first():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    features = np.concatenate([rng.normal(c, 0.7, (60, 2)) for c in centres])
    labels = np.repeat(list(CLASSES), 60)
    wrong = np.arange(5)  # five "ant" images labelled "cat"
    labels[wrong] = "cat"
    manifest = pd.DataFrame({"path": [f"img{i}.png" for i in range(180)], "label": labels,
                             "split": "train"})
    issues = quality.find_label_issues(manifest, features, seed=0)
    assert list(issues.columns) == quality.LABEL_ISSUE_COLUMNS
    assert set(issues["path"].head(5)) == {f"img{i}.png" for i in wrong}
    assert (issues["suggested"].head(5) == "ant").all()
    assert issues["score"].is_monotonic_decreasing
    assert len(issues) == 5
    with pytest.raises(ValueError, match="one feature row per image"):
        quality.find_label_issues(manifest, features[:-1], seed=0)


def test_class_balance_uses_the_training_class_weights():
    counts = {("ant", "train"): 30, ("bee", "train"): 10, ("cat", "train"): 5,
              ("ant", "val"): 6, ("bee", "val"): 2, ("cat", "val"): 1, ("ant", "test"): 4}
    manifest = pd.DataFrame([(f"{label}/{split}{k}.png", label, split)
                             for (label, split), n in counts.items() for k in range(n)],
                            columns=["path", "label", "split"])
    table, summary = quality.class_balance(manifest)
    train = manifest[manifest["split"] == "train"]["label"].map(
        {n: i for i, n in enumerate(CLASSES)}).to_numpy()
    expected = class_weights(train, list(CLASSES), "balanced")
    assert table["weight"].tolist() == [expected[i] for i in range(3)]
    assert table[["label", "train", "val", "test", "total"]].values.tolist() == [
        ["ant", 30, 6, 4, 40], ["bee", 10, 2, 0, 12], ["cat", 5, 1, 0, 6]]
    mean_weight = sum(table["weight"] * table["train"]) / table["train"].sum()
    assert mean_weight == pytest.approx(1.0)
    assert summary["imbalance_ratio"] == 6.0
    assert (summary["largest_class"], summary["smallest_class"]) == ("ant", "cat")
    assert summary["missing"] == {"train": [], "val": [], "test": ["bee", "cat"]}
    json.dumps(summary)


def test_report_table_and_figure_of_an_ingested_folder(tmp_path):
    folder = tmp_path / "images"
    for c, label in enumerate(CLASSES):
        for k in range(10):
            write(picture(100 + 10 * c + k), folder / label / f"{k}.png")
    (folder / "bee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "cat" / "9.png").unlink()
    (folder / "cat" / "9.png").write_bytes((folder / "ant" / "0.png").read_bytes())
    manifest, skipped = ingest_image_folder(folder, 0.2, 0.2, seed=0)
    assert skipped["path"].str.endswith("broken.png").tolist() == [True]

    found = quality.find_duplicates(manifest)
    features = np.random.default_rng(0).normal(size=(len(manifest), 4))
    issues = quality.find_label_issues(manifest, features, seed=0, folds=3)
    table, summary = quality.class_balance(manifest)
    report = quality.quality_report(manifest, skipped, found, issues, (table, summary))
    json.dumps(report)
    assert report["unreadable"] == 1 and report["images"] == 30
    assert report["conflicting_label_pairs"] == 1
    assert any("conflicting labels" in p for p in report["problems"])
    assert any("unreadable" in w for w in report["warnings"])

    findings = quality.findings_table(skipped, found, issues)
    assert list(findings.columns) == quality.FINDING_COLUMNS
    assert findings["finding"].value_counts().to_dict() == {
        "exact_duplicate": 1, "unreadable": 1, **({"label_issue": len(issues)} if len(issues)
                                                   else {})}
    assert findings["severity"].iloc[0] == "problem"
    assert quality.findings_table(pd.DataFrame(), found.iloc[:0], issues.iloc[:0]).empty

    figure = quality.quality_figure(table, report)
    assert isinstance(figure, Figure) and len(figure.axes) == 2
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    assert Image.open(buffer).size[0] > 800


@pytest.mark.slow
def test_kedro_run_with_quality_stop_ends_before_training_on_leakage(tmp_path: Path):
    """A user's folder with one training photo copied into test/ (leakage), and
    `finetune.data.quality=stop` on the command line: `kedro run` ends with one Error line
    pointing at the findings, which are saved, and trains nothing."""
    from tests.conftest import copy_project, kedro_cli, small_base

    folder = tmp_path / "photos"
    for c, name in enumerate(CLASSES):
        for i in range(12):
            split = "test" if i >= 8 else "train"
            (folder / split / name).mkdir(parents=True, exist_ok=True)
            picture(100 * c + i).save(folder / split / name / f"{name}_{i}.png")
    leaked = folder / "train" / "bee" / "bee_3.png"
    (folder / "test" / "bee" / "copy_of_bee_3.png").write_bytes(leaked.read_bytes())
    project = copy_project(tmp_path / "project")
    base = small_base(tmp_path / "base.keras")
    result = kedro_cli(project, "run", "--env", "test", "--params",
                       f"finetune.data.path={folder},finetune.base.path={base},"
                       "finetune.data.image_size=48,finetune.data.quality=stop")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "across splits" in errors[0], result.stderr[-3000:]
    assert "data_quality_findings.csv" in errors[0] and "finetune.data.quality" in errors[0]
    findings = next((project / "data/08_reporting/data_quality_findings.csv").glob("*/*.csv"))
    table = pd.read_csv(findings)
    leak = table[table["scope"] == "across_splits"]
    assert {Path(p).name for p in leak[["path", "other_path"]].to_numpy().ravel()} == {
        "bee_3.png", "copy_of_bee_3.png"}
    assert not (project / "data/06_models/phase1_model.keras").exists()  # nothing trained


def test_class_weight_auto_weighs_only_imbalanced_classes():
    balanced = np.repeat([0, 1, 2], [10, 12, 11])
    assert class_weights(balanced, list(CLASSES), "auto") is None
    skewed = np.repeat([0, 1, 2], [30, 10, 10])
    assert class_weights(skewed, list(CLASSES), "auto") == class_weights(
        skewed, list(CLASSES), "balanced")
