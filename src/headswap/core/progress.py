"""Training progress as log lines, in place of Keras' own printing (``fit(verbose=0)``).

:class:`TrainingProgress` logs a stage's training through Python logging, so it lands where
the run's other lines go (the terminal and the log file of conf/logging.yml). Three settings
(``finetune.training.verbose``, :attr:`~headswap.core.fit.FitOptions.verbose`):

- ``progress``: a summary line every few epochs (about :data:`SUMMARY_LINES` per stage, and
  at least one a minute) with the epochs done of the stage's total, the time elapsed and left,
  the current and best validation accuracy; then a line when the stage ends;
- ``epochs``: a line per epoch with every metric, then the end line;
- ``quiet``: the end line only.

Each epoch's line is logged whatever the setting, on the logger :data:`EPOCH_LOGGER`: at INFO
with ``epochs``, else at DEBUG, which conf/logging.yml sends to the log file only.
:class:`LoggedEarlyStopping` and :class:`LoggedReduceLROnPlateau` say what they did through
logging too.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import keras

logger = logging.getLogger(__name__)
#: One line per epoch (every metric); DEBUG unless ``verbose`` is ``epochs``.
EPOCH_LOGGER = f"{__name__}.epochs"
epoch_logger = logging.getLogger(EPOCH_LOGGER)

VERBOSITY = ("progress", "epochs", "quiet")
SUMMARY_LINES = 10  # a stage's summary lines with ``progress`` (a 200-epoch stage: every 20)
SUMMARY_EVERY_S = 60.0  # and at least one this often, when epochs are slow


def verbosity(value: str | int) -> str:
    """``progress``, ``epochs`` or ``quiet``; Keras' own ``verbose`` values 0, 1 and 2 as
    ``quiet``, ``epochs`` and ``epochs``."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"verbose must be one of {', '.join(VERBOSITY)}; got {value!r}")
    if isinstance(value, int):
        return "quiet" if value == 0 else "epochs"
    if value not in VERBOSITY:
        raise ValueError(f"verbose must be one of {', '.join(VERBOSITY)}; got {value!r}")
    return value


def duration(seconds: float) -> str:
    """``0.4 s``, ``12 s``, ``3 min 05 s``, ``2 h 07 min``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _metrics(logs: dict[str, Any]) -> str:
    """An epoch's metrics: the loss and accuracy ones first, rates in short form."""
    first = ("loss", "accuracy", "val_loss", "val_accuracy")
    names = [n for n in first if n in logs] + sorted(n for n in logs if n not in first)
    return ", ".join(
        f"{name} {float(logs[name]):.3g}" if "learning_rate" in name
        else f"{name} {float(logs[name]):.4f}"
        for name in names if isinstance(logs[name], (int, float))
    )


class TrainingProgress(keras.callbacks.Callback):
    """Logs the training of one stage: ``label`` (``phase1``, ``phase2 stage 2``...) of
    ``epochs`` epochs that start at ``first_epoch`` on the run's epoch axis (a resumed stage
    starts later; its epochs count as done). ``verbose``: see the module. ``every``: epochs
    between summary lines (default: the stage's epochs / :data:`SUMMARY_LINES`)."""

    def __init__(self, label: str, epochs: int, first_epoch: int = 0,
                 verbose: str | int = "progress", every: int | None = None,
                 every_s: float = SUMMARY_EVERY_S) -> None:
        super().__init__()
        self.label, self.epochs, self.first_epoch = label, epochs, first_epoch
        self.verbose = verbosity(verbose)
        self.every = every or max(1, math.ceil(epochs / SUMMARY_LINES))
        self.every_s = every_s
        self._reset()

    def _reset(self) -> None:
        self._started = self._epoch_started = self._logged_at = time.perf_counter()
        self._first_done: float | None = None  # when this process's first epoch ended
        self._ran = 0  # epochs run in this process
        self._done = 0  # epochs of the stage done, resumed ones included
        self._monitor: str | None = None
        self._current: float | None = None
        self._best: float | None = None
        self._best_epoch = 0
        self._last: dict[str, Any] = {}

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._reset()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        now = time.perf_counter()
        logs = dict(logs or {})
        self._ran += 1
        self._done = epoch - self.first_epoch + 1
        if self._first_done is None:
            self._first_done = now
        self._last = logs
        self._monitor = self._monitor or next(
            (m for m in ("val_accuracy", "accuracy") if m in logs), None)
        if self._monitor is not None and isinstance(logs.get(self._monitor), (int, float)):
            self._current = float(logs[self._monitor])
            if self._best is None or self._current > self._best:
                self._best, self._best_epoch = self._current, self._done
        epoch_logger.log(
            logging.INFO if self.verbose == "epochs" else logging.DEBUG,
            "%s: epoch %s/%s (%s): %s", self.label, self._done, self.epochs,
            duration(now - self._epoch_started), _metrics(logs),
        )
        due = self._done % self.every == 0 or now - self._logged_at >= self.every_s
        if self.verbose == "progress" and self._done < self.epochs and due:
            self._logged_at = now
            logger.info("%s: epoch %s/%s, %s elapsed, about %s left%s", self.label,
                        self._done, self.epochs, duration(now - self._started),
                        duration(self._seconds_left(now)), self._score())

    def on_train_end(self, logs: dict | None = None) -> None:
        if not self._ran:
            logger.info("%s: all %s epochs were done before", self.label, self.epochs)
            return
        stopped = " (stopped early)" if self._done < self.epochs else ""
        score = (f"; {self._monitor} {self._current:.4f}, best {self._best:.4f} at epoch "
                 f"{self._best_epoch}" if self._current is not None else "")
        loss = next((f"; {m} {float(self._last[m]):.4f}" for m in ("val_loss", "loss")
                     if isinstance(self._last.get(m), (int, float))), "")
        logger.info("%s: %s/%s epochs in %s%s%s%s", self.label, self._done, self.epochs,
                    duration(time.perf_counter() - self._started), stopped, score, loss)

    def _seconds_left(self, now: float) -> float:
        """The epochs left at the mean time of this process's epochs after its first (which
        also builds and traces the training step)."""
        if self._ran > 1 and self._first_done is not None:
            per_epoch = (now - self._first_done) / (self._ran - 1)
        else:
            per_epoch = (now - self._started) / max(self._ran, 1)
        return per_epoch * max(self.epochs - self._done, 0)

    def _score(self) -> str:
        if self._current is None:
            return ""
        return f"; {self._monitor} {self._current:.4f} (best {self._best:.4f})"


class LoggedEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' EarlyStopping, saying through logging (not print) when it stopped and which
    epoch's weights it restored. ``label`` and ``first_epoch`` as in
    :class:`TrainingProgress`."""

    def __init__(self, *args: Any, label: str = "training", first_epoch: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "verbose": 0})
        self.label, self.first_epoch = label, first_epoch

    def on_train_end(self, logs: dict | None = None) -> None:
        restores = self.restore_best_weights and self.best_weights is not None
        super().on_train_end(logs)
        if self.stopped_epoch > 0:
            logger.info("%s: early stopping at epoch %s: %s did not improve by %s in %s",
                        self.label, self.stopped_epoch - self.first_epoch + 1, self.monitor,
                        abs(self.min_delta), _epochs(self.wait))
        if restores:
            logger.info("%s: restored the weights of its best epoch, %s (%s %.4f)", self.label,
                        self.best_epoch - self.first_epoch + 1, self.monitor, self.best)


class LoggedReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
    """Keras' ReduceLROnPlateau, saying through logging (not print) when it lowers the
    learning rate. ``label`` and ``first_epoch`` as in :class:`TrainingProgress`."""

    def __init__(self, *args: Any, label: str = "training", first_epoch: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "verbose": 0})
        self.label, self.first_epoch = label, first_epoch

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        before, waited = _rates(self.model.optimizer), self.wait + 1
        super().on_epoch_end(epoch, logs)
        after = _rates(self.model.optimizer)
        if after != before:
            logger.info("%s: epoch %s: %s did not improve in %s; learning rate lowered to %s",
                        self.label, epoch - self.first_epoch + 1, self.monitor,
                        _epochs(waited), ", ".join(f"{r:.3g}" for r in after))


class CountProgress:
    """Logs ``<what>: n of N (p%), about T left`` each time another tenth of ``total`` items
    is done, once the work has taken ``after_s`` seconds: nothing for a quick job, at most ten
    lines for a long one. Only when ``total`` is over ``large`` (ingest and predict of large
    folders)."""

    def __init__(self, what: str, total: int, log: logging.Logger | None = None,
                 large: int = 2000, after_s: float = 10.0) -> None:
        self.what, self.total, self.log = what, total, log or logger
        self.active = total > large
        self.after_s = after_s
        self._started = time.perf_counter()
        self._tenths = 0

    def update(self, done: int) -> None:
        """``done`` of the ``total`` items are done."""
        if not self.active or done <= 0 or done >= self.total:
            return
        elapsed = time.perf_counter() - self._started
        tenths = done * 10 // self.total
        if tenths > self._tenths and elapsed >= self.after_s:
            self._tenths = tenths
            self.log.info("%s: %s of %s (%d%%), about %s left", self.what, f"{done:,}",
                          f"{self.total:,}", 100 * done // self.total,
                          duration(elapsed / done * (self.total - done)))


def _epochs(count: int) -> str:
    return f"{count} epoch" if count == 1 else f"{count} epochs"


def _rates(optimizer: keras.optimizers.Optimizer) -> list[float]:
    optimizers = getattr(optimizer, "optimizers", None) or [optimizer]
    return [float(keras.ops.convert_to_numpy(o.learning_rate)) for o in optimizers]
