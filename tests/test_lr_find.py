"""The learning-rate range test of the core: what it reads off a curve, that it leaves the model
as it found it, and ``learning_rate: auto`` (resolved, reused on resume, checked)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import keras
import numpy as np
import pytest

from headswap.core import FitOptions, Stage, bases, data, fit, heads, manifests
from headswap.core.errors import InputError
from headswap.core.fit import find_learning_rate
from headswap.core.lr_find import (
    RangeTest,
    RangeTestSettings,
    learning_rates,
    range_test,
    range_test_figure,
    suggest,
)
from headswap.core.train import compile_model, make_optimizer
from headswap.project.config import ParameterError, parse_finetune
from tests.conftest import make_image_folder, small_cnn

#: 100 steps over 6 decades: the default smoothing (an average over about 50 steps) needs
#: that many to show a dip.
SETTINGS = RangeTestSettings(steps=100, min_learning_rate=1e-5)


@pytest.fixture
def manifest(image_folder):
    return manifests.ingest_image_folder(image_folder)[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A small CNN trained for 8 epochs on the shapes (about 5 s): a base whose features a new
    head learns from within a range test, as with a real pretrained base (a random one's
    curve is flat within its noise)."""
    folder = make_image_folder(tmp_path_factory.mktemp("shapes") / "images")
    manifest = manifests.ingest_image_folder(folder)[0]
    keras.utils.set_random_seed(0)
    model = small_cnn(num_classes=3)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(data.make_dataset(manifest, "train", (32, 32), 1, 8, shuffle=True), epochs=8,
              verbose=0, shuffle=False)
    path = tmp_path_factory.mktemp("base") / "base.keras"
    model.save(path)
    return path


def _model(base: Path) -> keras.Model:
    keras.utils.set_random_seed(0)
    pretrained = keras.saving.load_model(base)
    return heads.attach_head(bases.cut_model(pretrained, "features"), 3, dense=[16], seed=1)


def _options(**kwargs) -> FitOptions:
    return FitOptions(image_size=(32, 32), batch_size=8, verbose=0, **{"lr_find": SETTINGS,
                                                                       **kwargs})


