"""What a fine-tuning stage is made of: which base layers train, optimizer, rates, schedule,
callbacks and augmentation, as validated settings objects.

A *stage* is one ``fit`` of the model with one set of trainable layers (phase 1 is one stage;
phase 2 is one stage, or several run in order for gradual unfreezing). Every field is checked
when the object is made; an error names the field, the value and what is allowed.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import keras
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Settings(BaseModel):
    """Settings objects refuse unknown fields (a misspelt key is an error, not a no-op).

    Each field is described by the docstring under it (``use_attribute_docstrings``), which
    the documentation's parameter reference shows."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class LayerSelection(Settings):
    """Which layers of the base: exactly one of the fields.

    ``all: true``; ``names: [a, b]``; ``regex: "block[45]_.*"``; ``index: "5:-1"`` (a Python
    slice over the base's layers); ``top: 10`` (the last 10 layers); ``from_layer: block4_conv``
    (that layer and every layer above it). Shorthands where a selection is expected: ``"all"``
    or ``True``, ``"none"``, ``False`` or ``None`` (no layer), a list of names.
    """

    all: bool | None = None
    """`true`: every layer of the base."""
    names: list[str] | None = None
    """These layers of the base, by name."""
    regex: str | None = None
    """The base layers whose whole name matches this regular expression (`"block[45]_.*"`)."""
    index: str | None = None
    """A Python slice over the base's layers, bottom to top, as text (`"5:-1"`, `":10"`)."""
    top: int | None = Field(None, ge=0)
    """The last N layers of the base (0: none)."""
    from_layer: str | None = None
    """That layer, by name, and every layer above it."""

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


class LayerRate(Settings):
    """A group of base layers trained at its own learning rate."""

    layers: LayerSelection
    """The group's base layers: a layer selection, as `train` takes (a layer already in an earlier
    group stays there)."""
    learning_rate: float = Field(ge=0)
    """The group's learning rate (0: its layers do not change)."""


class Discriminative(Settings):
    """Base layers split into ``groups`` blocks, bottom to top, with learning rates spaced
    geometrically from ``min_learning_rate`` up to the stage's (the head's) rate."""

    min_learning_rate: float = Field(gt=0)
    """The bottom block's learning rate; block i of n trains at `min_learning_rate * (learning_rate
    / min_learning_rate) ** (i / n)`, the head at the stage's `learning_rate`."""
    groups: int = Field(3, ge=1)
    """How many blocks of consecutive trainable base layers, bottom to top (at most one a layer)."""


class Stage(Settings):
    """One ``fit``: which base layers train (the head always does), for how many epochs, with
    which optimizer, learning rate(s) and schedule. ``learning_rate: auto``: the rate the
    learning-rate range test suggests for the stage, run just before it (see
    :mod:`headswap.core.lr_find`)."""

    epochs: int = Field(ge=0)
    """Epochs the stage trains (phases and stages share one epoch axis); 0 skips it."""
    learning_rate: float | Literal["auto"]
    """The learning rate of the head (and of every trainable base layer without a rate of its own),
    above 0; `auto`: the learning-rate range test's suggestion, found just before the stage trains
    (`training.lr_find`)."""
    optimizer: str = "adam"
    """The Keras optimizer, by the name `keras.optimizers.get` knows: `adam`, `adamw`, `rmsprop`,
    `sgd`, `nadam`, `lion`, ..."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay of the optimizer (0: none; `adamw` then uses Keras' 0.004)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """Momentum of `sgd` (unused by the others)."""
    schedule: Literal["constant", "cosine"] = "constant"
    """The learning rate over the stage, after the warmup: `constant`, or `cosine` decay to 0 at the
    stage's last step."""
    warmup_epochs: int = Field(0, ge=0)
    """Epochs over which the rate rises linearly from 0 to `learning_rate` before the schedule
    (never the whole stage: a stage of N epochs warms up over at most N - 1)."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """Label smoothing of the cross-entropy loss (0: none)."""
    train: LayerSelection | None = None
    """Which base layers train (the head always does): `all`, `none` (or null), a list of names, or
    one of `{names: [...]}`, `{regex: ...}`, `{index: "5:-1"}`, `{top: N}`, `{from_layer: name}`."""
    train_batchnorm: bool = False
    """Let the BatchNormalization layers among them train and update their statistics (false: they
    stay frozen, in inference mode)."""
    layer_rates: list[LayerRate] = Field(default_factory=list)
    """Groups of base layers with learning rates of their own, `[{layers: <selection>,
    learning_rate: r}, ...]` (not with `discriminative`)."""
    discriminative: Discriminative | None = None
    """Discriminative rates: the trainable base layers in blocks whose rates rise geometrically from
    `min_learning_rate` at the bottom (not with `layer_rates`)."""

    @field_validator("train", mode="before")
    @classmethod
    def _train(cls, value: Any) -> Any:
        return _selection(value)

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, value: str) -> str:
        try:
            keras.optimizers.get(value.lower())
        except ValueError:
            raise ValueError(
                f"unknown optimizer {value!r}; give a Keras optimizer's name (adam, adamw, "
                "rmsprop, sgd, nadam, lion, ...)"
            ) from None
        return value.lower()

    @field_validator("learning_rate", mode="plain")
    @classmethod
    def _rate(cls, value: Any) -> float | str:
        if value == "auto":
            return value
        try:
            rate = float(value)
        except (TypeError, ValueError):
            rate = None
        if isinstance(value, bool) or rate is None or not rate > 0:
            raise ValueError("give a number above 0, or auto (the range test's suggestion)")
        return rate

    @model_validator(mode="after")
    def _rates(self) -> Stage:
        if self.layer_rates and self.discriminative:
            raise ValueError("give layer_rates or discriminative, not both")
        return self


class EarlyStopping(Settings):
    """Keras' ``EarlyStopping``: end a stage once the monitored metric stops improving."""

    monitor: str = "val_loss"
    """The metric watched (an epoch log's name: `val_loss`, `val_accuracy`, ...)."""
    patience: int = Field(5, ge=0)
    """Epochs without improvement before the stage ends."""
    min_delta: float = Field(0.0, ge=0)
    """The smallest change that counts as an improvement."""
    restore_best_weights: bool = True
    """Restore the weights of the best epoch when the stage ends early."""


