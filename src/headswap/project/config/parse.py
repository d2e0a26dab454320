"""Reading parameters: merging overrides, validating the ``finetune``, ``predict`` and ``tune``
sections once, and errors that name each bad key, the value given and what is allowed.
"""

from __future__ import annotations

import re
from typing import Any, get_args

from pydantic import (
    BaseModel,
    ValidationError,
)

from headswap.project.config.finetune import FinetuneConfig
from headswap.project.config.predict import PredictConfig
from headswap.project.config.tune import TuneConfig


def merge_parameters(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in key by key (nested dicts merged, the rest replaced)."""
    merged = dict(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_parameters(merged[key], value)
        else:
            merged[key] = value
    return merged


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
        from headswap.core.applications import ARCHITECTURES

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
