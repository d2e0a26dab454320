"""The sections of the ``finetune`` parameters (``data``, ``base``, ``head``, a phase,
``training``, ``evaluation``, ``registry``, ``export``, ``calibration``): each key with its
type, default and, as the docstring under it, its description (the documentation's
configuration reference is generated from them)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from headswap.core import heads
from headswap.core.export import FORMATS
from headswap.core.fit import FitOptions
from headswap.core.images import RESIZE_MODES
from headswap.core.lr_find import RangeTestSettings
from headswap.core.recipe import (
    Augmentation,
    Callbacks,
    Settings,
    Stage,
)


class DataConfig(Settings):
    """The images: where they are, how they are split, read and batched."""

    path: str | None = None
    """Your images: a folder with one sub-folder per class, or with `train/` and `test/` (and
    optionally `val/`) of class sub-folders, or a `.csv` of `path,label[,split]`; local, or
    `s3://...`/`gs://...`. The catalog's `images` reads it; null: none set yet."""
    image_size: tuple[int, int] | None = None
    """`[height, width]` (or one number, a square) the images are resized to; null: the base's
    own input size (its fixed input, or the size a keras.applications architecture was made
    for)."""
    batch_size: int = Field(FitOptions.batch_size, ge=1)
    """Images per batch (with a `distribution`, the global batch, split across the replicas)."""
    val_fraction: float = Field(0.2, gt=0, lt=1)
    """Fraction held out for validation, stratified and seeded: of all the images of a folder of
    class folders, or of `train/` when there is no `val/`."""
    test_fraction: float = Field(0.2, gt=0, lt=1)
    """Fraction of the images held out for the test split, stratified and seeded, when the images
    have no split of their own (no `test/` folder, no `split` column)."""
    manifest: str | None = None
    """An earlier run's manifest to reuse its split
    (`data/02_intermediate/manifest.csv/<version>/manifest.csv`); null: split the images."""
    quality: Literal["warn", "stop", "off"] = "warn"
    """The data-quality check before training (duplicates, near-duplicates, leakage across
    splits, conflicting labels, label-issue candidates, class balance, unreadable files),
    written to `data/08_reporting/data_quality*`: `warn` logs what it found, `stop` also ends
    the run before training when it finds leakage across splits or conflicting labels, `off`
    checks only the class balance."""
    resize: Literal[RESIZE_MODES] = "stretch"
    """How images are brought to `image_size`: `stretch` (the aspect ratio is not kept), `pad`
    (kept, black bands) or `crop` (kept, the centre cut out); the same in training, `predict`,
    serving and the exports."""
    cache_memory_mb: int = Field(FitOptions.cache_memory_mb, ge=0)
    """A split's decoded images (and a frozen base's features) are kept in memory when they
    fit in this many MiB; larger splits are streamed from disk every epoch. 0: always
    stream."""

    @field_validator("image_size", mode="before")
    @classmethod
    def _square(cls, value: Any) -> Any:
        return (value, value) if isinstance(value, int) else value

    @field_validator("image_size")
    @classmethod
    def _positive(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and min(value) < 1:
            raise ValueError("both sides must be at least 1 pixel")
        return value

    @model_validator(mode="after")
    def _room_to_train(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction is {self.val_fraction} + {self.test_fraction}; "
                "it must be below 1 to leave images to train on"
            )
        return self


class BaseConfig(Settings):
    """Where the pretrained base comes from (see conf/base/parameters_finetune.yml)."""

    source: Literal["file", "keras_applications", "keras_hub"] = "file"
    """Where the base comes from: `file` (a model file at `path`), `keras_applications` (the
    architecture `name`) or `keras_hub` (a preset folder at `path`)."""
    path: str | None = None
    """`file`: the `.keras`/`.h5` model (local, `s3://` or `gs://`; a Kedro-versioned folder
    means its latest version); `keras_hub`: a preset folder saved by keras-hub."""
    name: str | None = None
    """The `keras.applications` architecture (e.g. `MobileNetV2`); required when `source` is
    `keras_applications`."""
    weights: str | None = "imagenet"
    """`keras_applications`: `imagenet` (Keras downloads and caches the file), null (random
    weights) or the path of the no-top `.h5` file Keras downloads for that architecture
    (loaded by Keras itself)."""
    cut_at: str | int = "auto"
    """Where the model is cut (everything above is dropped): `auto` (after the last feature
    map), a layer name, or a layer index (`-2` keeps `layers[0]` to `layers[-2]`)."""
    weights_file: str | None = None
    """A `.keras`, `.weights.h5` or legacy `.h5` file whose weights are loaded into the base by
    layer name and shape after it is built (either source); reported as
    `base_weights_report`."""
    allow_unsafe: bool = False
    """Load model files containing `Lambda` layers (arbitrary code): only files you trust."""


class HeadConfig(Settings):
    """The new head put on the cut base."""

    pooling: Literal["avg", "max", "flatten"] = "avg"
    """How the base's feature map becomes a vector: global `avg` or `max` pooling, or
    `flatten` (skipped when the base already gives vectors)."""
    dense: list[int] = Field(default_factory=lambda: list(heads.DENSE))
    """Units of each hidden `Dense` layer (ReLU) of the new head, one number or a list; `[]`
    or null: none (the classifier sits on the pooled features)."""
    dropout: float = Field(heads.DROPOUT, ge=0, lt=1)
    """Dropout rate after each hidden `Dense` layer (or before the classifier without one)."""

    @field_validator("dense", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, int) else value


class PhaseConfig(Stage):
    """A phase: one stage, or a list of ``stages`` run in order (gradual unfreezing); then the
    phase's own keys other than ``stages`` are not used."""

    stages: list[Stage] = Field(default_factory=list)
    """Gradual unfreezing: stages with the keys of a phase, run in order on one epoch axis, each
    recompiled; when given, the phase's other keys are not used (the run says which)."""

    def stages_list(self) -> list[Stage]:
        return list(self.stages) or [Stage(**self.model_dump(exclude={"stages"}))]


class TrainingConfig(Settings):
    """Settings shared by both phases."""

    class_weight: Literal["balanced", "auto"] | dict[str, float] | None = None
    """Loss weight of each class: null (all 1), `balanced` (inversely proportional to the class's
    training images), `auto` (`balanced` when the largest training class has at least 1.5
    times the smallest's images, as the data-quality report recommends) or `{class name:
    weight}`."""
    augmentation: Augmentation = Field(default_factory=Augmentation)
    """Random layers in the model, active in training only (all off by default)."""
    callbacks: Callbacks = Field(
        default_factory=lambda: Callbacks(checkpoint_dir="data/06_models/checkpoints"))
    """Keras callbacks every stage of both phases gets."""
    cache_features: bool = FitOptions.cache_features
    """While the base is frozen (phase 1) and there is no augmentation, compute the base's features
    once per image and train the head on them."""
    resume: bool = True
    """Keep per-epoch backups so that the same command, run again after an interruption,
    continues where it stopped (false: keep none and always start afresh)."""
    resume_dir: str = "data/05_model_input/resume"
    """Where the backups are kept, in a folder per set of parameters; removed when the run
    finishes."""
    lr_find: RangeTestSettings = Field(default_factory=RangeTestSettings)
    """The learning-rate range test (a phase's `learning_rate: auto`, the `lr_find`
    pipeline)."""
    verbose: Literal["progress", "epochs", "quiet"] = "progress"
    """What training logs: `progress` (a summary line every few epochs and each stage's end),
    `epochs` (a line per epoch) or `quiet` (each stage's end); the log file has every epoch."""


class EvaluationConfig(Settings):
    """What the test-set evaluation adds to the classification report."""

    top_k: int = Field(2, ge=1)
    """k of the top-k accuracy metric (`test.top_2_accuracy`); capped at the number of
    classes."""
    misclassified: int = Field(16, ge=0)
    """How many of the most confidently misclassified test images are listed and shown in a
    grid."""


class RegistryConfig(Settings):
    """Where each run's model is registered in the MLflow Model Registry."""

    name: str | None = "auto"
    """The registered model's name: `auto` (after the image folder or CSV trained on), a name
    of your own, or null (not registered)."""

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[\w][\w.\- ]*", value):
            raise ValueError("use letters, digits, '_', '-', '.' or spaces (or auto, or null)")
        return value

    def model_name(self, images_name: str) -> str | None:
        """The registered model's name: as given, (auto) the image folder's (or CSV's) own
        name, or None (registration off)."""
        if self.name != "auto":
            return self.name
        return re.sub(r"[^\w.\-]+", "-", images_name).strip("-.") or "images"


class ExportConfig(Settings):
    """The files the fine-tuned model is exported to, for serving and for devices."""

    formats: list[Literal[FORMATS]] = Field(default_factory=lambda: list(FORMATS))
    """Which exports to write: any of `saved_model`, `tflite` (float32), `tflite_quantized`
    (dynamic-range), `tflite_int8` (full-integer), `onnx`; `[]` for none."""
    check_images: int = Field(250, ge=0)
    """Test images (at most; a seeded sample of the test split) each export is scored on
    against the Keras model: accuracy, top-1 agreement, largest probability difference,
    latency; 0: no check."""
    representative_images: int = Field(100, ge=1)
    """Training images (a seeded sample) on which `tflite_int8` measures the ranges of its
    activations."""


class CalibrationConfig(Settings):
    """Calibrated confidence and the threshold below which an image is `unknown`, fitted on
    the validation split after the last phase."""

    method: Literal["temperature", "none"] = "temperature"
    """`temperature`: temperature scaling (one number fitted on the validation split and
    folded into the model's last layer, so every use of the model gives calibrated
    probabilities; the predicted classes do not change); `none`: the probabilities as trained
    (the calibration report still measures them)."""
    target_precision: float = Field(0.95, gt=0, le=1)
    """The precision the `auto` threshold keeps on the validation split: the lowest top
    probability at which the images at or above it are right at least this often (stored
    with the model as its `min_confidence`; `predict.min_confidence: auto` uses it)."""


