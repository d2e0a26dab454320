"""Where the images live: a folder (one sub-folder per class, or train/ and test/ of class
sub-folders) or a CSV of ``path,label[,split]``, on the local disk or in object storage
(``s3://``, ``gs://``, any fsspec protocol).

:func:`open_images` lists them into an :class:`ImageSource` (nothing is decoded or downloaded).
Images in object storage are read through a local cache (:func:`local_paths`): each object is
downloaded once into ``$HEADSWAP_CACHE`` (default ``~/.cache/headswap``) under a name made from
its URL, fetched again only when its ETag changes, and shared by every run and every worker
process on the machine; training then streams the cached files from the local disk, so a
folder larger than memory still works.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd

from headswap.core.errors import InputError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
#: Image formats ``tf.io.decode_image`` cannot read: listed as skipped, never silently dropped.
UNSUPPORTED_EXTENSIONS = frozenset({".tif", ".tiff", ".heic", ".heif", ".avif", ".jp2", ".ico"})
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"
}
SKIPPED_COLUMNS = ["path", "reason"]
_FETCH_CHUNK = 256  # objects downloaded per request batch (bounds the bytes held in memory)
_LIST_THREADS = 16  # sub-folders of a remote folder listed at once


class DataError(InputError):
    """An image folder or manifest that cannot be used as given; the message says how to fix it."""


class MissingDataError(DataError, FileNotFoundError):
    """An image folder, manifest or image file that does not exist."""


def is_url(path: str) -> bool:
    """Whether ``path`` names an object in remote storage (``s3://...``), not a local file."""
    return "://" in str(path) and not str(path).startswith("file://")


@dataclass(frozen=True)
class ImageSource:
    """The image files of a folder or CSV (local or remote), listed on first use, not read.

    ``files``: ``path`` (a local path as given, or a URL), ``label`` (the class; empty for a
    file outside any class folder) and ``split`` (``train``/``val``/``test`` where the layout or
    the CSV gives one, else empty). ``skipped``: files in image formats that cannot be decoded
    (``path``, ``reason``). ``versions``: each remote file's ETag, which keys the local cache.
    Listing raises :class:`MissingDataError` for a folder or CSV that is not there and
    :class:`DataError` when the storage refuses access, naming the location.
    """

    location: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    # an earlier run's manifest.csv whose split is reused instead of listing the location
    manifest: str | None = None

    @property
    def name(self) -> str:
        """The folder's (or CSV's) own name, e.g. ``flowers`` for ``s3://bucket/flowers/``."""
        last = posixpath.basename(str(self.location).rstrip("/"))
        if not is_url(self.location):
            last = Path(self.location).resolve().name if last in ("", ".", "..") else last
        return last[:-4] if last.lower().endswith(".csv") else last or "images"

    @property
    def remote(self) -> bool:
        return is_url(self.location)

    @property
    def files(self) -> pd.DataFrame:
        return self._listing[0]

    @property
    def skipped(self) -> pd.DataFrame:
        return self._listing[1]

    @property
    def versions(self) -> dict[str, str]:
        return self._listing[2]

    @cached_property
    def _listing(self) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
        location = str(self.location)
        try:
            fs, root = fsspec.core.url_to_fs(location, **self.storage_options)
        except (ImportError, ValueError) as err:
            raise DataError(f"Cannot read {location}: {err}") from None
        try:
            if location.lower().endswith(".csv"):
                return _from_csv(location, fs, root)
            return _from_folder(location, fs, root)
        except InputError:
            raise
        except FileNotFoundError as err:
            raise MissingDataError(_missing(location, err)) from None
        except Exception as err:  # the storage's own refusal: no bucket, no access, no network
            raise DataError(
                f"Cannot read {location}: {reason(err)}. Check the URL and the credentials "
                "(conf/local/credentials.yml, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                "and AWS_ENDPOINT_URL for an S3-compatible store; "
                "GOOGLE_APPLICATION_CREDENTIALS for gs://)."
            ) from None


def open_images(location: str, storage_options: dict[str, Any] | None = None) -> ImageSource:
    """The images of a folder or a ``.csv`` (``path,label`` and optionally ``split``; relative
    paths are read from the CSV's folder), local or remote, listed now (see
    :class:`ImageSource` for the errors)."""
    source = ImageSource(str(location), dict(storage_options or {}))
    source.files  # noqa: B018 - list now: a folder that is not there fails here
    return source


def _missing(location: str, err: BaseException) -> str:
    what = "CSV" if location.lower().endswith(".csv") else "Image folder"
    why = f" ({reason(err)})" if is_url(location) else ""
    return (
        f"{what} {location} does not exist{why}. Give `path` as an existing folder of images "
        "(one sub-folder per class) or a .csv of path,label[,split]."
    )


def reason(err: BaseException | str) -> str:
    """An error's message on one line, without a closing full stop (for "...: <reason>.")."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:300].rstrip(".")


def _from_folder(
    location: str, fs: fsspec.AbstractFileSystem, root: str
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    if is_url(location):
        if not fs.isdir(root):
            raise FileNotFoundError(f"no objects under {location}")
        found = _find(fs, root)
        prefix = root.rstrip("/") + "/"
        entries = [(fs.unstrip_protocol(path), path[len(prefix):].split("/"), _etag(info))
                   for path, info in sorted(found.items()) if path.startswith(prefix)]
    else:
        if not os.path.isdir(location):
            raise FileNotFoundError(location)
        entries = _walk(location)
    rows, skipped, versions = [], [], {}
    entries = [e for e in entries if not any(part.startswith(".") for part in e[1])]
    top = {parts[0].lower() for _, parts, _ in entries if len(parts) > 1}
    by_split = bool(top) and top <= set(SPLIT_ALIASES) and "train" in top
    for path, parts, version in entries:
        suffix = posixpath.splitext(parts[-1])[1].lower()
        if suffix in UNSUPPORTED_EXTENSIONS:
            skipped.append((path, unsupported(suffix)))
            continue
        if suffix not in IMAGE_EXTENSIONS:
            continue
        if by_split:
            split = SPLIT_ALIASES.get(parts[0].lower(), "")
            label = parts[1] if len(parts) > 2 else ""
        else:
            split, label = "", parts[0] if len(parts) > 1 else ""
        rows.append((path, label, split))
        if version:
            versions[path] = version
    files = pd.DataFrame(rows, columns=["path", "label", "split"])
    return files, pd.DataFrame(skipped, columns=SKIPPED_COLUMNS), versions


def _walk(folder: str) -> list[tuple[str, list[str], str]]:
    """``(path, parts of the path under folder, "")`` of every file under the local ``folder``,
    as ``sorted(Path(folder).rglob("*"))`` gives them (links to files followed, to folders
    not; sub-folders that cannot be opened left out, with a warning), in a fraction of its
    time."""
    entries: list[tuple[str, list[str], str]] = []

    def visit(path: str, under: list[str]) -> None:
        try:
            listing = os.scandir(path)
        except OSError as err:
            if not under:
                raise
            logger.warning("Not listed: the folder %s cannot be read (%s)", path, reason(err))
            return
        with listing:
            for entry in listing:
                child = entry.name if path == "." else entry.path
                try:
                    if entry.is_dir(follow_symlinks=False):
                        visit(child, [*under, entry.name])
                    elif entry.is_file():
                        entries.append((child, [*under, entry.name], ""))
                except OSError:  # a link to itself, a file gone meanwhile: no file to read
                    continue

    visit(str(Path(folder)), [])
    # Path's own order: its parts compared, case-insensitively on Windows
    fold = str.lower if os.name == "nt" else str
    entries.sort(key=lambda entry: [fold(part) for part in entry[1]])
    return entries


def _find(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, dict[str, Any]]:
    """``fs.find(root, detail=True)``: every file under ``root``. On an asynchronous store
    (S3, GCS, Azure, HTTP) each sub-folder of ``root`` is listed concurrently: a store lists
    at most ~1,000 keys per request, and one listing of the whole folder waits for its pages
    one after another."""
    if not getattr(fs, "async_impl", False):
        return fs.find(root, detail=True)
    fs.invalidate_cache(root)  # what is there now, as find lists it
    top = fs.ls(root, detail=True)
    found = {entry["name"]: entry for entry in top if entry.get("type") != "directory"}
    folders = [entry["name"] for entry in top if entry.get("type") == "directory"]
    if folders:
        with ThreadPoolExecutor(max_workers=min(_LIST_THREADS, len(folders))) as pool:
            for listed in pool.map(lambda folder: fs.find(folder, detail=True), folders):
                found.update(listed)
    return found


def _etag(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "md5Hash", "md5"):
        if info.get(key):
            return str(info[key]).strip('"')
    changed = info.get("LastModified", info.get("mtime", info.get("created", "")))
    return f"{info.get('size', '')}-{changed}"


def _from_csv(
    location: str, fs: fsspec.AbstractFileSystem, root: str
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    with fs.open(root, "rb") as file:
        table = pd.read_csv(file, dtype=str, keep_default_na=False)
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise DataError(
            f"The CSV {location} lacks the column(s) {sorted(missing)}: it needs a header "
            "row with path and label (and optionally split)."
        )
    if "split" in table:
        splits = table["split"].str.strip().str.lower()
        unknown = sorted(set(splits) - set(SPLIT_ALIASES) - {""})
        if unknown:
            raise DataError(
                f"The CSV {location} has split values {unknown}; allowed: "
                + ", ".join(SPLIT_ALIASES) + " (or empty, to have the image split)."
            )
        table["split"] = splits.map(lambda s: SPLIT_ALIASES.get(s, ""))
    else:
        table["split"] = ""
    base = posixpath.dirname(location) if is_url(location) else str(Path(location).parent)
    table["path"] = [_joined(base, p.strip()) for p in table["path"]]
    suffixes = table["path"].map(lambda p: posixpath.splitext(p)[1].lower())
    unsupported_rows = suffixes.isin(UNSUPPORTED_EXTENSIONS)
    skipped = pd.DataFrame({"path": table.loc[unsupported_rows, "path"],
                            "reason": suffixes[unsupported_rows].map(unsupported)},
                           columns=SKIPPED_COLUMNS)
    files = table.loc[~unsupported_rows, ["path", "label", "split"]].reset_index(drop=True)
    return files, skipped.reset_index(drop=True), {}


def _joined(base: str, path: str) -> str:
    if is_url(path) or path.startswith("/") or not path:
        return path
    if is_url(base):
        return posixpath.join(base, path)
    return str(Path(base) / path) if base not in ("", ".") else path


def unsupported(suffix: str) -> str:
    """Why an image in the format ``suffix`` is skipped."""
    return (
        f"unsupported format {suffix!r}: tf.io.decode_image reads JPEG, PNG, GIF, BMP and "
        "WebP; convert the file (e.g. to PNG) to use it"
    )


# --- the local cache of remote images ----------------------------------------------------


def cache_dir() -> Path:
    """Where remote images are cached: ``$HEADSWAP_CACHE``, else ``$XDG_CACHE_HOME/headswap``,
    else ``~/.cache/headswap``."""
    if os.environ.get("HEADSWAP_CACHE"):
        return Path(os.environ["HEADSWAP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "headswap"


def cached_path(url: str) -> Path:
    """The local file that holds the object at ``url`` once it is fetched."""
    return Path(_cache_file(url, str(cache_dir() / "images")))


def _cache_file(url: str, images: str) -> str:
    """:func:`cached_path` as a string, in the cache's folder of images ``images`` (string
    operations only: it is computed for every image of a folder)."""
    key = hashlib.sha256(url.encode()).hexdigest()
    suffix = posixpath.splitext(url)[1].lower()[:8]
    return os.path.join(images, key[:2], f"{key}{suffix}")


def fetch(urls: list[str], versions: dict[str, str] | None = None,
          storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """Download each of ``urls`` into the cache unless it is there at the same version (its
    ETag); ``{url: reason}`` for those that could not be read. Downloads run concurrently,
    ``_FETCH_CHUNK`` objects at a time, the next chunk downloading while one is written (at
    most two chunks are held in memory); each file is written under a temporary name and
    renamed into place, so processes sharing the cache never read a partial file."""
    versions = versions or {}
    images = str(cache_dir() / "images")
    files = {url: _cache_file(url, images) for url in urls}
    todo = [u for u in urls if not _fresh(files[u], versions.get(u, ""))]
    if not todo:
        return {}
    logger.info("Fetching %s of %s images into the local cache %s", len(todo), len(urls),
                cache_dir())
    fs, _ = fsspec.core.url_to_fs(todo[0], **(storage_options or {}))
    problems: dict[str, str] = {}
    folders: set[str] = set()
    chunks = [todo[start:start + _FETCH_CHUNK] for start in range(0, len(todo), _FETCH_CHUNK)]
    options = _whole_object_reads(fs)
    with ThreadPoolExecutor(max_workers=1) as downloads:
        pending = downloads.submit(fs.cat, chunks[0], on_error="return", **options)
        for index, chunk in enumerate(chunks):
            contents = pending.result()
            if index + 1 < len(chunks):
                pending = downloads.submit(fs.cat, chunks[index + 1], on_error="return",
                                           **options)
            for url in chunk:
                content = contents.get(url, contents.get(_strip(url)))
                if isinstance(content, BaseException) or content is None:
                    problems[url] = f"cannot be read: {reason(content or 'missing')}"
                    continue
                _store(files[url], content, versions.get(url, ""), folders)
    return problems


def _whole_object_reads(fs: fsspec.AbstractFileSystem) -> dict[str, Any]:
    """Options of ``fs.cat`` that read each object with one GET. s3fs (``max_concurrency``
    > 1, its default) first asks every object's size, to read large ones in concurrent
    ranges: a HEAD request per object, or, once its folder is listed, a scan of that listing
    per object (quadratic in a folder's size); images are read whole."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return {"max_concurrency": 1} if "s3" in protocols else {}


def _strip(url: str) -> str:
    return url.split("://", 1)[1]


def _fresh(file: str, version: str) -> bool:
    """Whether the cached ``file`` is there (at ``version``, its ETag, when one is given)."""
    if not os.path.isfile(file):
        return False
    if not version:
        return True
    try:
        with open(file + ".etag") as tag:
            return tag.read() == version
    except OSError:  # no tag (or not a file)
        return False


def _store(file: str, content: bytes, version: str, folders: set[str]) -> None:
    """Write ``content`` to the cached ``file`` and its ETag beside it; ``folders``: those
    already made by this fetch."""
    folder = os.path.dirname(file)
    if folder not in folders:
        os.makedirs(folder, exist_ok=True)
        folders.add(folder)
    for target, data in ((file, content), (file + ".etag", version.encode())):
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".part-")
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, target)


def local_paths(paths: Any, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """``paths`` as files TensorFlow can open: local paths as they are, URLs as their cached
    copies (fetched now if the cache lacks them, e.g. on another worker)."""
    paths = np.asarray(paths, dtype=str)
    remote = [p for p in paths if is_url(p)]
    if not remote:
        return paths
    images = str(cache_dir() / "images")
    files = {url: _cache_file(url, images) for url in remote}
    if not all(map(os.path.isfile, files.values())):
        problems = fetch(remote, storage_options=storage_options)
        if problems:
            url, why = next(iter(problems.items()))
            raise MissingDataError(
                f"{len(problems)} images cannot be read, e.g. {url}: {why}.")
    return np.asarray([files[p] if is_url(p) else p for p in paths], dtype=str)
