"""Project hooks: stop bad runs early with a readable message, log chosen outputs to MLflow,
and leave every MLflow run with a status that tells what happened."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import urllib.error
import urllib.request
from typing import Any

import click
import mlflow
import pandas as pd
from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl
from kedro_mlflow.framework.hooks import MlflowHook
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
        # imports TensorFlow: only once a node failed
        from headswap.data import DataError

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


class MlflowParamsOnceHook(MlflowHook):
    """kedro-mlflow's hook (registered in settings.py in place of the plugin's own), writing
    each parameter to an MLflow run once.

    kedro-mlflow logs a node's ``params:`` inputs before every node; every finetune node takes
    the whole ``params:finetune``, so the same values would be written again for each node
    (hundreds of database writes per run). A value that changes within a run still reaches
    MLflow, which refuses it as it always does.
    """

    def __init__(self) -> None:
        super().__init__()
        self._logged: dict[tuple[str | None, str], str] = {}

    def _log_param(self, name: str, value: Any) -> None:
        run = mlflow.active_run()
        key = (run.info.run_id if run else None, name)
        if self._logged.get(key) == str(value):
            return
        super()._log_param(name, value)
        self._logged[key] = str(value)


class SkippedImagesSummaryHook:
    """Repeats at the end of a run how many image files ingest skipped, and where they are
    listed."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self._counts = {}

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        if dataset_name in ("manifest", "skipped_images") and isinstance(data, pd.DataFrame):
            self._counts[dataset_name] = len(data)

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if "skipped_images" not in self._counts:
            return
        skipped = self._counts["skipped_images"]
        (logger.warning if skipped else logger.info)(
            "Run summary: %s images used, %s image files skipped%s.",
            self._counts.get("manifest", 0), skipped,
            " (listed in skipped_images, and in the MLflow run under data/)" if skipped else "",
        )


class MlflowRunEndHook:
    """Leaves the MLflow run that kedro-mlflow started closed, with a status that tells what
    happened.

    kedro-mlflow re-enters its run before each node (``nested: true``), so after a run the same
    run is still active once per node: a later session in the same process would log into it.
    After the pipeline they are all closed. When the process exits mid-run (Ctrl-C, which
    ``kedro run`` turns into an exit), the run is marked KILLED instead of the FINISHED that
    MLflow's own exit handler would record. Failed runs are marked FAILED by kedro-mlflow.
    """

    def __init__(self) -> None:
        self._outer_run = False
        self._run_id: str | None = None
        atexit.register(self._end_interrupted_run)

    @hook_impl
    def after_context_created(self, context) -> None:
        self._outer_run = mlflow.active_run() is not None  # started by the caller: left open

    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        run = mlflow.active_run()
        self._run_id = run.info.run_id if run is not None and not self._outer_run else None

    @hook_impl(trylast=True)
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self._close(RunStatus.FINISHED)

    @hook_impl(trylast=True)
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any], pipeline, catalog):
        self._close(RunStatus.FAILED)

    def _close(self, status: int) -> None:
        while (run := mlflow.active_run()) is not None and run.info.run_id == self._run_id:
            mlflow.end_run(RunStatus.to_string(status))
        self._run_id = None

    def _end_interrupted_run(self) -> None:
        run = mlflow.active_run()
        if self._run_id and run is not None and run.info.run_id == self._run_id:
            logger.warning("The run was interrupted; MLflow run %s is marked KILLED.", self._run_id)
            self._close(RunStatus.KILLED)


class MlflowArtifactHook:
    """Logs each saved output whose catalog entry has ``metadata: {mlflow_artifact: <dir>}``
    to the active MLflow run, under ``<dir>/`` (figures as PNG, dicts as JSON, tables as CSV).
    """

    def __init__(self) -> None:
        self._folders: dict[str, str] = {}

    @hook_impl
    def after_catalog_created(self, catalog) -> None:
        self._folders = {}
        for name in catalog:
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


