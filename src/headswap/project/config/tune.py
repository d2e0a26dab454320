"""The ``tune`` pipeline's parameters (conf/base/parameters_tune.yml): the study and its search
space.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from headswap.core.recipe import (
    Settings,
)


class SearchDimension(Settings):
    """One key of the ``tune`` search space: numbers from ``low`` to ``high`` (integers when
    both are; ``log``: sampled on a log scale; ``step``: a grid), or one of ``choices`` (a list
    of values, or a mapping of names to values, such as ``{off: {...}, on: {...}}``)."""

    low: int | float | None = None
    """The lowest value of a range (with `high`; integers when both are)."""
    high: int | float | None = None
    """The highest value of a range, above `low`."""
    log: bool = False
    """Sample the range on a log scale (`low` above 0)."""
    step: int | float | None = None
    """Sample the range on a grid of this step (integers: 1 when not given)."""
    choices: list[Any] | dict[str, Any] | None = None
    """Instead of a range: a list of values, or a mapping of names to values (the trial's
    value is the mapping's value)."""

    @model_validator(mode="after")
    def _one_kind(self) -> SearchDimension:
        if self.choices is not None:
            if self.low is not None or self.high is not None or not self.choices:
                raise ValueError("give either choices (not empty) or low and high")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError("give low < high, or choices")
        elif self.log and self.low <= 0:
            raise ValueError("a log scale needs low above 0")
        return self


class TuneConfig(Settings):
    """The ``tune`` pipeline's parameters (conf/base/parameters_tune.yml)."""

    study: str = Field("headswap", min_length=1)
    """The study's name in the storage."""
    storage: str = "sqlite:///data/07_model_output/tune/optuna.db"
    """Optuna's storage URL: processes (and machines) given the same storage and study share
    the search. A relative SQLite path is inside the project folder; for a team, a database
    such as `postgresql://user:password@host/db`."""
    n_trials: int | None = Field(20, ge=1)
    """Trials of the study, whichever process runs them (null: no count, `timeout_s`
    alone)."""
    timeout_s: float | None = Field(None, gt=0)
    """This process starts no trial after this many seconds (null: no limit)."""
    seed: int | None = None
    """The sampler's seed (null: each process draws its own)."""
    startup_trials: int = Field(5, ge=0)
    """Random trials before TPE models the space, and before any pruning."""
    pruner: Literal["median", "hyperband", "none"] = "median"
    """Stop weak trials early: `median` (below the other trials' median validation accuracy
    at the same epoch), `hyperband`, or `none`."""
    warmup_epochs: int = Field(2, ge=0)
    """Epochs a trial runs before it can be pruned."""
    space: dict[str, SearchDimension] = Field(min_length=1)
    """The searched finetune keys, nested as in parameters_finetune.yml (or dotted:
    `phase1.learning_rate`), each a range `{low, high[, log][, step]}` or `{choices: ...}`;
    not the keys of `data` and `base` (every trial shares the images and the base), except
    `data.batch_size`."""

    @field_validator("space", mode="before")
    @classmethod
    def _dotted(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        flat: dict[str, Any] = {}

        def walk(prefix: str, node: dict[str, Any]) -> None:
            for key, item in node.items():
                name = f"{prefix}.{key}" if prefix else str(key)
                if isinstance(item, dict) and not {"low", "high", "choices"} & set(item):
                    walk(name, item)
                else:
                    flat[name] = item

        walk("", value)
        return flat

    @model_validator(mode="after")
    def _budget_and_keys(self) -> TuneConfig:
        if self.n_trials is None and self.timeout_s is None:
            raise ValueError("give n_trials or timeout_s (or both): the search needs a budget")
        fixed = [k for k in self.space if k.split(".")[0] in ("data", "base")
                 and k != "data.batch_size"]
        if fixed:
            raise ValueError(
                f"space keys {fixed} would change the images or the base, which every trial "
                "shares; search the recipe's keys (phase1.*, phase2.*, head.*, training.*, "
                "data.batch_size)"
            )
        return self
