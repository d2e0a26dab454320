"""Real photos: EXIF orientation read from the JPEG bytes (checked against PIL) and the resize
modes, the same in training's decoder, the Classifier, the served MLflow model and exports."""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path
from types import SimpleNamespace

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from headswap.core import data
from headswap.core.errors import InputError
from headswap.core.export import export_model
from headswap.core.images import (
    RESIZE_MODES,
    apply_orientation,
    decode_for_size,
    exif_orientation,
    may_have_exif,
    resize_image,
)
from headswap.core.predict import (
    PREPROCESSING_FILE,
    Classifier,
    read_preprocessing,
    write_labels,
    write_preprocessing,
)
from headswap.project.serving import ImageClassifierModel, log_classifier


def quadrants(height: int = 32, width: int = 48) -> np.ndarray:
    """An RGB image whose four quadrants differ: every flip and turn of it looks different."""
    image = np.zeros((height, width, 3), dtype="uint8")
    h, w = height // 2, width // 2
    image[:h, :w] = (255, 0, 0)
    image[:h, w:] = (0, 255, 0)
    image[h:, :w] = (0, 0, 255)
    image[h:, w:] = (255, 255, 255)
    return image


def exif_block(orientation: int, byte_order: bytes) -> bytes:
    """An APP1 payload: ``Exif\\0\\0`` and a TIFF header in ``byte_order`` (b"II" or b"MM")
    with an IFD0 of two entries, Make first, then Orientation."""
    e = "<" if byte_order == b"II" else ">"
    return (
        b"Exif\x00\x00" + byte_order + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", 2)
        + struct.pack(e + "HHI", 0x010F, 2, 4) + b"cam\x00"
        + struct.pack(e + "HHIHH", 0x0112, 3, 1, orientation, 0)
        + struct.pack(e + "I", 0)
    )


def jpeg(image: np.ndarray, exif: bytes | None = None) -> bytes:
    buffer = io.BytesIO()
    extra = {"exif": exif} if exif is not None else {}
    Image.fromarray(image).save(buffer, "JPEG", quality=95, subsampling=0, **extra)
    return buffer.getvalue()


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def decoded(raw: bytes, size: tuple[int, int], channels: int = 3, resize: str = "stretch"):
    return data.decode_bytes(tf.constant(raw), size, channels, resize).numpy()


@pytest.mark.parametrize("byte_order", [b"MM", b"II"])
def test_each_exif_orientation_decodes_as_pil_transposes_it(byte_order, tmp_path: Path):
    image = quadrants()
    for orientation in range(1, 9):
        file = tmp_path / f"photo_{orientation}.jpg"
        file.write_bytes(jpeg(image, exif_block(orientation, byte_order)))
        upright = np.asarray(ImageOps.exif_transpose(Image.open(file)), dtype="float32")
        assert int(exif_orientation(tf.constant(file.read_bytes()))) == orientation
        got = data.decode_image(tf.constant(str(file)), upright.shape[:2], 3).numpy()
        assert got.shape == upright.shape, orientation
        assert np.abs(got - upright).mean() < 3, orientation  # JPEG decoders differ a little


def test_pil_written_exif_is_read_inside_tf_data_graphs():
    raws = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        raws.append(jpeg(quadrants(), exif))
    stream = tf.data.Dataset.from_tensor_slices(raws).map(exif_orientation)
    assert [int(o) for o in stream] == list(range(1, 9))

    @tf.function
    def upright(raw: tf.Tensor) -> tf.Tensor:
        return apply_orientation(tf.io.decode_jpeg(raw), exif_orientation(raw))

    assert tuple(upright(tf.constant(raws[5])).shape) == (48, 32, 3)


def test_images_without_exif_are_decoded_as_stored():
    image = quadrants()
    for raw in (png(image), jpeg(image)):
        assert int(exif_orientation(tf.constant(raw))) == 1
        plain = tf.image.resize(tf.io.decode_image(raw, channels=3), (16, 24)).numpy()
        np.testing.assert_array_equal(decoded(raw, (16, 24)), plain)
    np.testing.assert_array_equal(decoded(png(image), (32, 48)), image)


