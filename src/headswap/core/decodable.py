"""A memo of the image files already found decodable, so that ingest decodes a folder's files
once, not on every run.

A file is remembered by its absolute path and a stamp of what could change its content (size,
modification and change times, inode) and of the check (its version and TensorFlow's): a file
that is rewritten, replaced or moved, a new check or a new TensorFlow, is decoded again. The
memo is one SQLite file, ``decodable.sqlite`` in :func:`headswap.core.sources.cache_dir`
(``$HEADSWAP_CACHE``), shared by the runs and workers of a machine. Only decodable files are
recorded, so an unreadable one is checked, and reported, every time. A memo that cannot be
read or written (a read-only cache folder, a locked file) is left out with a warning: every
file is then decoded, as without it. Rows are never removed; deleting the file forgets them.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager

import tensorflow as tf

from headswap.core import sources

logger = logging.getLogger(__name__)

MEMO_FILE = "decodable.sqlite"
_CHECK = 2  # the version of the check (2: JPEGs at an eighth of their size); a new one
# decodes every file again
_CHUNK = 500  # paths per SELECT (under SQLite's limit of bound parameters)


def unreadable(paths: list[str], check: Callable[[list[str]], dict[str, str]]) -> dict[str, str]:
    """``check(paths)`` (``{path: reason}`` of the local files that cannot be decoded) for the
    ``paths`` the memo does not hold at their current stamp; those ``check`` passes are
    recorded."""
    absolute = {path: os.path.abspath(path) for path in paths}
    stamps = {absolute[path]: _stamp(path) for path in paths}
    known = _recorded(stamps)
    todo = [path for path in paths if absolute[path] not in known]
    if known:
        logger.info("%s of %s image files already found decodable (unchanged since); "
                    "decoding the other %s", len(known), len(paths), len(todo))
    problems = check(todo)
    passed = (absolute[path] for path in todo if path not in problems)
    _record({path: stamps[path] for path in passed if stamps[path] is not None})
    return problems


def _stamp(path: str) -> str | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (f"{_CHECK}:{tf.__version__}:{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}:"
            f"{info.st_ino}")


@contextmanager
def _memo() -> Iterator[sqlite3.Connection]:
    folder = sources.cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(folder / MEMO_FILE, timeout=10)) as connection:
        connection.execute(
            "CREATE TABLE IF NOT EXISTS decodable (path TEXT PRIMARY KEY, stamp TEXT NOT NULL)")
        yield connection


def _recorded(stamps: dict[str, str | None]) -> set[str]:
    """The paths whose recorded stamp is their current one."""
    paths = [path for path, stamp in stamps.items() if stamp is not None]
    if not paths:
        return set()
    try:
        with _memo() as memo:
            rows = []
            for start in range(0, len(paths), _CHUNK):
                chunk = paths[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows += memo.execute(
                    f"SELECT path, stamp FROM decodable WHERE path IN ({marks})", chunk).fetchall()
    except (OSError, ValueError, sqlite3.Error) as err:  # ValueError: a name SQLite cannot take
        logger.warning("The memo of decodable files in %s cannot be read (%s): every file is "
                       "decoded", sources.cache_dir(), err)
        return set()
    return {path for path, stamp in rows if stamps.get(path) == stamp}


def _record(stamps: dict[str, str]) -> None:
    if not stamps:
        return
    try:
        with _memo() as memo, memo:
            memo.executemany("INSERT OR REPLACE INTO decodable (path, stamp) VALUES (?, ?)",
                             stamps.items())
    except (OSError, ValueError, sqlite3.Error) as err:
        logger.warning("The memo of decodable files in %s cannot be written (%s)",
                       sources.cache_dir(), err)
