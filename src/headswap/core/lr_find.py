"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates for Training Neural
Networks"; fastai's ``lr_find``): train a few hundred batches at exponentially increasing
learning rates, watch the smoothed loss, and read a good rate off the curve.

:func:`range_test` runs it on a compiled model and a ``tf.data`` dataset and restores the
model's weights and its optimizer's state afterwards, so the test leaves no trace on the
model. :func:`headswap.core.fit.find_learning_rate` prepares a model for one stage (which
layers train, the stage's optimizer, cached features while the base is frozen) and calls it.

The suggestion is one tenth of the highest rate at which the smoothed loss is still within 10%
of its minimum (the first tenth of the steps, where the average still settles, left out).
fastai's rule, the rate at the minimum divided by 10, works on a curve with a clear dip (a new
head: the loss falls, then blows up) and there both rules land close together; but on a
curve that stays flat until it climbs (a model that has already learned, as in phase 2: the
loss cannot fall much, and its minimum is wherever the batches' noise put it, often among the
lowest rates) it suggests a rate too small to train at. The edge of the low-loss region is
where training stops being safe on both kinds of curve; one decade below it is the usual
margin. The steepest descent of the smoothed loss (a derivative of a noisy curve) and the
minimum are reported beside it, and marked on the plot.

A curve that does not fall gives no suggestion: the smoothed loss must drop, from where it
starts (after that first tenth) to its minimum, by more than :data:`MARGIN` times the
batch-to-batch noise of the raw loss up to where the smoothed loss leaves its low region (from
the median absolute second difference of consecutive steps, which a steady fall or rise of the
curve leaves alone, scaled to a standard deviation for Gaussian noise; the steps after that
edge, where training comes apart, are left out). On a flat curve (the loss varies within its
noise across the whole range: a model that has already learned, or rates too small to move
anything) the lowest point is wherever the noise put it and any rate read off it means nothing;
the test then logs a warning and its suggestion is NaN (null in :meth:`RangeTest.to_dict`), and
a `learning_rate: auto` stops (:meth:`RangeTest.rate`). The margin of two keeps out curves whose
only fall is the smoothed average settling from a few high first batches (the example's phase 2:
a fall of 1.4 times the noise, then a climb).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure
from pydantic import Field, model_validator

from headswap.core.errors import InputError
from headswap.core.recipe import Settings
from headswap.core.train import StopOnCtrlC

logger = logging.getLogger(__name__)

#: How far above its minimum the smoothed loss may be where the suggestion is read off.
RISE = 0.1
#: The median absolute second difference (a - 2b + c) of independent Gaussian values, over
#: their standard deviation (0.6745 * sqrt(6)): the loss's batch-to-batch noise from it.
MEDIAN_CHANGE = 0.6745 * math.sqrt(6)
#: How many times the batch-to-batch noise the smoothed loss must fall for a suggestion.
MARGIN = 2.0


class RangeTestSettings(Settings):
    """How the range test runs: ``steps`` batches at rates spaced geometrically from
    ``min_learning_rate`` to ``max_learning_rate``; the loss is smoothed exponentially
    (``smoothing``, bias-corrected) and the test stops once the smoothed loss exceeds
    ``divergence`` times its lowest value (or is not finite)."""

    min_learning_rate: float = Field(1e-7, gt=0)
    """The rate of the first step."""
    max_learning_rate: float = Field(10.0, gt=0)
    """The rate of the last step, above `min_learning_rate`."""
    steps: int = Field(100, ge=5)
    """Batches trained, at rates rising geometrically from `min_learning_rate` to
    `max_learning_rate`."""
    smoothing: float = Field(0.98, ge=0, lt=1)
    """Exponential smoothing of the loss (bias-corrected); 0: none."""
    divergence: float = Field(4.0, gt=1)
    """The test stops once the smoothed loss passes this many times its lowest value."""

    @model_validator(mode="after")
    def _range(self) -> RangeTestSettings:
        if self.max_learning_rate <= self.min_learning_rate:
            raise ValueError(
                f"max_learning_rate ({self.max_learning_rate}) must be above min_learning_rate "
                f"({self.min_learning_rate})"
            )
        return self


