"""Classify images with a fine-tuned model: files of a folder, file paths, or encoded image
bytes (raw, or base64 as a REST client sends them). Images are read exactly as in training
(:func:`headswap.core.data.decode_bytes`: decode, EXIF orientation, channels, resize in the
classifier's ``resize`` mode).

A :class:`Classifier` is a Keras model that takes raw pixels together with the class names
of its outputs. :meth:`Classifier.predict` gives one row per image: the predicted class
(``unknown`` when its probability is below the classifier's ``min_confidence``), its
confidence, an out-of-distribution score (``ood_score``, higher is more unusual: see
:mod:`headswap.core.ood`; NaN for a model without its statistics), the ``top_k`` classes
with their probabilities and each class's probability (``p[<class name>]``); images that
cannot be read are returned apart with the reason.

::

    from headswap.core.predict import Classifier, list_images
    classifier = Classifier.from_file("model.keras")    # labels.txt (+ preprocessing.json)
    table, problems = classifier.predict(["cat.jpg", "dog.png"])
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from headswap.core import calibration, data, inference, manifests, ood, sources
from headswap.core.bases import input_spec, load_model_file
from headswap.core.errors import InputError
from headswap.core.images import check_resize
from headswap.core.progress import CountProgress

TOP_K = 3
LABELS_FILE = "labels.txt"
PREPROCESSING_FILE = "preprocessing.json"
_CHUNK = 1024  # images read into memory at a time
_MAX_PATH = 4096  # longer strings are never taken for file paths


def check_class_names(class_names: Sequence[str]) -> list[str]:
    """``class_names`` as a list, checked to be distinct one-line strings."""
    if isinstance(class_names, str):
        raise InputError(
            f"`class_names` must be a list of class names, not the string {class_names!r}."
        )
    names = list(class_names)
    bad = [name for name in names if not isinstance(name, str) or not name.strip()]
    bad += [name for name in names if isinstance(name, str) and ("\n" in name or "\r" in name)]
    if bad:
        raise InputError(
            f"Class names must be non-empty strings on one line; got {bad!r}. "
            "Give each class a one-line name."
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(
            f"Class names must be distinct; repeated: {', '.join(map(repr, repeated))}. "
            "Give each class its own name."
        )
    return names


def check_classifier(model: keras.Model, class_names: Sequence[str]) -> list[str]:
    """Refuse what is not a one-input, one-output Keras model with one output per class;
    return the class names as a list."""
    if not isinstance(model, keras.Model):
        raise InputError(
            f"Expected a Keras model; got {type(model).__name__}. Load a saved one with "
            "keras.models.load_model first."
        )
    names = check_class_names(class_names)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise InputError(
            f"Model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} "
            "outputs; a classifier takes one image input and gives one output."
        )
    input_spec(model)  # an image input
    shape = tuple(model.outputs[0].shape)
    if len(shape) != 2:
        raise InputError(
            f"Model {model.name!r} gives outputs of shape {shape}, not one probability per "
            "class: it is not a classifier (a base cut below its head?). Give a fine-tuned "
            "model."
        )
    units = shape[-1]
    if units != len(names):
        raise InputError(
            f"Model {model.name!r} gives {units} class probabilities but {len(names)} class "
            f"names were given ({', '.join(names)}). Give the class names the model was "
            "trained with, in output order."
        )
    return names


def write_labels(path: str | Path, class_names: Sequence[str]) -> Path:
    """Write ``class_names`` one a line, in output order, to ``path``; return ``path``."""
    names = check_class_names(class_names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    return path


def read_labels(path: str | Path) -> list[str]:
    """The class names in a labels file written by :func:`write_labels`, in output order."""
    return Path(path).read_text(encoding="utf-8").splitlines()


def write_preprocessing(
    path: str | Path,
    image_size: tuple[int | None, int | None],
    channels: int,
    resize: str = "stretch",
    min_confidence: float | None = None,
    ood_statistics: ood.Statistics | None = None,
) -> Path:
    """Write how images are read for a model to the JSON file ``path`` (``image_size``:
    [height, width], ``channels``, ``resize``: a mode of
    :data:`headswap.core.images.RESIZE_MODES`), the top probability below which its
    answer is ``unknown`` (``min_confidence``, None: none), and what its ``ood_score`` needs
    (:class:`headswap.core.ood.Statistics`, None: none): ``ood_threshold``, the reference to
    compare the score with, and ``ood``, the class means and precision; return ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = [None if side is None else int(side) for side in image_size]
    settings = {"image_size": size, "channels": int(channels), "resize": check_resize(resize)}
    if min_confidence is not None:
        settings["min_confidence"] = float(min_confidence)
    settings.update(ood.to_settings(ood_statistics))
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return path


