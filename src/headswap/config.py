"""The parameter schema of the ``finetune`` pipeline.

Parameters arrive as plain dicts (from ``conf/*/parameters_finetune.yml`` and
``kedro run --params``); :func:`parse_finetune` validates them once, before any work starts,
and every error names the key, the value that was given and what is allowed.
"""

from __future__ import annotations

import re
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    path: str
    image_size: tuple[int, int] = (224, 224)
    batch_size: int = Field(32, ge=1)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    manifest: str | None = None
    # A split's decoded images (and a frozen base's features) are kept in memory when they
    # fit in this many MiB; larger splits are streamed from disk. 0: always stream.
    cache_memory_mb: int = Field(1024, ge=0)

    @field_validator("image_size", mode="before")
    @classmethod
    def _square(cls, value: Any) -> Any:
        return (value, value) if isinstance(value, int) else value

    @field_validator("image_size")
    @classmethod
    def _positive(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
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


class BaseConfig(_Strict):
    """Where the pretrained base comes from (see conf/base/parameters_finetune.yml)."""

    source: Literal["file", "keras_applications"] = "file"
    path: str | None = None  # model file, for source file
    name: str | None = None  # architecture, for source keras_applications
    # keras_applications: "imagenet", None (random) or the path of the no-top .h5 file Keras
    # downloads for that architecture (loaded by Keras itself).
    weights: str | None = "imagenet"
    cut_at: str | int = "auto"
    # A .keras, .weights.h5 or legacy .h5 file whose weights are loaded into the base by layer
    # name and shape after it is built (both sources); reported as base_weights_report.
    weights_file: str | None = None
    allow_unsafe: bool = False


class HeadConfig(_Strict):
    pooling: Literal["avg", "max", "flatten"] = "avg"
    dense: list[int] = Field(default_factory=lambda: [128])
    dropout: float = Field(0.5, ge=0, lt=1)

    @field_validator("dense", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, int) else value


class LayerSelection(_Strict):
    """Which layers of the base: exactly one of the fields (see headswap.training.select_layers).

    ``all: true``; ``names: [a, b]``; ``regex: "block[45]_.*"``; ``index: "5:-1"`` (a Python
    slice over the base's layers); ``top: 10`` (the last 10 layers); ``from_layer: block4_conv``
    (that layer and every layer above it).
    """

    all: bool | None = None
    names: list[str] | None = None
    regex: str | None = None
    index: str | None = None
    top: int | None = Field(None, ge=0)
    from_layer: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> LayerSelection:
        given = [k for k, v in self.model_dump().items() if v is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of all, names, regex, index, top, from_layer; got "
                + (", ".join(given) or "none")
            )
        if self.index is not None and not re.fullmatch(r"\s*-?\d*\s*:\s*-?\d*\s*", self.index):
            raise ValueError(f"index must be a slice such as '5:-1' or ':10'; got {self.index!r}")
        return self


def _selection(value: Any) -> Any:
    """``all``/``none`` and bare lists as shorthands of a :class:`LayerSelection`."""
    if value in ("all", True):
        return {"all": True}
    if value in ("none", False, None):
        return None
    if isinstance(value, list):
        return {"names": value}
    return value


class LayerRate(_Strict):
    """A group of base layers trained at its own learning rate."""

    layers: LayerSelection
    learning_rate: float = Field(ge=0)


class Discriminative(_Strict):
    """Base layers split into ``groups`` blocks, bottom to top, with learning rates spaced
    geometrically from ``min_learning_rate`` up to the phase's (the head's) rate."""

    min_learning_rate: float = Field(gt=0)
    groups: int = Field(3, ge=1)


class TrainingSettings(_Strict):
    """Optimizer, rates, schedule and which base layers train, for a phase or a stage."""

    epochs: int = Field(5, ge=0)
    learning_rate: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "adamw", "rmsprop", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    train: LayerSelection | None = None
    train_batchnorm: bool = False
    layer_rates: list[LayerRate] = Field(default_factory=list)
    discriminative: Discriminative | None = None

    @field_validator("train", mode="before")
    @classmethod
    def _train(cls, value: Any) -> Any:
        return _selection(value)

    @model_validator(mode="after")
    def _rates(self) -> TrainingSettings:
        if self.layer_rates and self.discriminative:
            raise ValueError("give layer_rates or discriminative, not both")
        if self.warmup_epochs and self.warmup_epochs >= max(self.epochs, 1):
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be fewer than epochs ({self.epochs})"
            )
        return self


class PhaseConfig(TrainingSettings):
    """A phase; phase 2 may instead be a list of ``stages`` run in order (gradual unfreezing)."""

    stages: list[TrainingSettings] = Field(default_factory=list)


class EarlyStoppingConfig(_Strict):
    monitor: str = "val_loss"
    patience: int = Field(5, ge=0)
    min_delta: float = Field(0.0, ge=0)
    restore_best_weights: bool = True


class ReduceLROnPlateauConfig(_Strict):
    monitor: str = "val_loss"
    factor: float = Field(0.5, gt=0, lt=1)
    patience: int = Field(3, ge=0)
    min_delta: float = Field(1e-4, ge=0)
    min_learning_rate: float = Field(1e-7, ge=0)


class CallbacksConfig(_Strict):
    early_stopping: EarlyStoppingConfig | None = None
    reduce_lr_on_plateau: ReduceLROnPlateauConfig | None = None
    checkpoint: bool = False
    terminate_on_nan: bool = True
    checkpoint_dir: str = "data/06_models/checkpoints"


