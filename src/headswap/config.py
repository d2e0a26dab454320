"""The parameter schema of the ``finetune`` pipeline.

Parameters arrive as plain dicts (from ``conf/*/parameters_finetune.yml`` and
``kedro run --params``); :func:`parse_finetune` validates them once, before any work starts,
and every error names the key, the value that was given and what is allowed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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


class BaseConfig(_Strict):
    source: Literal["file", "keras_applications"] = "file"
    path: str | None = None
    name: str | None = None
    weights: str | None = "imagenet"
    cut_at: str | int = "auto"
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


class PhaseConfig(_Strict):
    epochs: int = Field(5, ge=0)
    learning_rate: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "adamw", "rmsprop", "sgd"] = "adam"
    train_batchnorm: bool = False


class FinetuneConfig(_Strict):
    seed: int = 42
    data: DataConfig
    base: BaseConfig
    head: HeadConfig = Field(default_factory=HeadConfig)
    phase1: PhaseConfig = Field(
        default_factory=lambda: PhaseConfig(epochs=5, learning_rate=1e-3, optimizer="rmsprop")
    )
    phase2: PhaseConfig = Field(
        default_factory=lambda: PhaseConfig(epochs=5, learning_rate=1e-4, optimizer="adam")
    )


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
    if config.base.source == "file" and not config.base.path:
        raise ParameterError(
            f"{prefix}.base.path is required when {prefix}.base.source is file "
            "(a .keras or .h5 model)."
        )
    return config


def _describe(err: ValidationError, prefix: str) -> str:
    lines = []
    for problem in err.errors():
        key = ".".join([prefix, *(str(p) for p in problem["loc"])])
        if problem["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (check its spelling; see conf/base/parameters_*.yml)")
        elif problem["type"] == "missing":
            lines.append(f"{key}: missing (it has no default; set it in the parameters)")
        else:
            lines.append(f"{key}: got {problem.get('input')!r}; {problem['msg']}")
    return "Invalid parameters:\n  " + "\n  ".join(lines)