def _same(before: list[np.ndarray], after: list[np.ndarray]) -> bool:
    return len(before) == len(after) and all(
        np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def _smoothed(losses: np.ndarray, smoothing: float = 0.98) -> list[float]:
    """The range test's bias-corrected exponential average, written out."""
    weights = smoothing ** np.arange(len(losses))
    return [float(np.dot(weights[:i + 1][::-1], losses[:i + 1]) / weights[:i + 1].sum())
            for i in range(len(losses))]


def test_the_suggestion_is_a_decade_below_where_the_loss_leaves_its_low():
    rates = list(np.geomspace(1e-7, 10, 100))
    log = np.log10(rates)
    rng = np.random.default_rng(0)
    # a new head: the loss falls from 1e-4, bottoms out at 1e-2, then blows up (the smoothed
    # curve; each step's loss has noise around it)
    dip = 2.0 - np.clip(log + 4, 0, 2) * 0.5 + np.clip(log + 2, 0, None) ** 2
    noisy = dip + 0.05 * rng.standard_normal(100)
    reading = suggest(rates, list(noisy), list(dip))
    assert reading.minimum == pytest.approx(1e-2, rel=0.3)
    assert reading.suggestion == pytest.approx(reading.minimum / 10, rel=1.0)
    assert 1e-4 <= reading.steepest <= 1e-2
    assert reading.noise == pytest.approx(0.05, rel=0.4)
    assert reading.drop == pytest.approx(1, abs=0.01)
    # the range test's own smoothing lags behind the curve, but it still falls
    assert math.isfinite(suggest(rates, list(noisy), _smoothed(noisy)).suggestion)
    assert all(math.isnan(v) for v in suggest(rates[:1], list(dip[:1]), list(dip[:1])))


def test_a_curve_flat_within_its_noise_gives_no_suggestion(caplog):
    """A trained model: the loss varies within its noise until 1e-3, then climbs. Its minimum
    is wherever the noise put it (fastai's minimum/10, here among the lowest rates), so no
    rate is suggested; the report says null, the plot says so, and `auto` stops."""
    rates = list(np.geomspace(1e-7, 10, 100))
    rng = np.random.default_rng(0)
    flat = 0.5 + 0.1 * rng.standard_normal(100) + np.clip(np.log10(rates) + 3, 0, None)
    reading = suggest(rates, list(flat), _smoothed(flat))
    assert reading.minimum < 1e-3 and math.isnan(reading.suggestion)
    assert 0 <= reading.drop < reading.noise and reading.noise == pytest.approx(0.1, rel=0.4)
    # the same noise on a curve that falls by 5 times it (half of that after smoothing, which
    # lags) gives a suggestion
    falling = flat - 0.5 * (np.asarray(rates) > 1e-5)
    fall = suggest(rates, list(falling), _smoothed(falling))
    assert fall.drop > 2 * fall.noise and math.isfinite(fall.suggestion)

    test = RangeTest(rates, list(flat), _smoothed(flat), *reading, stopped="all steps ran")
    report = test.to_dict()
    assert report["suggestion"] is None and json.loads(json.dumps(report)) == report
    labels = [t.get_text() for t in range_test_figure([("flat", test)]).axes[0]
              .get_legend().get_texts()]
    assert any(label.startswith("no suggestion") for label in labels), labels
    assert not any(label.startswith("suggestion") for label in labels), labels
    with pytest.raises(InputError, match=r"^phase2: `learning_rate` is auto, but .* suggests "
                                         r"no rate .*flat.*Set the phase2 `learning_rate` to a "
                                         r"number"):
        test.rate("phase2")


@pytest.mark.slow  # trains a model for seconds
def test_range_test_restores_the_weights_and_the_optimizer_state(base, manifest):
    model = _model(base)
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
def test_find_learning_rate_leaves_the_weights_as_they_were(base, manifest, stage):
    model = _model(base)
    weights = [w.copy() for w in model.get_weights()]
    test = find_learning_rate(model, manifest, stage, _options())
    assert _same(weights, model.get_weights())
    assert math.isfinite(test.suggestion) and test.suggestion > 0
    assert test.drop > 2 * test.noise > 0  # a real dip, well out of the noise


@pytest.mark.slow  # trains a model for seconds
def test_auto_rates_are_found_trained_at_and_reused_by_a_resumed_run(base, manifest, tmp_path):
    stages = [Stage(epochs=2, learning_rate="auto", optimizer="rmsprop")]
    history = fit(_model(base), manifest, stages, _options(backup_dir=tmp_path), name="phase1")
    found = history["found_learning_rates"][0]
    assert found > 0 and history["learning_rate"] == pytest.approx([found, found])
    memo = tmp_path / "phase1_stage1.lr_find.json"
    assert json.loads(memo.read_text())["learning_rate"] == found

    # A rerun with the same resume folder reuses the rate found the first time (the range
    # test on another machine, or on a GPU, could land elsewhere): here, a rate planted in it.
    planted = {**json.loads(memo.read_text()), "learning_rate": 0.0123}
    memo.write_text(json.dumps(planted))
    again = fit(_model(base), manifest, stages, _options(backup_dir=tmp_path), name="phase1")
    assert again["found_learning_rates"] == [0.0123]
    assert again["learning_rate"] == pytest.approx([0.0123, 0.0123])
    # a rate given as a number is trained at as it is
    plain = fit(_model(base), manifest,
                [Stage(epochs=1, learning_rate=0.002, optimizer="rmsprop")],
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


@pytest.mark.slow  # trains a model for seconds
def test_a_real_flat_curve_gives_no_suggestion_and_auto_stops(base, manifest, caplog):
    """Rates too small to move the loss (1e-9 to 1e-7): the head's curve is flat within its
    noise; the same model's curve over the default range falls (above). ``learning_rate:
    auto`` on the flat range stops the phase with one error naming it, in ``fit`` and in the
    lr_find pipeline's node."""
    from headswap.pipelines.lr_find.nodes import find_head_rate

    tiny = RangeTestSettings(steps=40, min_learning_rate=1e-9, max_learning_rate=1e-7)
    stage = Stage(epochs=1, learning_rate="auto", optimizer="rmsprop")
    with caplog.at_level("WARNING", logger="headswap.core.lr_find"):
        test = find_learning_rate(_model(base), manifest, stage, _options(lr_find=tiny))
    assert math.isnan(test.suggestion) and test.to_dict()["suggestion"] is None
    assert 0 <= test.drop < test.noise, (test.drop, test.noise)
    assert "no suggestion" in caplog.text and "flat" in caplog.text
    with pytest.raises(InputError, match=r"^phase1: `learning_rate` is auto, .*flat.*Set the "
                                         r"phase1 `learning_rate` to a number"):
        fit(_model(base), manifest, [stage], _options(lr_find=tiny), name="phase1")

    params = {"data": {"path": "images", "image_size": 32, "batch_size": 8},
              "base": {"path": "base.keras"}, "head": {"dense": [16]},
              "phase1": {"learning_rate": "auto"},
              "training": {"verbose": "quiet", "lr_find": tiny.model_dump()}}
    with pytest.raises(InputError, match=r"^phase1: `learning_rate` is auto, .*flat.*Set the "
                                         r"phase1 `learning_rate` to a number"):
        find_head_rate(_model(base), manifest, parse_finetune(params))
