"""Catalog dataset types of the project."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import mlflow
from kedro.io import AbstractDataset, AbstractVersionedDataset, DatasetError, Version
from mlflow.entities import Metric
from mlflow.utils.time import get_current_time_millis

BATCH = 1000  # the most metrics one MLflow log_batch request takes


def log_metrics(run_id: str, metrics: list[Metric], synchronous: bool = True) -> None:
    """Send ``metrics`` to run ``run_id`` in requests of up to :data:`BATCH` values (without
    waiting for the tracking store unless ``synchronous``)."""
    client = mlflow.MlflowClient()
    for start in range(0, len(metrics), BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + BATCH], synchronous=synchronous)


class MetricsHistoryDataset(AbstractDataset[dict, dict]):
    """Metrics of the active MLflow run, each a list of ``{"step", "value"}`` points, named
    ``<prefix>.<name>`` (the format of kedro-mlflow's ``MlflowMetricsHistoryDataset``).

    Saved in batches of up to 1000 values per MLflow request, not one request per value;
    nothing is saved when no MLflow run is active (a pipeline with tracking switched off).
    Loading reads the histories (by their full names) back from ``run_id``, else from the
    active run or the run last saved to.
    """

    def __init__(self, prefix: str | None = None, run_id: str | None = None,
                 metadata: dict[str, Any] | None = None):
        self.prefix = prefix
        self.metadata = metadata
        self._run_id = run_id

    def _key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def save(self, data: dict[str, Any]) -> None:
        run = mlflow.active_run()
        if run is None:
            return
        now = get_current_time_millis()
        metrics = []
        for name, points in data.items():
            points = points if isinstance(points, list) else [points]
            metrics += [Metric(self._key(name), float(p["value"]), now, int(p.get("step", 0)))
                        for p in points]
        log_metrics(run.info.run_id, metrics)
        self._run_id = run.info.run_id

    def load(self) -> dict[str, list[dict[str, float]]]:
        run = mlflow.active_run()
        run_id = self._run_id or (run.info.run_id if run is not None else None)
        if run_id is None:
            raise DatasetError("No MLflow run to read the metrics from.")
        client = mlflow.MlflowClient()
        keys = client.get_run(run_id).data.metrics
        wanted = [k for k in keys if self.prefix is None or k.startswith(f"{self.prefix}.")]
        return {
            key: [{"step": m.step, "value": m.value}
                  for m in client.get_metric_history(run_id, key)]
            for key in wanted
        }

    def _describe(self) -> dict[str, Any]:
        return {"prefix": self.prefix}


class FilesDataset(AbstractVersionedDataset[dict, dict]):
    """A folder of files, given and returned as ``{relative path: bytes}``; versioned like
    Kedro's file datasets (``<filepath>/<version>/<folder name>/...``)."""

    def __init__(self, filepath: str, version: Version | None = None,
                 metadata: dict[str, Any] | None = None):
        super().__init__(PurePosixPath(filepath), version)
        self.metadata = metadata

    def save(self, data: dict[str, bytes]) -> None:
        folder = Path(self._get_save_path())
        folder.mkdir(parents=True, exist_ok=True)
        for relative, content in data.items():
            path = folder / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)

    def load(self) -> dict[str, bytes]:
        folder = Path(self._get_load_path())
        if not folder.is_dir():
            raise DatasetError(f"No folder {folder} to load.")
        return {p.relative_to(folder).as_posix(): p.read_bytes()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    def _exists(self) -> bool:
        try:
            return Path(self._get_load_path()).is_dir()
        except DatasetError:
            return False

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "version": self._version}
