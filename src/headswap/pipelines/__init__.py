"""The project's pipelines, and what their definitions share."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial, update_wrapper
from typing import Any


def bound(func: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """``func`` with keyword arguments fixed, keeping its name for Kedro's logs."""
    return update_wrapper(partial(func, **kwargs), func)


def metrics_points(values: dict[str, float]) -> dict[str, dict[str, float]]:
    """Single values as the metrics datasets take them (``{name: {"value", "step"}}``)."""
    return {k: {"value": float(v), "step": 0} for k, v in values.items()}
