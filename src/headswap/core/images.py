"""Pixels as the camera meant them and at the size a model takes: EXIF orientation and the
resize modes, in TensorFlow ops only, so they run inside ``tf.data`` graphs.

A phone stores a portrait photo as landscape pixels with an EXIF ``Orientation`` tag
(0x0112) that says how to turn them; :func:`exif_orientation` reads the tag from the encoded
bytes and :func:`apply_orientation` turns the decoded image as PIL's
``ImageOps.exif_transpose`` does. :func:`resize_image` brings an image to ``(height, width)``
in one of :data:`RESIZE_MODES`. :func:`decode_for_size` decodes a JPEG far larger than that
size at a fraction of its size. :func:`headswap.core.data.decode_bytes` uses all three, so
every image is read the same way in training, prediction and serving.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from headswap.core.errors import InputError

RESIZE_MODES = ("stretch", "pad", "crop")
"""How :func:`resize_image` brings an image to ``(height, width)``:

* ``stretch``: resized to exactly ``(height, width)``, the aspect ratio changed (the default);
* ``pad``: resized to fit inside, the aspect ratio kept, centred, with black (0) bands
  (``tf.image.resize_with_pad``);
* ``crop``: resized so that it covers ``(height, width)``, the aspect ratio kept, then the
  centre cut out.
"""

JPEG_SCALES = (2, 4, 8)
"""The fractions (1/2, 1/4, 1/8) at which :func:`decode_for_size` may decode a JPEG."""

_EXIF_WORDS = (0x4578, 0x6966, 0)  # "Exif\0\0", after the APP1 marker (FF E1) and length
_WORDS = 1_024  # 16-bit words read from the APP1 marker on: the TIFF header and the first IFD
_IFD_ENTRIES = 64  # IFD0 entries looked at for the Orientation tag (cameras write ~10-30)
_ORIENTATION_TAG = 0x0112
# IFD0 entries (a count word, then 6 words each): every entry's number, the words of its tag
# and (SHORT) value after the count word, and the word after its end; constants, so that the
# parse is a few dozen ops (each op costs time when a graph is built and run)
_ENTRIES = np.arange(_IFD_ENTRIES, dtype=np.int32)
_ENTRY_WORDS = 1 + 6 * _ENTRIES[:, None] + np.array([0, 4], dtype=np.int32)
_ENTRY_ENDS = 1 + 6 * (_ENTRIES + 1)


def decode_for_size(raw: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """An encoded image (a scalar string tensor) decoded by ``tf.io.decode_image`` (its own
    channels, an animation's first frame) for resizing to ``image_size`` (height, width).

    A JPEG whose shorter side is at least twice the longer of ``image_size`` is decoded at
    the smallest of 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling, as PIL's
    ``Image.draft`` does) whose shorter side still covers the longer of ``image_size``, so
    that the resize only ever shrinks it, whatever its EXIF orientation and resize mode. Its
    entropy-coded data is still read whole (a broken file fails as it does at full size), but
    less is transformed and resized: a 12-megapixel photo brought to 224 px decodes and
    resizes in less than half the time, and its pixels average the fine detail a bilinear
    resize from full size skips.
    """
    longest = max(int(s) for s in image_size)
    jpeg = tf.io.is_jpeg(raw)
    shorter = tf.cond(jpeg, lambda: tf.reduce_min(tf.io.extract_jpeg_shape(raw)[:2]),
                      lambda: tf.constant(0, tf.int32))
    # 0: as stored; k: JPEG_SCALES[k - 1]
    scale = tf.reduce_sum(tf.cast(shorter // longest >= JPEG_SCALES, tf.int32))
    return tf.switch_case(scale, [
        lambda: tf.io.decode_image(raw, channels=0, expand_animations=False),
        *(lambda ratio=ratio: tf.io.decode_jpeg(raw, ratio=ratio) for ratio in JPEG_SCALES),
    ])


def exif_orientation(raw: tf.Tensor) -> tf.Tensor:
    """The EXIF Orientation (int32, 1-8) of an encoded image (a scalar string tensor); 1 for
    anything but a JPEG with a readable Orientation tag in its EXIF data (PNG, no EXIF, a
    truncated or garbled EXIF segment, a value out of range).

    The APP1 ``Exif`` segment is where cameras and phones put it: first after the JPEG's
    start marker, or right after a JFIF (APP0) segment. Its TIFF header (either byte order)
    and the first IFD, which holds the tag, are read as 16-bit words in the TIFF data's byte
    order (TIFF keeps its offsets even). Only a few hundred bytes are read per image.
    """
    start, there = _app1_start(raw)
    return tf.cond(there, lambda: _orientation_in(tf.strings.substr(raw, start, 2 * _WORDS)),
                   lambda: tf.constant(1, tf.int32))


def may_have_exif(raw: tf.Tensor) -> tf.Tensor:
    """False for an encoded image that surely has no EXIF segment where
    :func:`exif_orientation` looks (any other format; a JPEG whose segment there is not APP1),
    in a handful of ops, so that most images skip the rest; True for the others.

    Only a common JFIF segment (16 bytes) is looked past: after one of another length the
    answer is True, and :func:`exif_orientation` looks exactly.
    """
    # big-endian words from byte 0, zero past the end of the file: the start marker, the first
    # segment's marker and length, and (word 10) the marker after a 16-byte JFIF segment
    words = tf.io.decode_raw(raw, tf.uint16, little_endian=False, fixed_length=22)
    start_marker, app1, app0, jfif_16, app1_after_jfif = tf.unstack(tf.equal(
        tf.gather(words, [0, 1, 1, 2, 10]),
        tf.constant([0xFFD8, 0xFFE1, 0xFFE0, 16, 0xFFE1], tf.uint16)))
    return start_marker & (app1 | (app0 & (app1_after_jfif | tf.logical_not(jfif_16))))


def _app1_start(raw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Where the segment after the JPEG's start marker (or after its JFIF segment) starts, and
    whether it is an APP1 segment."""
    # big-endian words at byte 0: the start marker (FF D8), the first segment's marker and its
    # length; zero-padded past the end of the file
    words = tf.io.decode_raw(tf.strings.substr(raw, 0, 6), tf.uint16, little_endian=False,
                             fixed_length=6)
    start_marker, marker, size = tf.unstack(tf.cast(words, tf.int32))
    # after an APP0 (FF E0) segment, the next one starts at 2 + 2 + its length
    start = tf.minimum(tf.where(tf.equal(marker, 0xFFE0), 4 + size, 2), tf.strings.length(raw))
    there = (tf.equal(start_marker, 0xFFD8)
             & tf.equal(tf.strings.substr(raw, start, 2), b"\xff\xe1"))
    return start, there


