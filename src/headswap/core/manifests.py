"""Image folders into a *manifest*: scanning, checking every file decodes, splitting, and reading a
manifest back.

A *manifest* is a table with one row per image: ``path`` (as it can be opened from the working
directory), ``label`` (the class name) and ``split`` (``train``, ``val`` or ``test``). The
split is decided once, at file level and seeded, so validation and test images never mix.

Every image is decoded once at ingest, with the decoder ``tf.data`` uses later
(:func:`headswap.core.data.decode_image`): empty, corrupt, truncated or unsupported files are
left out of the manifest and listed with the reason in a *skipped* table (``path``,
``reason``), so they cannot stop a training run hours in. Files found decodable are
remembered (:mod:`headswap.core.decodable`): a later ingest of the same, unchanged files
only lists them.
"""

from __future__ import annotations

import logging
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.model_selection import train_test_split

from headswap.core import decodable, sources
from headswap.core.progress import CountProgress
from headswap.core.sources import (
    SKIPPED_COLUMNS,
    SPLITS,
    DataError,
    MissingDataError,
)

logger = logging.getLogger(__name__)


_SHOWN = 20  # skipped files named one by one in the log


def image_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be used as an image (empty, unreadable, corrupt, truncated), or None.

    The file is decoded once with :func:`tf.io.decode_image`, as :func:`decode_image` does.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        return f"cannot be read: {err.strerror or err}"
    return bytes_problem(raw)


def bytes_problem(raw: bytes) -> str | None:
    """Why ``raw`` cannot be decoded as an image (empty, corrupt, truncated), or None."""
    if not raw:
        return "empty file (0 bytes)"
    try:
        tf.io.decode_image(raw, channels=0, expand_animations=False)
    except tf.errors.OpError as err:
        message = err.message.split("}}")[-1].replace("[Op:DecodeImage]", "").strip()
        return f"cannot be decoded (corrupt or truncated?): {message}"
    return None


