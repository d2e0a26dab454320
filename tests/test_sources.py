"""Where images live (headswap.core.sources): CSV listings, folder layouts, and the local cache
remote images are read through, on fsspec's in-memory file system (a real fsspec store with
URLs, as s3:// is; the S3 server itself is exercised in test_remote_storage.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import fsspec
import pandas as pd
import pytest
from PIL import Image

from headswap.core import data, manifests, sources
from tests.conftest import CLASSES, make_image_folder


def _csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_a_csv_gives_labels_and_splits_with_paths_read_from_its_folder(tmp_path: Path):
    folder = make_image_folder(tmp_path / "images", per_class=10)
    rows = [{"path": str(p.relative_to(tmp_path)), "label": p.parent.name.upper(),
             "split": "Test" if p.stem.endswith(("0", "1")) else "train"}
            for p in sorted(folder.rglob("*.png"))]
    rows.append({"path": str(tmp_path / "elsewhere" / "scan.tiff"), "label": "X", "split": ""})
    source = sources.open_images(str(_csv(tmp_path / "labels.csv", rows)))
    assert source.name == "labels"
    assert all(Path(p).is_file() for p in source.files["path"])
    assert [Path(p).name for p in source.skipped["path"]] == ["scan.tiff"]
    manifest, skipped = manifests.ingest(source, val_fraction=0.25, seed=0)
    assert set(manifest["label"]) == {p.name.upper() for p in folder.iterdir()}
    test = manifest[manifest["split"] == "test"]
    classes = len(CLASSES)
    assert len(test) == 2 * classes
    assert all(Path(p).stem.endswith(("0", "1")) for p in test["path"])
    assert (manifest["split"] == "val").sum() == 2 * classes  # carved out of train, stratified
    assert list(skipped["path"]) == [str(tmp_path / "elsewhere" / "scan.tiff")]


@pytest.mark.parametrize(("rows", "message"), [
    ([{"file": "a.png", "label": "x"}], r"lacks the column\(s\) \['path'\]"),
    ([{"path": "a.png", "label": "x", "split": "holdout"}], r"split values \['holdout'\]"),
])
def test_a_csv_that_cannot_be_used_says_why(tmp_path: Path, rows, message):
    with pytest.raises(sources.DataError, match=message):
        sources.open_images(str(_csv(tmp_path / "bad.csv", rows)))


def test_a_missing_folder_or_csv_says_what_to_give(tmp_path: Path):
    for missing in (tmp_path / "nowhere", tmp_path / "nowhere.csv"):
        with pytest.raises(sources.MissingDataError, match="does not exist.*path,label"):
            sources.open_images(str(missing))


def _memory_folder(root: str, per_class: int = 6) -> fsspec.AbstractFileSystem:
    """``memory://<root>/<class>/img_<i>.png`` written from a local image folder."""
    fs = fsspec.filesystem("memory")
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        for i in range(per_class):
            with fs.open(f"{root}/{name}/img_{i}.png", "wb") as file:
                Image.new("RGB", (12 + i, 10), colour).save(file, format="PNG")
    fs.pipe(f"{root}/red/broken.jpg", b"not a jpeg")
    fs.pipe(f"{root}/.hidden/x.png", b"")
    return fs


def test_remote_images_are_fetched_once_into_the_cache_and_again_when_they_change(
    tmp_path: Path, monkeypatch, caplog
):
    monkeypatch.setenv("HEADSWAP_CACHE", str(tmp_path / "cache"))
    fs = _memory_folder("/store/flowers")
    source = sources.open_images("memory://store/flowers")
    assert source.remote and source.name == "flowers"
    assert sorted(set(source.files["label"])) == ["blue", "red"]
    with caplog.at_level(logging.INFO, logger="headswap.core.sources"):
        manifest, skipped = manifests.ingest(source, 0.2, 0.2, seed=0)
    assert "Fetching 13 of 13 images" in caplog.text
    assert all(p.startswith("memory://") for p in manifest["path"])
    assert [p.rsplit("/", 1)[1] for p in skipped["path"]] == ["broken.jpg"]
    cached = sources.local_paths(manifest["path"])
    assert all(Path(p).is_file() and str(tmp_path / "cache") in p for p in cached)
    # the same images through the training input: from the cached copies
    images, labels = next(iter(data.make_dataset(manifest, "train", (8, 8), 3, 64)))
    assert images.shape[1:] == (8, 8, 3) and len(labels) == (manifest["split"] == "train").sum()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="headswap.core.sources"):
        manifests.ingest(sources.open_images("memory://store/flowers"), 0.2, 0.2, seed=0)
    assert "Fetching" not in caplog.text  # a second run reads the cache alone

    first = manifest["path"].iloc[0]
    with fs.open(first.split("://", 1)[1], "wb") as file:
        Image.new("RGB", (30, 30), (0, 255, 0)).save(file, format="PNG")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="headswap.core.sources"):
        manifests.ingest(sources.open_images("memory://store/flowers"), 0.2, 0.2, seed=0)
    assert "Fetching 1 of 13 images" in caplog.text  # only the object that changed
    with Image.open(sources.local_paths([first])[0]) as image:
        assert image.size == (30, 30)


def test_an_image_folder_dataset_saves_without_touching_other_files(tmp_path: Path):
    from headswap.project.datasets import ImageFolderDataset

    (tmp_path / "own").mkdir(parents=True)
    (tmp_path / "own" / "keep.txt").write_text("the user's")
    ImageFolderDataset(str(tmp_path)).save({"a/x.png": b"1"})
    assert (tmp_path / "own" / "keep.txt").read_text() == "the user's"
    ImageFolderDataset(str(tmp_path / "generated"), overwrite=True).save({"a/x.png": b"1"})
    ImageFolderDataset(str(tmp_path / "generated"), overwrite=True).save({"b/y.png": b"2"})
    assert [p.name for p in (tmp_path / "generated").rglob("*.png")] == ["y.png"]


def test_a_local_folder_is_listed_as_rglob_lists_it(tmp_path: Path, monkeypatch):
    """The listing gives the files ``sorted(Path.rglob("*"))`` gives, in its order, with
    links to files followed and links to folders, broken links and link loops left out."""
    root = tmp_path / "images"
    for name in ("b c/y.png", "a/x.png", "a/sub/z.png", "A/w.png", ".hidden/q.png", "a/0.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (root / "a" / "link.png").symlink_to(root / "a" / "x.png")
    (root / "linked_folder").symlink_to(root / "a")
    (root / "a" / "broken.png").symlink_to(tmp_path / "nowhere.png")
    (root / "a" / "loop.png").symlink_to(root / "a" / "loop.png")
    expected = [(str(p), list(p.relative_to(root).parts), "")
                for p in sorted(root.rglob("*")) if p.is_file()]
    assert sources._walk(str(root)) == expected
    assert sources._walk(f"{root}/") == expected
    assert [parts for _, parts, _ in expected] == [
        [".hidden", "q.png"], ["A", "w.png"], ["a", "0.png"], ["a", "link.png"],
        ["a", "sub", "z.png"], ["a", "x.png"], ["b c", "y.png"]]
    monkeypatch.chdir(root)  # the working folder itself: paths as Path gives them, "a/x.png"
    assert sources._walk(".") == [(str(Path(*parts)), parts, "") for _, parts, _ in expected]
