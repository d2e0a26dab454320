"""The parameter schema of the ``finetune`` pipeline.

Parameters arrive as plain dicts (from ``conf/*/parameters_finetune.yml`` and
``kedro run --params``); :func:`parse_finetune` validates them once, before any work starts,
and every error names the key, the value that was given and what is allowed.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from headswap.core.export import FORMATS
from headswap.core.fit import FitOptions
from headswap.core.images import RESIZE_MODES
from headswap.core.lr_find import RangeTestSettings
from headswap.core.recipe import (
    Augmentation,
    Callbacks,
    Settings,
    Stage,
    check_plateau,
)


class DataConfig(Settings):
    # the folder or CSV of images (the catalog's `images` reads it); null: none set yet
    path: str | None = None
    image_size: tuple[int, int]
    batch_size: int = Field(FitOptions.batch_size, ge=1)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    manifest: str | None = None
    # how images are brought to image_size: stretch (ignore the aspect ratio), pad (keep it,
    # pad with black) or crop (keep it, cut the centre); the same in training and prediction
    resize: Literal[RESIZE_MODES] = "stretch"
    # A split's decoded images (and a frozen base's features) are kept in memory when they
    # fit in this many MiB; larger splits are streamed from disk. 0: always stream.
    cache_memory_mb: int = Field(FitOptions.cache_memory_mb, ge=0)

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


class BaseConfig(Settings):
    """Where the pretrained base comes from (see conf/base/parameters_finetune.yml)."""

    source: Literal["file", "keras_applications", "keras_hub"] = "file"
    path: str | None = None  # model file (source file), preset folder (source keras_hub)
    name: str | None = None  # architecture, for source keras_applications
    # keras_applications: "imagenet", None (random) or the path of the no-top .h5 file Keras
    # downloads for that architecture (loaded by Keras itself).
    weights: str | None = "imagenet"
    cut_at: str | int = "auto"
    # A .keras, .weights.h5 or legacy .h5 file whose weights are loaded into the base by layer
    # name and shape after it is built (both sources); reported as base_weights_report.
    weights_file: str | None = None
    allow_unsafe: bool = False


class HeadConfig(Settings):
    pooling: Literal["avg", "max", "flatten"] = "avg"
    dense: list[int] = Field(default_factory=lambda: [64])
    dropout: float = Field(0.3, ge=0, lt=1)

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

    def stages_list(self) -> list[Stage]:
        return list(self.stages) or [Stage(**self.model_dump(exclude={"stages"}))]


class TrainingConfig(Settings):
    """Settings shared by both phases."""

    class_weight: Literal["balanced"] | dict[str, float] | None = None
    augmentation: Augmentation = Field(default_factory=Augmentation)
    callbacks: Callbacks = Field(default_factory=Callbacks)
    cache_features: bool = FitOptions.cache_features
    # Keep per-epoch backups so that the same command, run again after an interruption,
    # continues where it stopped (false: keep none and always start afresh).
    resume: bool = True
    resume_dir: str = "data/05_model_input/resume"
    # The learning-rate range test (a phase's `learning_rate: auto`, the lr_find pipeline).
    lr_find: RangeTestSettings = Field(default_factory=RangeTestSettings)


class EvaluationConfig(Settings):
    """What the test-set evaluation adds to the classification report."""

    top_k: int = Field(2, ge=1)  # top-k accuracy (capped at the number of classes)
    misclassified: int = Field(16, ge=0)  # most confident errors shown in the grid


class RegistryConfig(Settings):
    """Where each run's model is registered in the MLflow Model Registry."""

    # "auto": named after the image folder (or CSV) trained on; null: not registered.
    name: str | None = "auto"

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


