"""Training progress through logging (headswap.core.progress) in place of Keras' own printing:
what each ``finetune.training.verbose`` setting logs, and where conf/logging.yml sends it."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from headswap.core import FitOptions, Stage, bases, fit, heads, manifests
from headswap.core.progress import (
    EPOCH_LOGGER,
    CountProgress,
    LoggedEarlyStopping,
    LoggedReduceLROnPlateau,
    TrainingProgress,
    verbosity,
)
from headswap.project.config import ParameterError, parse_finetune, state_dir
from tests.conftest import small_cnn

SUMMARY = "headswap.core.progress"
ROOT = Path(__file__).resolve().parents[1]


def _arrays(seed: int, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32")


def _train(epochs: int, verbose: str, callbacks=(), first: int = 0) -> None:
    """A small real Keras model trained on small real arrays with the progress callback last,
    as core.fit adds it."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(*_arrays(0), validation_data=_arrays(1), epochs=first + epochs,
              initial_epoch=first, batch_size=16, verbose=0,
              callbacks=[*callbacks, TrainingProgress("phase1", epochs, first, verbose)])


def _lines(caplog, name: str, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name and r.levelno == level]


@pytest.fixture
def caplog(caplog):
    caplog.set_level(logging.DEBUG, logger="headswap")
    return caplog


def test_progress_logs_a_summary_every_tenth_of_the_stage_with_time_left_and_val_accuracy(
        caplog):
    _train(20, "progress")
    summaries = _lines(caplog, SUMMARY)
    # every 2 epochs (20 / 10) before the last, then the end line
    assert [int(re.match(r"phase1: epoch (\d+)/20,", s)[1]) for s in summaries[:-1]] == list(
        range(2, 20, 2))
    for line in summaries[:-1]:
        assert re.search(r"elapsed, about [\d.]+ s left; val_accuracy 0\.\d{4} \(best 0\.\d{4}\)",
                         line), line
    assert re.match(r"phase1: 20/20 epochs in [\d.]+ s; val_accuracy 0\.\d{4}, best 0\.\d{4} "
                    r"at epoch \d+; val_loss \d\.\d{4}$", summaries[-1]), summaries[-1]
    # every epoch's line is still logged, at DEBUG (conf/logging.yml: the file only)
    assert len(_lines(caplog, EPOCH_LOGGER, logging.DEBUG)) == 20
    assert not _lines(caplog, EPOCH_LOGGER)
    assert TrainingProgress("phase1", 200).every == 20  # a 200-epoch phase: 10 lines


def test_epochs_logs_one_line_per_epoch_and_quiet_only_the_end(caplog):
    _train(4, "epochs")
    epochs = _lines(caplog, EPOCH_LOGGER)
    assert len(epochs) == 4
    assert re.match(r"phase1: epoch 3/4 \([\d.]+ s\): loss \d\.\d{4}, accuracy \d\.\d{4}, "
                    r"val_loss \d\.\d{4}, val_accuracy \d\.\d{4}", epochs[2]), epochs[2]
    assert [s.split(" epochs in")[0] for s in _lines(caplog, SUMMARY)] == ["phase1: 4/4"]

    caplog.clear()
    _train(4, "quiet")
    assert not _lines(caplog, EPOCH_LOGGER)
    assert len(_lines(caplog, EPOCH_LOGGER, logging.DEBUG)) == 4
    assert [s.split(" epochs in")[0] for s in _lines(caplog, SUMMARY)] == ["phase1: 4/4"]


def test_a_resumed_stage_counts_the_epochs_done_before(caplog):
    _train(6, "epochs", first=10)  # the stage starts at epoch 10 of the run's axis
    assert _lines(caplog, EPOCH_LOGGER)[0].startswith("phase1: epoch 1/6 ")
    assert _lines(caplog, SUMMARY)[-1].startswith("phase1: 6/6 epochs")


