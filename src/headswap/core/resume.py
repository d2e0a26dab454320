"""Resuming an interrupted stage: all that exists only for resuming lives here.

A stage given a folder keeps in it a backup after each epoch (the values of the model's
variables, its optimizer's and its random layers' seed states, which Keras does not save with
the weights, in one NumPy file: a few milliseconds, where Keras' ``save_weights`` takes tens,
which for a head trained on cached features is longer than its epoch), the per-epoch log
(Keras' ``CSVLogger``, appended across interruptions) and, once the stage has finished, its
weights and history. Run again with the same folder, a finished stage is reused and an
interrupted one continues after its last completed epoch: with the data order keyed on the
epoch (see :func:`headswap.core.data.make_dataset`), the result is that of an uninterrupted
run.

Each backup is written into a folder of its own and renamed into place once complete, so a
process killed at any moment leaves the previous backup whole. (Keras' ``BackupAndRestore``
does not: its first backup is written in place, and its weights and epoch are two files
written one after the other, so a kill between them resumes the wrong epoch.)
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import keras
import numpy as np

from headswap.core.devices import seed_states

logger = logging.getLogger(__name__)

STATE = "state.npz"


class EpochBackup(keras.callbacks.Callback):
    """After each epoch, the model's state in ``<folder>/epoch-<epochs completed>/``."""

    def __init__(self, folder: str | os.PathLike) -> None:
        super().__init__()
        self.folder = Path(folder)

    def restore(self, model: keras.Model) -> int | None:
        """Load the newest backup into ``model`` (compiled); return the epoch to continue at."""
        done = sorted(self.folder.glob("epoch-*")) if self.folder.is_dir() else []
        if not done:
            return None
        model.optimizer.build(model.trainable_variables)
        with np.load(done[-1] / STATE) as saved:
            values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        for variable, value in zip(_state(model), values, strict=True):
            variable.assign(value)
        epoch = int(done[-1].name.split("-")[1])
        logger.info("Resumed at epoch %s from the backup in %s", epoch, done[-1])
        return epoch

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        partial = self.folder / "partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        np.savez(partial / STATE, *(keras.ops.convert_to_numpy(v) for v in _state(self.model)))
        final = self.folder / f"epoch-{epoch + 1:05d}"
        os.replace(partial, final)
        for old in sorted(self.folder.glob("epoch-*"))[:-1]:
            shutil.rmtree(old)


def _state(model: keras.Model) -> list[keras.Variable]:
    """Every variable a backup keeps, in one order: the model's, its optimizer's, its random
    layers' seed states."""
    return [*model.weights, *model.optimizer.variables, *seed_states(model)]


class StageState:
    """The folder of one stage (see the module's docstring).

    ``key`` identifies what the stage trains on and how (its data, settings and epochs): a
    folder left by a stage with another key is emptied, so a changed input never resumes
    from a stale state.
    """

    def __init__(self, folder: str | os.PathLike, key: str) -> None:
        self.folder = Path(folder)
        stamp = self.folder / "key.txt"
        if self.folder.is_dir() and not (stamp.is_file() and stamp.read_text() == key):
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(key)
        self._done = self.folder / "done.weights.h5"
        self._history = self.folder / "history.json"
        self._log = self.folder / "epochs.csv"
        self.backup = EpochBackup(self.folder / "backup")
        self._logger = keras.callbacks.CSVLogger(str(self._log), append=True)

    def reuse(self, model: keras.Model) -> dict[str, Any] | None:
        """The history of the finished stage, its weights loaded into ``model``; else None."""
        if not (self._done.is_file() and self._history.is_file()):
            return None
        model.optimizer.build(model.trainable_variables)
        model.load_weights(self._done)
        return json.loads(self._history.read_text())

    def callbacks(self) -> list[keras.callbacks.Callback]:
        return [self._logger, self.backup]

    def close(self) -> None:
        """Close the per-epoch log, also when training stopped on an exception."""
        log = getattr(self._logger, "csv_file", None)
        if log is not None and not log.closed:
            log.close()

    def history(self) -> dict[str, Any]:
        """Every epoch logged across interruptions; a repeated epoch keeps its last row."""
        rows: dict[int, dict[str, float]] = {}
        if self._log.is_file():
            with open(self._log, newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    rows[int(row["epoch"])] = {k: float(v) for k, v in row.items()}
        epochs = sorted(rows)
        keys = sorted({key for row in rows.values() for key in row} - {"epoch"})
        return {"epoch": epochs, **{key: [rows[e][key] for e in epochs] for key in keys}}

    def finish(self, model: keras.Model, history: dict[str, Any]) -> None:
        """Keep the finished stage's weights and history (each written, then renamed)."""
        partial = self.folder / "partial.weights.h5"
        model.save_weights(partial)
        os.replace(partial, self._done)
        partial = self.folder / "history.partial"
        partial.write_text(json.dumps(history))
        os.replace(partial, self._history)
        shutil.rmtree(self.backup.folder, ignore_errors=True)