def _orientation_in(segment: tf.Tensor) -> tf.Tensor:
    """The Orientation (1-8) in an APP1 segment's first bytes (from its FF E1 marker on), or
    1 where they are no readable EXIF data."""

    def words(little_endian: bool) -> tf.Tensor:  # zero-padded past the end of the file
        return tf.cast(tf.io.decode_raw(segment, tf.uint16, little_endian=little_endian,
                                        fixed_length=2 * _WORDS), tf.int32)

    # words: FF E1, length, "Ex", "if", 0, byte order ("II" or "MM"), 42, IFD0's offset (2)
    big = words(little_endian=False)
    marker, _, exif_0, exif_1, exif_2, order = tf.unstack(big[:6])
    little = tf.equal(order, 0x4949)  # "II": Intel byte order; "MM": Motorola
    segment_words = tf.where(little, words(little_endian=True), big)
    magic, offset_0, offset_1 = tf.unstack(segment_words[6:9])
    ifd_offset = tf.where(little, offset_0, offset_1)  # bytes from "II"/"MM"
    offset_high = tf.where(little, offset_1, offset_0)
    ifd = 5 + ifd_offset // 2  # the word holding IFD0's entry count; 12-byte entries follow
    count = tf.gather(segment_words, tf.minimum(ifd, _WORDS - 1))
    tags, values = tf.unstack(
        tf.gather(segment_words, tf.minimum(ifd + _ENTRY_WORDS, _WORDS - 1)), axis=1)
    is_orientation = (
        tf.equal(tags, _ORIENTATION_TAG)
        & (count > _ENTRIES)
        & (ifd + _ENTRY_ENDS <= _WORDS)
    )
    value = tf.reduce_max(tf.where(is_orientation, values, 0))
    usable = (
        tf.equal(marker, 0xFFE1)
        & tf.reduce_all(tf.equal(tf.stack([exif_0, exif_1, exif_2]), _EXIF_WORDS))  # "Exif\0\0"
        & (little | tf.equal(order, 0x4D4D))
        & tf.equal(magic, 42)
        & tf.equal(offset_high, 0)  # offset < 64 KiB
        & tf.equal(ifd_offset % 2, 0)
        & (value >= 1) & (value <= 8)
    )
    return tf.where(usable, value, 1)


