"""Project hooks: stop bad runs early with a readable message, set up multi-worker training,
and log chosen outputs to MLflow. The MLflow run's own lifecycle (resume, names, nested runs,
status) is :mod:`headswap.project.mlflow_run`."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click
import mlflow
import pandas as pd
from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl
from kedro.framework.project import pipelines
from kedro.io import DatasetError, MemoryDataset
from matplotlib.figure import Figure

from headswap.core import devices
from headswap.core.errors import InputError
from headswap.project.config import (
    ParameterError,
    merge_parameters,
    parameter_keys,
    parse_finetune,
    parse_predict,
    parse_tune,
)

logger = logging.getLogger(__name__)

SERVER_TIMEOUT_S = 5.0
#: The parameters behind each catalog input's arguments (named in its errors).
INPUT_KEYS = {
    "images": {"path": "finetune.data.path"},
    "prediction_images": {"path": "predict.path"},
    "pretrained_model": {"path": "finetune.base.path", "name": "finetune.base.name",
                         "weights": "finetune.base.weights",
                         "allow_unsafe": "finetune.base.allow_unsafe",
                         "image_size": "finetune.data.image_size"},
    "classifier": {"model": "predict.model", "labels": "predict.labels",
                   "allow_unsafe": "predict.allow_unsafe"},
}


class RunStopped(click.ClickException):
    """A run stopped for a reason the user can fix; ``kedro run`` prints just the message."""


class UserErrorHook:
    """Stops a run on input the user can fix with one readable message (no traceback):
    invalid ``finetune`` or ``predict`` parameters before the first node (and before an
    MLflow run starts), and a node's :class:`~headswap.core.InputError` or
    :class:`ParameterError`, naming the parameter keys. The pipeline error hooks still run:
    the MLflow run is marked FAILED."""

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        # before kedro-mlflow's setup, which would retry an absent server for minutes
        if mlflow.active_run() is not None:
            return
        uri, where = tracking_uri(context)
        if uri and uri.startswith(("http://", "https://")):
            check_tracking_server(uri, where)

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        for name, parse in (("finetune", parse_finetune), ("predict", parse_predict),
                            ("tune", parse_tune)):
            if f"params:{name}" in pipeline.inputs():
                try:
                    config = parse(catalog.load(f"params:{name}"))
                except ParameterError as err:
                    raise RunStopped(str(err)) from err
                if name == "finetune":
                    _check_inputs_set(config, pipeline.inputs())

    @hook_impl(trylast=True)
    def on_node_error(self, error: Exception, node) -> None:
        if isinstance(error, (ParameterError, InputError)):
            message = parameter_keys(str(error), node.name.rsplit(".", 1)[-1])
            raise RunStopped(f"Node {node.name} stopped: {message}") from error

    @hook_impl(trylast=True)
    def on_pipeline_error(self, error: Exception) -> None:
        # An input the catalog could not load (an image folder, a CSV or a base that is not
        # there or refuses access): the dataset's own message, without Kedro's wrapping.
        cause = error
        while isinstance(cause, DatasetError):
            cause = cause.__cause__
        if cause is not error and isinstance(cause, InputError):
            dataset = str(error).split(":", 1)[0]  # Kedro's "<dataset>: Failed while loading"
            message = str(cause)
            for argument, key in INPUT_KEYS.get(dataset, {}).items():
                message = message.replace(f"`{argument}`", key)
            raise RunStopped(message) from error


def _check_inputs_set(config, inputs: set[str]) -> None:
    """Stop a run whose catalog inputs ``images`` or ``pretrained_model`` have no location."""
    where = ("in conf/local/parameters_finetune.yml (README, \"Your own images\"; the "
             "embedded example runs with `make example`)")
    if "images" in inputs and not (config.data.path or config.data.manifest):
        raise RunStopped(
            "finetune.data.path is not set: give the images to fine-tune on, a folder of class "
            f"sub-folders or a .csv of path,label (local, s3:// or gs://), {where}."
        )
    if ("pretrained_model" in inputs and config.base.source != "keras_applications"
            and not config.base.path):
        raise RunStopped(
            "finetune.base.path is not set: give the base to fine-tune, a .keras or .h5 model "
            "file (or with finetune.base.source: keras_hub, a keras-hub preset folder), or set "
            "finetune.base.source: keras_applications and finetune.base.name (e.g. "
            f"MobileNetV2), {where}."
        )


def mlflow_config(context) -> dict[str, Any]:
    """The environment's mlflow.yml, as kedro-mlflow will read it ({} without one)."""
    loader = context.config_loader
    loader.config_patterns.setdefault("mlflow", ["mlflow*", "mlflow*/**", "**/mlflow*"])
    try:
        return loader["mlflow"] or {}
    except MissingConfigException:
        return {}


