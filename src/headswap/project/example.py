"""The embedded example: a real transfer task on Fashion-MNIST.

The source task (classes 0-4) trains a compact CNN that plays the part of a pretrained base;
the target task (classes 5-9, few labels) is written out as an ordinary image folder so that
fine-tuning reads it exactly as it reads a user's folder.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import keras
import numpy as np
from PIL import Image

from headswap.core.errors import InputError

logger = logging.getLogger(__name__)

CLASS_NAMES = (
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_PREFIX = "fmnist_"


KERAS = "keras"  # in ``fashion_mnist_dirs``: Keras' download cache, fetched when empty


def find_fashion_mnist(candidates: list[str]) -> Path:
    """Return the first folder in ``candidates`` that holds the four Fashion-MNIST IDX files.

    The entry ``keras`` stands for Keras' download cache (``$KERAS_HOME/datasets/fashion-mnist``,
    ``~/.keras`` by default); when the files are not there yet, ``keras.datasets.fashion_mnist``
    fetches them into it (this needs network) and the search goes on if that fails.
    """
    for candidate in candidates:
        folder = _keras_cache() if candidate == KERAS else Path(candidate).expanduser()
        if _complete(folder) or (candidate == KERAS and _fetched_by_keras()):
            return folder
    raise InputError(
        "Fashion-MNIST was not found in any of: "
        + ", ".join(str(c) for c in candidates)
        + ". Copy the four files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz into "
        "data/01_raw/fashion-mnist/, or install Debian's package "
        "(`sudo apt-get install dataset-fashion-mnist`), or run with network access so that "
        "Keras can fetch them (the entry `keras` of example.fashion_mnist_dirs)."
    )


def _complete(folder: Path) -> bool:
    return all(_idx_file(folder, name) is not None for pair in _FILES.values() for name in pair)


def _keras_cache() -> Path:
    """Where ``keras.datasets.fashion_mnist`` keeps its files, as ``keras.utils.get_file``
    chooses it: ``$KERAS_HOME`` (else ``~/.keras``), or ``.keras`` in the temporary folder when
    that cannot be written to."""
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras").expanduser()
    if not os.access(home, os.W_OK):
        home = Path(tempfile.gettempdir()) / ".keras"
    return home / "datasets" / "fashion-mnist"


def _fetched_by_keras() -> bool:
    """Fetch Fashion-MNIST into :func:`_keras_cache` with Keras; False when that fails."""
    logger.info("Fashion-MNIST: fetching it with keras.datasets.fashion_mnist")
    try:
        keras.datasets.fashion_mnist.load_data()
    except Exception as error:  # noqa: BLE001 - no network, a proxy, a full disk: say so, go on
        logger.warning("Fashion-MNIST could not be fetched by Keras: %s", error)
        return False
    return _complete(_keras_cache())


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file.")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of the ``train`` or ``test`` split."""
    images_stem, labels_stem = _FILES[split]
    return read_idx(_idx_file(folder, images_stem)), read_idx(_idx_file(folder, labels_stem))


def select_classes(
    labels: np.ndarray, classes: list[int], per_class: int | None, seed: int
) -> np.ndarray:
    """Indices of a seeded sample of ``per_class`` images of each class (all if None)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in classes:
        idx = np.flatnonzero(labels == cls)
        if per_class is not None:
            if per_class > len(idx):
                raise ValueError(
                    f"Class {cls} has {len(idx)} images; {per_class} per class were asked for."
                )
            idx = np.sort(rng.choice(idx, size=per_class, replace=False))
        chosen.append(idx)
    return np.concatenate(chosen)


def image_files(
    images: np.ndarray, labels: np.ndarray, indices: np.ndarray, split: str
) -> dict[str, bytes]:
    """``images[indices]`` as PNG files ``{"<split>/<class name>/fmnist_<index>.png": bytes}``,
    an image folder's contents (the catalog's image folder datasets write them)."""
    files = {}
    for i in indices:
        buffer = io.BytesIO()
        Image.fromarray(images[i]).save(buffer, format="PNG")
        name = CLASS_NAMES[int(labels[i])]
        files[f"{split}/{name}/{_PREFIX}{int(i):05d}.png"] = buffer.getvalue()
    return files


def compact_cnn(
    input_shape: tuple[int, int, int], num_classes: int, filters: tuple[int, ...] = (32, 64, 128)
) -> keras.Model:
    """A small CNN with BatchNormalization, taking raw pixels (0-255).

    One conv-BN-ReLU block per entry of ``filters``, max-pooling between blocks. Its last
    feature map is the layer ``features``; ``predictions`` is the classifier to cut off.
    """
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    for i, width in enumerate(filters, start=1):
        if i > 1:
            x = layers.MaxPooling2D(name=f"block{i - 1}_pool")(x)
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"block{i}_conv")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"block{i}_bn")(x)
        x = layers.ReLU(name=f"block{i}_relu")(x)
    x = layers.Activation("linear", name="features")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dropout(0.3, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="fashion_cnn")


def pretrain_compact_cnn(
    images: np.ndarray,
    labels: np.ndarray,
    filters: tuple[int, ...],
    epochs: int,
    batch_size: int,
    learning_rate: float,
    val_fraction: float,
    seed: int,
) -> tuple[keras.Model, dict]:
    """Train :func:`compact_cnn` on in-memory images (N, H, W) uint8; return it and its history."""
    import tensorflow as tf

    from headswap.core.data import untuned
    from headswap.core.train import compile_model

    keras.utils.set_random_seed(seed)
    classes = np.unique(labels)
    y = np.searchsorted(classes, labels).astype("int32")
    x = images[..., None].astype("float32")
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = int(len(x) * val_fraction)
    val_idx, train_idx = order[:n_val], order[n_val:]
    train = untuned(
        tf.data.Dataset.from_tensor_slices((x[train_idx], y[train_idx]))
        .shuffle(len(train_idx), seed=seed)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    val = untuned(tf.data.Dataset.from_tensor_slices((x[val_idx], y[val_idx])).batch(batch_size))
    model = compact_cnn(x.shape[1:], len(classes), tuple(filters))
    compile_model(model, keras.optimizers.Adam(learning_rate))
    result = model.fit(train, validation_data=val, epochs=epochs, verbose=2, shuffle=False)
    history = {k: [float(v) for v in values] for k, values in result.history.items()}
    return model, {"epoch": [int(e) for e in result.epoch], **history}


def target_folder(params: dict[str, Any]) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The target task as an image folder: ``train/`` (few labels) and ``test/``.

    ``train/`` holds ``labels_per_class`` seeded training images of each target class (the
    finetune pipeline carves its validation images out of them); ``test/`` holds all the
    official test images of those classes. Returns the folder's files (the catalog writes
    them) and a summary of it (path, source, images per class in each split).
    """
    folder = find_fashion_mnist(params["fashion_mnist_dirs"])
    files: dict[str, bytes] = {}
    summary: dict[str, Any] = {"path": str(params["target_path"]), "source": str(folder)}
    for split, per_class in (("train", params["labels_per_class"]), ("test", None)):
        images, labels = load_split(folder, split)
        idx = select_classes(labels, params["target_classes"], per_class, params["seed"])
        files.update(image_files(images, labels, idx, split))
        names, counts = np.unique(labels[idx], return_counts=True)
        summary[split] = {CLASS_NAMES[int(n)]: int(c)
                          for n, c in zip(names, counts, strict=True)}
        logger.info("Target %s: %s images", split, len(idx))
    return files, summary