class ReduceLROnPlateau(Settings):
    """Keras' ``ReduceLROnPlateau``: lower the learning rate when the monitored metric stalls
    (only with a constant rate: no cosine schedule, warmup or per-layer rates)."""

    monitor: str = "val_loss"
    """The metric watched (an epoch log's name: `val_loss`, `val_accuracy`, ...)."""
    factor: float = Field(0.5, gt=0, lt=1)
    """The rate is multiplied by this on a plateau."""
    patience: int = Field(3, ge=0)
    """Epochs without improvement before the rate is lowered."""
    min_delta: float = Field(1e-4, ge=0)
    """The smallest change that counts as an improvement."""
    min_learning_rate: float = Field(1e-7, ge=0)
    """The rate is never lowered below this."""


class Callbacks(Settings):
    """Keras callbacks every stage gets."""

    early_stopping: EarlyStopping | None = None
    """Stop a stage early when the monitored metric stops improving (e.g. `{monitor: val_loss,
    patience: 5}`); null: off."""
    reduce_lr_on_plateau: ReduceLROnPlateau | None = None
    """Lower the learning rate on a plateau (e.g. `{monitor: val_loss, factor: 0.5, patience: 3}`);
    null: off. Needs a constant schedule without warmup or per-layer rates."""
    checkpoint: bool = False
    """Keep the best epoch (lowest `val_loss`) of each stage under `checkpoint_dir`."""
    checkpoint_dir: str = "checkpoints"
    """Where checkpoints go, in a time-stamped folder for each stage."""
    terminate_on_nan: bool = True
    """Stop training when the loss becomes NaN."""


class Augmentation(Settings):
    """Random Keras preprocessing layers, active in training only (0 or null turns one off)."""

    flip: Literal["horizontal", "vertical", "horizontal_and_vertical"] | None = None
    """Random flips: `horizontal`, `vertical` or `horizontal_and_vertical`; null: none."""
    rotation: float = Field(0.0, ge=0, le=1)
    """Random rotation by up to this fraction of a full turn, either way (0: none)."""
    zoom: float = Field(0.0, ge=0, lt=1)
    """Random zoom in or out by up to this fraction of the image size (0: none)."""
    contrast: float = Field(0.0, ge=0, le=1)
    """Random contrast change by up to this factor, either way (0: none)."""
    translation: float = Field(0.0, ge=0, lt=1)
    """Random shift, vertically and horizontally, by up to this fraction of the image size (0:
    none)."""


def check_plateau(stages: list[Stage], callbacks: Callbacks) -> None:
    """Refuse stages whose rates ``reduce_lr_on_plateau`` could not scale."""
    if not callbacks.reduce_lr_on_plateau:
        return
    for stage in stages:
        if stage.schedule != "constant" or stage.warmup_epochs:
            raise ValueError(
                f"a {stage.schedule} schedule with warmup {stage.warmup_epochs}, which "
                "reduce_lr_on_plateau cannot change; use one or the other"
            )
        if stage.layer_rates or stage.discriminative:
            raise ValueError(
                "per-layer learning rates, which reduce_lr_on_plateau cannot scale; use "
                "schedule: cosine instead"
            )
