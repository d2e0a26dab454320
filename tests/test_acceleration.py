"""Multi-device training, mixed precision and XLA, checked for correctness on CPU."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pytest

from headswap.core import bases, devices, fine_tune, heads, manifests, train
from headswap.project.config import parse_finetune
from tests.conftest import small_cnn

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _params(folder: Path, **extra) -> dict:
    return {"data": {"path": str(folder), "image_size": 32, "batch_size": 8},
            "base": {"path": "unused.keras"},
            "training": {"resume_dir": str(folder.parent / "resume")},
            "phase1": {"epochs": 2, "learning_rate": 1e-2},
            "phase2": {"epochs": 10, "learning_rate": 3e-3, "train_batchnorm": True}, **extra}


def _train_both_phases(folder: Path, dropout: float = 0.2, **extra):
    cfg = parse_finetune(_params(folder, **extra))
    manifest = manifests.ingest_image_folder(folder, seed=0)[0]
    keras.utils.set_random_seed(0)
    model = heads.attach_head(bases.cut_model(small_cnn()), 3, dense=[16], dropout=dropout)
    options = replace(cfg.fit_options(), backup_dir=None, verbose=0)
    histories = fine_tune(model, manifest, {"phase1": cfg.phase1.stages_list(),
                                            "phase2": cfg.phase2.stages_list()}, options)
    return model, histories["phase1"], histories["phase2"]


def test_mirrored_strategy_on_two_logical_cpus_learns(image_folder: Path):
    """Two replicas, each on half of every batch, with gradients summed across them: the same
    training as on one device (no dropout, so no per-replica randomness), and it learns."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT)!r})
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from headswap.core import devices
        from tests.test_acceleration import _train_both_phases
        from pathlib import Path
        folder = Path({str(image_folder)!r})
        found = {{}}
        for distribution in ("none", "mirrored"):
            model, h1, h2 = _train_both_phases(folder, dropout=0.0, distribution=distribution)
            found[distribution] = {{"loss": h1["loss"] + h2["loss"],
                                   "accuracy": h1["accuracy"] + h2["accuracy"]}}
        found["replicas"] = devices.distribution_strategy("mirrored").num_replicas_in_sync
        print("RESULT" + json.dumps(found))
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env=env, cwd=ROOT, check=False)
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT")]
    assert line, result.stdout[-2000:] + result.stderr[-3000:]
    found = json.loads(line[0][len("RESULT"):])
    assert found["replicas"] == 2
    mirrored, single = found["mirrored"], found["none"]
    assert len(mirrored["loss"]) == 12
    np.testing.assert_allclose(mirrored["loss"], single["loss"], rtol=1e-3)
    assert mirrored["loss"][-1] < 0.8 * mirrored["loss"][0]
    assert mirrored["accuracy"][-1] > 0.5  # three classes: chance is 1/3


def test_mixed_precision_trains_in_float16_with_a_float32_output(image_folder: Path):
    model, h1, h2 = _train_both_phases(image_folder, mixed_precision=True)
    assert np.isfinite(h1["loss"] + h2["loss"]).all() and h2["loss"][-1] < h1["loss"][0]
    copy = devices.rebuild(model, mixed_precision=True)
    policies = {layer.name: layer.dtype_policy.name for layer in train.iter_layers(copy)}
    assert policies["predictions"] == "float32" and policies["head_dense1"] == "mixed_float16"
    assert policies["conv1"] == "mixed_float16"
    assert {layer.dtype_policy.name for layer in train.iter_layers(model)} == {"float32"}
    assert copy(np.zeros((1, 32, 32, 1), "float32")).dtype.name == "float32"


def test_xla_compiled_training_matches_the_ordinary_one(image_folder: Path):
    # No dropout: XLA draws its random numbers with another algorithm than the ordinary path.
    runs = [_train_both_phases(image_folder, dropout=0.0, phase2={"epochs": 2}, **extra)
            for extra in ({}, {"jit_compile": True})]
    (_, plain1, plain2), (_, xla1, xla2) = runs
    np.testing.assert_allclose(xla1["loss"] + xla2["loss"], plain1["loss"] + plain2["loss"],
                               rtol=1e-3)
    assert xla2["loss"][-1] < xla1["loss"][0]
