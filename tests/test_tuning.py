"""The ``tune`` parameters and how a trial's values become finetune parameters (no training:
the pipeline itself runs in tests/test_tune.py)."""

from __future__ import annotations

import multiprocessing

import optuna
import pytest
import yaml

from headswap.project.config import ParameterError, merge_parameters, parse_finetune, parse_tune
from headswap.project.tuning import best_parameters, nested, open_study, search, suggest

FINETUNE = {"data": {"path": "images", "image_size": 28}, "base": {"path": "base.keras"}}


def test_the_base_search_space_is_valid_and_its_trials_are_valid_finetune_parameters():
    with open("conf/base/parameters_tune.yml") as f:
        cfg = parse_tune(yaml.safe_load(f)["tune"])
    assert {"phase1.learning_rate", "phase2.train", "head.dense",
            "training.augmentation"} <= set(cfg.space)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    for _ in range(5):
        values = suggest(study.ask(), cfg.space)
        assert isinstance(values["phase1.epochs"], int)
        assert 1e-4 <= values["phase1.learning_rate"] <= 1e-2
        assert values["head.dense"] in (32, 64, 128)
        assert isinstance(values["training.augmentation"], dict)  # the named choice's value
        params = parse_finetune(merge_parameters(FINETUNE, nested(values)))
        assert params.phase2.train.all or params.phase2.train.top in (2, 4, 8, 12)
        assert params.head.dense == [values["head.dense"]]


def test_dotted_and_nested_keys_mean_the_same():
    dotted = parse_tune({"space": {"phase1.epochs": {"low": 1, "high": 3}}})
    deep = parse_tune({"space": {"phase1": {"epochs": {"low": 1, "high": 3}}}})
    assert dotted.space == deep.space
    assert nested({"phase1.epochs": 2, "phase1.learning_rate": 0.1, "seed": 3}) == {
        "phase1": {"epochs": 2, "learning_rate": 0.1}, "seed": 3}


@pytest.mark.parametrize(("tune", "message"), [
    ({"space": {"head.dropout": {"low": 0.5, "high": 0.1}}},
     r"tune.space.head.dropout: give low < high, or choices"),
    ({"space": {"phase1.learning_rate": {"low": 0, "high": 1, "log": True}}},
     r"a log scale needs low above 0"),
    ({"space": {"data.path": {"choices": ["a", "b"]}}},
     r"tune: space keys \['data.path'\] would change the images or the base"),
    ({"n_trials": None, "space": {"head.dropout": {"low": 0.1, "high": 0.5}}},
     r"give n_trials or timeout_s"),
    ({"n_trials": 0, "space": {"head.dropout": {"low": 0.1, "high": 0.5}}},
     r"tune.n_trials: got 0"),
    ({"space": {}}, r"tune.space"),
    ({"pruner": "fast", "space": {"head.dropout": {"low": 0.1, "high": 0.5}}},
     r"tune.pruner: got 'fast'"),
])
def test_bad_tune_parameters_name_their_key(tune, message):
    with pytest.raises(ParameterError, match=message):
        parse_tune(tune)


def _value_at(cfg, key: str):
    value = cfg.model_dump()
    for part in key.split("."):
        value = value[part]
    return value


@pytest.mark.slow  # trains a model for seconds
def test_a_new_study_runs_the_default_recipe_first(tmp_path):
    """The study's first trial trains the finetune parameters as they are (every searched key
    at its default), so the best trial is never worse on validation than the defaults; the
    trials after it search the space, and a study that has trials gets no second one."""
    with open("conf/base/parameters_tune.yml") as f:
        tune = yaml.safe_load(f)["tune"]
    with open("conf/base/parameters_finetune.yml") as f:
        finetune = merge_parameters(yaml.safe_load(f)["finetune"], FINETUNE)
    cfg = parse_tune({**tune, "storage": f"sqlite:///{tmp_path / 'optuna.db'}", "n_trials": 3,
                      "seed": 0, "startup_trials": 1})
    trained = []

    def train(params, callbacks):
        trained.append(parse_finetune(params))
        return 0.9 if len(trained) == 1 else 0.5  # the default recipe stays the best

    study = search(cfg, finetune, train)
    defaults = parse_finetune(finetune)
    assert len(trained) == 3 and study.trials[0].user_attrs["default_recipe"]
    for key in cfg.space:
        assert _value_at(trained[0], key) == _value_at(defaults, key), key
    assert trained[0] == defaults
    assert any(_value_at(trained[1], key) != _value_at(defaults, key) for key in cfg.space)
    best, value = best_parameters(study, finetune)
    assert best["finetune"] == study.trials[0].user_attrs["finetune"]
    assert value == study.trials[0].value

    more = search(cfg.model_copy(update={"n_trials": 4}), finetune, train)
    assert len(trained) == 4 and "default_recipe" not in more.trials[3].user_attrs


def _search_when_released(cfg, finetune, barrier) -> None:
    barrier.wait()
    search(cfg, finetune, lambda params, callbacks: 0.5)


def test_processes_starting_together_on_a_new_study_run_the_default_recipe_once(tmp_path):
    """Two processes that open one new study at the same moment run its trials between them:
    the default recipe once (trial 0), every trial to its end, none left waiting. (A queued
    default trial was queued by both and could be taken by both: 21 of 30 such starts went
    wrong that way.)"""
    with open("conf/base/parameters_tune.yml") as f:
        tune = yaml.safe_load(f)["tune"]
    with open("conf/base/parameters_finetune.yml") as f:
        finetune = merge_parameters(yaml.safe_load(f)["finetune"], FINETUNE)
    fork = multiprocessing.get_context("fork")
    for attempt in range(3):
        cfg = parse_tune({**tune, "storage": f"sqlite:///{tmp_path / f'{attempt}.db'}",
                          "study": "shared", "n_trials": 2, "seed": 0, "startup_trials": 1})
        open_study(cfg)  # the tables exist: both processes go straight to their first trial
        barrier = fork.Barrier(2)
        processes = [fork.Process(target=_search_when_released, args=(cfg, finetune, barrier))
                     for _ in range(2)]
        for p in processes:
            p.start()
        for p in processes:
            p.join(timeout=120)
        assert [p.exitcode for p in processes] == [0, 0]
        trials = [t for t in optuna.load_study(study_name="shared", storage=cfg.storage).trials
                  if not t.user_attrs.get("over_budget")]
        assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
        assert [bool(t.user_attrs.get("default_recipe")) for t in trials] == [True, False]
