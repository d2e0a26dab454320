"""Project hooks: stop bad runs early with a readable message, log chosen outputs to MLflow,
and leave every MLflow run with a status that tells what happened."""

from __future__ import annotations

import atexit
import logging
import os
import urllib.error
import urllib.request
from typing import Any

import click
import mlflow
import pandas as pd
from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl
from matplotlib.figure import Figure
from mlflow.entities import RunStatus

from headswap.config import ParameterError, parse_finetune

logger = logging.getLogger(__name__)

SERVER_TIMEOUT_S = 5.0


class RunStopped(click.ClickException):
    """A run stopped for a reason the user can fix; ``kedro run`` prints just the message."""


class ValidateParametersHook:
    """Stops a run that uses ``params:finetune`` before its first node (and before an MLflow
    run starts) if they are invalid."""

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if "params:finetune" in pipeline.inputs():
            try:
                parse_finetune(catalog.load("params:finetune"))
            except ParameterError as err:
                raise RunStopped(str(err)) from err


class UserErrorHook:
    """Turns a node's :class:`ParameterError` or :class:`DataError` (bad input the message
    explains) into :class:`RunStopped`, so the CLI shows the message, not a traceback. The
    pipeline error hooks still run: kedro-mlflow marks the MLflow run FAILED."""

    @hook_impl(trylast=True)
    def on_node_error(self, error: Exception, node) -> None:
        from headswap.data import DataError  # imports TensorFlow: only once a node failed

        if isinstance(error, (ParameterError, DataError)):
            raise RunStopped(f"Node {node.name} stopped: {error}") from error


def tracking_uri(context) -> str | None:
    """The tracking URI kedro-mlflow will use: ``server.mlflow_tracking_uri`` of mlflow.yml,
    else ``MLFLOW_TRACKING_URI``."""
    loader = context.config_loader
    loader.config_patterns.setdefault("mlflow", ["mlflow*", "mlflow*/**", "**/mlflow*"])
    try:
        server = (loader["mlflow"] or {}).get("server") or {}
    except MissingConfigException:
        server = {}
    return server.get("mlflow_tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")


def check_tracking_server(uri: str, where: str, timeout: float = SERVER_TIMEOUT_S) -> None:
    """Raise :class:`RunStopped` unless the MLflow server at ``uri`` answers ``/health``."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            status, problem = response.status, ""
    except urllib.error.HTTPError as err:
        status, problem = err.code, f"it answered HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        status, problem = 0, str(getattr(err, "reason", err))
    if 0 < status < 500:
        return
    raise RunStopped(
        f"The MLflow tracking server {uri} cannot be reached ({problem or f'HTTP {status}'}); "
        f"nothing was run. Start the server, correct server.mlflow_tracking_uri in {where}, "
        "or set it to sqlite:///mlflow.db to record runs in a local file."
    )


class MlflowServerCheckHook:
    """Stops a run before anything else (kedro-mlflow's setup included, which would retry for
    minutes) when the configured http(s) MLflow tracking server does not answer."""

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        if mlflow.active_run() is not None:
            return
        uri = tracking_uri(context)
        if uri and uri.startswith(("http://", "https://")):
            check_tracking_server(uri, f"conf/{context.env or 'local'}/mlflow.yml")


class RunSummaryHook:
    """Repeats at the end of a run how many image files were skipped at ingest, and marks the
    MLflow run KILLED when the process exits mid-run (e.g. Ctrl-C), where MLflow's own exit
    handler would record it as FINISHED."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._run_id: str | None = None
        atexit.register(self._end_interrupted_run)

    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self._counts = {}
        run = mlflow.active_run()
        self._run_id = run.info.run_id if run else None

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        if dataset_name in ("manifest", "skipped_images") and isinstance(data, pd.DataFrame):
            self._counts[dataset_name] = len(data)

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self._run_id = None
        if "skipped_images" in self._counts:
            skipped = self._counts["skipped_images"]
            log = logger.warning if skipped else logger.info
            log(
                "Run summary: %s images used, %s image files skipped%s.",
                self._counts.get("manifest", 0), skipped,
                " (listed in skipped_images, and in the MLflow run under data/)" if skipped else "",
            )

    @hook_impl
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any], pipeline, catalog):
        self._run_id = None

    def _end_interrupted_run(self) -> None:
        run = mlflow.active_run()
        if self._run_id and run is not None and run.info.run_id == self._run_id:
            logger.warning("The run was interrupted; MLflow run %s is marked KILLED.", self._run_id)
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))


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
