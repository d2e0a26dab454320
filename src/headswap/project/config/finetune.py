"""The ``finetune`` parameters as one typed object, :class:`FinetuneConfig`: its sections
(:mod:`headswap.project.config.sections`), the phases, and the resume state's folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from headswap.core.fit import FitOptions
from headswap.core.recipe import (
    Settings,
    Stage,
    check_plateau,
)
from headswap.project.config.sections import (
    BaseConfig,
    CalibrationConfig,
    DataConfig,
    EvaluationConfig,
    ExportConfig,
    HeadConfig,
    PhaseConfig,
    RegistryConfig,
    TrainingConfig,
)

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
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    """Calibrated confidence and the `unknown` threshold, fitted on the validation split."""
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
                                     "registry": True, "export": True,
                                     "calibration": True}).encode()
    ).hexdigest()[:16]
    return Path(cfg.training.resume_dir) / key


