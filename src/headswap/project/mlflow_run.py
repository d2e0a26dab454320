"""The MLflow run of a ``kedro run``, from start to end, in one place: :class:`MlflowRunHook`.
"""

from __future__ import annotations

import atexit
import logging
import shutil
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from kedro.framework.hooks import hook_impl
from mlflow.entities import RunStatus

from headswap.project import tracking
from headswap.project.config import (
    ParameterError,
    parse_finetune,
    state_dir,
)

logger = logging.getLogger(__name__)


class MlflowRunHook:
    """The MLflow run of a ``kedro run``, from start to end (kedro-mlflow starts and ends it;
    this hook runs after kedro-mlflow's own at each step).

    * **Resume.** A finetune run that was killed or interrupted, run again with the same
      parameters (and ``finetune.training.resume``, on by default), continues in its MLflow run:
      the run's id is kept beside its resume state (:func:`headswap.project.config.state_dir`) and
      handed to kedro-mlflow, which reopens the run instead of starting one. Once a pipeline
      finishes, or fails on an error (which a rerun would meet again), the resume folder is
      removed: only a run killed or stopped with Ctrl-C leaves its state to resume from.
    * **Names.** Each run is named after what ran (``<pipeline> - <base> - <image folder>``,
      unless ``tracking.run.name`` in mlflow.yml names it); the manifest is logged as its input
      dataset; a finished finetune run gets a description with its headline result and tags.
    * **Namespaces.** Each node namespace (a variant of ``compare``) logs into its own run,
      nested under the pipeline's run (``labels_10.full`` under ``labels_10`` under it), opened
      before each of its nodes and closed once the node's last output is saved, so metrics
      datasets saved by the node land in the innermost one. A saved
      ``<namespace>.finetune_params`` dict is logged as that run's parameters.
    * **End.** kedro-mlflow re-enters its run before each node (``nested: true``): after the
      pipeline the run is closed as many times as it is still active, so that a later session
      in the same process does not log into it; a process that exits mid-run (Ctrl-C) marks it
      KILLED instead of the FINISHED MLflow's exit handler would record; a failed one is
      FAILED. The end of a run repeats how many image files ingest skipped.
    """

    def __init__(self) -> None:
        self._outer_run = False  # a run the caller started: left open
        self._named = False
        self._state: Path | None = None  # this run's resume state
        self._resume_dir: Path | None = None
        self._run_id: str | None = None  # the pipeline's run, to close
        self._pipeline_run: str | None = None  # the pipeline's run, to describe
        self._folder: str | None = None
        self._counts: dict[str, int] = {}
        self._runs: dict[str, str] = {}  # namespace -> its nested run
        self._open: str | None = None  # the node whose nested runs are open
        self._depth = 0  # how many nested runs it opened
        atexit.register(self._end_interrupted_run)

    @hook_impl(trylast=True)
    def after_context_created(self, context) -> None:
        self._outer_run = mlflow.active_run() is not None
        config = getattr(context, "mlflow", None)  # kedro-mlflow's configuration
        self._named = bool(config is not None and config.tracking.run.name)
        self._state = self._resume_dir = None
        try:
            cfg = parse_finetune(context.params["finetune"])
        except (KeyError, ParameterError):
            return  # not a finetune configuration, or UserErrorHook reports it
        if not cfg.keeps_backups():
            return
        self._state, self._resume_dir = state_dir(cfg), Path(cfg.training.resume_dir)
        run_file = self._state / "mlflow_run_id"
        if run_file.is_file() and config is not None:
            config.tracking.run.id = run_file.read_text().strip()
            logger.info("Resuming: logging into the interrupted MLflow run %s",
                        config.tracking.run.id)

    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        run = mlflow.active_run()
        self._pipeline_run = run.info.run_id if run is not None else None
        self._run_id = self._pipeline_run if not self._outer_run else None
        self._counts, self._runs, self._open, self._depth = {}, {}, None, 0
        self._keep_resume_state(pipeline, run)
        self._folder = None
        if run is None:
            return
        params = {key: catalog.load(f"params:{key}") for key in ("finetune", "predict")
                  if f"params:{key}" in pipeline.inputs()}
        if not params:
            return
        self._folder = ((params.get("finetune") or {}).get("data") or {}).get("path")
        if not self._named:
            names = run_params.get("pipeline_names") or [run_params.get("pipeline_name")]
            label = "+".join(n for n in names if n) or "__default__"
            label = "finetune" if label == "__default__" else label
            mlflow.set_tag("mlflow.runName", tracking.run_name(label, params))

    def _keep_resume_state(self, pipeline, run) -> None:
        # tune's trials keep no resume state; several processes may share one search
        if ("params:finetune" not in pipeline.inputs() or "params:tune" in pipeline.inputs()
                or run is None):
            self._state = self._resume_dir = None
        if self._state is not None:
            self._state.mkdir(parents=True, exist_ok=True)
            (self._state / "mlflow_run_id").write_text(run.info.run_id)

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
        if dataset_name in ("manifest", "skipped_images") and isinstance(data, pd.DataFrame):
            self._counts[dataset_name] = len(data)
            if (dataset_name == "manifest" and self._folder
                    and mlflow.active_run() is not None):
                tracking.log_manifest(data, self._folder)
        if self._open != node.name:
            return
        if dataset_name.endswith(".finetune_params") and isinstance(data, dict):
            flat = pd.json_normalize(data, sep=".").iloc[0].to_dict()
            mlflow.log_params({f"finetune.{k}": str(v)[:6000] for k, v in flat.items()})
        if dataset_name == node.outputs[-1]:
            self._close_namespace(RunStatus.FINISHED)

    @hook_impl(trylast=True)
    def after_node_run(self, node) -> None:
        if self._open == node.name and not node.outputs:
            self._close_namespace(RunStatus.FINISHED)

    @hook_impl(tryfirst=True)
    def on_node_error(self, error: Exception, node) -> None:
        if self._open == node.name:
            self._close_namespace(RunStatus.FAILED)

    @hook_impl(trylast=True)
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self._describe()
        self._summarise_skipped()
        self._remove_resume_state()
        self._close(RunStatus.FINISHED)

    @hook_impl(tryfirst=True)
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any], pipeline, catalog):
        self._remove_resume_state()
        # kedro-mlflow's own error handler ends the run once per time it was re-entered, and
        # says so each time: leave it entered once, so the user reads that line once.
        run_id = self._run_id
        self._close(RunStatus.FAILED)
        if run_id is not None:
            mlflow.start_run(run_id=run_id)

    def _describe(self) -> None:
        """The finished run's description and tags (base, test accuracy)."""
        if self._pipeline_run is None:
            return
        client = mlflow.MlflowClient()
        finished = client.get_run(self._pipeline_run)
        for key, value in tracking.describe_run(finished.data.metrics,
                                                finished.data.params).items():
            client.set_tag(self._pipeline_run, key, value)

    def _summarise_skipped(self) -> None:
        if "skipped_images" not in self._counts:
            return
        skipped = self._counts["skipped_images"]
        (logger.warning if skipped else logger.info)(
            "Run summary: %s images used, %s image files skipped%s.",
            self._counts.get("manifest", 0), skipped,
            " (listed in skipped_images, and in the MLflow run under data/)" if skipped else "",
        )

    def _remove_resume_state(self) -> None:
        if self._resume_dir is not None:
            shutil.rmtree(self._resume_dir, ignore_errors=True)
        self._state = self._resume_dir = None

    def _close_namespace(self, status: int) -> None:
        for _ in range(self._depth):
            mlflow.end_run(RunStatus.to_string(status))
        self._open, self._depth = None, 0

    def _close(self, status: int) -> None:
        while (run := mlflow.active_run()) is not None and run.info.run_id == self._run_id:
            mlflow.end_run(RunStatus.to_string(status))
        self._run_id = None

    def _end_interrupted_run(self) -> None:
        run = mlflow.active_run()
        if self._run_id and run is not None and run.info.run_id == self._run_id:
            logger.warning("The run was interrupted; MLflow run %s is marked KILLED.", self._run_id)
            self._close(RunStatus.KILLED)