def tracking_uri(context) -> tuple[str | None, str]:
    """The tracking URI kedro-mlflow will use, and where it is set: ``server.mlflow_tracking_uri``
    of mlflow.yml, else the ``MLFLOW_TRACKING_URI`` environment variable."""
    server = mlflow_config(context).get("server") or {}
    if server.get("mlflow_tracking_uri"):
        return (server["mlflow_tracking_uri"],
                f"server.mlflow_tracking_uri in conf/{context.env or 'local'}/mlflow.yml")
    return os.environ.get("MLFLOW_TRACKING_URI"), "the environment variable MLFLOW_TRACKING_URI"


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
        f"nothing was run. Start the server, correct {where}, "
        "or set it to sqlite:///mlflow.db to record runs in a local file."
    )


class MultiWorkerHook:
    """Runs with ``finetune.distribution: multi_worker_mirrored`` on every worker that
    ``TF_CONFIG`` names, with one writer.

    The strategy is made when the Kedro context is created, before TensorFlow runs any
    operation (collective operations must be configured at program startup). Only the chief
    writes: on the other workers every output of the pipeline stays in memory (nothing under
    ``data/``) and kedro-mlflow neither opens the tracking store nor starts a run (its
    configuration points at a throwaway store in a temporary folder, tracking disabled). At
    the end of the pipeline every worker waits for the others, so that all exit together.
    """

    def __init__(self) -> None:
        self._worker = False
        self._strategy = None

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        self._worker, self._strategy = False, None
        finetune = context.params.get("finetune")
        if not isinstance(finetune, dict) or finetune.get("distribution") != \
                "multi_worker_mirrored":
            return
        strategy = devices.distribution_strategy("multi_worker_mirrored")
        self._strategy = strategy if devices.spans_workers(strategy) else None
        chief = devices.is_chief()
        logger.info("MultiWorkerMirroredStrategy: %s workers, %s replicas in sync; this process "
                    "is %s", devices.worker_count(), strategy.num_replicas_in_sync,
                    "the chief (it writes the outputs and the MLflow run)" if chief
                    else "a worker (it writes nothing)")
        if chief:
            return
        self._worker = True
        store = tempfile.mkdtemp(prefix="headswap_worker_mlflow_")
        atexit.register(shutil.rmtree, store, ignore_errors=True)
        context.config_loader["mlflow"] = merge_parameters(mlflow_config(context), {
            "server": {"mlflow_tracking_uri": f"sqlite:///{store}/mlflow.db"},
            "tracking": {"disable_tracking": {"pipelines": [*pipelines, "__default__"]}},
        })

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if self._worker:
            for name in pipeline.all_outputs():
                catalog[name] = MemoryDataset(copy_mode="assign")

    @hook_impl(trylast=True)
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if self._strategy is not None:
            logger.info("Waiting for the other workers to finish their pipeline")
            devices.wait_for_workers(self._strategy)


class MlflowArtifactHook:
    """Logs each saved output whose catalog entry has ``metadata: {mlflow_artifact: <dir>}``
    to the active MLflow run, under ``<dir>/`` (figures as PNG at their entry's ``save_args``,
    dicts as JSON, tables as CSV).

    Not kedro-mlflow's ``MlflowArtifactDataset``: that dataset logs the file at its local save
    path (``mlflow.log_artifact`` of ``_get_save_path()``), which fails when the catalog's
    ``globals: data`` is an ``s3://`` or ``gs://`` folder; this hook logs the saved data itself,
    wherever the catalog put the file.
    """

    def __init__(self) -> None:
        self._folders: dict[str, str] = {}
        self._save_args: dict[str, dict[str, Any]] = {}

    @hook_impl
    def after_context_created(self, context) -> None:
        # a figure is logged as its catalog entry saves it (dpi, ...): its save_args
        self._save_args = {name: dict(entry.get("save_args") or {})
                           for name, entry in context.config_loader["catalog"].items()
                           if isinstance(entry, dict)}

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
            mlflow.log_figure(data, f"{folder}/{dataset_name}.png",
                              save_kwargs=self._save_args.get(dataset_name) or None)
        elif isinstance(data, dict) and all(isinstance(v, bytes) for v in data.values()):
            _log_files(data, folder)  # a folder of files (FilesDataset); nothing if empty
        elif isinstance(data, pd.DataFrame):
            mlflow.log_text(data.to_csv(index=False), f"{folder}/{dataset_name}.csv")
        elif isinstance(data, (dict, list)):
            mlflow.log_dict(data, f"{folder}/{dataset_name}.json")
        else:
            mlflow.log_text(str(data), f"{folder}/{dataset_name}.txt")


def _log_files(files: dict[str, bytes], folder: str) -> None:
    """Log ``{relative path: bytes}`` to the active MLflow run under ``folder/``."""
    if not files:
        return
    with tempfile.TemporaryDirectory(prefix="headswap_artifacts_") as tmp:
        for relative, content in files.items():
            path = Path(tmp) / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        mlflow.log_artifacts(tmp, folder)


