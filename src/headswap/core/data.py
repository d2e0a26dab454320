"""Streaming a manifest's images through ``tf.data``: decoding (EXIF orientation, channels,
resize), a fresh seeded shuffle each epoch, and whole splits decoded into memory when they fit.
The manifest itself (scanning, splitting) is :mod:`headswap.core.manifests`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from headswap.core import sources
from headswap.core.images import (
    apply_orientation,
    decode_for_size,
    exif_orientation,
    may_have_exif,
    resize_image,
)
from headswap.core.manifests import split_arrays

logger = logging.getLogger(__name__)

_UNTUNED = tf.data.Options()
_UNTUNED.autotune.enabled = False


def untuned(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``dataset`` with ``tf.data``'s autotuner off: its ``AUTOTUNE`` parallelism is then every
    core the process may use, and a pass over it ends as soon as its last element is out.

    With the autotuner on, about half the passes (15 of 33 measured) end only at the
    autotuner's next wake-up, whose period doubles as the pass goes on: 1.5-2 s of idle cores
    after a 3.5-s epoch of 12,000 images (TensorFlow 2.21; benchmarks/input_speed.py). Any
    pass can: an evaluation, a validation pass in each epoch, a split decoded into memory.
    """
    return dataset.with_options(_UNTUNED)


@tf.autograph.experimental.do_not_convert
def decode_image(
    path: tf.Tensor, image_size: tuple[int, int], channels: int, resize: str = "stretch"
) -> tf.Tensor:
    """Read, decode and resize one image file to float32 pixels in [0, 255]
    (:func:`decode_bytes` of the file's bytes)."""
    return decode_bytes(tf.io.read_file(path), image_size, channels, resize)


@tf.autograph.experimental.do_not_convert
def decode_bytes(
    raw: tf.Tensor, image_size: tuple[int, int], channels: int, resize: str = "stretch"
) -> tf.Tensor:
    """Decode and resize one encoded image (JPEG, PNG, GIF, BMP or WebP bytes) to float32
    pixels in [0, 255]: how every image is read, in training and in prediction.

    A JPEG is turned upright by its EXIF orientation
    (:func:`~headswap.core.images.exif_orientation`), and decoded at a fraction of its size
    when it is far larger than ``image_size``
    (:func:`~headswap.core.images.decode_for_size`). Every format and colour mode
    ``tf.io.decode_image`` reads gives ``channels`` (1 or 3) channels: grayscale is repeated
    or colour converted to grayscale, alpha is dropped, palettes are expanded and an animated
    GIF gives its first frame. ``resize`` is one of
    :data:`~headswap.core.images.RESIZE_MODES` (stretch, pad or crop). Images that have the
    channels asked for and no EXIF segment (:func:`~headswap.core.images.may_have_exif`), most
    of them, go from the decoder to the resize directly.
    """
    if channels not in _UPRIGHT_WITH_CHANNELS:
        raise ValueError(f"Images are read with 1 or 3 channels, not {channels}.")
    image = decode_for_size(raw, image_size)
    # most images have the channels asked for and no EXIF segment: they are used as decoded.
    # Checked after decoding: TensorFlow's executor hands a costly op (the decode) that becomes
    # ready beside cheap ones to another thread, where it queues behind other images' work
    with tf.control_dependencies([image]):
        as_decoded = tf.equal(tf.shape(image)[-1], channels) & tf.logical_not(may_have_exif(raw))
    image = tf.cond(as_decoded, lambda: image,
                    lambda: _UPRIGHT_WITH_CHANNELS[channels](image, raw))
    image.set_shape([None, None, channels])
    return resize_image(image, image_size, resize)


def _upright_with_channels(channels: int) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """``f(image, raw)``: the decoded ``image`` turned by the EXIF orientation in its encoded
    bytes ``raw``, with ``channels`` channels.

    It is a graph function that is never inlined: a ``tf.cond`` branch inlined into a
    ``tf.data`` map is still stepped through, op by op, for every image that does not take it
    (its 200 ops cost a fifth of the time a 350-pixel JPEG takes to decode and resize); as a
    single call it costs next to nothing there.
    """

    def upright(image: tf.Tensor, raw: tf.Tensor) -> tf.Tensor:
        return _with_channels(apply_orientation(image, exif_orientation(raw)), channels)

    return tf.function(
        upright,
        input_signature=(tf.TensorSpec([None, None, None], tf.uint8), tf.TensorSpec([], tf.string)),
        autograph=False,
        experimental_attributes={"_noinline": True},
    )