def exif_layouts(image: np.ndarray, orientation: int) -> dict[str, bytes]:
    """One JPEG with an EXIF orientation where encoders put it: after a 16-byte JFIF segment
    (PIL), first after the start marker (cameras), after a longer JFIF segment."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = jpeg(image, exif)
    assert raw[2:6] == b"\xff\xe0\x00\x10" and raw[20:22] == b"\xff\xe1"
    jfif, rest = raw[6:20], raw[20:]
    longer_jfif = b"\xff\xe0\x00\x16" + jfif + bytes(6)
    return {"after JFIF": raw, "first": raw[:2] + rest, "after a longer JFIF": raw[:2] + longer_jfif
            + rest}


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_is_read_first_or_after_a_jfif_segment_of_any_length(orientation):
    image = quadrants()
    for layout, raw in exif_layouts(image, orientation).items():
        assert bool(may_have_exif(tf.constant(raw))), layout
        assert int(exif_orientation(tf.constant(raw))) == orientation, layout
        upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(raw))), "float32")
        got = decoded(raw, upright.shape[:2])
        assert got.shape == upright.shape, layout
        assert np.abs(got - upright).mean() < 3, layout


def test_images_that_cannot_hold_exif_are_told_apart_in_a_few_ops_and_read_the_same():
    image = quadrants()
    plain = jpeg(image)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "GIF")
    others = {
        "JFIF JPEG": plain, "JPEG without JFIF": plain[:2] + plain[20:], "PNG": png(image),
        "GIF": buffer.getvalue(), "empty": b"", "start marker only": b"\xff\xd8",
        "one byte": b"\xff",
    }
    for name, raw in others.items():
        assert not bool(may_have_exif(tf.constant(raw))), name
    # an EXIF segment saying "as stored" sends a JPEG through the EXIF parse: the same pixels
    exif = Image.Exif()
    exif[0x0112] = 1
    for channels in (1, 3):
        np.testing.assert_array_equal(decoded(jpeg(image, exif), (20, 30), channels),
                                      decoded(plain, (20, 30), channels))


def photo(height: int, width: int) -> np.ndarray:
    """A smooth RGB picture with detail at every scale, like a photo's."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(7 * x + 3 * y), np.cos(5 * y - 2 * x), np.sin(11 * x * y + 1)]
    return (127.5 + 100 * np.stack(channels, axis=-1)).astype("uint8")


