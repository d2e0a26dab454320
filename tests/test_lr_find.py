"""The learning-rate range test of the core: what it reads off a curve, that it leaves the model
as it found it, and ``learning_rate: auto`` (resolved, reused on resume, checked)."""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest

from headswap.core import FitOptions, Stage, bases, data, fit, heads
from headswap.core.fit import find_learning_rate
from headswap.core.lr_find import (
    RangeTestSettings,
    learning_rates,
    range_test,
    range_test_figure,
    suggest,
)
from headswap.core.train import compile_model, make_optimizer
from headswap.project.config import ParameterError, parse_finetune
from tests.conftest import small_cnn

SETTINGS = RangeTestSettings(steps=40)


@pytest.fixture
def manifest(image_folder):
    return data.ingest_image_folder(image_folder)[0]


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return heads.attach_head(bases.cut_model(small_cnn(), "features"), 3, dense=[16], seed=1)


def _options(**kwargs) -> FitOptions:
    return FitOptions(image_size=(32, 32), batch_size=8, verbose=0, lr_find=SETTINGS, **kwargs)


def _same(before: list[np.ndarray], after: list[np.ndarray]) -> bool:
    return len(before) == len(after) and all(
        np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_the_suggestion_is_a_decade_below_where_the_loss_leaves_its_low():
    rates = list(np.geomspace(1e-7, 10, 100))
    log = np.log10(rates)
    # a new head: the loss falls from 1e-4, bottoms out at 1e-2, then blows up
    dip = list(2.0 - np.clip(log + 4, 0, 2) * 0.5 + np.clip(log + 2, 0, None) ** 2)
    suggestion, minimum, steepest = suggest(rates, dip)
    assert minimum == pytest.approx(1e-2, rel=0.3)
    assert suggestion == pytest.approx(minimum / 10, rel=1.0)
    assert 1e-4 <= steepest <= 1e-2
    # a trained model: flat with noise until 1e-3, then rising; fastai's minimum/10 would be
    # wherever the noise put the minimum, here among the lowest rates
    rng = np.random.default_rng(0)
    flat = list(0.5 + 0.01 * rng.standard_normal(100) + np.clip(log + 3, 0, None))
    suggestion, minimum, _ = suggest(rates, flat)
    assert minimum < 1e-3
    assert 3e-5 < suggestion < 2e-4
    assert all(math.isnan(v) for v in suggest(rates[:1], flat[:1]))


def test_range_test_restores_the_weights_and_the_optimizer_state(manifest):
    model = _model()
    compile_model(model, make_optimizer("adam", 1e-3))
    train = data.make_dataset(manifest, "train", (32, 32), 1, 8, shuffle=True)
    model.fit(train, epochs=1, verbose=0, shuffle=False)  # moments and a step count
    weights = [w.copy() for w in model.get_weights()]
    state = [np.array(keras.ops.convert_to_numpy(v)) for v in model.optimizer.variables]

    test = range_test(model, train, SETTINGS)

    assert _same(weights, model.get_weights())
    assert _same(state, [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables])
    assert test.learning_rates == pytest.approx(list(learning_rates(SETTINGS))[
        :len(test.learning_rates)])
    assert len(test.losses) == len(test.smoothed) == len(test.learning_rates) >= 10
    assert test.stopped
    assert SETTINGS.min_learning_rate / 10 <= test.suggestion <= SETTINGS.max_learning_rate / 10
    assert len(range_test_figure([("test", test)]).axes) == 1


@pytest.mark.parametrize("stage", [Stage(epochs=1, learning_rate="auto", optimizer="rmsprop"),
                                   Stage(epochs=1, learning_rate="auto", train="all")],
                         ids=["head, cached features", "whole base"])
def test_find_learning_rate_leaves_the_weights_as_they_were(manifest, stage):
    model = _model()
    weights = [w.copy() for w in model.get_weights()]
    test = find_learning_rate(model, manifest, stage, _options())
    assert _same(weights, model.get_weights())
    assert math.isfinite(test.suggestion) and test.suggestion > 0


def test_auto_rates_are_found_trained_at_and_reused_by_a_resumed_run(manifest, tmp_path):
    stages = [Stage(epochs=2, learning_rate="auto", optimizer="rmsprop")]
    history = fit(_model(), manifest, stages, _options(backup_dir=tmp_path), name="phase1")
    found = history["found_learning_rates"][0]
    assert found > 0 and history["learning_rate"] == pytest.approx([found, found])
    memo = tmp_path / "phase1_stage1.lr_find.json"
    assert json.loads(memo.read_text())["learning_rate"] == found

    # A rerun with the same resume folder reuses the rate found the first time (the range
    # test on another machine, or on a GPU, could land elsewhere): here, a rate planted in it.
    planted = {**json.loads(memo.read_text()), "learning_rate": 0.0123}
    memo.write_text(json.dumps(planted))
    again = fit(_model(), manifest, stages, _options(backup_dir=tmp_path), name="phase1")
    assert again["found_learning_rates"] == [0.0123]
    assert again["learning_rate"] == pytest.approx([0.0123, 0.0123])
    # a rate given as a number is trained at as it is
    plain = fit(_model(), manifest, [Stage(epochs=1, learning_rate=0.002, optimizer="rmsprop")],
                _options())
    assert plain["found_learning_rates"] == [None]


def test_the_parameters_take_auto_and_name_the_key_of_a_bad_rate():
    params = {"data": {"path": "images", "image_size": 32}, "base": {"path": "base.keras"}}
    cfg = parse_finetune({**params, "phase1": {"learning_rate": "auto"},
                          "phase2": {"stages": [{"epochs": 1, "learning_rate": "auto"}]}})
    assert cfg.phase1.stages_list()[0].learning_rate == "auto"
    assert cfg.phase2.stages_list()[0].learning_rate == "auto"
    assert cfg.fit_options().lr_find == RangeTestSettings()
    with pytest.raises(ParameterError, match=r"finetune.phase2.learning_rate: got 'fast'; give "
                                             r"a number above 0, or auto"):
        parse_finetune({**params, "phase2": {"learning_rate": "fast"}})
    with pytest.raises(ParameterError, match=r"finetune.training.lr_find: max_learning_rate"):
        parse_finetune({**params, "training": {"lr_find": {"max_learning_rate": 1e-9}}})
