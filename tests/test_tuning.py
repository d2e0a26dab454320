"""The ``tune`` parameters and how a trial's values become finetune parameters (no training:
the pipeline itself runs in tests/test_tune.py)."""

from __future__ import annotations

import optuna
import pytest
import yaml

from headswap.config import ParameterError, merge_parameters, parse_finetune, parse_tune
from headswap.tuning import nested, suggest

FINETUNE = {"data": {"path": "images", "image_size": 28}, "base": {"path": "base.keras"}}


def test_the_base_search_space_is_valid_and_its_trials_are_valid_finetune_parameters():
    with open("conf/base/parameters_tune.yml") as f:
        cfg = parse_tune(yaml.safe_load(f)["tune"])
    assert {"phase1.learning_rate", "phase2.train.top", "head.dense",
            "training.augmentation"} <= set(cfg.space)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    for _ in range(5):
        values = suggest(study.ask(), cfg.space)
        assert isinstance(values["phase1.epochs"], int)
        assert 1e-4 <= values["phase1.learning_rate"] <= 1e-2
        assert values["head.dense"] in (32, 64, 128)
        assert isinstance(values["training.augmentation"], dict)  # the named choice's value
        params = parse_finetune(merge_parameters(FINETUNE, nested(values)))
        assert params.phase2.train.top == values["phase2.train.top"]
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
