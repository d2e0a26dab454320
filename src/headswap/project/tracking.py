"""What a run shows in the MLflow UI beyond kedro-mlflow's parameters: per-epoch metrics while
training runs, a run name that says what ran, the image data as an MLflow dataset, and a
description and tags with the headline result."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import keras
import mlflow
import pandas as pd
from mlflow.entities import Metric
from mlflow.utils.time import get_current_time_millis

from headswap.core import Stage
from headswap.core.fit import FitOptions, History, fit
from headswap.project.datasets import log_metrics


class EpochMetrics(keras.callbacks.Callback):
    """Logs each epoch's metrics (``<prefix>.loss``, ``<prefix>.val_accuracy``,
    ``<prefix>.learning_rate``, ...) to the active MLflow run while it trains, at the epoch's
    index on the run's one epoch axis (phase 2 continues phase 1), so a run can be watched as
    it goes. The epochs that ended are sent together at most every ``every_s`` seconds (and
    when training ends), without waiting for the tracking store: a head trained on cached
    features runs an epoch in a few milliseconds, less than a request to the store costs.
    Epochs the run already has (a resumed run) are not sent again; nothing without an active
    run. :func:`log_history` then sends what a killed process could not."""

    def __init__(self, prefix: str = "epoch", every_s: float = 2.0) -> None:
        super().__init__()
        self.prefix = prefix
        self.every_s = every_s
        self._logged: set[int] = set()
        self._pending: list[Metric] = []
        self._sent_at = float("-inf")

    def on_train_begin(self, logs: dict | None = None) -> None:
        run = mlflow.active_run()
        self._logged = logged_steps(run.info.run_id, f"{self.prefix}.loss") if run else set()
        self._sent_at = float("-inf")  # a training's first epoch is sent at once

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        run = mlflow.active_run()
        if run is None or not logs or epoch in self._logged:
            return
        now = get_current_time_millis()
        self._pending += [Metric(f"{self.prefix}.{name}", float(value), now, int(epoch))
                          for name, value in logs.items() if isinstance(value, (int, float))]
        self._logged.add(epoch)
        if time.monotonic() - self._sent_at >= self.every_s:
            self._send(run.info.run_id)

    def on_train_end(self, logs: dict | None = None) -> None:
        self.flush()

    def flush(self) -> None:
        """Send the epochs not sent yet, and wait until the store has them."""
        run = mlflow.active_run()
        if run is not None:
            self._send(run.info.run_id)
        mlflow.flush_async_logging()

    def _send(self, run_id: str) -> None:
        if self._pending:
            log_metrics(run_id, self._pending, synchronous=False)
        self._pending, self._sent_at = [], time.monotonic()


@contextmanager
def epoch_metrics(prefix: str = "epoch") -> Iterator[EpochMetrics]:
    """An :class:`EpochMetrics` for the trainings run in the block; its last epochs are sent
    when the block ends, also when training stopped on an exception (a pruned trial, Ctrl-C,
    an error), which Keras' ``on_train_end`` does not see."""
    callback = EpochMetrics(prefix)
    try:
        yield callback
    finally:
        callback.flush()


def fit_phase(
    model: keras.Model, manifest: pd.DataFrame, stages: list[Stage], options: FitOptions,
    name: str, first_epoch: int = 0,
) -> History:
    """One phase of the recipe (:func:`headswap.core.fit.fit`), its epochs' metrics logged to
    the active MLflow run while they train, then any the run lacks and the learning rates the
    range test found."""
    with epoch_metrics() as live:
        history = fit(model, manifest, stages,
                      replace(options, extra_callbacks=[*options.extra_callbacks, live]),
                      first_epoch, name)
    log_history(history)
    log_found_rates(history, name)
    return history


def logged_steps(run_id: str, key: str) -> set[int]:
    """The steps at which run ``run_id`` has metric ``key``."""
    return {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key)}


