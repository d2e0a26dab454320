"""The ``tune`` search: an Optuna study over the recipe's keys, each trial one fine-tuning of
the base, pruned on its per-epoch validation accuracy, logged as an MLflow run nested under
the search's run.

The study lives in Optuna's storage (``tune.storage``: a SQLite file, or a PostgreSQL URL),
named ``tune.study`` and opened with ``load_if_exists``: every process given the same storage
and study name, on this machine or another, works on the same search. Optuna hands out trial
numbers in the storage, so no trial runs twice; ``tune.n_trials`` counts the study's trials,
whichever process runs them.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import mlflow
import optuna
import pandas as pd
import sqlalchemy.exc
from optuna.trial import TrialState
from optuna_integration.tfkeras import TFKerasPruningCallback

from headswap.core.errors import InputError
from headswap.project.config import (
    ParameterError,
    SearchDimension,
    TuneConfig,
    merge_parameters,
    parse_finetune,
)

logger = logging.getLogger(__name__)

OVER_BUDGET = "over_budget"  # user attribute of a trial drawn after the budget was spent
DEFAULT_RECIPE = "default_recipe"  # user attribute of a new study's first trial


class OverBudget(Exception):
    """A trial drawn after other processes had used up ``tune.n_trials``."""


def open_study(cfg: TuneConfig) -> optuna.Study:
    """The study ``cfg.study`` in ``cfg.storage``, created by the first process that opens it
    (maximising validation accuracy) and loaded by every other."""
    url = cfg.storage
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # Several processes write to one file: wait for its lock instead of failing at once.
        engine: dict[str, Any] = {"connect_args": {"timeout": 60}}
    else:
        engine = {"pool_pre_ping": True}

    def create() -> optuna.Study:
        with warnings.catch_warnings():
            # Marked experimental: constant_liar (it keeps parallel workers from sampling next
            # to each other's running trials) and the heartbeat (a killed process's running
            # trial is marked failed, not left running for ever).
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(
                seed=cfg.seed, n_startup_trials=cfg.startup_trials, constant_liar=True)
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine,
                                                 heartbeat_interval=30, grace_period=120)
        return optuna.create_study(study_name=cfg.study, storage=storage, sampler=sampler,
                                   pruner=_pruner(cfg), direction="maximize",
                                   load_if_exists=True)

    for attempt in range(4):
        try:
            return create()
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
            time.sleep(1 + attempt)  # two processes creating the storage's tables at once
    return create()


def _pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials,
                                           n_warmup_steps=cfg.warmup_epochs)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(cfg.warmup_epochs, 1))
    return optuna.pruners.NopPruner()


def suggest(trial: optuna.Trial, space: dict[str, SearchDimension]) -> dict[str, Any]:
    """The trial's value of each key of the search space, ``{dotted key: value}``."""
    values = {}
    for key, dim in space.items():
        if dim.choices is not None:
            names = list(dim.choices) if isinstance(dim.choices, dict) else None
            if names is not None:
                values[key] = dim.choices[trial.suggest_categorical(key, names)]
            else:
                values[key] = trial.suggest_categorical(key, dim.choices)
        elif isinstance(dim.low, int) and isinstance(dim.high, int) and not isinstance(
                dim.step, float):
            values[key] = trial.suggest_int(key, dim.low, dim.high, step=dim.step or 1,
                                            log=dim.log)
        else:
            values[key] = trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)
    return values


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"phase1.learning_rate": 0.01}`` as ``{"phase1": {"learning_rate": 0.01}}``."""
    result: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = result
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return result


def default_trial(space: dict[str, SearchDimension], finetune: dict[str, Any]
                  ) -> tuple[dict[str, Any], list[str]]:
    """The trial parameters (a named choice by its name) under which ``finetune`` (finetune
    parameters) keeps its own value of each key of ``space``, and the keys whose value none of
    their choices gives (left to the sampler)."""
    given = parse_finetune(finetune).model_dump()
    params: dict[str, Any] = {}
    missing = []
    for key, dim in space.items():
        value = _value_at(given, key)
        if dim.choices is None:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                params[key] = value
            else:
                missing.append(key)  # e.g. phase2.train.top, where the phase trains all
            continue
        options = dim.choices.items() if isinstance(dim.choices, dict) else (
            (choice, choice) for choice in dim.choices)
        for name, choice in options:
            try:
                parsed = parse_finetune(merge_parameters(finetune, nested({key: choice})))
            except ParameterError:
                continue
            if _value_at(parsed.model_dump(), key) == value:
                params[key] = name
                break
        else:
            missing.append(key)
    return params, missing


def _value_at(params: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(params, dict) or part not in params:
            return None
        params = params[part]
    return params


class DefaultFirst(optuna.samplers.BaseSampler):
    """The study's trial 0 takes ``params`` (the default recipe, see :func:`default_trial`);
    every later trial, and every key ``params`` lacks, is ``base``'s. The storage numbers the
    trials, so among processes sharing a study exactly one trial is the default recipe (a
    queued trial can be taken by two processes at once on SQLite, and queued twice by two
    processes that both found the study empty)."""

    def __init__(self, params: dict[str, Any], base: optuna.samplers.BaseSampler) -> None:
        self.params = params
        self.base = base

    def reseed_rng(self) -> None:
        self.base.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: Any) -> dict[str, Any]:
        return {} if trial.number == 0 else self.base.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: Any,
                        search_space: dict[str, Any]) -> dict[str, Any]:
        return {} if trial.number == 0 else self.base.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: Any, param_name: str,
                           param_distribution: Any) -> Any:
        if trial.number == 0 and param_name in self.params:
            return self.params[param_name]
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: Any) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: Any, state: TrialState,
                    values: Any) -> None:
        self.base.after_trial(study, trial, state, values)


def default_first(study: optuna.Study, space: dict[str, SearchDimension],
                  finetune: dict[str, Any]) -> None:
    """Make the study's first trial the recipe of ``finetune`` as it is (:class:`DefaultFirst`
    around its sampler); the objective marks it with the user attribute
    :data:`DEFAULT_RECIPE`."""
    params, missing = default_trial(space, finetune)
    study.sampler = DefaultFirst(params, study.sampler)
    if study.get_trials(deepcopy=False):
        return  # its first trial ran before
    outside = [k for k, v in params.items() if space[k].choices is None
               and not space[k].low <= v <= space[k].high]
    logger.info("The study's first trial is the default recipe: %s", params)
    if outside:
        logger.warning("The search space leaves out the default of %s; the first trial runs "
                       "it, the others search the space", ", ".join(outside))
    if missing:
        logger.warning("No point of the search space is the default of %s; the first trial "
                       "samples it", ", ".join(missing))


@contextlib.contextmanager
def _trial_run(name: str) -> Iterator[Any]:
    """An MLflow run nested under the active one (nothing without an active run)."""
    if mlflow.active_run() is None:
        yield None
        return
    with mlflow.start_run(run_name=name, nested=True) as run:
        try:
            yield run
        finally:
            mlflow.flush_async_logging()  # the per-epoch metrics, before the run ends


def _rank(study: optuna.Study, trial: optuna.Trial) -> int:
    """How many of the study's trials (over-budget ones aside) were drawn before ``trial``."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.number < trial.number and not t.user_attrs.get(OVER_BUDGET))


