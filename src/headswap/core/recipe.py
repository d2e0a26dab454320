"""What a fine-tuning stage is made of: which base layers train, optimizer, rates, schedule,
callbacks and augmentation, as validated settings objects.

A *stage* is one ``fit`` of the model with one set of trainable layers (phase 1 is one stage;
phase 2 is one stage, or several run in order for gradual unfreezing). Every field is checked
when the object is made; an error names the field, the value and what is allowed.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")


class Settings(BaseModel):
    """Settings objects refuse unknown fields (a misspelt key is an error, not a no-op)."""

    model_config = ConfigDict(extra="forbid")


class LayerSelection(Settings):
    """Which layers of the base: exactly one of the fields.

    ``all: true``; ``names: [a, b]``; ``regex: "block[45]_.*"``; ``index: "5:-1"`` (a Python
    slice over the base's layers); ``top: 10`` (the last 10 layers); ``from_layer: block4_conv``
    (that layer and every layer above it). Shorthands where a selection is expected: ``"all"``
    or ``True``, ``"none"``, ``False`` or ``None`` (no layer), a list of names.
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


class LayerRate(Settings):
    """A group of base layers trained at its own learning rate."""

    layers: LayerSelection
    learning_rate: float = Field(ge=0)


class Discriminative(Settings):
    """Base layers split into ``groups`` blocks, bottom to top, with learning rates spaced
    geometrically from ``min_learning_rate`` up to the stage's (the head's) rate."""

    min_learning_rate: float = Field(gt=0)
    groups: int = Field(3, ge=1)


class Stage(Settings):
    """One ``fit``: which base layers train (the head always does), for how many epochs, with
    which optimizer, learning rate(s) and schedule. ``learning_rate: auto``: the rate the
    learning-rate range test suggests for the stage, run just before it (see
    :mod:`headswap.core.lr_find`)."""

    epochs: int = Field(ge=0)
    learning_rate: float | Literal["auto"]
    optimizer: Literal["adam", "adamw", "rmsprop", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["constant", "cosine"] = "constant"
    #: the rate rises linearly from 0 over the first ``warmup_epochs`` epochs (never the
    #: whole stage: a stage of N epochs warms up over at most N - 1)
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
    monitor: str = "val_loss"
    patience: int = Field(5, ge=0)
    min_delta: float = Field(0.0, ge=0)
    restore_best_weights: bool = True


class ReduceLROnPlateau(Settings):
    monitor: str = "val_loss"
    factor: float = Field(0.5, gt=0, lt=1)
    patience: int = Field(3, ge=0)
    min_delta: float = Field(1e-4, ge=0)
    min_learning_rate: float = Field(1e-7, ge=0)


class Callbacks(Settings):
    """Keras callbacks every stage gets."""

    early_stopping: EarlyStopping | None = None
    reduce_lr_on_plateau: ReduceLROnPlateau | None = None
    checkpoint: bool = False
    checkpoint_dir: str = "data/06_models/checkpoints"
    terminate_on_nan: bool = True


class Augmentation(Settings):
    """Random Keras preprocessing layers, active in training only (0 or null turns one off)."""

    flip: Literal["horizontal", "vertical", "horizontal_and_vertical"] | None = None
    rotation: float = Field(0.0, ge=0, le=1)
    zoom: float = Field(0.0, ge=0, lt=1)
    contrast: float = Field(0.0, ge=0, le=1)
    translation: float = Field(0.0, ge=0, lt=1)

    @property
    def active(self) -> bool:
        return bool(self.flip or self.rotation or self.zoom or self.contrast or self.translation)


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
