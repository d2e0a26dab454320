"""Image fingerprints for finding duplicates: a SHA-256 of the bytes (exact copies) and a 256-bit
DCT perceptual hash (the same picture re-encoded, resized or recompressed), and the pairs of
hashes close enough to be near-duplicates.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from scipy.fft import dctn

logger = logging.getLogger(__name__)

HASH_BITS = 256
"""Bits of the perceptual hash (:func:`perceptual_hash`), from a 16x16 block of DCT
coefficients: the common 64-bit (8x8) hash is too coarse for folders of similar pictures
(centred product shots), where unrelated images often lie 2-4 of its bits apart."""


NEAR_DISTANCE = 16.0
"""Default largest distance (:func:`close_pairs`: disagreeing reliable bits, scaled to
:data:`HASH_BITS`) between near-duplicates. Measured by ``benchmarks/data_quality.py`` on
Fashion-MNIST: JPEG re-encodings resized by 5-10% lie within it (all at 64x64 pixels, 98%
at 28x28), distinct images of a 1,000-image folder at 64x64 pixels beyond 24."""


_HASH_SIDE = 32  # images are reduced to 32x32 grey before the DCT


_HASH_BLOCK = 16  # the 16x16 lowest-frequency coefficients are hashed: 256 bits


_RELIABLE = 2.0  # a coefficient this far (grey levels, orthonormal DCT) from the median


_MIN_COMMON = 64  # distances are scaled as if at least this many bits were compared


def perceptual_hash(raw: bytes) -> bytes:
    """The DCT perceptual hash of an encoded image: :data:`HASH_BITS` bits and as many
    reliability bits, 64 bytes.

    The image (EXIF orientation applied) in grey is reduced to 32x32 pixels; each of its
    16x16 lowest-frequency coefficients (orthonormal DCT) gives one bit: above their median
    or not; its reliability bit says whether it lies more than 2 grey levels from the
    median, i.e. whether re-encoding noise is unlikely to flip it (smooth pictures have
    many coefficients near zero). A JPEG is decoded at reduced size (``Image.draft``)."""
    with Image.open(io.BytesIO(raw)) as image:
        image.draft("L", (_HASH_SIDE * 2, _HASH_SIDE * 2))  # JPEG: decode at 1/2..1/8 scale
        grey = ImageOps.exif_transpose(image).convert("L")
        small = grey.resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.LANCZOS)
    low = dctn(np.asarray(small, dtype=np.float64), norm="ortho")[:_HASH_BLOCK, :_HASH_BLOCK]
    centred = (low - np.median(low)).ravel()
    return np.packbits(centred > 0).tobytes() + np.packbits(abs(centred) > _RELIABLE).tobytes()


def _fingerprint(path: str, read: Callable[[str], bytes]) -> tuple[str | None, bytes | None]:
    """(SHA-256 of the bytes, perceptual hash) of one file; None for what cannot be had."""
    try:
        raw = read(path)
    except Exception as err:  # noqa: BLE001 - any reader's failure: the file is left out
        logger.warning("Cannot read %s for the duplicate check: %s", path, err)
        return None, None
    digest = hashlib.sha256(raw).hexdigest()
    try:
        return digest, perceptual_hash(raw)
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds on a broken image
        logger.warning("Cannot decode %s for the near-duplicate check: %s", path, err)
        return digest, None


def fingerprints(
    paths: list[str], read: Callable[[str], bytes] | None = None
) -> tuple[list[str | None], list[bytes | None]]:
    """SHA-256 digests and perceptual hashes of ``paths``, read and hashed in a thread pool."""
    read = read or (lambda path: Path(path).read_bytes())  # a local file
    workers = max(1, min(32, 4 * (os.cpu_count() or 1)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda p: _fingerprint(p, read), paths, chunksize=16))
    return [r[0] for r in results], [r[1] for r in results]


def close_pairs(hashes: np.ndarray, max_distance: float) -> np.ndarray:
    """Index pairs ``(i, j)``, ``i < j``, of :func:`perceptual_hash` ``hashes`` (an (n, 64)
    uint8 array, one hash a row) within ``max_distance``, and that distance: an array of
    shape (pairs, 3), float.

    The distance of two hashes is the number of bits that disagree among those both hold
    reliably, scaled to :data:`HASH_BITS` (as if at least 64 had been compared). All pairs
    are compared (AND, XOR and popcount, vectorised), a block of rows at a time so that
    memory stays under 100 MiB whatever n."""
    words = np.ascontiguousarray(hashes, dtype=np.uint8).view(np.uint64)
    half = words.shape[1] // 2  # sign words, then reliability words
    block = max(1, 2**21 // max(len(words), 1))
    found = [np.empty((0, 3))]
    for start in range(0, len(words), block):
        rows, rest = words[start : start + block, None], words[None, start:]
        differ = np.zeros((rows.shape[0], rest.shape[1]), dtype=np.uint16)
        common = np.zeros_like(differ)
        for w in range(half):
            both = rows[..., half + w] & rest[..., half + w]
            common += np.bitwise_count(both)
            differ += np.bitwise_count((rows[..., w] ^ rest[..., w]) & both)
        distance = differ * (HASH_BITS / np.maximum(common, _MIN_COMMON))
        i, j = np.nonzero(distance <= max_distance)
        keep = j > i  # the block's upper triangle: each pair once, no self-pairs
        i, j = i[keep], j[keep]
        found.append(np.stack([i + start, j + start, distance[i, j]], axis=1))
    return np.concatenate(found)
