"""Project hooks: validate parameters before any work, and log chosen outputs to MLflow."""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import pandas as pd
from kedro.framework.hooks import hook_impl
from matplotlib.figure import Figure

from headswap.config import parse_finetune

logger = logging.getLogger(__name__)


class ValidateParametersHook:
    """Stops a run that uses ``params:finetune`` before its first node if they are invalid."""

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if "params:finetune" in pipeline.inputs():
            parse_finetune(catalog.load("params:finetune"))


class MlflowArtifactHook:
    """Logs each saved output whose catalog entry has ``metadata: {mlflow_artifact: <dir>}``
    to the active MLflow run, under ``<dir>/`` (figures as PNG, dicts as JSON, tables as CSV).
    """

    def __init__(self) -> None:
        self._folders: dict[str, str] = {}

    @hook_impl
    def after_catalog_created(self, catalog) -> None:
        self._folders = {}
        for name in catalog.keys():
            metadata = getattr(catalog.get(name), "metadata", None) or {}
            if "mlflow_artifact" in metadata:
                self._folders[name] = metadata["mlflow_artifact"]

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        folder = self._folders.get(dataset_name)
        if folder is None or mlflow.active_run() is None:
            return
        if isinstance(data, Figure):
            mlflow.log_figure(data, f"{folder}/{dataset_name}.png")
        elif isinstance(data, pd.DataFrame):
            mlflow.log_text(data.to_csv(index=False), f"{folder}/{dataset_name}.csv")
        elif isinstance(data, (dict, list)):
            mlflow.log_dict(data, f"{folder}/{dataset_name}.json")
        else:
            mlflow.log_text(str(data), f"{folder}/{dataset_name}.txt")