def _spent(study: optuna.Study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(OVER_BUDGET))


def search(
    cfg: TuneConfig,
    finetune: dict[str, Any],
    train: Callable[[dict[str, Any], list[keras.callbacks.Callback]], float],
) -> optuna.Study:
    """Run trials of the study until ``cfg.n_trials`` trials exist in it (counting every
    process's) or ``cfg.timeout_s`` has passed in this process. ``train(params, callbacks)``
    trains the finetune ``params`` of a trial with ``callbacks`` and returns the validation
    accuracy."""
    study = open_study(cfg)
    default_first(study, cfg.space, finetune)

    def objective(trial: optuna.Trial) -> float:
        if cfg.n_trials is not None and _rank(study, trial) >= cfg.n_trials:
            trial.set_user_attr(OVER_BUDGET, True)
            study.stop()
            raise OverBudget(f"trial {trial.number}: the study has its {cfg.n_trials} trials")
        values = suggest(trial, cfg.space)
        if trial.number == 0:
            trial.set_user_attr(DEFAULT_RECIPE, True)
        trial.set_user_attr("finetune", nested(values))
        pruned = None
        with _trial_run(f"trial {trial.number}") as run:
            if run is not None:
                trial.set_user_attr("mlflow_run_id", run.info.run_id)
                mlflow.set_tags({"optuna.study": cfg.study, "optuna.trial": str(trial.number)})
                mlflow.log_params({f"finetune.{k}": str(v)[:6000] for k, v in values.items()})
            try:
                value = train(merge_parameters(finetune, nested(values)),
                              [TFKerasPruningCallback(trial, "val_accuracy")])
            except optuna.TrialPruned as err:
                pruned = err
                if run is not None:
                    mlflow.set_tags({"trial_state": "PRUNED", "pruned": "true"})
            except Exception:
                if run is not None:
                    mlflow.set_tag("trial_state", "FAIL")
                raise
            else:
                if run is not None:
                    mlflow.set_tag("trial_state", "COMPLETE")
                    mlflow.log_metric("val_accuracy", value)
        if pruned is not None:
            raise pruned  # Optuna logs it and records the trial as pruned
        return value

    def enough(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if cfg.n_trials is not None and _spent(study) >= cfg.n_trials:
            study.stop()

    if cfg.n_trials is None or _spent(study) < cfg.n_trials:
        study.optimize(objective, timeout=cfg.timeout_s, catch=(OverBudget,),
                       callbacks=[enough], gc_after_trial=True)
    return study


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial of the study: number, state, validation accuracy (a pruned trial's:
    its last reported), epochs it ran, seconds, the searched values, its MLflow run."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(OVER_BUDGET):
            continue
        seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
                   if t.datetime_complete and t.datetime_start else None)
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values \
            else None
        rows.append({"trial": t.number, "state": t.state.name,
                     "val_accuracy": t.value if t.value is not None else last,
                     "epochs": len(t.intermediate_values), "seconds": seconds,
                     **t.params,
                     "mlflow_run_id": t.user_attrs.get("mlflow_run_id")})
    return pd.DataFrame(rows)


def best_parameters(
    study: optuna.Study, finetune: dict[str, Any]
) -> tuple[dict[str, Any], float]:
    """The best completed trial's settings as a parameters file (``{"finetune": {...}}``, only
    the searched keys), checked against the parameter schema with ``finetune`` under them, and
    that trial's validation accuracy."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        raise InputError(
            f"No trial of the study {study.study_name!r} completed (each was pruned or failed): "
            "there are no best parameters yet. Run more trials (`n_trials`), or prune later "
            "(`warmup_epochs`, `startup_trials`) or not at all (`pruner`: none)."
        )
    best = study.best_trial
    overrides = best.user_attrs["finetune"]
    parse_finetune(merge_parameters(finetune, overrides))
    logger.info("Best of %s completed trials: trial %s, validation accuracy %.4f, with %s",
                len(completed), best.number, best.value, overrides)
    return {"finetune": overrides}, best.value
