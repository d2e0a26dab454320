import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from headswap.core import data, decodable, manifests, sources
from tests.conftest import CLASSES, make_image_folder
from tests.test_faults import MESSY_CLASSES, PER_CLASS, make_messy_folder


def test_class_folder_is_split_stratified_and_seeded(image_folder: Path):
    manifest, _ = manifests.ingest_image_folder(image_folder, val_fraction=0.2, test_fraction=0.2,
                                           seed=1)
    assert list(manifest.columns) == ["path", "label", "split"]
    assert len(manifest) == 60 and manifest["path"].is_unique
    counts = manifest.groupby(["split", "label"]).size().unstack()
    assert (counts.loc["test"] == 4).all() and (counts.loc["val"] == 4).all()
    assert (counts.loc["train"] == 12).all()
    again = manifests.ingest_image_folder(image_folder, val_fraction=0.2, test_fraction=0.2,
                                          seed=1)[0]
    pd.testing.assert_frame_equal(manifest, again)
    other = manifests.ingest_image_folder(image_folder, val_fraction=0.2, test_fraction=0.2,
                                          seed=2)[0]
    def test_paths(m):
        return set(m.loc[m["split"] == "test", "path"])

    assert test_paths(manifest) != test_paths(other)


def test_existing_train_test_layout_is_honoured_and_val_carved_from_train(tmp_path: Path):
    make_image_folder(tmp_path / "train", per_class=10)
    make_image_folder(tmp_path / "test", per_class=5, seed=9)
    manifest = manifests.ingest_image_folder(tmp_path, val_fraction=0.2, seed=0)[0]
    test = manifest[manifest["split"] == "test"]
    assert len(test) == 15 and test["path"].str.contains("/test/").all()
    assert (manifest.loc[manifest["split"] == "val", "path"].str.contains("/train/")).all()
    assert (manifest["split"] == "val").sum() == 6
    assert set(manifest["label"]) == set(CLASSES)


def test_hidden_and_non_image_files_are_ignored(image_folder: Path):
    (image_folder / "circle" / ".hidden.png").write_bytes(b"")
    (image_folder / "circle" / "notes.txt").write_text("not an image")
    (image_folder / ".cache").mkdir()
    manifest = manifests.ingest_image_folder(image_folder)[0]
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
        manifests.ingest_image_folder(folder)[0]


def test_dataset_streams_resized_images_with_the_model_channels(image_folder: Path, tmp_path):
    rgb = image_folder / "circle" / "rgb_big.jpg"
    Image.fromarray(np.full((50, 70, 3), 128, dtype="uint8")).save(rgb)
    manifest = manifests.ingest_image_folder(image_folder, seed=0)[0]
    manifest.loc[0, "path"] = str(rgb)
    for channels in (1, 3):
        batches = list(data.make_dataset(manifest, "train", (24, 24), channels, batch_size=8))
        images, labels = batches[0]
        assert images.shape == (8, 24, 24, channels) and images.dtype.name == "float32"
        assert float(images.numpy().max()) <= 255.0
        total = sum(int(b[1].shape[0]) for b in batches)
        assert total == (manifest["split"] == "train").sum()
    _, labels = manifests.split_arrays(manifest, "test")
    test = data.make_dataset(manifest, "test", (24, 24), 1, 5)
    ordered = np.concatenate([y.numpy() for _, y in test])
    np.testing.assert_array_equal(ordered, labels)


def test_shuffled_order_depends_only_on_the_seed(image_folder: Path):
    manifest = manifests.ingest_image_folder(image_folder, seed=0)[0]

    def first_epoch(seed):
        ds = data.make_dataset(manifest, "train", (8, 8), 1, 64, shuffle=True, seed=seed)
        return np.concatenate([y.numpy() for _, y in ds])

    np.testing.assert_array_equal(first_epoch(3), first_epoch(3))
    assert sorted(first_epoch(3)) == sorted(first_epoch(4))


# --- image folders as users have them ----------------------------------------------------