@pytest.mark.parametrize("shorter, scale", [(319, 1), (320, 2), (639, 2), (640, 4), (1280, 8)])
def test_a_jpeg_far_larger_than_the_input_is_decoded_at_a_fraction_as_pil_drafts_it(
    shorter, scale
):
    raw = jpeg(photo(shorter, shorter + 37))
    got = decode_for_size(tf.constant(raw), (120, 160)).numpy()
    assert got.shape == (-(-shorter // scale), -(-(shorter + 37) // scale), 3)
    np.testing.assert_array_equal(got, tf.io.decode_jpeg(raw, ratio=scale).numpy())
    drafted = Image.open(io.BytesIO(raw))
    drafted.draft("RGB", (drafted.width // scale, drafted.height // scale))
    assert np.asarray(drafted).shape == got.shape
    # within the two decoders' rounding (they differ as much at full size)
    assert np.abs(np.asarray(drafted, "float32") - got).mean() < 2.0
    # other formats are decoded whole, however large
    assert decode_for_size(tf.constant(png(photo(shorter, 400))), (120, 160)).shape == (
        shorter, 400, 3)


@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_a_large_jpeg_read_at_a_fraction_gives_the_picture_a_full_decode_gives(orientation):
    raw = jpeg(photo(700, 1000), exif_block(orientation, b"II"))
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(raw))), "float32")
    for size in ((160, 160), (90, 300), (300, 90)):
        for resize in RESIZE_MODES:
            want = resize_image(tf.constant(upright), size, resize).numpy()
            got = decoded(raw, size, resize=resize)
            assert got.shape == want.shape
            assert np.abs(got - want).mean() < 1.0, (size, resize)
    # a cut file fails as at full size: its entropy-coded data is read whole
    with pytest.raises(tf.errors.InvalidArgumentError):
        decoded(raw[: len(raw) // 2], (160, 160))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_stretching_gives_the_pixels_of_resizing_the_decoded_integers(channels):
    rng = np.random.default_rng(channels)
    for shape in ((37, 53), (9, 7), (40, 40)):
        pixels = rng.integers(0, 256, (*shape, channels), dtype="uint8")
        for size in ((20, 24), (64, 48), shape):
            np.testing.assert_array_equal(resize_image(tf.constant(pixels), size).numpy(),
                                          tf.image.resize(pixels, size).numpy())


def test_truncated_or_garbled_exif_falls_back_to_as_stored():
    good = exif_block(6, b"II")
    broken = {
        "truncated APP1": good[:14],
        "bad byte order": b"Exif\x00\x00IM" + good[8:],
        "bad magic": good[:8] + b"\x2b\x00" + good[10:],
        "IFD far away": good[:10] + b"\xff\xff\xff\xff" + good[14:],
        "Orientation past the entry count": good[:14] + b"\x01\x00" + good[16:],
        "value 9": exif_block(9, b"II"),
        "value 0": exif_block(0, b"MM"),
        "random": b"Exif\x00\x00" + np.random.default_rng(0).bytes(200),
    }
    image = quadrants()
    for name, exif in broken.items():
        raw = jpeg(image, exif)
        assert int(exif_orientation(tf.constant(raw))) == 1, name
        assert decoded(raw, (32, 48)).shape == (32, 48, 3), name
    cut = jpeg(image, good)[:40]  # the file ends inside the EXIF segment
    for raw in (cut, b"", b"\xff\xd8", b"not an image", b"\xff\xd8\xff\xe1\x00\x08Exif\x00\x00"):
        assert int(exif_orientation(tf.constant(raw))) == 1, raw


def test_resize_modes_give_their_geometry_for_a_wide_and_a_tall_image(tmp_path: Path):
    wide = np.full((20, 40, 3), 200, dtype="uint8")
    pad = decoded(png(wide), (20, 20), resize="pad")  # 10 rows of image, 5-row bands above/below
    assert pad.shape == (20, 20, 3)
    assert (pad[:5] == 0).all() and (pad[15:] == 0).all()
    np.testing.assert_allclose(pad[5:15], 200, atol=1e-3)
    tall = decoded(png(wide.transpose(1, 0, 2)), (20, 20), resize="pad")
    assert (tall[:, :5] == 0).all() and (tall[:, 15:] == 0).all()
    np.testing.assert_allclose(tall[:, 5:15], 200, atol=1e-3)

    thirds = np.zeros((40, 120, 3), dtype="uint8")  # red | green | blue, 40 columns each
    for i in range(3):
        thirds[:, 40 * i:40 * (i + 1), i] = 255
    crop = decoded(png(thirds), (20, 20), resize="crop")  # the centre: green only
    assert crop.shape == (20, 20, 3)
    np.testing.assert_allclose(crop, np.broadcast_to([0, 255, 0], crop.shape), atol=1e-3)
    (tmp_path / "thirds.png").write_bytes(png(thirds))  # files in tf.data: the same pixels
    files = np.asarray([str(tmp_path / "thirds.png")])
    np.testing.assert_array_equal(data.decode_all(files, (20, 20), 3, resize="crop")[0], crop)
    crop = decoded(png(thirds.transpose(1, 0, 2)), (10, 30), resize="crop")
    np.testing.assert_allclose(crop[:, 10:20], np.broadcast_to([0, 255, 0], (10, 10, 3)),
                               atol=1e-3)

    stretch = decoded(png(thirds), (20, 20))
    np.testing.assert_array_equal(
        stretch, tf.image.resize(thirds, (20, 20)).numpy())
    with pytest.raises(InputError, match="`resize` is 'squash'"):
        decoded(png(wide), (20, 20), resize="squash")


def pixel_model(size: tuple[int, int] = (6, 6)) -> keras.Model:
    """A 'classifier' whose outputs are its input pixels: it shows what it was given."""
    inputs = keras.Input(shape=(*size, 1), name="image")
    return keras.Model(inputs, keras.layers.Flatten()(inputs))


def pixel_names(size: tuple[int, int] = (6, 6)) -> tuple[str, ...]:
    return tuple(f"pixel_{i}" for i in range(size[0] * size[1]))


def odd_images() -> list[bytes]:
    """Non-square images in which every resize mode gives other pixels (one with EXIF)."""
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, shape, dtype="uint8") for shape in ((6, 14), (15, 9))]
    return [png(images[0]), png(images[1]), jpeg(np.stack([images[0]] * 3, -1),
                                                 exif_block(8, b"MM"))]


@pytest.mark.parametrize("resize", RESIZE_MODES)
def test_the_classifier_reads_images_in_its_resize_mode(resize):
    raws = odd_images()
    expected = np.stack([decoded(raw, (6, 6), 1, resize).reshape(-1) for raw in raws])
    classifier = Classifier(pixel_model(), pixel_names(), resize=resize)
    for batch_size in (32, 1):  # one request decoded eagerly; more through tf.data
        probabilities, positions, problems = classifier.probabilities(raws, batch_size)
        assert problems == {} and positions.tolist() == [0, 1, 2]
        np.testing.assert_allclose(probabilities, expected, atol=1e-4)
    if resize != "stretch":
        assert not np.allclose(expected, Classifier(pixel_model(), pixel_names())
                               .probabilities(raws)[0], atol=1)
    with pytest.raises(InputError, match="`resize`"):
        Classifier(pixel_model(), pixel_names(), resize="fit")


def test_a_model_file_is_read_with_the_resize_mode_beside_its_labels(tmp_path: Path):
    pixel_model().save(tmp_path / "model.keras")
    write_labels(tmp_path / "labels.txt", pixel_names())
    assert Classifier.from_file(tmp_path / "model.keras").resize == "stretch"  # no file: as before
    write_preprocessing(tmp_path / PREPROCESSING_FILE, (6, 6), 1, "crop")
    classifier = Classifier.from_file(tmp_path / "model.keras")
    assert (classifier.resize, classifier.image_size) == ("crop", (6, 6))
    assert read_preprocessing(tmp_path / "missing.json")["resize"] == "stretch"


def test_a_served_model_logged_before_resize_modes_stretches(tmp_path: Path):
    """The MLflow model's load_context on artifacts as older ``log_classifier`` wrote them."""
    pixel_model().save(tmp_path / "model.keras")
    spec = {"class_names": list(pixel_names()), "image_size": [6, 6]}  # no "resize"
    (tmp_path / "classifier.json").write_text(json.dumps(spec))
    served = ImageClassifierModel()
    served.load_context(SimpleNamespace(artifacts={
        "keras_model": str(tmp_path / "model.keras"),
        "classifier": str(tmp_path / "classifier.json")}))
    assert served.classifier.resize == "stretch"
    raw = odd_images()[0]
    table = served.predict(None, pd.DataFrame({"image": [raw]}))
    expected = decoded(raw, (6, 6), 1, "stretch").reshape(-1)
    np.testing.assert_allclose(table[[f"p[{n}]" for n in pixel_names()]].to_numpy()[0],
                               expected, atol=1e-4)


def test_exports_record_the_preprocessing_beside_the_labels(tmp_path: Path):
    paths = export_model(pixel_model(), tmp_path / "export", pixel_names(),
                         ["saved_model", "tflite"], resize="pad")
    for folder in (paths["saved_model"], paths["tflite"].parent):
        assert json.loads((folder / PREPROCESSING_FILE).read_text()) == {
            "image_size": [6, 6], "channels": 1, "resize": "pad"}
        assert (folder / "labels.txt").is_file()
    with pytest.raises(InputError, match="`resize`"):
        export_model(pixel_model(), tmp_path / "other", pixel_names(), "tflite", resize="zoom")


@pytest.mark.slow  # trains a model for seconds
def test_the_logged_classifier_remembers_its_resize_mode(tmp_path: Path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("resize")  # not the experiment an earlier module made active
    raw = odd_images()[1]
    (tmp_path / "example.png").write_bytes(raw)
    with mlflow.start_run():
        info = log_classifier(Classifier(pixel_model(), pixel_names(), resize="crop"),
                              tmp_path / "example.png")
    served = mlflow.pyfunc.load_model(info.model_uri)
    table = served.predict(pd.DataFrame({"image": [base64.b64encode(raw).decode("ascii")]}))
    np.testing.assert_allclose(table[[f"p[{n}]" for n in pixel_names()]].to_numpy()[0],
                               decoded(raw, (6, 6), 1, "crop").reshape(-1), atol=1e-4)
