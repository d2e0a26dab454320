"""Resuming an interrupted stage: all that exists only for resuming lives here.

A stage given a folder keeps in it Keras' own ``BackupAndRestore`` files (weights and
optimizer state after each epoch, written twice so that a process killed mid-write leaves the
previous one), the random layers' seed states (which Keras does not save with the weights),
the per-epoch log (Keras' ``CSVLogger``, appended across interruptions) and, once the stage
has finished, its weights and history. Run again with the same folder, a finished stage is
reused and an interrupted one continues after its last completed epoch: with the data order
keyed on the epoch (see :func:`headswap.core.data.make_dataset`), the result is that of an
uninterrupted run.
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

_KEEP_SEEDS = 3  # seed files kept: the weights on disk may be an epoch behind the newest


class SeededBackup(keras.callbacks.BackupAndRestore):
    """Keras' ``BackupAndRestore``, plus the random layers' seed states of each epoch."""

    def __init__(self, folder: str | os.PathLike) -> None:
        super().__init__(os.fspath(folder), double_checkpoint=True, delete_checkpoint=True)
        self._resumed = False

    def _seeds(self, epoch: int) -> Path:
        return Path(self.backup_dir) / f"seeds-{epoch:05d}.npy"

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        self._resumed = False

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        # The first epoch of a fit is the one Keras resumes at: restore the seeds it began with.
        if not self._resumed and self._seeds(epoch).is_file():
            for variable, value in zip(seed_states(self.model), np.load(self._seeds(epoch)),
                                       strict=True):
                variable.assign(value)
            logger.info("Resumed at epoch %s from the backup in %s", epoch, self.backup_dir)
        self._resumed = True

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        # seeds first: the weights on disk are then never ahead of the seeds
        os.makedirs(self.backup_dir, exist_ok=True)
        states = [keras.ops.convert_to_numpy(v) for v in seed_states(self.model)]
        partial = self._seeds(epoch + 1).with_suffix(".partial")
        with open(partial, "wb") as f:
            np.save(f, np.stack(states) if states else np.zeros((0, 2)))
        os.replace(partial, self._seeds(epoch + 1))
        for old in sorted(Path(self.backup_dir).glob("seeds-*.npy"))[:-_KEEP_SEEDS]:
            old.unlink()
        super().on_epoch_end(epoch, logs)


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

    def reuse(self, model: keras.Model) -> dict[str, Any] | None:
        """The history of the finished stage, its weights loaded into ``model``; else None."""
        if not (self._done.is_file() and self._history.is_file()):
            return None
        model.optimizer.build(model.trainable_variables)
        model.load_weights(self._done)
        return json.loads(self._history.read_text())

    def callbacks(self) -> list[keras.callbacks.Callback]:
        return [keras.callbacks.CSVLogger(str(self._log), append=True),
                SeededBackup(self.folder / "backup")]

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
