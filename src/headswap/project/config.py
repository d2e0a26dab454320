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

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    ValidationError,
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
    check_plateau,
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
    """Which exports to write: any of `saved_model`, `tflite`, `tflite_quantized`; `[]` for none."""


class PredictConfig(Settings):
    """The ``predict`` pipeline's parameters (conf/base/parameters_predict.yml)."""

    path: str
    """Required: the images to classify, a folder (flat, or one sub-folder per class: then a
    classification report against those labels is written too) or a CSV; local, `s3://` or
    `gs://`."""
    model: str | None = None
    """null: the latest fine-tuned model (`phase2_model`); or a Kedro version of it
    (`2026-11-30T04.19.02.123Z`), a `.keras`/`.h5` file (class names in `labels.txt` beside
    it, or `labels`), or an MLflow model URI (`runs:/<run id>/model`,
    `models:/<name>@champion`)."""
    labels: str | None = None
    """A file of class names, one a line, for a `.keras`/`.h5` model without `labels.txt`
    beside it."""
    top_k: int = Field(3, ge=1)
    """Classes listed per image (`top_1` ... `top_k`), most probable first."""
    batch_size: int = Field(FitOptions.batch_size, ge=1)
    """Images classified per batch."""
    allow_unsafe: bool = False
    """Load model files containing `Lambda` layers (arbitrary code): only files you trust."""

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
    """The lowest value of a range (with `high`; integers when both are)."""
    high: int | float | None = None
    """The highest value of a range, above `low`."""
    log: bool = False
    """Sample the range on a log scale (`low` above 0)."""
    step: int | float | None = None
    """Sample the range on a grid of this step (integers: 1 when not given)."""
    choices: list[Any] | dict[str, Any] | None = None
    """Instead of a range: a list of values, or a mapping of names to values (the trial's
    value is the mapping's value)."""

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
    """The study's name in the storage."""
    storage: str = "sqlite:///data/07_model_output/tune/optuna.db"
    """Optuna's storage URL: processes (and machines) given the same storage and study share
    the search. A relative SQLite path is inside the project folder; for a team, a database
    such as `postgresql://user:password@host/db`."""
    n_trials: int | None = Field(20, ge=1)
    """Trials of the study, whichever process runs them (null: no count, `timeout_s`
    alone)."""
    timeout_s: float | None = Field(None, gt=0)
    """This process starts no trial after this many seconds (null: no limit)."""
    seed: int | None = None
    """The sampler's seed (null: each process draws its own)."""
    startup_trials: int = Field(5, ge=0)
    """Random trials before TPE models the space, and before any pruning."""
    pruner: Literal["median", "hyperband", "none"] = "median"
    """Stop weak trials early: `median` (below the other trials' median validation accuracy
    at the same epoch), `hyperband`, or `none`."""
    warmup_epochs: int = Field(2, ge=0)
    """Epochs a trial runs before it can be pruned."""
    space: dict[str, SearchDimension] = Field(min_length=1)
    """The searched finetune keys, nested as in parameters_finetune.yml (or dotted:
    `phase1.learning_rate`), each a range `{low, high[, log][, step]}` or `{choices: ...}`;
    not the keys of `data` and `base` (every trial shares the images and the base), except
    `data.batch_size`."""

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
    """Seeds the split, the shuffling and the new head's initial weights."""
    distribution: Literal["none", "mirrored", "multi_worker_mirrored"] = FitOptions.distribution
    """`none`; `mirrored`: data-parallel on every local GPU (without one, every logical CPU
    device); `multi_worker_mirrored`: across the machines `TF_CONFIG` names."""
    mixed_precision: bool = FitOptions.mixed_precision
    """Compute in `mixed_float16` (variables and the output layer stay float32)."""
    jit_compile: bool = FitOptions.jit_compile
    """XLA-compile the training step."""
    data: DataConfig
    """The images: where they are, how they are split, read and batched."""
    base: BaseConfig
    """The pretrained base: where it comes from and where it is cut."""
    head: HeadConfig = Field(default_factory=HeadConfig)
    """The new head put on the cut base."""
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    """Settings both phases share."""
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    """What the test-split evaluation adds to the classification report."""
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    """Registration of each run's model in the MLflow Model Registry."""
    export: ExportConfig = Field(default_factory=ExportConfig)
    """Files of the fine-tuned model for serving and devices."""
    ignored: dict[str, list[str]] = Field(default_factory=dict, exclude=True)
    """Not a parameter: the keys of a phase that its `stages` make unused (set by
    `parse_finetune`)."""
    phase1: PhaseConfig = Field(default_factory=lambda: PhaseConfig(**PHASE_DEFAULTS["phase1"]))
    """The new head alone, the base frozen (a stage's keys, or `stages`); keys not given keep
    the phase's defaults."""
    phase2: PhaseConfig = Field(default_factory=lambda: PhaseConfig(**PHASE_DEFAULTS["phase2"]))
    """The base opened (by default all of it, BatchNormalization in inference mode) at a lower
    rate (a stage's keys, or `stages`); keys not given keep the phase's defaults."""

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

    # where a run of these parameters keeps its resume state (see with_image_size)
    _state: Path | None = PrivateAttr(None)

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
            backup_dir=(self._state or state_dir(self)) if self.keeps_backups() else None,
            lr_find=training.lr_find, verbose=training.verbose,
        )

    def phases(self) -> dict[str, list[Stage]]:
        """The recipe's phases in order, each a list of stages (what
        :func:`headswap.core.fine_tune` trains)."""
        return {"phase1": self.phase1.stages_list(), "phase2": self.phase2.stages_list()}

    def with_image_size(self, image_size: tuple[int, int]) -> FinetuneConfig:
        """These parameters with ``data.image_size`` set (the base's own, when unset). The
        resume folder stays that of the parameters as given: the hook that reopens an
        interrupted run finds it before any base is loaded."""
        resolved = self.model_copy(update={
            "data": self.data.model_copy(update={"image_size": tuple(image_size)})})
        resolved._state = self._state or state_dir(self)
        return resolved

    def keeps_backups(self) -> bool:
        """Whether the run keeps what it needs to resume: ``training.resume``, except across
        workers (``multi_worker_mirrored``), where every worker would have to resume from the
        same epoch and only the chief may write."""
        return self.training.resume and self.distribution != "multi_worker_mirrored"


def state_dir(cfg: FinetuneConfig) -> Path:
    """Where a run with these parameters keeps what it needs to resume after an interruption.

    Settings that change no result (resuming itself, the memory budget, the log's detail)
    leave it as it is."""
    key = hashlib.sha256(
        cfg.model_dump_json(exclude={"training": {"resume", "verbose"}, "data": {"cache_memory_mb"},
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
NODE_SECTIONS = {"ingest_images": "data", "load_base": "base"}
ARGUMENT_KEYS = {"image_size": "data.image_size", "manifest": "data.manifest",
                 "quality": "data.quality", "class_weight": "training.class_weight",
                 "top_k": "evaluation.top_k"}


#: Nodes of the ``predict`` pipeline: their arguments are ``predict.<argument>``.
PREDICT_NODES = {"list_images", "classify_images"}


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
