"""The project's pipelines, and what their definitions share."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial, update_wrapper
from typing import Any


def bound(func: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """``func`` with keyword arguments fixed, keeping its name for Kedro's logs."""
    return update_wrapper(partial(func, **kwargs), func)