class AugmentationConfig(_Strict):
    """Random Keras preprocessing layers, active in training only (0 or null turns one off)."""

    flip: Literal["horizontal", "vertical", "horizontal_and_vertical"] | None = None
    rotation: float = Field(0.0, ge=0, le=1)
    zoom: float = Field(0.0, ge=0, lt=1)
    contrast: float = Field(0.0, ge=0, le=1)
    translation: float = Field(0.0, ge=0, lt=1)

    @property
    def active(self) -> bool:
        return bool(self.flip or self.rotation or self.zoom or self.contrast or self.translation)


class TrainingConfig(_Strict):
    """Settings shared by both phases."""

    class_weight: Literal["balanced"] | dict[str, float] | None = None
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)
    callbacks: CallbacksConfig = Field(default_factory=CallbacksConfig)
    cache_features: bool = True
    resume: bool = False
    resume_dir: str = "data/05_model_input/resume"


class EvaluationConfig(_Strict):
    """What the test-set evaluation adds to the classification report."""

    top_k: int = Field(2, ge=1)  # top-k accuracy (capped at the number of classes)
    misclassified: int = Field(16, ge=0)  # most confident errors shown in the grid


class FinetuneConfig(_Strict):
    seed: int = 42
    distribution: Literal["none", "mirrored", "multi_worker_mirrored"] = "none"
    mixed_precision: bool = False
    jit_compile: bool = False
    data: DataConfig
    base: BaseConfig
    head: HeadConfig = Field(default_factory=HeadConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    phase1: PhaseConfig = Field(
        default_factory=lambda: PhaseConfig(epochs=5, learning_rate=1e-3, optimizer="rmsprop")
    )
    phase2: PhaseConfig = Field(
        default_factory=lambda: PhaseConfig(
            epochs=5, learning_rate=1e-4, optimizer="adam", train={"all": True}
        )
    )

    @model_validator(mode="after")
    def _phase_defaults(self) -> FinetuneConfig:
        # Phase 2 opens the whole base unless it says otherwise; phase 1 keeps it frozen.
        if "train" not in self.phase2.model_fields_set:
            self.phase2.train = LayerSelection(all=True)
        if self.training.callbacks.reduce_lr_on_plateau:
            for phase in ("phase1", "phase2"):
                settings = getattr(self, phase)
                for stage in settings.stages or [settings]:
                    if stage.schedule != "constant" or stage.warmup_epochs:
                        raise ValueError(
                            f"{phase} uses a {stage.schedule} schedule with warmup "
                            f"{stage.warmup_epochs}, which reduce_lr_on_plateau cannot change; "
                            "use one or the other"
                        )
                    if stage.layer_rates or stage.discriminative:
                        raise ValueError(
                            f"{phase} has per-layer learning rates, which "
                            "reduce_lr_on_plateau cannot scale; use schedule: cosine instead"
                        )
        return self


class ParameterError(ValueError):
    """A parameter is missing, has the wrong type, or is out of range."""


def parse_finetune(params: dict[str, Any], prefix: str = "finetune") -> FinetuneConfig:
    """Validate the ``finetune`` parameters; raise :class:`ParameterError` naming each bad key."""
    try:
        config = FinetuneConfig.model_validate(params)
    except ValidationError as err:
        raise ParameterError(_describe(err, prefix)) from None
    if config.base.source == "keras_applications" and not config.base.name:
        raise ParameterError(
            f"{prefix}.base.name is required when {prefix}.base.source is keras_applications "
            "(e.g. MobileNetV2)."
        )
    if config.base.source == "keras_applications":
        from headswap.bases import ARCHITECTURES  # imports Keras: only when needed

        if config.base.name not in ARCHITECTURES:
            raise ParameterError(
                f"Invalid parameters:\n  {prefix}.base.name: got {config.base.name!r}; not a "
                "known keras.applications architecture. Allowed: " + ", ".join(ARCHITECTURES)
            )
    if config.base.source == "file" and not config.base.path:
        raise ParameterError(
            f"{prefix}.base.path is required when {prefix}.base.source is file "
            "(a .keras or .h5 model)."
        )
    return config


def _describe(err: ValidationError, prefix: str) -> str:
    """One message with a line per problem: the key, the value given and what is allowed."""
    lines = []
    for problem in err.errors():
        key = ".".join([prefix, *(str(p) for p in problem["loc"])])
        value = problem.get("input")
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            allowed = _allowed_keys(problem["loc"])
            lines.append(
                f"{key}: unknown key (given {value!r}); "
                + (f"allowed keys here: {', '.join(allowed)}" if allowed else "check its spelling")
                + " (see conf/base/parameters_finetune.yml)"
            )
        elif problem["type"] == "missing":
            lines.append(f"{key}: missing (it has no default; set it in the parameters)")
        elif isinstance(value, dict):
            lines.append(f"{key}: {message}")
        else:
            lines.append(f"{key}: got {value!r}; {message}")
    return "Invalid parameters:\n  " + "\n  ".join(lines)


def _allowed_keys(loc: tuple[int | str, ...]) -> list[str]:
    """The keys the section holding ``loc[-1]`` accepts (empty when it cannot be told)."""
    model: type[BaseModel] | None = FinetuneConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part)) if model else None
        model = _model_of(field.annotation) if field else None
    return list(model.model_fields) if model else []


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as ``X``, ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if (model := _model_of(arg)) is not None:
            return model
    return None
