"""Image folders: scanning into a manifest, splitting it, and streaming it through ``tf.data``.

A *manifest* is a table with one row per image: ``path`` (as it can be opened from the working
directory), ``label`` (the class name) and ``split`` (``train``, ``val`` or ``test``). The
split is decided once, at file level and seeded, so validation and test images never mix.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.model_selection import train_test_split

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif"})
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def list_images(folder: Path) -> list[Path]:
    """Image files below ``folder`` (any depth), sorted, skipping hidden files and folders."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_image_folder(
    path: str | Path, val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 42
) -> pd.DataFrame:
    """Scan an image folder into a manifest with a seeded, stratified split.

    Two layouts are understood:

    * ``path/<class>/*.png``: every class folder is split into train/val/test;
    * ``path/train/<class>/…`` and ``path/test/<class>/…`` (and optionally ``path/val/…``):
      the given splits are kept; without ``val/``, validation images are carved out of
      ``train/``, stratified.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Image folder {root} does not exist. Set finetune.data.path to a folder holding one "
            "sub-folder per class (or train/ and test/ folders of class sub-folders)."
        )
    subfolders = _class_folders(root)
    names = {p.name.lower() for p in subfolders}
    if subfolders and names <= set(_SPLIT_ALIASES) and "train" in names:
        frames = {_SPLIT_ALIASES[p.name.lower()]: _scan_classes(p) for p in subfolders}
        if "test" not in frames:
            raise ValueError(
                f"{root} has a train/ folder but no test/ folder. Add test/<class>/ images, or "
                "put the class folders directly under the folder to have them split."
            )
        if "val" not in frames:
            train, val = _stratified(frames["train"], val_fraction, seed, "validation")
            frames["train"], frames["val"] = train, val
        manifest = pd.concat(
            [frame.assign(split=split) for split, frame in frames.items()], ignore_index=True
        )
    else:
        table = _scan_classes(root)
        rest, test = _stratified(table, test_fraction, seed, "test")
        train, val = _stratified(rest, val_fraction / (1 - test_fraction), seed, "validation")
        manifest = pd.concat(
            [train.assign(split="train"), val.assign(split="val"), test.assign(split="test")],
            ignore_index=True,
        )
    check_manifest(manifest)
    manifest["split"] = pd.Categorical(manifest["split"], categories=SPLITS)
    manifest = manifest.sort_values(["split", "label", "path"]).reset_index(drop=True)
    manifest["split"] = manifest["split"].astype(str)
    logger.info(
        "Manifest of %s: %s images, %s classes; %s",
        root,
        len(manifest),
        manifest["label"].nunique(),
        ", ".join(f"{s} {int((manifest['split'] == s).sum())}" for s in SPLITS),
    )
    return manifest


def _scan_classes(folder: Path) -> pd.DataFrame:
    rows = []
    for class_dir in _class_folders(folder):
        rows.extend((str(p), class_dir.name) for p in list_images(class_dir))
    if not rows:
        raise ValueError(
            f"No images found under {folder}. Expected one sub-folder per class holding image "
            f"files ({', '.join(sorted(IMAGE_EXTENSIONS))})."
        )
    return pd.DataFrame(rows, columns=["path", "label"])


def _stratified(
    table: pd.DataFrame, fraction: float, seed: int, what: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    counts = table["label"].value_counts()
    too_few = counts[counts * fraction < 1]
    if len(too_few) or counts.size < 2:
        if counts.size < 2:
            raise ValueError(
                f"Only one class ({counts.index[0]!r}) was found; a classifier needs at least two "
                "class folders."
            )
        raise ValueError(
            f"Too few images to carve a {what} split of {fraction:.0%} from class(es) "
            + ", ".join(f"{name!r} ({n} images)" for name, n in too_few.items())
            + ". Add images to those classes or raise the split fraction."
        )
    keep, carved = train_test_split(
        table, test_size=fraction, stratify=table["label"], random_state=seed
    )
    return keep, carved


def check_manifest(manifest: pd.DataFrame) -> None:
    """Raise if a manifest lacks columns, splits, or classes in some split."""
    missing = {"path", "label", "split"} - set(manifest.columns)
    if missing:
        raise ValueError(f"The manifest lacks the column(s) {sorted(missing)}.")
    classes = set(manifest["label"])
    for split in SPLITS:
        present = set(manifest.loc[manifest["split"] == split, "label"])
        if not present:
            raise ValueError(f"The manifest has no images in the {split!r} split.")
        if split != "test" and present != classes:
            raise ValueError(
                f"The {split!r} split has no images of class(es) {sorted(classes - present)}."
            )


def class_names(manifest: pd.DataFrame) -> list[str]:
    """The classes of a manifest in label-index order (sorted names)."""
    return sorted(manifest["label"].unique().tolist())


def split_arrays(manifest: pd.DataFrame, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Paths and integer labels of one split, in manifest order."""
    names = class_names(manifest)
    index = {name: i for i, name in enumerate(names)}
    rows = manifest[manifest["split"] == split]
    return rows["path"].to_numpy(dtype=str), rows["label"].map(index).to_numpy(dtype=np.int32)


def decode_image(path: tf.Tensor, image_size: tuple[int, int], channels: int) -> tf.Tensor:
    """Read, decode and resize one image file to float32 pixels in [0, 255]."""
    raw = tf.io.read_file(path)
    image = tf.io.decode_image(raw, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return tf.image.resize(image, image_size)


def make_dataset(
    manifest: pd.DataFrame,
    split: str,
    image_size: tuple[int, int],
    channels: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 42,
) -> tf.data.Dataset:
    """Stream one split of a manifest as batches of (images, labels).

    Files are read and decoded in parallel, in a deterministic order; shuffling (for training)
    is seeded and reshuffles each epoch. Nothing is loaded whole into memory.
    """
    paths, labels = split_arrays(manifest, split)
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    if shuffle:
        dataset = dataset.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    size = tuple(int(s) for s in image_size)
    dataset = dataset.map(
        lambda p, y: (decode_image(p, size, channels), y),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