def history_metrics(histories: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Per-epoch metrics of consecutive phases as ``{name: [{"step", "value"}, ...]}``."""
    metrics: dict[str, list[dict[str, float]]] = {}
    for history in histories:
        for name, values in history.items():
            per_epoch = isinstance(values, list) and len(values) == len(history["epoch"])
            if name == "epoch" or not per_epoch or not all(
                isinstance(v, (int, float)) for v in values
            ):
                continue
            metrics.setdefault(name, []).extend(
                {"step": int(step), "value": float(value)}
                for step, value in zip(history["epoch"], values, strict=True)
            )
    return metrics


def log_history(history: dict[str, Any], prefix: str = "epoch") -> None:
    """Log the epochs of a phase's ``history`` that the active run does not have: those a
    process killed mid-phase trained but could not send (a resumed run's history holds
    them). Nothing without an active run."""
    run = mlflow.active_run()
    if run is None or not history.get("epoch"):
        return
    done = logged_steps(run.info.run_id, f"{prefix}.loss")
    now = get_current_time_millis()
    metrics = [Metric(f"{prefix}.{name}", point["value"], now, point["step"])
               for name, points in history_metrics([history]).items()
               for point in points if point["step"] not in done]
    log_metrics(run.info.run_id, metrics)


def log_found_rates(history: dict[str, Any], phase: str) -> None:
    """Log the learning rates the range test found for a phase's ``learning_rate: auto``
    stages as parameters ``lr_find.<phase>.learning_rate`` (``lr_find.<phase>.stage<i>.
    learning_rate`` for a phase of several stages). A resumed run finds the same rates (kept
    with its resume state), which MLflow accepts again. Nothing without an active run."""
    rates = history.get("found_learning_rates") or []
    params = {f"lr_find.{phase}" + (f".stage{i}" if len(rates) > 1 else "") + ".learning_rate":
              repr(float(rate)) for i, rate in enumerate(rates, start=1) if rate is not None}
    if params and mlflow.active_run() is not None:
        mlflow.log_params(params)


def run_name(pipeline: str, params: dict[str, Any]) -> str:
    """``<pipeline> - <base> - <image folder>``, e.g. ``finetune - pretrained_base -
    fashion-mnist-target`` (``predict - <model> - <folder>`` for the predict pipeline)."""
    if pipeline == "predict":
        predict = params.get("predict") or {}
        model = predict.get("model") or "latest fine-tuned model"
        return " - ".join([pipeline, _short(model), _short(predict.get("path") or "")])
    finetune = params.get("finetune") or {}
    base = finetune.get("base") or {}
    base_name = (base.get("name") if base.get("source") == "keras_applications"
                 else base.get("path")) or ""
    folder = (finetune.get("data") or {}).get("path") or ""
    return " - ".join([pipeline, _short(base_name), _short(folder)])


def _short(path_or_uri: str) -> str:
    """The last part of a path or MLflow URI, without a model file's suffix."""
    text = str(path_or_uri).rstrip("/")
    if "://" in text:  # an object store's folder or file: its last part
        text = text.rsplit("/", 1)[-1]
    elif ":/" in text:  # an MLflow URI (runs:/..., models:/...)
        return text
    name = Path(text).name
    return Path(name).stem if Path(name).suffix in (".keras", ".h5") else name


def log_manifest(manifest: pd.DataFrame, folder: str) -> None:
    """The images of the run as an MLflow dataset (Datasets column, run page): the manifest,
    its digest, the source folder, the images per split."""
    counts = manifest["split"].value_counts()
    with warnings.catch_warnings():
        # MLflow registers its local-file source twice (for paths and for file:// URIs) and
        # warns that a local folder "can be interpreted in multiple ways": both are the same.
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
        remote = "://" in folder
        dataset = mlflow.data.from_pandas(
            manifest, source=folder if remote else Path(folder).resolve().as_uri(),
            name=folder.rstrip("/").rsplit("/", 1)[-1] if remote else Path(folder).resolve().name)
    mlflow.log_input(dataset, context="training", tags={
        f"{split}_images": str(int(counts.get(split, 0))) for split in ("train", "val", "test")
    })


def describe_run(metrics: dict[str, float], params: dict[str, str]) -> dict[str, str]:
    """The description (``mlflow.note.content``) and tags of a finished finetune run, from its
    metrics and parameters."""
    if "test.accuracy" not in metrics:
        return {}
    lines = [f"Test accuracy **{metrics['test.accuracy']:.4f}**, macro F1 "
             f"{metrics.get('test.macro_f1', float('nan')):.4f}"]
    if "phase1.test.accuracy" in metrics:
        lines.append(f"head only (phase 1): {metrics['phase1.test.accuracy']:.4f}")
    if "data.images" in metrics:
        lines.append(f"{int(metrics['data.images'])} images")
    tags = {"mlflow.note.content": "; ".join(lines) + ".",
            "test_accuracy": f"{metrics['test.accuracy']:.4f}"}
    base = params.get("finetune.base.name") if params.get(
        "finetune.base.source") == "keras_applications" else params.get("finetune.base.path")
    if base:
        tags["base"] = base
    if "epoch.phase2.trainable_params" in metrics:
        tags["phase2_trainable_params"] = str(int(metrics["epoch.phase2.trainable_params"]))
    return tags