def _decoded_indices(paths: list[str]) -> set[int]:
    """Indices of the ``paths`` that :func:`tf.io.decode_image` decodes, found by ``tf.data``
    in parallel (files that fail are dropped from its output, not raised).

    A JPEG is decoded at an eighth of its size (``decode_jpeg``'s ``ratio``), in about half
    the time: the same library reads and entropy-decodes the whole file, so it fails on the
    same corrupt or truncated files; its full size is checked against the decoder's limit.
    """

    def decode(path: tf.Tensor, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        raw = tf.io.read_file(path)
        shape = tf.cond(  # an output that needs the decode: it is not pruned
            tf.io.is_jpeg(raw), lambda: _jpeg_checked(raw),
            lambda: tf.shape(tf.io.decode_image(raw, channels=0, expand_animations=False)))
        return index, shape

    from headswap.core.data import untuned  # data builds on this module

    dataset = untuned(
        tf.data.Dataset.from_tensor_slices((paths, tf.range(len(paths))))
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        .ignore_errors()
        .batch(1024)
    )
    progress = CountProgress("Decoding the images", len(paths), logger)  # large folders only
    decoded: set[int] = set()
    for indices, _ in dataset:
        decoded.update(int(i) for i in indices.numpy())
        progress.update(len(decoded))
    return decoded


def _jpeg_checked(raw: tf.Tensor) -> tf.Tensor:
    """The shape of the JPEG ``raw`` decoded at an eighth of its size; an error where the
    full decode fails: the stream (the same library reads all of it) or the full size, over
    the decoder's limit of :data:`_JPEG_LIMIT` bytes."""
    full = tf.cast(tf.image.extract_jpeg_shape(raw), tf.int64)
    small = tf.io.decode_jpeg(raw, ratio=8)
    with tf.control_dependencies([tf.debugging.assert_less(
            tf.reduce_prod(full), tf.constant(_JPEG_LIMIT, tf.int64), message="too large")]):
        return tf.shape(small)


_JPEG_LIMIT = 2**29  # bytes of a decoded image TensorFlow's JPEG decoder refuses to reach


def find_unreadable(paths: list[str]) -> dict[str, str]:
    """``{path: reason}`` for each of ``paths`` that :func:`image_problem` rejects.

    Files found decodable by an earlier call, unchanged since, are not decoded again
    (:mod:`headswap.core.decodable`). The others are decoded in parallel by ``tf.data``
    first; only those it cannot decode go through :func:`image_problem` one by one, for the
    reason.
    """
    return decodable.unreadable(list(map(str, paths)), _find_unreadable)


def _find_unreadable(paths: list[str]) -> dict[str, str]:
    if not paths:
        return {}
    decoded = _decoded_indices(paths)
    suspects = [path for i, path in enumerate(paths) if i not in decoded]
    workers = max(1, min(16, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = pool.map(image_problem, suspects)
        return {path: problem for path, problem in zip(suspects, problems, strict=True) if problem}


def log_skipped(skipped: pd.DataFrame, total: int) -> None:
    """Log how many files were skipped and why (the first few by name)."""
    if skipped.empty:
        logger.info("All %s image files can be read; none skipped.", total)
        return
    shown = "\n".join(f"  {row.path}: {row.reason}" for row in skipped.head(_SHOWN).itertuples())
    more = f"\n  ... and {len(skipped) - _SHOWN} more" if len(skipped) > _SHOWN else ""
    logger.warning(
        "Skipped %s of %s image files (listed with reasons in the skipped_images table):\n%s%s",
        len(skipped), total, shown, more,
    )


def ingest_image_folder(
    path: str | Path, val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 42
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`ingest` of the folder or CSV at ``path`` (local or remote,
    :func:`headswap.core.sources.open_images`)."""
    return ingest(sources.open_images(str(path)), val_fraction, test_fraction, seed)


def ingest(
    source: sources.ImageSource, val_fraction: float = 0.2, test_fraction: float = 0.2,
    seed: int = 42,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A manifest with a seeded, stratified split of ``source``'s images, and a skipped table.

    Two folder layouts are understood:

    * ``path/<class>/*.png``: every class folder is split into train/val/test;
    * ``path/train/<class>/…`` and ``path/test/<class>/…`` (and optionally ``path/val/…``):
      the given splits are kept; without ``val/``, validation images are carved out of
      ``train/``, stratified.

    A CSV gives each image's label and, in an optional ``split`` column, its split (the same
    rules: train and test given, val carved out of train when absent).

    Every image is decoded once (a remote one from its local cached copy; one found decodable
    by an earlier ingest, unchanged since, not again); files that cannot be are left out
    before splitting and returned as the skipped table (``path``,
    ``reason``); the split depends only on the readable files and ``seed``. Hidden files and
    folders, files that are no images (e.g. ``notes.txt``) and images outside any class
    folder are ignored.
    With ``source.manifest`` (an earlier run's manifest), that manifest's split is reused
    instead (:func:`load_manifest`).
    """
    if source.manifest:
        return load_manifest(source.manifest, source.storage_options)
    skipped = [tuple(row) for row in source.skipped.itertuples(index=False)]
    files = source.files[source.files["label"] != ""]
    problems = _unreadable(files["path"].tolist(), source)
    skipped.extend(problems.items())
    files = files[~files["path"].isin(problems)]
    if files.empty:
        why = f" that can be read ({len(skipped)} skipped: {skipped[0][1]}, ...)" if skipped else ""
        raise DataError(
            f"No images found under {source.location}{why}. Expected one sub-folder per class "
            f"holding image files ({', '.join(sorted(sources.IMAGE_EXTENSIONS))}), or a CSV "
            "of path,label."
        )
    manifest = _split(files, val_fraction, test_fraction, seed, source.location)
    check_manifest(manifest)
    manifest["split"] = pd.Categorical(manifest["split"], categories=SPLITS)
    manifest = manifest.sort_values(["split", "label", "path"]).reset_index(drop=True)
    manifest["split"] = manifest["split"].astype(str)
    _log_manifest(manifest, source.location)
    table = pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)
    log_skipped(table, len(manifest) + len(table))
    return manifest, table


def _unreadable(paths: list[str], source: sources.ImageSource | None = None) -> dict[str, str]:
    """``{path: reason}`` of the images that cannot be read or decoded, each decoded from its
    local file (a remote one from its cached copy). With ``source``, remote images are
    fetched from it first and those it cannot give are listed; without, a remote image that
    cannot be fetched raises :class:`MissingDataError`."""
    remote = [p for p in paths if sources.is_url(p)]
    problems = (sources.fetch(remote, source.versions, source.storage_options)
                if remote and source is not None else {})
    readable = [p for p in paths if p not in problems]
    local = [str(p) for p in sources.local_paths(readable)]
    broken = find_unreadable(local)
    back = dict(zip(local, readable, strict=True))
    return {**problems, **{back[p]: reason for p, reason in broken.items()}}


def _split(
    files: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int, where: str
) -> pd.DataFrame:
    """``files`` (path, label, split: given or empty) with every split decided."""
    given = files[files["split"] != ""]
    loose = files[files["split"] == ""][["path", "label"]]
    frames = {split: given[given["split"] == split][["path", "label"]] for split in SPLITS}
    if not given.empty:
        if frames["train"].empty or frames["test"].empty:
            missing = "train" if frames["train"].empty else "test"
            raise DataError(
                f"{where} has no {missing}/ folder (or {missing} rows) beside its other "
                f"splits. Add {missing}/<class>/ images, or put the class folders directly "
                "under the folder (a CSV: leave out its split column) to have them split."
            )
        if frames["val"].empty:
            frames["train"], frames["val"] = _stratified(
                frames["train"], val_fraction, seed, "validation")
        if not loose.empty:
            logger.warning("%s images of %s have no split; they are left out.", len(loose),
                           where)
    else:
        rest, frames["test"] = _stratified(loose, test_fraction, seed, "test")
        frames["train"], frames["val"] = _stratified(
            rest, val_fraction / (1 - test_fraction), seed, "validation")
    return pd.concat([frames[s].assign(split=s) for s in SPLITS], ignore_index=True)


def _log_manifest(manifest: pd.DataFrame, source: str) -> None:
    logger.info(
        "Manifest of %s: %s images, %s classes; %s",
        source,
        len(manifest),
        manifest["label"].nunique(),
        ", ".join(f"{s} {int((manifest['split'] == s).sum())}" for s in SPLITS),
    )


def _stratified(
    table: pd.DataFrame, fraction: float, seed: int, what: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    counts = table["label"].value_counts()
    too_few = counts[counts * fraction < 1]
    if len(too_few) or counts.size < 2:
        if counts.size < 2:
            raise DataError(
                f"Only one class ({counts.index[0]!r}) was found; a classifier needs at least two "
                "class folders."
            )
        raise DataError(
            f"Too few images to carve a {what} split of {fraction:.0%} from class(es) "
            + ", ".join(f"{name!r} ({n} images)" for name, n in too_few.items())
            + ". Add images to those classes or raise the split fraction."
        )
    keep, carved = train_test_split(
        table, test_size=fraction, stratify=table["label"], random_state=seed
    )
    return keep, carved


def check_manifest(manifest: pd.DataFrame) -> None:
    """Raise :class:`DataError` if a manifest lacks columns, splits, or classes in some split."""
    missing = {"path", "label", "split"} - set(manifest.columns)
    if missing:
        raise DataError(
            f"The manifest lacks the column(s) {sorted(missing)}; it needs path, label and split."
        )
    unknown = set(manifest["split"]) - set(SPLITS)
    if unknown:
        raise DataError(
            f"The manifest's split column holds {sorted(map(str, unknown))}; allowed: "
            + ", ".join(SPLITS) + "."
        )
    classes = set(manifest["label"])
    if len(classes) < 2:
        raise DataError(
            f"The manifest has {len(classes)} class(es); a classifier needs at least two."
        )
    for split in SPLITS:
        present = set(manifest.loc[manifest["split"] == split, "label"])
        if not present:
            raise DataError(f"The manifest has no images in the {split!r} split.")
        if split != "test" and present != classes:
            raise DataError(
                f"The {split!r} split has no images of class(es) {sorted(classes - present)}."
            )


def load_manifest(
    location: str | Path, storage_options: dict[str, Any] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """An earlier run's manifest (local or remote), to reuse its split, and the table of
    images skipped now.

    Stops with :class:`MissingDataError` if the manifest or any image it lists is gone (the split
    would no longer be the same); images that exist but no longer decode are skipped and listed.
    """
    file = str(location)
    fs, root = fsspec.core.url_to_fs(file, **(storage_options or {}))
    if not fs.isfile(root):
        name = posixpath.basename(root.rstrip("/"))
        versions = sorted(fs.glob(f"{root.rstrip('/')}/*/{name}")) if fs.isdir(root) else []
        hint = (
            f" It is a versioned folder; give one version's file, e.g. "
            f"{fs.unstrip_protocol(versions[-1]) if sources.is_url(file) else versions[-1]}."
            if versions else ""
        )
        raise MissingDataError(
            f"The manifest {file} (`manifest`) does not exist.{hint} Give the "
            "manifest.csv of an earlier run, e.g. "
            "data/02_intermediate/manifest.csv/<version>/manifest.csv, or set "
            "`manifest` to null to scan `path`."
        )
    with fs.open(root, "rb") as stream:
        manifest = pd.read_csv(stream, dtype=str, keep_default_na=False)
    check_manifest(manifest)
    gone = [p for p in manifest["path"] if not sources.is_url(p) and not Path(p).is_file()]
    if gone:
        raise MissingDataError(
            f"{len(gone)} of {len(manifest)} images listed in the manifest {file} no longer "
            f"exist (relative paths are read from {Path.cwd()}), e.g. "
            + ", ".join(gone[:3])
            + ". Restore them, or set `manifest` to null to scan "
            "`path` into a new split."
        )
    unreadable = _unreadable(manifest["path"].tolist(),
                             sources.ImageSource(file, dict(storage_options or {})))
    skipped = pd.DataFrame(list(unreadable.items()), columns=SKIPPED_COLUMNS)
    manifest = manifest[~manifest["path"].isin(unreadable)].reset_index(drop=True)
    check_manifest(manifest)
    _log_manifest(manifest, str(file))
    log_skipped(skipped, len(manifest) + len(skipped))
    return manifest, skipped


def class_names(manifest: pd.DataFrame) -> list[str]:
    """The classes of a manifest in label-index order (sorted names)."""
    return sorted(manifest["label"].unique().tolist())


def split_arrays(manifest: pd.DataFrame, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Paths and integer labels of one split, in manifest order."""
    names = class_names(manifest)
    index = {name: i for i, name in enumerate(names)}
    rows = manifest[manifest["split"] == split]
    return rows["path"].to_numpy(dtype=str), rows["label"].map(index).to_numpy(dtype=np.int32)


def labelled_subset(manifest: pd.DataFrame, per_class: int, seed: int = 42) -> pd.DataFrame:
    """The manifest with ``per_class`` labelled (train + val) images of each class; the test
    split is kept whole.

    Each class keeps the train/val proportion it has in ``manifest``: of its ``per_class``
    images, ``round(per_class * val / (train + val))`` are validation images (at least one, and
    at least one training image). The train and the val images of each class are put in one
    seeded order that does not depend on ``per_class``, and the subset takes the first ones of
    each; so, for one ``seed``, the subset of a smaller count lies inside that of a larger one
    (10 ⊂ 30 ⊂ 100): counts differ only in how many labels there are.
    """
    check_manifest(manifest)
    per_class = int(per_class)
    if per_class < 2:
        raise DataError(
            f"{per_class} labelled images per class were asked for; at least 2 are needed "
            "(one training and one validation image of each class)."
        )
    rng = np.random.default_rng(seed)
    rows = manifest.sort_values(["label", "path"])
    chosen = []
    for name in class_names(manifest):
        of_class = rows[rows["label"] == name]
        train, val = (of_class[of_class["split"] == s] for s in ("train", "val"))
        # one order per class and split, drawn whatever per_class is: smaller subsets nest
        train, val = (t.iloc[rng.permutation(len(t))] for t in (train, val))
        if len(train) + len(val) < per_class:
            raise DataError(
                f"Class {name!r} has {len(train) + len(val)} labelled (train + val) images; "
                f"{per_class} per class were asked for. Ask for at most "
                f"{len(train) + len(val)} per class, or add labelled images of {name!r}."
            )
        n_val = round(per_class * len(val) / (len(train) + len(val)))
        n_val = min(max(n_val, 1), per_class - 1, len(val))
        chosen += [train.iloc[: per_class - n_val], val.iloc[:n_val]]
    subset = pd.concat([*chosen, manifest[manifest["split"] == "test"]])
    order = subset["split"].map(SPLITS.index)
    subset = subset.assign(_order=order).sort_values(["_order", "label", "path"])
    subset = subset.drop(columns="_order").reset_index(drop=True)
    check_manifest(subset)
    return subset