def test_early_stopping_and_the_plateau_are_logged_not_printed(caplog, capsys):
    never = {"monitor": "val_loss", "min_delta": 10.0, "patience": 1}  # no epoch improves
    _train(6, "quiet", [LoggedReduceLROnPlateau(factor=0.5, label="phase1", **never),
                        LoggedEarlyStopping(restore_best_weights=True, label="phase1", **never)])
    lines = _lines(caplog, SUMMARY)
    assert any(re.match(r"phase1: epoch 2: val_loss did not improve in 1 epoch; learning "
                        r"rate lowered to 0\.0005$", line) for line in lines), lines
    assert "phase1: early stopping at epoch 2: val_loss did not improve by 10.0 in 1 epoch" in (
        lines)
    assert any(line.startswith("phase1: restored the weights of its best epoch, 1") for line in
               lines), lines
    assert lines[-1].startswith("phase1: 2/6 epochs in") and "(stopped early)" in lines[-1]
    assert capsys.readouterr().out == ""


def test_core_fit_logs_progress_and_keras_prints_nothing(image_folder, caplog, capsys):
    manifest, _ = manifests.ingest_image_folder(image_folder)
    keras.utils.set_random_seed(0)
    model = heads.attach_head(bases.cut_model(small_cnn()), 3, dense=[8], seed=0)
    options = FitOptions(image_size=(32, 32), batch_size=8, verbose="progress")
    history = fit(model, manifest, [Stage(epochs=3, learning_rate=1e-3)], options)
    assert history["epoch"] == [0, 1, 2] and len(history["val_accuracy"]) == 3
    out = capsys.readouterr().out
    assert "Epoch 1/3" not in out and "step" not in out, out  # Keras' own per-epoch print
    assert any(s.startswith("phase: 3/3 epochs in") for s in _lines(caplog, SUMMARY))
    assert len(_lines(caplog, EPOCH_LOGGER, logging.DEBUG)) == 3


def test_verbose_is_a_training_setting_that_changes_no_resume_folder(tmp_path):
    params = {"data": {"path": str(tmp_path)}, "base": {"path": "base.keras"}}
    assert parse_finetune(params).fit_options().verbose == "progress"
    chatty = parse_finetune({**params, "training": {"verbose": "epochs"}})
    assert chatty.fit_options().verbose == "epochs"
    assert state_dir(chatty) == state_dir(parse_finetune(params))
    with pytest.raises(ParameterError, match=r"finetune.training.verbose"):
        parse_finetune({**params, "training": {"verbose": "loud"}})
    assert [verbosity(v) for v in (0, 1, 2, "quiet")] == ["quiet", "epochs", "epochs", "quiet"]
    with pytest.raises(ValueError, match="progress, epochs, quiet"):
        verbosity("loud")


def test_counts_are_logged_by_tenths_for_large_jobs_only(caplog):
    small = CountProgress("Decoding the images", 2000, after_s=0)
    for done in range(0, 2000, 100):
        small.update(done)
    assert not _lines(caplog, SUMMARY)
    large = CountProgress("Decoding the images", 10_000, after_s=0)
    for done in range(0, 10_001, 500):
        large.update(done)
    lines = _lines(caplog, SUMMARY)
    assert len(lines) == 9, lines
    assert re.match(r"Decoding the images: 1,000 of 10,000 \(10%\), about [\d.]+ s left$",
                    lines[0]), lines[0]


def test_the_log_file_gets_every_epoch_and_the_terminal_the_summaries(tmp_path):
    """conf/logging.yml as Kedro applies it, in a fresh process run from ``tmp_path``."""
    script = (
        "import logging, logging.config, yaml\n"
        f"logging.config.dictConfig(yaml.safe_load(open({str(ROOT / 'conf/logging.yml')!r})))\n"
        f"logging.getLogger({EPOCH_LOGGER!r}).debug('phase1: epoch 1/200 (0.1 s): loss 1.0')\n"
        f"logging.getLogger({SUMMARY!r}).info('phase1: epoch 20/200, about 9 s left')\n"
        "logging.getLogger('headswap.core.data').debug('not logged anywhere')\n"
        "logging.getLogger('kedro.io').info('Loading data')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, text=True,
                            capture_output=True, check=True)
    assert "epoch 1/200" not in result.stdout and "epoch 20/200" in result.stdout
    log = (tmp_path / "info.log").read_text()
    assert "DEBUG headswap.core.progress.epochs: phase1: epoch 1/200" in log
    assert "INFO headswap.core.progress: phase1: epoch 20/200" in log
    assert "INFO kedro.io: Loading data" in log and "not logged anywhere" not in log
