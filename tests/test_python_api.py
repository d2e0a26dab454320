"""The documentation's "From Python" example (docs/api.md), run as a user would: the code block
as it stands, in a folder holding `images/` and `base.keras`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CLASSES, draw, make_image_folder, small_cnn

pytestmark = pytest.mark.slow

PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _documented_example() -> str:
    section = PAGE.read_text().split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _pretrained_base(path: Path) -> None:
    """A small CNN trained briefly on other drawings of the shapes: a pretrained base."""
    import keras
    import numpy as np

    rng = np.random.default_rng(1)
    labels = np.arange(900) % len(CLASSES)
    images = np.stack([draw(CLASSES[y], rng, 28) for y in labels])[..., None].astype("float32")
    keras.utils.set_random_seed(1)
    model = small_cnn(input_shape=(28, 28, 1), num_classes=4)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(images, labels, epochs=20, batch_size=32, verbose=0)
    model.save(path)


def test_the_readme_python_example_fine_tunes_and_prints_the_report(tmp_path: Path):
    make_image_folder(tmp_path / "images", per_class=100, size=28)
    _pretrained_base(tmp_path / "base.keras")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", _documented_example()], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout
    for name in ("circle", "square", "stripes", "macro avg"):
        assert name in report, report
    accuracy = float(re.search(r"accuracy\s+([\d.]+)", report).group(1))
    assert accuracy > 0.8, report  # three easy shapes: the recipe must learn them
    assert "phase1: 200/200 epochs" in result.stderr  # both phases ran, on one epoch axis:
    assert "phase2: 30/30 epochs" in result.stderr  # the progress log's end-of-phase lines
