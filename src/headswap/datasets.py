"""Catalog dataset types of the project."""

from __future__ import annotations

from itertools import chain

from kedro.io import DatasetError
from kedro_mlflow.io.metrics import MlflowMetricsHistoryDataset
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis

BATCH = 1000  # the most metrics one MLflow log_batch request takes


class MetricsHistoryDataset(MlflowMetricsHistoryDataset):
    """kedro-mlflow's metrics history dataset (same configuration, same metrics in the run),
    saved in batches of up to 1000 values per MLflow request instead of one request per value:
    a history of a few hundred epoch values is one request, not hundreds."""

    def _save(self, data) -> None:
        if not self._logging_activated:
            return
        try:
            run_id = self.run_id
        except DatasetError:  # no run: kedro-mlflow's own path starts one
            super()._save(data)
            return
        now = get_current_time_millis()
        metrics = [
            Metric(key, float(value), now, int(step))
            for key, value, step in chain.from_iterable(
                self._build_args_list_from_metric_item(k, v) for k, v in data.items()
            )
        ]
        client = MlflowClient()
        for start in range(0, len(metrics), BATCH):
            client.log_batch(run_id, metrics=metrics[start:start + BATCH])
