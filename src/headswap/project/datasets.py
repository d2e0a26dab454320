"""Catalog dataset types of the project."""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import mlflow
from kedro.io import AbstractDataset, AbstractVersionedDataset, DatasetError, Version
from mlflow.entities import Metric
from mlflow.utils.time import get_current_time_millis

from headswap.core import sources
from headswap.core.errors import InputError, first_line

BATCH = 1000  # the most metrics one MLflow log_batch request takes

logger = logging.getLogger(__name__)
EMPTY = ".empty"  # marks a saved, empty version of a FilesDataset in an object store
KEDRO_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}\.\d{2}\.\d{2}\.\d{3}Z")
MLFLOW_URI = re.compile(r"[a-z][a-z0-9+.-]*:/", re.IGNORECASE)


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
    Kedro's file datasets (``<filepath>/<version>/<folder name>/...``); local or in object
    storage (any fsspec URL, with ``credentials`` and ``fs_args``)."""

    def __init__(self, filepath: str, version: Version | None = None,
                 credentials: dict[str, Any] | None = None,
                 fs_args: dict[str, Any] | None = None,
                 metadata: dict[str, Any] | None = None):
        self._fs, path = fsspec.core.url_to_fs(filepath, **_storage_options(credentials,
                                                                             fs_args))
        self._protocol = filepath.split("://", 1)[0] if "://" in filepath else None
        super().__init__(PurePosixPath(path), version, exists_function=self._fs.exists,
                         glob_function=self._fs.glob)
        self.metadata = metadata

    def save(self, data: dict[str, bytes]) -> None:
        folder = str(self._get_save_path())
        self._fs.makedirs(folder, exist_ok=True)
        if not data and self._protocol:  # an object store has no empty folders
            self._fs.pipe_file(f"{folder}/{EMPTY}", b"")
        _write_files(self._fs, folder, data)

    def load(self) -> dict[str, bytes]:
        folder = str(self._get_load_path())
        if not self._fs.isdir(folder):
            raise DatasetError(f"No folder {folder} to load.")
        return {path[len(folder) + 1:]: self._fs.cat_file(path)
                for path in sorted(self._fs.find(folder)) if not path.endswith(f"/{EMPTY}")}

    def _exists(self) -> bool:
        try:
            return self._fs.isdir(str(self._get_load_path()))
        except DatasetError:
            return False

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "protocol": self._protocol, "version": self._version}


def _write_files(fs: fsspec.AbstractFileSystem, folder: str, files: dict[str, bytes],
                 present: set[str] = frozenset()) -> None:
    """Write ``{relative path: bytes}`` under ``folder``; a file among ``present`` (paths
    already there) that holds the same bytes is left as it is."""
    for relative, content in files.items():
        target = f"{folder}/{relative}"
        if target in present and fs.cat_file(target) == content:
            continue
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(target, content)


def _storage_options(credentials: dict[str, Any] | None,
                     fs_args: dict[str, Any] | None) -> dict[str, Any]:
    """fsspec's options from a catalog entry's ``credentials`` and ``fs_args``."""
    return {**(fs_args or {}), **(credentials or {})}


class ImageFolderDataset(AbstractDataset[dict, Any]):
    """The images of a folder (one sub-folder per class, or train/ and test/ of class
    sub-folders) or of a CSV of ``path,label[,split]``, local or in object storage
    (``s3://``, ``gs://``: any fsspec protocol, with ``credentials`` and ``fs_args`` as in
    kedro-datasets).

    Loading gives an :class:`~headswap.core.sources.ImageSource`, which lists the files when
    first used (a run that reuses an earlier manifest never lists them); nothing is decoded or
    downloaded until the images are ingested. Saving ``{relative path: bytes}`` writes
    those files into the folder (files already there with the same content are left as they
    are). Nothing else in the folder is touched, unless ``overwrite`` (for folders the project
    generates, such as the example's): then the folder holds exactly the files saved.
    ``manifest``: an earlier run's manifest.csv, whose split is reused (the images it lists
    must all still be there).
    """

    def __init__(self, path: str | None, credentials: dict[str, Any] | None = None,
                 fs_args: dict[str, Any] | None = None, overwrite: bool = False,
                 manifest: str | None = None, metadata: dict[str, Any] | None = None):
        self.path = None if path is None else str(path)
        self.manifest = None if manifest is None else str(manifest)
        self.overwrite = overwrite
        self.metadata = metadata
        self._options = _storage_options(credentials, fs_args)

    def load(self) -> Any:
        if not self.path and not self.manifest:
            raise sources.DataError(
                "No image folder is set. Put `path` (finetune.data.path, or predict.path) in "
                "conf/local/parameters_finetune.yml, or run `kedro run --params "
                "finetune.data.path=<folder or .csv>`."
            )
        # listed when first used; with a manifest, that manifest's split instead
        return sources.ImageSource(self.path or self.manifest, self._options, self.manifest)

    def save(self, data: dict[str, bytes]) -> None:
        fs, root = fsspec.core.url_to_fs(self.path, **self._options)
        root = root.rstrip("/")
        present = set(fs.find(root)) if fs.exists(root) else set()
        _write_files(fs, root, data, present)
        stale = sorted(present - {f"{root}/{relative}" for relative in data})
        if self.overwrite and stale:
            fs.rm(stale)

    def _describe(self) -> dict[str, Any]:
        return {"path": self.path}


class BaseModelDataset(AbstractDataset[None, Any]):
    """The pretrained network to fine-tune, as ``finetune.base`` names it: a ``.keras``/``.h5``
    model file (local, a Kedro-versioned folder: its latest version, or remote: any fsspec
    URL), a ``keras.applications`` architecture, or a keras-hub preset folder. Read only.

    With ``versioned: true`` in the catalog, ``kedro run --load-versions
    pretrained_model:<version>`` picks that version of a Kedro-versioned model folder (such as
    the example's ``pretrained_base``); without a load version, the latest one is read."""

    def __init__(self, source: str = "file", path: str | None = None, name: str | None = None,
                 weights: str | None = "imagenet", image_size: Any = None,
                 allow_unsafe: bool = False, credentials: dict[str, Any] | None = None,
                 fs_args: dict[str, Any] | None = None, version: Version | None = None,
                 metadata: dict[str, Any] | None = None):
        self.source, self.path, self.name, self.weights = source, path, name, weights
        if path and version is not None and version.load:
            self.path = f"{path.rstrip('/')}/{version.load}/{PurePosixPath(path).name}"
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.allow_unsafe = allow_unsafe
        self.metadata = metadata
        self._options = _storage_options(credentials, fs_args)

    def load(self) -> Any:
        from headswap.core import applications, bases

        size = tuple(self.image_size) if self.image_size else None
        if self.source == "keras_applications":
            return applications.keras_application(self.name, size, self.weights)
        if self.source == "keras_hub":
            return applications.keras_hub_base(self.path or self.name, size)
        if not self.path:
            raise bases.BaseLoadError(
                "No base is set. Put `base.path` (a .keras/.h5 file) or `base.source`: "
                "keras_applications with `base.name` in conf/local/parameters_finetune.yml."
            )
        if not sources.is_url(self.path):
            return bases.load_model_file(_latest_version(Path(self.path)), self.allow_unsafe)
        suffix = PurePosixPath(self.path).suffix or ".keras"
        with tempfile.TemporaryDirectory(prefix="headswap_base_") as folder:
            local = Path(folder) / f"base{suffix}"
            try:
                fsspec.core.url_to_fs(self.path, **self._options)[0].get(self.path, str(local))
            except Exception as err:  # the storage's own refusal, or no such object
                raise bases.BaseLoadError(
                    f"Cannot read the base {self.path}: {sources.reason(err)}. "
                    "Check the URL and the credentials."
                ) from None
            return bases.load_model_file(local, self.allow_unsafe)

    def save(self, data: None) -> None:
        raise DatasetError("The pretrained base is an input: it is read, never written.")

    def _describe(self) -> dict[str, Any]:
        return {"source": self.source, "path": self.path, "name": self.name}


def _latest_version(path: Path) -> Path:
    """``path``, or for a Kedro-versioned folder (``<path>/<version>/<name>``) its latest
    version's file."""
    if not path.is_dir():
        return path
    versions = sorted(path.glob(f"*/{path.name}"))
    return versions[-1] if versions else path


class ClassifierDataset(AbstractDataset):
    """The classifier the ``predict`` pipeline uses, as ``predict.model`` names it: null (the
    latest fine-tuned model), a Kedro version of it, a .keras/.h5 file (class names from
    ``labels`` or a labels.txt beside it) or an MLflow model URI. A fine-tuned model comes
    with the class names of its run's manifest and its run's resize mode, ``min_confidence``
    and ``ood_score`` statistics (``preprocessing``).
    Read only."""

    def __init__(self, fine_tuned_model: str, manifest: str, preprocessing: str,
                 model: str | None = None, labels: str | None = None,
                 allow_unsafe: bool = False, metadata: dict[str, Any] | None = None):
        self.model, self.labels, self.allow_unsafe = model, labels, allow_unsafe
        self.fine_tuned_model, self.manifest = fine_tuned_model, manifest
        self.preprocessing = preprocessing
        self.metadata = metadata

    def load(self) -> Any:
        from headswap.core.predict import Classifier
        from headswap.project import serving

        model = self.model
        if model is None or KEDRO_VERSION.fullmatch(model):
            return self._fine_tuned(model)
        if MLFLOW_URI.match(model) and not Path(model).exists():
            try:
                return serving.load_classifier(model)
            except InputError:
                raise
            except Exception as err:  # MLflow says why: unknown run, alias, registry...
                raise InputError(f"`model` {model} cannot be loaded from MLflow: "
                                 f"{first_line(err)}") from err
        return Classifier.from_file(model, self.labels, self.allow_unsafe)

    def _fine_tuned(self, version: str | None) -> Any:
        """A version (None: the latest) of the fine-tuned model, with the class names of the
        manifest of the same run."""
        from kedro_datasets.json import JSONDataset
        from kedro_datasets.pandas import CSVDataset
        from kedro_datasets.tensorflow import TensorFlowModelDataset

        from headswap.core import manifests, ood
        from headswap.core.predict import Classifier

        stored = TensorFlowModelDataset(filepath=self.fine_tuned_model,
                                        version=Version(version, None),
                                        load_args={"compile": False})
        try:
            version = stored.resolve_load_version()
            model = stored.load()
        except DatasetError as err:
            which = f"version {version} of the " if version else ""
            raise InputError(
                f"There is no {which}fine-tuned model in {self.fine_tuned_model}: run "
                "`kedro run` (or `kedro run --pipeline finetune`) first, or give `model` "
                "(a .keras file or an MLflow model URI)."
            ) from err
        manifest = CSVDataset(filepath=self.manifest, version=Version(version, None),
                              load_args={"dtype": str, "keep_default_na": False})
        try:
            names = manifests.class_names(manifest.load())
        except DatasetError as err:
            raise InputError(
                f"The fine-tuned model {version} has no manifest of its run in "
                f"{self.manifest}, so its class names are unknown. Give `model` as another "
                "version or an MLflow model URI."
            ) from err
        logger.info("Model: the fine-tuned model of run %s (%s classes)", version, len(names))
        how = JSONDataset(filepath=self.preprocessing, version=Version(version, None))
        settings = how.load() if how.exists() else {}
        return Classifier(model, tuple(names),  # runs before resize modes: stretch
                          resize=settings.get("resize", "stretch"),
                          min_confidence=settings.get("min_confidence"),
                          ood=ood.from_settings(settings))

    def save(self, data: Any) -> None:
        raise DatasetError("The classifier is an input: it is read, never written.")

    def _describe(self) -> dict[str, Any]:
        return {"model": self.model or "the latest fine-tuned model"}