@dataclass
class RangeTest:
    """The rates tried, the loss of each step (raw and smoothed), the suggested rate (NaN when
    the curve gives none), the rates at the smoothed loss's minimum and at its steepest
    descent, how far the smoothed loss fell against the raw loss's noise, and why the test
    stopped."""

    learning_rates: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    suggestion: float = math.nan
    minimum: float = math.nan
    steepest: float = math.nan
    drop: float = math.nan
    noise: float = math.nan
    stopped: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The test as plain values, JSON-ready: a value that is not a number (no suggestion)
        is None."""
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in asdict(self).items()}

    def rate(self, label: str) -> float:
        """The rate a `learning_rate`: auto trains at (``label``: the phase or stage it is
        for); :class:`InputError` when the test suggests none."""
        if math.isfinite(self.suggestion):
            return self.suggestion
        if not math.isfinite(self.noise):  # too few steps to tell
            why = f"{self.stopped} after {len(self.learning_rates)} steps"
        else:
            why = (f"its smoothed loss falls by {self.drop:.3g}, not more than {MARGIN:g} "
                   f"times the loss's batch-to-batch noise ({self.noise:.3g}): the curve is "
                   "flat")
        raise InputError(
            f"{label}: `learning_rate` is auto, but the learning-rate range test suggests no "
            f"rate ({why}). Set the {label} `learning_rate` to a number (read one off the "
            "lr_find pipeline's plot)."
        )


def learning_rates(settings: RangeTestSettings) -> np.ndarray:
    """The ``steps`` rates of the test, from the lowest to the highest, spaced geometrically."""
    return np.geomspace(settings.min_learning_rate, settings.max_learning_rate, settings.steps)


def range_test(
    model: keras.Model, dataset: tf.data.Dataset, settings: RangeTestSettings | None = None
) -> RangeTest:
    """Run the range test on ``model`` (compiled with a single optimizer whose learning rate
    is a plain number, ``steps_per_execution=1``) over batches of ``dataset`` (repeated if
    it has fewer). The model's weights and the optimizer's variables (its step count, moments
    and learning rate) are restored afterwards."""
    settings = settings or RangeTestSettings()
    optimizer = model.optimizer
    if not isinstance(optimizer.learning_rate, keras.Variable):
        raise ValueError("range_test needs an optimizer with a constant learning rate.")
    optimizer.build(model.trainable_variables)
    weights = model.get_weights()
    state = [keras.ops.convert_to_numpy(v) for v in optimizer.variables]
    result = RangeTest()
    average, best = 0.0, math.inf
    with StopOnCtrlC() as ctrl_c:
        try:
            batches = iter(dataset.repeat())
            for step, rate in enumerate(learning_rates(settings)):
                ctrl_c.stop_if_pressed()
                optimizer.learning_rate.assign(rate)
                x, y = next(batches)
                loss = float(model.train_on_batch(x, y, return_dict=True)["loss"])
                if not math.isfinite(loss):
                    result.stopped = f"the loss was not finite at learning rate {rate:.3g}"
                    break
                average = settings.smoothing * average + (1 - settings.smoothing) * loss
                smoothed = average / (1 - settings.smoothing ** (step + 1))
                result.learning_rates.append(float(rate))
                result.losses.append(loss)
                result.smoothed.append(smoothed)
                best = min(best, smoothed)
                if smoothed > settings.divergence * best:
                    result.stopped = (f"the smoothed loss passed {settings.divergence:g} times its "
                                      f"lowest value at learning rate {rate:.3g}")
                    break
            else:
                result.stopped = "all steps ran without the loss diverging"
        finally:
            model.set_weights(weights)
            for variable, value in zip(optimizer.variables, state, strict=True):
                variable.assign(value)
    reading = suggest(result.learning_rates, result.losses, result.smoothed)
    result.suggestion, result.minimum, result.steepest, result.drop, result.noise = reading
    if math.isfinite(result.noise) and not math.isfinite(result.suggestion):
        logger.warning(
            "Learning-rate range test: no suggestion. From its start to its minimum the "
            "smoothed loss falls by %.3g, not more than %g times the loss's batch-to-batch "
            "noise (%.3g): between %.3g and %.3g the curve is flat within its noise, so a "
            "rate read off it would mean nothing.", result.drop, MARGIN, result.noise,
            result.learning_rates[0], result.learning_rates[-1])
    return result


class Reading(NamedTuple):
    """What :func:`suggest` reads off a curve."""

    suggestion: float
    minimum: float
    steepest: float
    drop: float
    noise: float


def suggest(rates: list[float], losses: list[float], smoothed: list[float]) -> Reading:
    """The suggestion, minimum and steepest descent read off the smoothed loss, leaving out
    the first tenth of the steps (where the average still settles), and whether the curve
    falls at all.

    ``drop`` is how far the smoothed loss falls from its first settled value to its minimum;
    ``noise`` the batch-to-batch noise of the raw loss from there to the highest rate at which
    the smoothed loss is still within :data:`RISE` of its minimum (the median absolute second
    difference of consecutive steps over :data:`MEDIAN_CHANGE`; NaN for fewer than three steps).
    The suggestion is one tenth of the highest rate at which the smoothed loss is still within
    :data:`RISE` of its minimum, NaN unless ``drop`` is above :data:`MARGIN` times ``noise`` (a
    flat curve); the minimum is the rate at the smoothed loss's lowest point; the steepest, the
    rate where it falls fastest against the log of the rate, up to the minimum. NaN for all when
    fewer than two steps ran."""
    if len(rates) < 2:
        return Reading(math.nan, math.nan, math.nan, math.nan, math.nan)
    start = len(rates) // 10 if len(rates) >= 20 else 0
    values = np.asarray(smoothed[start:])
    lowest = int(np.argmin(values))
    edge = int(np.flatnonzero(values <= (1 + RISE) * values[lowest])[-1])
    if lowest >= 1:
        window = np.log(rates[start:start + lowest + 1])
        steepest = start + int(np.argmin(np.gradient(values[: lowest + 1], window)))
    else:
        steepest = start
    drop = float(values[0] - values[lowest])
    changes = np.abs(np.diff(losses[start:start + edge + 1], n=2))
    noise = float(np.median(changes)) / MEDIAN_CHANGE if len(changes) else math.nan
    suggestion = rates[start + edge] / 10 if drop > MARGIN * noise else math.nan
    return Reading(suggestion, rates[start + lowest], rates[steepest], drop, noise)


def range_test_figure(tests: list[tuple[str, RangeTest | dict[str, Any]]]) -> Figure:
    """Smoothed loss against learning rate (log scale), one panel per test, the suggestion
    marked (and the smoothed loss's minimum, dotted); a flat curve's legend says it gives no
    suggestion."""
    fig = Figure(figsize=(5.5 * len(tests), 4))
    axes = np.atleast_1d(fig.subplots(1, len(tests)))
    for ax, (title, test) in zip(axes, tests, strict=True):
        test = test.to_dict() if isinstance(test, RangeTest) else test
        ax.plot(test["learning_rates"], test["losses"], color="lightgrey", linewidth=1,
                label="loss of each step")
        ax.plot(test["learning_rates"], test["smoothed"], label="smoothed loss")
        for key, style, text in (("suggestion", "--", "suggestion"),
                                 ("minimum", ":", "minimum of the smoothed loss")):
            if test[key] is not None and math.isfinite(test[key]):
                ax.axvline(test[key], color="C3" if key == "suggestion" else "grey",
                           linestyle=style, label=f"{text}: {test[key]:.2g}")
        drop, noise = test.get("drop"), test.get("noise")
        if test["suggestion"] is None and drop is not None and noise is not None:
            ax.plot([], [], " ", label=f"no suggestion: the loss falls by {drop:.2g},\n"
                                       f"within {MARGIN:g}x its batch-to-batch noise "
                                       f"({noise:.2g})")
        settled = test["smoothed"][len(test["smoothed"]) // 10:]
        if settled:  # from the settled minimum to well above the curve's typical level
            low = min(settled)
            span = max(max(settled[0], float(np.median(settled))) - low, 0.05 * abs(low), 1e-3)
            ax.set_ylim(low - 0.1 * span, low + 2.5 * span)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("training loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
