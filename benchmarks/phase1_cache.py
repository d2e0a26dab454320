"""Phase 1 with cached base features against the ordinary image pipeline.

Runs phase 1 (frozen base, new head) on the example's target folder both ways, several times,
and prints the median per-epoch time, the one-off feature pass, the whole phase and the test
accuracy of each; writes the figures to benchmarks/results/phase1_cache.json.

    kedro run --pipeline data && kedro run --pipeline pretrain   # the example, once
    python benchmarks/phase1_cache.py [--repeats 3] [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from headswap import bases, data, evaluation, heads, phases
from headswap.config import parse_finetune

ROOT = Path(__file__).resolve().parents[1]


class EpochTimer(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def run(cache: bool, epochs: int, state: str) -> dict[str, float]:
    params = {
        "data": {"path": str(ROOT / "data/01_raw/fashion-mnist-target"), "image_size": 28},
        "base": {"path": str(ROOT / "data/06_models/pretrained_base.keras")},
        "head": {"dense": [64], "dropout": 0.3},
        "phase1": {"epochs": epochs, "optimizer": "rmsprop", "learning_rate": 1e-3},
        "training": {"cache_features": cache, "resume_dir": state},
    }
    cfg = parse_finetune(params)
    manifest = data.scan_image_folder(cfg.data.path, seed=cfg.seed)
    keras.utils.set_random_seed(cfg.seed)
    base = bases.cut_model(bases.load_model_file(cfg.base.path))
    model = heads.attach_head(base, 5, dense=cfg.head.dense, dropout=cfg.head.dropout)
    timer = EpochTimer()
    original_fit = keras.Model.fit

    def timed_fit(self, *args, callbacks=None, **kwargs):
        return original_fit(self, *args, callbacks=[*(callbacks or []), timer], **kwargs)

    keras.Model.fit = timed_fit
    try:
        start = time.perf_counter()
        phases.run_training_phase(model, manifest, cfg, "phase1")
        total = time.perf_counter() - start
    finally:
        keras.Model.fit = original_fit
    test = data.make_dataset(manifest, "test", cfg.data.image_size, 1, 256)
    y_true, probabilities = evaluation.predict(model, test)
    return {
        "epoch_s": statistics.median(timer.times[1:] or timer.times),
        "phase_s": total,
        "test_accuracy": float(np.mean(probabilities.argmax(1) == y_true)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"cached": [], "uncached": []}
    with tempfile.TemporaryDirectory() as state:
        for _ in range(args.repeats):
            for name in results:
                results[name].append(run(name == "cached", args.epochs, state))
    summary = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in results.items()
    }
    ratio = summary["uncached"]["epoch_s"] / summary["cached"]["epoch_s"]
    print(f"phase 1, {args.epochs} epochs, median of {args.repeats} runs")
    print(f"{'':10} {'s/epoch':>9} {'phase s':>9} {'test acc':>9}")
    for name, row in summary.items():
        print(f"{name:10} {row['epoch_s']:9.4f} {row['phase_s']:9.2f} {row['test_accuracy']:9.4f}")
    print(f"per-epoch speed-up of the cached path: {ratio:.1f}x; accuracy difference "
          f"{100 * (summary['cached']['test_accuracy'] - summary['uncached']['test_accuracy']):+.2f} points")
    out = ROOT / "benchmarks/results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "phase1_cache.json").write_text(
        json.dumps({"summary": summary, "speedup": ratio, "runs": results}, indent=2)
    )


if __name__ == "__main__":
    main()
