"""The ``predict`` pipeline's parameters (conf/base/parameters_predict.yml).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
)

from headswap.core.fit import FitOptions
from headswap.core.recipe import (
    Settings,
)


class PredictConfig(Settings):
    """The ``predict`` pipeline's parameters (conf/base/parameters_predict.yml)."""

    path: str
    """Required: the images to classify, a folder (flat, or one sub-folder per class: then a
    classification report against those labels is written too) or a CSV; local, `s3://` or
    `gs://`."""
    model: str | None = None
    """null: the latest fine-tuned model (`calibrated_model`: the last phase's, calibrated); or
    a Kedro version of it (`2026-11-30T04.19.02.123Z`), a `.keras`/`.h5` file (class names in
    `labels.txt` beside it, or `labels`), or an MLflow model URI (`runs:/<run id>/model`,
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
    min_confidence: float | Literal["auto"] | None = "auto"
    """Images whose top probability is below this are labelled `unknown` (the most probable
    class stays in `top_1`): `auto`, the threshold the finetune run stored with the model
    (`finetune.calibration.target_precision` kept on its validation split; none for a model
    without one), a probability from 0 to below 1, or null (every image gets a class)."""

    @field_validator("min_confidence", mode="before")
    @classmethod
    def _probability(cls, value: Any) -> Any:
        try:
            number = None if value in (None, "auto") else float(value)
        except (TypeError, ValueError):
            number = -1.0
        if number is not None and not 0 <= number < 1:
            raise ValueError("give a probability from 0 to below 1, auto, or null")
        return value

    @field_validator("path", mode="before")
    @classmethod
    def _given(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("give the folder of images to classify: --params predict.path=...")
        return value
