from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from headswap import data
from tests.conftest import CLASSES, make_image_folder


def test_class_folder_is_split_stratified_and_seeded(image_folder: Path):
    manifest = data.scan_image_folder(image_folder, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert list(manifest.columns) == ["path", "label", "split"]
    assert len(manifest) == 60 and manifest["path"].is_unique
    counts = manifest.groupby(["split", "label"]).size().unstack()
    assert (counts.loc["test"] == 4).all() and (counts.loc["val"] == 4).all()
    assert (counts.loc["train"] == 12).all()
    again = data.scan_image_folder(image_folder, val_fraction=0.2, test_fraction=0.2, seed=1)
    pd.testing.assert_frame_equal(manifest, again)
    other = data.scan_image_folder(image_folder, val_fraction=0.2, test_fraction=0.2, seed=2)
    test_paths = lambda m: set(m.loc[m["split"] == "test", "path"])  # noqa: E731
    assert test_paths(manifest) != test_paths(other)


def test_existing_train_test_layout_is_honoured_and_val_carved_from_train(tmp_path: Path):
    make_image_folder(tmp_path / "train", per_class=10)
    make_image_folder(tmp_path / "test", per_class=5, seed=9)
    manifest = data.scan_image_folder(tmp_path, val_fraction=0.2, seed=0)
    test = manifest[manifest["split"] == "test"]
    assert len(test) == 15 and test["path"].str.contains("/test/").all()
    assert (manifest.loc[manifest["split"] == "val", "path"].str.contains("/train/")).all()
    assert (manifest["split"] == "val").sum() == 6
    assert set(manifest["label"]) == set(CLASSES)


def test_hidden_and_non_image_files_are_ignored(image_folder: Path):
    (image_folder / "circle" / ".hidden.png").write_bytes(b"")
    (image_folder / "circle" / "notes.txt").write_text("not an image")
    (image_folder / ".cache").mkdir()
    manifest = data.scan_image_folder(image_folder)
    assert len(manifest) == 60


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "No images found"),
        (lambda p: make_image_folder(p, classes=("only",)), "at least two"),
        (lambda p: make_image_folder(p, per_class=3), "Too few images"),
    ],
)
def test_bad_folders_stop_with_a_clear_message(tmp_path: Path, setup, message):
    folder = tmp_path / "images"
    setup(folder)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        data.scan_image_folder(folder)


def test_dataset_streams_resized_images_with_the_model_channels(image_folder: Path, tmp_path):
    rgb = image_folder / "circle" / "rgb_big.jpg"
    Image.fromarray(np.full((50, 70, 3), 128, dtype="uint8")).save(rgb)
    manifest = data.scan_image_folder(image_folder, seed=0)
    manifest.loc[0, "path"] = str(rgb)
    for channels in (1, 3):
        batches = list(data.make_dataset(manifest, "train", (24, 24), channels, batch_size=8))
        images, labels = batches[0]
        assert images.shape == (8, 24, 24, channels) and images.dtype.name == "float32"
        assert float(images.numpy().max()) <= 255.0
        total = sum(int(b[1].shape[0]) for b in batches)
        assert total == (manifest["split"] == "train").sum()
    _, labels = data.split_arrays(manifest, "test")
    ordered = np.concatenate([y.numpy() for _, y in data.make_dataset(manifest, "test", (24, 24), 1, 5)])
    np.testing.assert_array_equal(ordered, labels)


def test_shuffled_order_depends_only_on_the_seed(image_folder: Path):
    manifest = data.scan_image_folder(image_folder, seed=0)

    def first_epoch(seed):
        ds = data.make_dataset(manifest, "train", (8, 8), 1, 64, shuffle=True, seed=seed)
        return np.concatenate([y.numpy() for _, y in ds])

    np.testing.assert_array_equal(first_epoch(3), first_epoch(3))
    assert sorted(first_epoch(3)) == sorted(first_epoch(4))