class PredictConfig(Settings):
    """The ``predict`` pipeline's parameters (conf/base/parameters_predict.yml)."""

    path: str
    # null: the latest fine-tuned model; or a Kedro version of it, a .keras/.h5 file (with
    # labels.txt beside it, or `labels`), or an MLflow model URI.
    model: str | None = None
    labels: str | None = None
    top_k: int = Field(3, ge=1)
    batch_size: int = Field(FitOptions.batch_size, ge=1)
    allow_unsafe: bool = False
    # where finetune runs keep the fine-tuned model and the manifest (the catalog's paths)
    fine_tuned_model: str = "data/06_models/phase2_model.keras"
    manifest: str = "data/02_intermediate/manifest.csv"
    preprocessing: str = "data/06_models/preprocessing.json"

    @field_validator("path", mode="before")
    @classmethod
    def _given(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("give the folder of images to classify: --params predict.path=...")
        return value


class SearchDimension(Settings):
    """One key of the ``tune`` search space: numbers from ``low`` to ``high`` (integers when
    both are; ``log``: sampled on a log scale; ``step``: a grid), or one of ``choices`` (a list
    of values, or a mapping of names to values, such as ``{off: {...}, on: {...}}``)."""

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: list[Any] | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SearchDimension:
        if self.choices is not None:
            if self.low is not None or self.high is not None or not self.choices:
                raise ValueError("give either choices (not empty) or low and high")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError("give low < high, or choices")
        elif self.log and self.low <= 0:
            raise ValueError("a log scale needs low above 0")
        return self


class TuneConfig(Settings):
    """The ``tune`` pipeline's parameters (conf/base/parameters_tune.yml)."""

    study: str = Field("headswap", min_length=1)
    # Optuna's storage URL: processes (and machines) given the same storage and study share
    # the search. A relative SQLite path is inside the project folder.
    storage: str = "sqlite:///data/07_model_output/tune/optuna.db"
    n_trials: int | None = Field(20, ge=1)  # trials of the study, whichever process runs them
    timeout_s: float | None = Field(None, gt=0)  # this process starts no trial after that
    seed: int | None = None  # the sampler's seed (null: each process draws its own)
    startup_trials: int = Field(5, ge=0)  # random trials before TPE, and before any pruning
    pruner: Literal["median", "hyperband", "none"] = "median"
    warmup_epochs: int = Field(2, ge=0)  # epochs a trial runs before it can be pruned
    # finetune keys as in parameters_finetune.yml (nested, or dotted: phase1.learning_rate),
    # each ending in a SearchDimension
    space: dict[str, SearchDimension] = Field(min_length=1)

    @field_validator("space", mode="before")
    @classmethod
    def _dotted(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        flat: dict[str, Any] = {}

        def walk(prefix: str, node: dict[str, Any]) -> None:
            for key, item in node.items():
                name = f"{prefix}.{key}" if prefix else str(key)
                if isinstance(item, dict) and not {"low", "high", "choices"} & set(item):
                    walk(name, item)
                else:
                    flat[name] = item

        walk("", value)
        return flat

    @model_validator(mode="after")
    def _budget_and_keys(self) -> TuneConfig:
        if self.n_trials is None and self.timeout_s is None:
            raise ValueError("give n_trials or timeout_s (or both): the search needs a budget")
        fixed = [k for k in self.space if k.split(".")[0] in ("data", "base")
                 and k != "data.batch_size"]
        if fixed:
            raise ValueError(
                f"space keys {fixed} would change the images or the base, which every trial "
                "shares; search the recipe's keys (phase1.*, phase2.*, head.*, training.*, "
                "data.batch_size)"
            )
        return self


#: Phase 1 trains the new head on the frozen base; phase 2 opens the whole base at a lower rate.
PHASE_DEFAULTS: dict[str, dict[str, Any]] = {
    "phase1": {"epochs": 200, "learning_rate": 3e-3, "optimizer": "adam"},
    "phase2": {"epochs": 30, "learning_rate": 3e-4, "optimizer": "adam", "train": "all",
               "schedule": "cosine", "warmup_epochs": 2},
}


class FinetuneConfig(Settings):
    """Every key of ``finetune``; the defaults are those of conf/base/parameters_finetune.yml."""

    # the core's defaults (FitOptions), stated once
    seed: int = FitOptions.seed
    distribution: Literal["none", "mirrored", "multi_worker_mirrored"] = FitOptions.distribution
    mixed_precision: bool = FitOptions.mixed_precision
    jit_compile: bool = FitOptions.jit_compile
    data: DataConfig
    base: BaseConfig
    head: HeadConfig = Field(default_factory=HeadConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    # keys of a phase that its stages make unused (see parse_finetune)
    ignored: dict[str, list[str]] = Field(default_factory=dict, exclude=True)
    phase1: PhaseConfig = Field(default_factory=lambda: PhaseConfig(**PHASE_DEFAULTS["phase1"]))
    phase2: PhaseConfig = Field(default_factory=lambda: PhaseConfig(**PHASE_DEFAULTS["phase2"]))

    @field_validator("phase1", "phase2", mode="before")
    @classmethod
    def _phase_defaults(cls, value: Any, info: Any) -> Any:
        # A phase given in part keeps that phase's defaults for the rest.
        if isinstance(value, dict):
            return {**PHASE_DEFAULTS[info.field_name], **value}
        return value

    @model_validator(mode="after")
    def _plateau(self) -> FinetuneConfig:
        for phase in ("phase1", "phase2"):
            try:
                check_plateau(getattr(self, phase).stages_list(), self.training.callbacks)
            except ValueError as err:
                raise ValueError(f"{phase}: {err}") from None
        return self

    def fit_options(self) -> FitOptions:
        """The core's training options for these parameters."""
        training = self.training
        return FitOptions(
            image_size=self.data.image_size, resize=self.data.resize,
            batch_size=self.data.batch_size, seed=self.seed,
            cache_memory_mb=self.data.cache_memory_mb, cache_features=training.cache_features,
            callbacks=training.callbacks,
            class_weight=training.class_weight, distribution=self.distribution,
            mixed_precision=self.mixed_precision, jit_compile=self.jit_compile,
            backup_dir=state_dir(self) if self.keeps_backups() else None,
            lr_find=training.lr_find,
        )

    def keeps_backups(self) -> bool:
        """Whether the run keeps what it needs to resume: ``training.resume``, except across
        workers (``multi_worker_mirrored``), where every worker would have to resume from the
        same epoch and only the chief may write."""
        return self.training.resume and self.distribution != "multi_worker_mirrored"


def state_dir(cfg: FinetuneConfig) -> Path:
    """Where a run with these parameters keeps what it needs to resume after an interruption.

    Settings that change no result (resuming itself, the memory budget) leave it as it is."""
    key = hashlib.sha256(
        cfg.model_dump_json(exclude={"training": {"resume"}, "data": {"cache_memory_mb"},
                                     "registry": True, "export": True}).encode()
    ).hexdigest()[:16]
    return Path(cfg.training.resume_dir) / key


def merge_parameters(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in key by key (nested dicts merged, the rest replaced)."""
    merged = dict(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_parameters(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_scratch_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """Finetune parameters for training the whole model from random weights in one phase.

    Phase 1 trains every layer (BatchNormalization statistics included: random ones mean
    nothing) for as many epochs as phases 1 and 2 of ``params`` together; phase 2 is empty.
    """
    phase1, phase2 = params.get("phase1", {}), params.get("phase2", {})
    stages = phase2.get("stages") or [phase2]
    total = int(phase1.get("epochs", 0)) + sum(int(s.get("epochs", 0)) for s in stages)
    return merge_parameters(params, {
        "phase1": {"epochs": total, "train": "all", "train_batchnorm": True},
        "phase2": {"epochs": 0, "stages": []},
    })


class ParameterError(ValueError):
    """A parameter is missing, has the wrong type, or is out of range."""


#: The section of ``finetune`` each node's core arguments belong to, and the arguments whose
#: key is the same wherever they come up.
NODE_SECTIONS = {"locate_images": "data", "ingest_images": "data", "read_pretrained": "base",
                 "load_base": "base"}
ARGUMENT_KEYS = {"image_size": "data.image_size", "manifest": "data.manifest",
                 "class_weight": "training.class_weight", "top_k": "evaluation.top_k"}


#: Nodes of the ``predict`` pipeline: their arguments are ``predict.<argument>``.
PREDICT_NODES = {"list_images", "load_classifier", "classify_images"}


def parameter_keys(message: str, node: str, prefix: str = "finetune") -> str:
    """``message`` of a core error with each `argument` replaced by its parameter key."""

    def key(match: re.Match) -> str:
        argument = match.group(1)
        if node in PREDICT_NODES:
            return f"predict.{argument}"
        if argument in ARGUMENT_KEYS:
            return f"{prefix}.{ARGUMENT_KEYS[argument]}"
        section = NODE_SECTIONS.get(node)
        return f"{prefix}.{section}.{argument}" if section else match.group(0)

    return re.sub(r"`(\w+)`", key, message)


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
        from headswap.core.bases import ARCHITECTURES

        if config.base.name not in ARCHITECTURES:
            raise ParameterError(
                f"Invalid parameters:\n  {prefix}.base.name: got {config.base.name!r}; not a "
                "known keras.applications architecture. Allowed: " + ", ".join(ARCHITECTURES)
            )
    for phase in ("phase1", "phase2"):
        given = params.get(phase) or {}
        if given.get("stages"):
            config.ignored[phase] = sorted(set(given) - {"stages"})
    return config


def parse_predict(params: dict[str, Any] | None) -> PredictConfig:
    """Validate the ``predict`` parameters; raise :class:`ParameterError` naming each bad key."""
    try:
        return PredictConfig.model_validate(params or {})
    except ValidationError as err:
        raise ParameterError(_describe(err, "predict", PredictConfig)) from None


def parse_tune(params: dict[str, Any] | None) -> TuneConfig:
    """Validate the ``tune`` parameters; raise :class:`ParameterError` naming each bad key."""
    try:
        return TuneConfig.model_validate(params or {})
    except ValidationError as err:
        raise ParameterError(_describe(err, "tune", TuneConfig)) from None


def _describe(
    err: ValidationError, prefix: str, root: type[BaseModel] | None = None
) -> str:
    """One message with a line per problem: the key, the value given and what is allowed."""
    lines = []
    for problem in err.errors():
        key = ".".join([prefix, *(str(p) for p in problem["loc"])])
        value = problem.get("input")
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            allowed = _allowed_keys(problem["loc"], root or FinetuneConfig)
            lines.append(
                f"{key}: unknown key (given {value!r}); "
                + (f"allowed keys here: {', '.join(allowed)}" if allowed else "check its spelling")
                + f" (see conf/base/parameters_{prefix.split('.')[0]}.yml)"
            )
        elif problem["type"] == "missing":
            lines.append(f"{key}: missing (it has no default; set it in the parameters)")
        elif isinstance(value, dict):
            lines.append(f"{key}: {message}")
        else:
            lines.append(f"{key}: got {value!r}; {message}")
    return "Invalid parameters:\n  " + "\n  ".join(lines)


def _allowed_keys(loc: tuple[int | str, ...], root: type[BaseModel]) -> list[str]:
    """The keys the section holding ``loc[-1]`` accepts (empty when it cannot be told)."""
    model: type[BaseModel] | None = root
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
