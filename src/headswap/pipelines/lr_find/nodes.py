"""Thin Kedro nodes of the ``lr_find`` pipeline (the range test is
:func:`headswap.core.fit.find_learning_rate`)."""

from __future__ import annotations

from typing import Any

import keras
import pandas as pd
from matplotlib.figure import Figure

from headswap.core import Stage
from headswap.core.fit import find_learning_rate
from headswap.core.lr_find import range_test_figure
from headswap.pipelines import metrics_points
from headswap.project import tracking
from headswap.project.config import FinetuneConfig


def find_head_rate(
    model: keras.Model, manifest: pd.DataFrame, config: FinetuneConfig
) -> tuple[dict[str, Any], list[Stage]]:
    """The range test on the head (phase 1's first stage, the base frozen); and phase 1's
    stages, a ``learning_rate: auto`` given the suggestion, to train phase 1 with (stopped
    when the test suggests none)."""
    stages = config.phases()["phase1"]
    test = find_learning_rate(model, manifest, stages[0], config.fit_options(), "phase1")
    rated = [s.model_copy(update={"learning_rate": test.rate("phase1")})
             if s.learning_rate == "auto" else s for s in stages]
    return test.to_dict(), rated


def train_head(
    model: keras.Model, manifest: pd.DataFrame, stages: list[Stage], config: FinetuneConfig
) -> tuple[keras.Model, dict[str, Any]]:
    """Phase 1 as ``finetune.phase1`` sets it, a ``learning_rate: auto`` at the rate found."""
    return model, tracking.fit_phase(model, manifest, stages, config.fit_options(), "phase1")


def find_fine_tune_rate(
    model: keras.Model, manifest: pd.DataFrame, config: FinetuneConfig
) -> dict[str, Any]:
    """The range test on the model phase 1 trained, opened as phase 2's first stage opens it."""
    stage = config.phases()["phase2"][0]
    return find_learning_rate(model, manifest, stage, config.fit_options(), "phase2").to_dict()


def report_rates(
    phase1: dict[str, Any], phase2: dict[str, Any]
) -> tuple[dict[str, Any], Figure, dict[str, dict[str, float]]]:
    """Both tests (rates, losses, suggestions, why each stopped) as one report, the figure of
    loss against learning rate, and the suggestions as metrics (a flat curve's: null in the
    report, no metric)."""
    report = {"phase1": phase1, "phase2": phase2,
              "suggested_learning_rates": {"phase1": phase1["suggestion"],
                                           "phase2": phase2["suggestion"]}}
    figure = range_test_figure([("Phase 1: the head, base frozen", phase1),
                                ("Phase 2: from the phase-1 weights, base opened", phase2)])
    metrics = metrics_points({f"{phase}.suggested_learning_rate": test["suggestion"]
                              for phase, test in (("phase1", phase1), ("phase2", phase2))
                              if test["suggestion"] is not None})
    return report, figure, metrics