class ResumeHook:
    """With ``finetune.training.resume``, an interrupted run continues in its MLflow run.

    The run's MLflow id is kept beside its resume state (see ``headswap.phases.state_dir``);
    a resumed ``kedro run`` hands that id to kedro-mlflow, which reopens the run instead of
    starting one, so both parts log into one run. The state is removed once the pipeline
    finishes.
    """

    def __init__(self) -> None:
        self._state = None

    @hook_impl(trylast=True)
    def after_context_created(self, context) -> None:
        # imports TensorFlow: only for finetune runs
        from headswap.phases import state_dir

        self._state = None
        try:
            cfg = parse_finetune(context.params["finetune"])
        except (KeyError, ParameterError):
            return  # not a finetune project configuration, or ValidateParametersHook reports
        self._state = state_dir(cfg)
        run_file = self._state / "mlflow_run_id"
        config = getattr(context, "mlflow", None)
        if cfg.training.resume and run_file.is_file() and config is not None:
            config.tracking.run.id = run_file.read_text().strip()
            logger.info("Resuming: logging into the interrupted MLflow run %s",
                        config.tracking.run.id)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if "params:finetune" not in pipeline.inputs():
            self._state = None

    @hook_impl
    def before_node_run(self, node) -> None:
        run = mlflow.active_run()
        if self._state is not None and run is not None:
            self._state.mkdir(parents=True, exist_ok=True)
            (self._state / "mlflow_run_id").write_text(run.info.run_id)

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if self._state is not None:
            shutil.rmtree(self._state, ignore_errors=True)
        self._state = None


class NamespaceRunsHook:
    """Each node namespace of a run (a variant of the ``compare`` pipeline) logs into its own
    MLflow run, nested under the pipeline's run, so the MLflow UI compares them side by side.
    Nested namespaces nest their runs: ``labels_10.full`` (a variant of one count of the
    ``label_efficiency`` pipeline) logs into the run ``labels_10.full``, nested under the run
    ``labels_10``, nested under the pipeline's run.

    The namespace's runs are opened (created the first time, named after the namespace) before
    each of its nodes, after kedro-mlflow has re-entered the pipeline's run, and closed once the
    node's last output is saved, so metrics datasets saved by the node land in the innermost
    one. A saved ``<namespace>.finetune_params`` dict is logged as that run's parameters.
    """

    def __init__(self) -> None:
        self._runs: dict[str, str] = {}
        self._open: str | None = None  # name of the node whose nested runs are open
        self._depth = 0  # how many nested runs it opened

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self._runs, self._open, self._depth = {}, None, 0

    @hook_impl(trylast=True)
    def before_node_run(self, node) -> None:
        if not node.namespace or mlflow.active_run() is None:
            return
        parts = node.namespace.split(".")
        for depth in range(1, len(parts) + 1):
            space = ".".join(parts[:depth])
            run_id = self._runs.get(space)
            run = mlflow.start_run(run_id=run_id, run_name=None if run_id else space,
                                   nested=True)
            if run_id is None:
                mlflow.set_tag("namespace", space)
            self._runs[space] = run.info.run_id
        self._open, self._depth = node.name, len(parts)

    @hook_impl(trylast=True)
    def after_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        if self._open != node.name:
            return
        if dataset_name.endswith(".finetune_params") and isinstance(data, dict):
            flat = pd.json_normalize(data, sep=".").iloc[0].to_dict()
            mlflow.log_params({f"finetune.{k}": str(v)[:6000] for k, v in flat.items()})
        if dataset_name == node.outputs[-1]:
            self._close(RunStatus.FINISHED)

    @hook_impl(trylast=True)
    def after_node_run(self, node) -> None:
        if self._open == node.name and not node.outputs:
            self._close(RunStatus.FINISHED)

    @hook_impl(tryfirst=True)
    def on_node_error(self, error: Exception, node) -> None:
        if self._open == node.name:
            self._close(RunStatus.FAILED)

    def _close(self, status: int) -> None:
        for _ in range(self._depth):
            mlflow.end_run(RunStatus.to_string(status))
        self._open, self._depth = None, 0