def read_preprocessing(path: str | Path) -> dict:
    """The settings :func:`write_preprocessing` wrote to ``path``: ``image_size`` (a tuple,
    or None where unknown), ``channels`` (None where unknown), ``resize``,
    ``min_confidence`` and ``ood`` (:func:`headswap.core.ood.from_settings`). A file that
    does not exist, or lacks a key, gives None and ``resize="stretch"`` (how images were read
    before the mode was recorded)."""
    path = Path(path)
    settings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    size = settings.get("image_size")
    return {
        "image_size": tuple(size) if size and None not in size else None,
        "channels": settings.get("channels"),
        "resize": check_resize(settings.get("resize", "stretch")),
        "min_confidence": settings.get("min_confidence"),
        "ood": ood.from_settings(settings),
    }


@dataclass(frozen=True)
class Classifier:
    """A Keras classifier taking raw pixels, with the names of its classes in output order
    (and, for a model that takes any size, the ``image_size`` images are resized to), and how
    images are resized to its input, as in its training (a mode of
    :data:`headswap.core.images.RESIZE_MODES`); below ``min_confidence`` (a top probability),
    :meth:`predict` labels an image ``unknown`` (None: never). With ``ood`` (the statistics
    of the training split's head features, :mod:`headswap.core.ood`) it gives each image an
    ``ood_score``; without, that column is NaN."""

    model: keras.Model
    class_names: tuple[str, ...]
    image_size: tuple[int, int] | None = None
    resize: str = "stretch"
    min_confidence: float | None = None
    ood: ood.Statistics | None = field(default=None, compare=False)
    # the model with the logits' layer input as a second output (None: no Dense softmax last)
    _with_features: keras.Model | None = field(default=None, init=False, repr=False,
                                               compare=False)

    def __post_init__(self) -> None:
        check_resize(self.resize)
        object.__setattr__(self, "class_names",
                           tuple(check_classifier(self.model, self.class_names)))
        object.__setattr__(self, "min_confidence",
                           calibration.check_threshold(self.min_confidence, self.class_names))
        object.__setattr__(self, "_with_features", calibration.with_features(self.model))
        if self.ood is not None:
            self._check_ood(self.ood)
        height, width, _ = input_spec(self.model)
        size = self.image_size or (height, width)
        if None in size:
            raise InputError(
                f"Model {self.model.name!r} takes images of any size; give `image_size` "
                "([height, width]) to resize them to."
            )
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))

    def _check_ood(self, statistics: ood.Statistics) -> None:
        """Refuse statistics of head features this model does not have."""
        width = (None if self._with_features is None
                 else calibration.classifier_layer(self.model).input.shape[-1])
        if width != statistics.dimensions:
            has = ("no Dense softmax last layer" if width is None
                   else f"{width} head features")
            raise InputError(
                f"The ood statistics are of {statistics.dimensions} head features, but model "
                f"{self.model.name!r} has {has}: they belong to another model. Give the "
                "preprocessing.json written with this model, or none (no ood_score).")

    @classmethod
    def from_file(cls, path: str | Path, labels: str | Path | None = None,
                  allow_unsafe: bool = False) -> Classifier:
        """The model in a ``.keras``/``.h5`` file, with the class names of ``labels`` (one a
        line; by default the ``labels.txt`` beside the model, as exports write it), and the
        image size, resize mode, ``min_confidence`` and ``ood`` statistics of the
        ``preprocessing.json`` beside ``labels`` (:func:`read_preprocessing`; without one,
        the model's input size, ``stretch``, and None for both)."""
        model = load_model_file(path, allow_unsafe)
        labels = Path(labels) if labels else Path(path).parent / LABELS_FILE
        if not labels.is_file():
            raise InputError(
                f"No class names for {path}: {labels} does not exist. Write the class names "
                f"one a line, in the model's output order, to {labels} (or give `labels`)."
            )
        settings = read_preprocessing(labels.parent / PREPROCESSING_FILE)
        return cls(model, tuple(read_labels(labels)), settings["image_size"], settings["resize"],
                   settings["min_confidence"], settings["ood"])

    @property
    def channels(self) -> int:
        return input_spec(self.model)[2]

    def probabilities(
        self, images: Sequence[str | bytes], batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """Class probabilities of the ``images`` that can be read: ``(probabilities,
        positions, problems)``, where ``positions`` are those images' indices in ``images``
        and ``problems`` maps the others' indices to the reason."""
        probabilities, _, positions, problems = self._outputs(images, batch_size)
        return probabilities, positions, problems

    def _outputs(
        self, images: Sequence[str | bytes], batch_size: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
        """:meth:`probabilities` with the images' ``ood_score`` after them
        (:meth:`headswap.core.ood.Statistics.score`; NaN without statistics)."""
        outputs: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        positions: list[int] = []
        problems: dict[int, str] = {}
        progress = CountProgress("Classifying the images", len(images))  # large sets only
        for start in range(0, len(images), _CHUNK):
            progress.update(start)
            raw: dict[int, bytes] = {}
            for i, item in enumerate(images[start:start + _CHUNK], start):
                try:
                    raw[i] = encoded_image(item)
                except InputError as err:
                    problems[i] = str(err)
            done = len(positions)
            model = self.model if self.ood is None else self._with_features
            # traced however few the batches: a server calls the same model request after
            # request
            for out, indices in inference.outputs(model, self._decoded(raw, batch_size)):
                if self.ood is None:
                    outputs.append(out)
                    scores.append(np.full(len(out), np.nan))
                else:
                    outputs.append(out[0])
                    scores.append(self.ood.score(out[1]))
                positions += [int(i) for i in indices]
            decoded = set(positions[done:])
            for i in sorted(set(raw) - decoded):
                problems[i] = manifests.bytes_problem(raw[i]) or "cannot be decoded"
        probabilities = (np.concatenate(outputs) if outputs
                         else np.zeros((0, len(self.class_names)), dtype="float32"))
        ood = np.concatenate(scores) if scores else np.zeros(0)
        return (probabilities.astype("float32"), ood.astype("float32"),
                np.asarray(positions, dtype=int), problems)

    def predict(
        self, images: Sequence[str | bytes], batch_size: int = 32, top_k: int = TOP_K
    ) -> tuple[pd.DataFrame, dict[int, str]]:
        """:func:`label_table` of the ``images`` that can be read (indexed by their position
        in ``images``; ``unknown`` below ``min_confidence``), and ``{position: reason}`` for
        the others."""
        probabilities, ood, positions, problems = self._outputs(images, batch_size)
        table = label_table(probabilities, self.class_names, top_k, ood, self.min_confidence)
        return table.set_index(pd.Index(positions)), problems

    def _decoded(self, raw: dict[int, bytes], batch_size: int):
        """Batches ``(images, indices)`` of the decodable ``raw`` images, in order; the
        others are dropped. One batch's worth (a request to a server) is decoded eagerly;
        more go through a parallel ``tf.data`` pipeline, which takes longer to set up."""
        if not raw:
            return iter(())
        size, channels, resize = self.image_size, self.channels, self.resize
        if len(raw) <= batch_size:
            decoded = {}
            for i, image in raw.items():
                try:
                    decoded[i] = data.decode_bytes(tf.constant(image), size, channels, resize)
                except tf.errors.OpError:
                    continue
            return iter([(tf.stack(list(decoded.values())), list(decoded))] if decoded else [])

        def decode(index: tf.Tensor, image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return data.decode_bytes(image, size, channels, resize), index

        return iter(data.untuned(
            tf.data.Dataset.from_tensor_slices((list(raw), list(raw.values())))
            .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .ignore_errors()
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE)
        ))


def encoded_image(item: str | bytes) -> bytes:
    """The encoded image an ``item`` stands for: the bytes themselves, the file at a path,
    or base64-encoded bytes (a ``data:image/...;base64,`` prefix is allowed)."""
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    text = str(item)
    if len(text) < _MAX_PATH:
        try:
            if Path(text).is_file():
                return Path(text).read_bytes()
        except (OSError, ValueError) as err:
            if isinstance(err, PermissionError) or Path(text).exists():
                raise InputError(f"{text} cannot be read: {err}") from err
    encoded = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        return base64.b64decode("".join(encoded.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(
            f"{text[:80]!r} is neither an image file that exists nor base64-encoded image bytes."
        ) from None


def label_table(
    probabilities: np.ndarray, class_names: Sequence[str], top_k: int = TOP_K,
    ood_score: np.ndarray | None = None, min_confidence: float | None = None,
) -> pd.DataFrame:
    """One row per image: ``predicted`` class (``unknown`` where its probability is below
    ``min_confidence``) and its ``confidence``, the ``ood_score`` (when given), the ``top_k``
    classes as ``top_<j>`` with ``top_<j>_probability`` (``top_1`` is the most probable class,
    also for an image labelled ``unknown``), then each class's probability
    ``p[<class name>]``."""
    names = np.asarray(class_names, dtype=object)
    k = max(1, min(int(top_k), len(names)))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    rows = np.arange(len(probabilities))[:, None]
    confidence = probabilities[rows[:, 0], order[:, 0]] if len(order) else np.zeros(0)
    table = {
        "predicted": calibration.refuse(names[order[:, 0]] if len(order) else [], confidence,
                                        min_confidence),
        "confidence": confidence,
    }
    if ood_score is not None:
        table["ood_score"] = np.asarray(ood_score)
    for j in range(k):
        table[f"top_{j + 1}"] = names[order[:, j]]
        table[f"top_{j + 1}_probability"] = probabilities[rows[:, 0], order[:, j]]
    for i, name in enumerate(names):
        table[f"p[{name}]"] = probabilities[:, i]
    return pd.DataFrame(table)


def list_images(source: sources.ImageSource) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The images to classify of ``source`` (a folder, flat or of class sub-folders, or a CSV
    of path[,label]): ``(path, label)``, ``label`` being the class sub-folder's (or the CSV's)
    label or empty; and the files in formats that cannot be decoded (path, reason). Remote
    images are fetched into the local cache; those that cannot be read are skipped too."""
    images = source.files[["path", "label"]]
    if images.empty:
        raise sources.DataError(
            f"No images found under {source.location}: expected image files "
            f"({', '.join(sorted(sources.IMAGE_EXTENSIONS))}), directly or in sub-folders, or a "
            "CSV of path[,label]."
        )
    remote = [p for p in images["path"] if sources.is_url(p)]
    problems = sources.fetch(remote, source.versions, source.storage_options) if remote else {}
    skipped = pd.concat([source.skipped, pd.DataFrame(list(problems.items()),
                                                      columns=sources.SKIPPED_COLUMNS)],
                        ignore_index=True)
    return images[~images["path"].isin(problems)].reset_index(drop=True), skipped