# For each orientation 1-8, how the stored pixels are turned upright: (transpose?, then flip
# the rows?, flip the columns?). 1 as stored, 2 mirrored, 3 upside down, 4 mirrored upside
# down; 5-8 stored transposed: 5 mirrored along the main diagonal, 6 turned 90°
# counter-clockwise (turned back clockwise), 7 mirrored along the other diagonal, 8 turned
# 90° clockwise.
_UPRIGHT = ((0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 0),
            (1, 0, 0), (1, 0, 1), (1, 1, 1), (1, 1, 0))


def apply_orientation(image: tf.Tensor, orientation: tf.Tensor | int) -> tf.Tensor:
    """``image`` (height, width, channels) turned and flipped upright for its EXIF
    ``orientation`` (1-8), as PIL's ``ImageOps.exif_transpose``; 5-8 swap height and width,
    other values leave it as it is.

    Orientation 1, most images, passes the image through untouched.
    """
    orientation = tf.cast(orientation, tf.int32)
    return tf.cond(tf.equal(orientation, 1), lambda: image,
                   lambda: _turned(image, orientation))


def _turned(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    known = (orientation >= 1) & (orientation <= 8)
    steps = tf.cast(tf.gather(_UPRIGHT, tf.where(known, orientation, 1) - 1), tf.bool)
    image = tf.transpose(image, tf.where(steps[0], [1, 0, 2], [0, 1, 2]))
    flipped_axes = tf.reshape(tf.where(steps[1:]), [-1])
    return tf.cond(tf.reduce_any(steps[1:]), lambda: tf.reverse(image, flipped_axes),
                   lambda: image)


def check_resize(resize: str) -> str:
    """``resize`` if it is one of :data:`RESIZE_MODES`; else :class:`InputError`."""
    if resize not in RESIZE_MODES:
        raise InputError(
            f"`resize` is {resize!r}; choose one of {', '.join(RESIZE_MODES)} (stretch: to "
            "the size exactly, pad: fit inside with black bands, crop: cover and cut the "
            "centre)."
        )
    return resize


def resize_image(
    image: tf.Tensor, image_size: tuple[int, int], resize: str = "stretch"
) -> tf.Tensor:
    """``image`` (height, width, channels) as float32 of ``image_size`` (height, width),
    resized bilinearly in the :data:`RESIZE_MODES` mode ``resize``."""
    height, width = (int(s) for s in image_size)
    check_resize(resize)
    # the same pixels as resizing the integers, sooner: TensorFlow's bilinear resize of three
    # float32 channels loads whole pixels, of integers one value at a time
    image = tf.cast(image, tf.float32)
    if resize == "stretch":
        return tf.image.resize(image, (height, width))
    if resize == "pad":
        return tf.image.resize_with_pad(image, height, width)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    target = tf.constant([height, width], tf.float32)
    scale = tf.reduce_max(target / shape)
    covering = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), [height, width])
    offset = (covering - [height, width]) // 2
    resized = tf.image.resize(image, covering)
    return tf.image.crop_to_bounding_box(resized, offset[0], offset[1], height, width)