def _with_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """``image`` (1: gray, 2: gray + alpha, 3: RGB or 4: RGBA channels) with ``channels``."""
    if channels not in (1, 3):
        raise ValueError(f"Images are read with 1 or 3 channels, not {channels}.")

    def from_gray() -> tf.Tensor:
        return tf.tile(image[..., :1], [1, 1, channels])

    def from_colour() -> tf.Tensor:
        rgb = tf.ensure_shape(image[..., :3], [None, None, 3])
        return rgb if channels == 3 else tf.image.rgb_to_grayscale(rgb)

    return tf.cond(tf.shape(image)[-1] < 3, from_gray, from_colour)


_UPRIGHT_WITH_CHANNELS = {channels: _upright_with_channels(channels) for channels in (1, 3)}


def _traced(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` for ``tf.data`` to trace as it is: it has no Python control flow on
    tensors for AutoGraph to convert, and converting a lambda means parsing its source file
    (about a second for the first dataset of a process)."""
    return tf.autograph.experimental.do_not_convert(function)


def _shuffle_key(seed: int, epoch: tf.Tensor | tf.Variable | int) -> tf.Tensor:
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])


def _shuffled_index(i: tf.Tensor, seed: int, epoch: Any, count: int) -> tf.Tensor:
    """Where position ``i`` (a scalar or a vector) of epoch ``epoch`` reads from: a stateless
    permutation of ``range(count)`` keyed on ``(seed, epoch)``."""
    return tf.random.experimental.index_shuffle(
        i, seed=_shuffle_key(seed, epoch), max_index=count - 1
    )


def _epoch_shuffled(
    arrays: tuple[np.ndarray, ...], seed: int, epoch: tf.Tensor
) -> tf.data.Dataset:
    """The rows of ``arrays`` in epoch ``epoch``'s order, a stateless function of
    ``(seed, epoch)``: the epoch's permutation is drawn and applied once, not row by row."""
    tensors, count = tuple(tf.constant(a) for a in arrays), len(arrays[0])
    order = _shuffled_index(tf.range(count, dtype=tf.int64), seed, epoch, count)
    return tf.data.Dataset.from_tensor_slices(tuple(tf.gather(t, order) for t in tensors))


def epoch_after_epoch(
    epoch: tf.Variable, one_epoch: Callable[[tf.Tensor], tf.data.Dataset]
) -> tf.data.Dataset:
    """Epoch after epoch without end, from the one ``epoch`` holds when iteration starts:
    ``one_epoch(e)`` is epoch ``e``'s dataset.

    Each epoch's order is keyed on its own number inside the dataset, so one iterator serves a
    whole training (Keras keeps it across epochs when ``fit`` is given ``steps_per_epoch``)
    instead of one made per epoch, and the next epoch's first batches can be prepared while
    the current one ends.
    """
    first = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).map(
        _traced(lambda _: tf.cast(epoch, tf.int64))
    )
    return first.flat_map(_traced(lambda e: tf.data.Dataset.range(e, e + 2**62))).flat_map(
        _traced(one_epoch))


def _epoch_indices(
    count: int, seed: int, epoch: tf.Tensor, batch_size: int | None
) -> tf.data.Dataset:
    """One epoch's row indices in its ``(seed, epoch)`` order: single, or in batches."""
    positions = tf.data.Dataset.range(count)
    if batch_size is not None:
        positions = positions.batch(batch_size)
    return positions.map(_traced(lambda i: _shuffled_index(i, seed, epoch, count)))


def array_dataset(
    arrays: tuple[np.ndarray, ...],
    batch_size: int,
    shuffle: bool = False,
    seed: int = 42,
    epoch: tf.Variable | None = None,
) -> tf.data.Dataset:
    """Batches of in-memory rows (decoded images or a frozen base's features, and labels).

    The order is that of :func:`make_dataset` for the same arguments: as given, or shuffled
    (see there; with ``epoch``, epoch after epoch without end). Shuffled rows are gathered a
    batch at a time.
    """
    if not shuffle:
        return untuned(tf.data.Dataset.from_tensor_slices(arrays).batch(batch_size))
    tensors, count = tuple(tf.constant(a) for a in arrays), len(arrays[0])

    def gather(j: tf.Tensor) -> tuple[tf.Tensor, ...]:
        return tuple(tf.gather(t, j) for t in tensors)

    if count and epoch is not None:
        indices = epoch_after_epoch(epoch, lambda e: _epoch_indices(count, seed, e, batch_size))
    else:  # the same order as make_dataset's streamed shuffle: it depends on the seed alone
        indices = tf.data.Dataset.range(count).shuffle(
            max(count, 1), seed=seed, reshuffle_each_iteration=True
        ).batch(batch_size)
    return untuned(indices.map(_traced(gather)))


def decoded_bytes(count: int, image_size: tuple[int, int], channels: int) -> int:
    """Memory that ``count`` decoded images take (float32 pixels of ``image_size``)."""
    height, width = (int(s) for s in image_size)
    return count * height * width * channels * np.dtype("float32").itemsize


def fits_in_memory(
    count: int, image_size: tuple[int, int], channels: int, budget_bytes: int
) -> bool:
    """Whether ``count`` decoded images fit in ``budget_bytes`` (0: never cache)."""
    return budget_bytes > 0 and decoded_bytes(count, image_size, channels) <= budget_bytes


def decode_all(
    paths: np.ndarray,
    image_size: tuple[int, int],
    channels: int,
    batch_size: int = 256,
    resize: str = "stretch",
) -> np.ndarray:
    """Every image of ``paths``, decoded and resized (:func:`decode_image`) in parallel, as
    one float32 array."""
    size = tuple(int(s) for s in image_size)
    images = np.empty((len(paths), *size, channels), dtype="float32")
    stream = untuned(
        tf.data.Dataset.from_tensor_slices(sources.local_paths(paths))
        .map(_traced(lambda p: decode_image(p, size, channels, resize)),
             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    start = 0
    for batch in stream:
        images[start : start + len(batch)] = batch.numpy()
        start += len(batch)
    return images


def make_dataset(
    manifest: pd.DataFrame,
    split: str,
    image_size: tuple[int, int],
    channels: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 42,
    epoch: tf.Variable | None = None,
    cache_bytes: int = 0,
    resize: str = "stretch",
) -> tf.data.Dataset:
    """One split of a manifest as batches of (images, labels), resized to ``image_size`` as
    ``resize`` says (:func:`headswap.core.images.resize_image`).

    Files are read, decoded and resized in parallel, in a deterministic order, and batches are
    prefetched. If the split's decoded images fit in ``cache_bytes``
    (:func:`fits_in_memory`), they are decoded once and kept in memory; otherwise (and by
    default) they are streamed from disk every time, so memory does not grow with the folder.
    Either way the batches are the same.

    Order: as listed in the manifest, unless ``shuffle`` (for training): then reshuffled each
    time the dataset is iterated. With ``epoch`` as well (an integer variable) the dataset
    runs epoch after epoch without end (:func:`epoch_after_epoch`; the trainer takes
    ``steps_per_epoch`` batches of each), from the epoch the variable holds when iteration
    starts, and each epoch's order is a stateless function of ``(seed, epoch)``: epoch k has
    the same order whether or not the run was interrupted before it. Without ``epoch`` the
    order is seeded but depends on how often the dataset was iterated.
    """
    paths, labels = split_arrays(manifest, split)
    paths = sources.local_paths(paths)
    size = tuple(int(s) for s in image_size)
    if fits_in_memory(len(paths), size, channels, cache_bytes):
        logger.info(
            "Keeping the %s decoded %s images in memory (%.1f MiB; cache budget %.0f MiB)",
            len(paths), split, decoded_bytes(len(paths), size, channels) / 2**20,
            cache_bytes / 2**20,
        )
        images = decode_all(paths, size, channels, resize=resize)
        return array_dataset((images, labels), batch_size, shuffle, seed, epoch)
    if cache_bytes:
        logger.info(
            "Streaming the %s %s images from disk: decoded they would take %.1f MiB, over the "
            "cache budget of %.0f MiB", len(paths), split,
            decoded_bytes(len(paths), size, channels) / 2**20, cache_bytes / 2**20,
        )

    def batches(rows: tf.data.Dataset) -> tf.data.Dataset:
        """(path, label) rows as batches of decoded images, read in parallel, in order."""
        return rows.map(_traced(lambda p, y: (decode_image(p, size, channels, resize), y)),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch_size)

    if shuffle and epoch is not None and len(paths):
        dataset = epoch_after_epoch(
            epoch, lambda e: batches(_epoch_shuffled((paths, labels), seed, e)))
    else:
        dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
        if shuffle:
            dataset = dataset.shuffle(max(len(paths), 1), seed=seed,
                                      reshuffle_each_iteration=True)
        dataset = batches(dataset)
    return untuned(dataset.prefetch(tf.data.AUTOTUNE))