def test_every_format_and_colour_mode_is_read_and_faulty_files_are_listed(tmp_path: Path):
    folder, faulty = make_messy_folder(tmp_path / "images")
    manifest, skipped = manifests.ingest_image_folder(folder, seed=0)
    assert set(manifest["label"]) == set(MESSY_CLASSES)
    assert len(manifest) == len(MESSY_CLASSES) * PER_CLASS
    assert not manifest["path"].str.contains(r"/\.|notes\.txt").any()
    reasons = dict(zip(skipped["path"], skipped["reason"], strict=True))
    assert {Path(p).name for p in reasons} == set(faulty)
    for path, reason in reasons.items():
        assert faulty[Path(path).name] in reason, (path, reason)
    # Every image the manifest keeps streams through tf.data with either channel count.
    for channels in (1, 3):
        for split in sources.SPLITS:
            images = np.concatenate(
                [x.numpy() for x, _ in data.make_dataset(manifest, split, (20, 24), channels, 7)]
            )
            assert images.shape == ((manifest["split"] == split).sum(), 20, 24, channels)
            assert images.min() >= 0.0 and images.max() <= 255.0


def test_decoding_converts_channels_the_same_way_for_every_mode(tmp_path: Path):
    gray = np.arange(48, dtype="uint8").reshape(6, 8) * 5
    rgb = np.stack([gray, gray // 2, 255 - gray], axis=-1)
    paths = {}
    for name, image in {
        "gray.png": Image.fromarray(gray),
        "gray_alpha.png": Image.fromarray(gray).convert("LA"),
        "rgb.bmp": Image.fromarray(rgb),
        "rgba.png": Image.fromarray(rgb).convert("RGBA"),
    }.items():
        paths[name] = str(tmp_path / name)
        image.save(paths[name])

    def read(name: str, channels: int) -> np.ndarray:
        return data.decode_image(tf.constant(paths[name]), (6, 8), channels).numpy()

    for name in ("gray.png", "gray_alpha.png"):
        np.testing.assert_array_equal(read(name, 1)[..., 0], gray)
        np.testing.assert_array_equal(read(name, 3), np.repeat(gray[..., None], 3, axis=-1))
    np.testing.assert_array_equal(read("rgba.png", 3), rgb)
    np.testing.assert_array_equal(read("rgb.bmp", 1), read("rgba.png", 1))
    expected_gray = rgb @ np.array([0.2989, 0.587, 0.114])
    np.testing.assert_allclose(read("rgb.bmp", 1)[..., 0], expected_gray, atol=1.0)


def test_a_class_left_too_small_by_faulty_files_stops_before_training(tmp_path: Path):
    folder = make_image_folder(tmp_path / "images", per_class=6)
    for i in range(2):
        (folder / "circle" / f"img_{i:03d}.png").write_bytes(b"")
    with pytest.raises(sources.DataError, match=r"Too few images.*'circle' \(4 images\)"):
        manifests.ingest_image_folder(folder)


def test_only_faulty_files_stop_with_the_reason(tmp_path: Path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(b"not a png")
    with pytest.raises(sources.DataError, match="No images found .* that can be read"):
        manifests.ingest_image_folder(tmp_path)


# --- reusing a manifest ------------------------------------------------------------------


def test_a_saved_manifest_is_reused_as_it_is(image_folder: Path, tmp_path: Path):
    manifest = manifests.ingest_image_folder(image_folder, seed=3)[0]
    file = tmp_path / "manifest.csv"
    manifest.to_csv(file, index=False)
    again, skipped = manifests.load_manifest(file)
    pd.testing.assert_frame_equal(again, manifest)
    assert skipped.empty and list(skipped.columns) == sources.SKIPPED_COLUMNS


def test_the_catalogs_images_with_a_manifest_reuse_its_split(image_folder: Path, tmp_path):
    from headswap.project.datasets import ImageFolderDataset

    manifest = manifests.ingest_image_folder(image_folder, seed=3)[0]
    file = tmp_path / "manifest.csv" / "2024-01-01T00.00.00.000Z" / "manifest.csv"
    file.parent.mkdir(parents=True)
    manifest.to_csv(file, index=False)
    images = ImageFolderDataset(str(image_folder), manifest=str(file)).load()
    again, skipped = manifests.ingest(images, seed=4)  # another seed: the split is still the file's
    pd.testing.assert_frame_equal(again, manifest)
    assert images.name == image_folder.name and skipped.empty
    with pytest.raises(sources.MissingDataError, match="versioned folder.*2024-01-01"):
        manifests.ingest(ImageFolderDataset(None, manifest=str(tmp_path / "manifest.csv")).load())


def test_a_reused_manifest_skips_images_that_no_longer_decode(image_folder: Path, tmp_path):
    manifest = manifests.ingest_image_folder(image_folder, seed=3)[0]
    broken = manifest.loc[manifest["split"] == "test", "path"].iloc[0]
    Path(broken).write_bytes(Path(broken).read_bytes()[:30])
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    again, skipped = manifests.load_manifest(tmp_path / "manifest.csv")
    assert skipped["path"].tolist() == [broken] and "cannot be decoded" in skipped["reason"][0]
    assert len(again) == len(manifest) - 1 and broken not in set(again["path"])


def test_a_missing_manifest_or_missing_images_stop_with_the_fix(image_folder: Path, tmp_path):
    with pytest.raises(sources.MissingDataError, match="does not exist.*`manifest`"):
        manifests.load_manifest(tmp_path / "nowhere.csv")
    versioned = tmp_path / "manifest.csv"
    file = versioned / "2024-01-01T00.00.00.000Z" / "manifest.csv"
    file.parent.mkdir(parents=True)
    manifests.ingest_image_folder(image_folder)[0].to_csv(file, index=False)
    with pytest.raises(sources.MissingDataError, match="versioned folder.*2024-01-01"):
        manifests.load_manifest(versioned)
    (image_folder / "square" / "img_000.png").unlink()
    with pytest.raises(sources.MissingDataError, match=r"1 of 60 images .* no longer exist"):
        manifests.load_manifest(file)


def test_manifest_labels_that_look_like_numbers_stay_text(tmp_path: Path):
    folder = make_image_folder(tmp_path / "images", classes=("007", "NA", "1.5"), per_class=5)
    manifests.ingest_image_folder(folder)[0].to_csv(tmp_path / "manifest.csv", index=False)
    manifest, _ = manifests.load_manifest(tmp_path / "manifest.csv")
    assert manifests.class_names(manifest) == ["007", "1.5", "NA"]


# --- order and in-memory caching ---------------------------------------------------------


def _batches(dataset) -> tuple[np.ndarray, np.ndarray, list[int]]:
    images, labels, sizes = [], [], []
    for x, y in dataset:
        images.append(x.numpy())
        labels.append(y.numpy())
        sizes.append(len(y))
    return np.concatenate(images), np.concatenate(labels), sizes


@pytest.mark.parametrize("cache", [0, 2**30], ids=["streamed", "in-memory"])
def test_training_data_runs_epoch_after_epoch_each_in_its_seeded_order(
    image_folder: Path, cache: int
):
    manifest = manifests.ingest_image_folder(image_folder, seed=0)[0]
    n = int((manifest["split"] == "train").sum())
    steps = -(-n // 5)
    epoch = tf.Variable(2, dtype=tf.int64)  # the trainer sets the first epoch

    def dataset(seed: int = 7):
        return data.make_dataset(manifest, "train", (8, 8), 1, 5, shuffle=True, seed=seed,
                                 epoch=epoch, cache_bytes=cache)

    iterator = iter(dataset())
    by_epoch = {}
    for e in (2, 3, 4):  # one iterator, as Keras keeps it across epochs
        batches = [next(iterator) for _ in range(steps)]
        by_epoch[e] = _batches(batches)
    # each epoch is whole (its last batch short), a permutation, reshuffled every epoch
    assert by_epoch[2][2] == [5] * (n // 5) + ([n % 5] if n % 5 else [])
    assert all(sorted(by_epoch[e][1]) == sorted(by_epoch[2][1]) for e in (3, 4))
    assert not np.array_equal(by_epoch[2][1], by_epoch[3][1])
    epoch.assign(3)  # a run resumed at epoch 3 starts at epoch 3's order: the same epochs
    resumed = iter(dataset())
    for e in (3, 4):
        np.testing.assert_array_equal(_batches([next(resumed) for _ in range(steps)])[0],
                                      by_epoch[e][0])
    other_seed = iter(dataset(seed=8))
    assert not np.array_equal(_batches([next(other_seed) for _ in range(steps)])[1],
                              by_epoch[3][1])


@pytest.mark.parametrize(
    "order",
    [{}, {"shuffle": True}, {"shuffle": True, "epoch": 3}],
)
def test_cached_images_give_the_same_batches_as_streamed_ones(image_folder: Path, order):
    manifest = manifests.ingest_image_folder(image_folder, seed=0)[0]
    if "epoch" in order:
        order = {**order, "epoch": tf.Variable(order["epoch"], dtype=tf.int64)}
    steps = -(-int((manifest["split"] == "train").sum()) // 4)
    streamed, cached = (  # with an epoch: two epochs of the endless stream
        _batches(data.make_dataset(manifest, "train", (12, 10), 3, 4, seed=5, cache_bytes=budget,
                                   **order).take(2 * steps))
        for budget in (0, 2**30)
    )
    np.testing.assert_array_equal(streamed[0], cached[0])
    np.testing.assert_array_equal(streamed[1], cached[1])
    assert streamed[2] == cached[2]


def test_images_are_kept_in_memory_only_when_the_split_fits_the_budget(
    image_folder: Path, caplog
):
    manifest = manifests.ingest_image_folder(image_folder, seed=0)[0]
    n = int((manifest["split"] == "train").sum())
    size = data.decoded_bytes(n, (16, 16), 1)
    assert size == n * 16 * 16 * 4
    assert data.fits_in_memory(n, (16, 16), 1, size)
    assert not data.fits_in_memory(n + 1, (16, 16), 1, size)
    assert not data.fits_in_memory(1, (16, 16), 1, 0)  # 0: never cache
    assert not data.fits_in_memory(10 * n, (16, 16), 1, 5 * size)  # a tenfold folder streams
    with caplog.at_level("INFO", logger="headswap.core.data"):
        kept = data.make_dataset(manifest, "train", (16, 16), 1, 8, cache_bytes=size)
        streamed = data.make_dataset(manifest, "train", (16, 16), 1, 8, cache_bytes=size - 1)
    assert f"Keeping the {n} decoded train images in memory" in caplog.text
    assert f"Streaming the {n} train images from disk" in caplog.text
    expected = _batches(kept)[0]
    for path in manifest.loc[manifest["split"] == "train", "path"]:
        Path(path).unlink()
    np.testing.assert_array_equal(_batches(kept)[0], expected)  # decoded once, kept
    with pytest.raises(tf.errors.NotFoundError):
        _batches(streamed)  # read from disk at every pass


def test_every_input_pipeline_runs_without_the_autotuner(image_folder: Path):
    # with tf.data's autotuner on, a pass often ends only at its next wake-up, seconds late
    manifest = manifests.ingest_image_folder(image_folder, seed=0)[0]
    n = int((manifest["split"] == "train").sum())
    epoch = tf.Variable(0, dtype=tf.int64)
    budget = data.decoded_bytes(n, (16, 16), 1)
    arrays = (np.zeros((n, 4), "float32"), np.zeros(n, "int32"))
    pipelines = {
        "streamed": data.make_dataset(manifest, "train", (16, 16), 1, 8),
        "streamed, shuffled": data.make_dataset(manifest, "train", (16, 16), 1, 8, shuffle=True),
        "streamed, epoch after epoch": data.make_dataset(
            manifest, "train", (16, 16), 1, 8, shuffle=True, epoch=epoch),
        "in memory": data.make_dataset(manifest, "train", (16, 16), 1, 8, cache_bytes=budget),
        "arrays": data.array_dataset(arrays, 8),
        "arrays, shuffled": data.array_dataset(arrays, 8, shuffle=True),
        "arrays, epoch after epoch": data.array_dataset(arrays, 8, shuffle=True, epoch=epoch),
    }
    for name, dataset in pipelines.items():
        assert dataset.options().autotune.enabled is False, name
    # each pass still gives every image
    assert sum(len(labels) for _, labels in pipelines["streamed"]) == n
    assert sum(len(labels) for _, labels in pipelines["streamed, shuffled"]) == n


def test_streamed_batches_hold_each_image_as_decode_image_reads_it(tmp_path: Path):
    """Plain RGB JPEGs take the short way through the tf.data graph; EXIF-turned JPEGs and
    gray, gray + alpha and RGBA PNGs the EXIF and channel steps: all as read one by one."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(10):
        pixels = rng.integers(0, 256, (18 + i, 30 - i, 3), dtype="uint8")
        image, name = Image.fromarray(pixels), f"img_{i}"
        if i % 5 == 0:
            file = tmp_path / f"{name}.jpg"
            image.save(file)
        elif i % 5 == 1:
            exif = Image.Exif()
            exif[0x0112] = 5 + i % 4
            file = tmp_path / f"{name}.jpg"
            image.save(file, exif=exif)
        else:
            file = tmp_path / f"{name}.png"
            image.convert(("L", "LA", "RGBA")[i % 5 - 2]).save(file)
        rows.append((str(file), ("a", "b")[i % 2], "train"))
    manifest = pd.DataFrame(rows, columns=["path", "label", "split"])
    for channels in (1, 3):
        streamed = _batches(data.make_dataset(manifest, "train", (12, 10), channels, 4))[0]
        one_by_one = np.stack([data.decode_image(tf.constant(path), (12, 10), channels).numpy()
                               for path in manifest["path"]])
        np.testing.assert_array_equal(streamed, one_by_one)


def test_each_epochs_order_is_the_index_shuffle_of_the_seed_and_epoch(image_folder: Path):
    """The order a resumed run relies on: position i of epoch e reads row
    index_shuffle(i, seed=(seed, e)) of the split, streamed or kept in memory."""
    manifest = manifests.ingest_image_folder(image_folder, seed=0)[0]
    _, labels = manifests.split_arrays(manifest, "train")
    n = len(labels)
    order = tf.random.experimental.index_shuffle(
        tf.range(n, dtype=tf.int64), seed=tf.constant([7, 3], tf.int64), max_index=n - 1)
    for cache in (0, 2**30):
        dataset = data.make_dataset(manifest, "train", (8, 8), 1, 5, shuffle=True, seed=7,
                                    epoch=tf.Variable(3, dtype=tf.int64), cache_bytes=cache)
        got = _batches(dataset.take(-(-n // 5)))[1]
        np.testing.assert_array_equal(got, labels[order.numpy()])


def test_the_example_pretrains_on_a_seeded_sample_of_each_source_class():
    from headswap.pipelines.data.nodes import extract_source_task

    params = {"fashion_mnist_dirs": ["/usr/share/datasets/fashion-mnist"],
              "source_classes": [0, 3], "seed": 42}
    task = extract_source_task({**params, "source_per_class": 50})
    assert task["images"].shape == (100, 28, 28)
    assert np.bincount(task["labels"]).tolist() == [50, 0, 0, 50]
    assert task["class_names"] == ["T-shirt_top", "Dress"]
    again = extract_source_task({**params, "source_per_class": 50})
    np.testing.assert_array_equal(again["images"], task["images"])  # the same sample
    every = extract_source_task({**params, "source_per_class": None})
    assert np.bincount(every["labels"]).tolist() == [6000, 0, 0, 6000]


# --- the memo of decodable files ---------------------------------------------------------


def _memo_rows(cache: Path) -> int:
    with sqlite3.connect(cache / decodable.MEMO_FILE) as memo:
        return memo.execute("SELECT COUNT(*) FROM decodable").fetchone()[0]


def test_images_found_decodable_are_decoded_again_only_when_they_change(
    tmp_path: Path, monkeypatch, caplog
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HEADSWAP_CACHE", str(cache))
    caplog.set_level("INFO", logger="headswap.core.decodable")
    folder = make_image_folder(tmp_path / "images", per_class=8)
    manifest, skipped = manifests.ingest_image_folder(folder, seed=0)
    total = len(manifest)
    assert skipped.empty and _memo_rows(cache) == total
    assert "already found decodable" not in caplog.text

    caplog.clear()
    again, skipped = manifests.ingest_image_folder(folder, seed=0)
    pd.testing.assert_frame_equal(again, manifest)
    assert f"{total} of {total} image files already found decodable" in caplog.text
    assert "decoding the other 0" in caplog.text

    # a file rewritten in place (truncated) is decoded again, and reported
    broken = Path(manifest["path"].iloc[0])
    broken.write_bytes(broken.read_bytes()[:40])
    caplog.clear()
    again, skipped = manifests.ingest_image_folder(folder, seed=0)
    assert f"{total - 1} of {total} image files already found decodable" in caplog.text
    assert skipped["path"].tolist() == [str(broken)]
    assert "cannot be decoded" in skipped["reason"].iloc[0]
    assert len(again) == total - 1


def test_jpegs_are_checked_as_training_decodes_them(tmp_path: Path, monkeypatch):
    """The ingest check decodes JPEGs at an eighth of their size: it must reject exactly the
    files the full decoder rejects, including a JPEG cut just before its end and one whose
    compressed data is damaged."""
    monkeypatch.setenv("HEADSWAP_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    encoded = tf.io.encode_jpeg(pixels, quality=90).numpy()
    progressive = tmp_path / "progressive.jpg"
    Image.fromarray(pixels).save(progressive, "JPEG", progressive=True)
    damaged = bytearray(encoded)
    damaged[len(encoded) // 2 : len(encoded) // 2 + 64] = b"\xff" * 64
    files = {"whole.jpg": encoded, "cut_at_end.jpg": encoded[:-12],
             "cut_in_half.jpg": encoded[: len(encoded) // 2], "damaged.jpg": bytes(damaged),
             "header_only.jpg": encoded[:300]}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    paths = [str(tmp_path / name) for name in files] + [str(progressive)]
    expected = {path for path in paths if manifests.bytes_problem(Path(path).read_bytes())}
    assert str(tmp_path / "whole.jpg") not in expected and str(progressive) not in expected
    assert str(tmp_path / "cut_in_half.jpg") in expected
    assert set(manifests.find_unreadable(paths)) == expected
    # a JPEG whose full decode would reach the decoder's size limit fails the quick check too
    # (then the full decode gives the reason): the limit is on the full size, not an eighth
    whole = [str(tmp_path / "whole.jpg")]
    monkeypatch.setattr(manifests, "_JPEG_LIMIT", 96 * 128 * 3)
    assert manifests._decoded_indices(whole) == set()
    monkeypatch.setattr(manifests, "_JPEG_LIMIT", 96 * 128 * 3 + 1)
    assert manifests._decoded_indices(whole) == {0}


def test_a_memo_that_cannot_be_used_is_left_out(tmp_path: Path, monkeypatch, caplog):
    caplog.set_level("WARNING", logger="headswap.core.decodable")
    folder, faulty = make_messy_folder(tmp_path / "images")
    blocked = tmp_path / "a file"
    blocked.write_text("not a folder")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / decodable.MEMO_FILE).write_bytes(b"this is no SQLite database" * 40)
    for cache in (blocked / "cache", garbage):
        monkeypatch.setenv("HEADSWAP_CACHE", str(cache))
        for _ in range(2):
            manifest, skipped = manifests.ingest_image_folder(folder, seed=0)
            assert {Path(p).name for p in skipped["path"]} == set(faulty)
            assert len(manifest) == len(MESSY_CLASSES) * PER_CLASS
        assert f"memo of decodable files in {cache} cannot be read" in caplog.text
        caplog.clear()
