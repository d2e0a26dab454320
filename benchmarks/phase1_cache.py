"""Phase 1 with cached base features against the ordinary image pipeline.

Runs phase 1 (frozen base, new head) on the example's target folder three ways, alternately,
several times: on cached features (the default), on images (``cache_features: false``) kept
decoded in memory (they fit the default ``cache_memory_mb``), and on images streamed from
disk every epoch (``cache_memory_mb: 0``). Prints the median per-epoch time (epochs after the
first), the whole phase and the test accuracy of each, and the per-epoch speed-up of the
cached features; writes benchmarks/results/phase1_cache.json.

    kedro run --pipeline data && kedro run --pipeline pretrain   # the example, once
    python benchmarks/phase1_cache.py [--repeats 3] [--epochs 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import keras
import numpy as np
from common import (
    EXAMPLE,
    PRETRAINED,
    load,
    medians,
    repeat,
    require_example,
    table,
    write_results,
)

from headswap import bases, data, evaluation, heads, phases
from headswap.config import parse_finetune

WAYS = {
    "cached features": {"cache_features": True},
    "images in memory": {"cache_features": False},
    "images streamed": {"cache_features": False, "cache_memory_mb": 0},
}


class EpochTimer(keras.callbacks.Callback):
    """Wall time from one epoch's end to the next (all of an epoch's work, callbacks too)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self._last: float | None = None

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def run(way: dict, epochs: int, state: str) -> dict[str, float]:
    params = {
        "data": {"path": str(EXAMPLE), "image_size": 28,
                 **({"cache_memory_mb": way["cache_memory_mb"]} if "cache_memory_mb" in way
                    else {})},
        "base": {"path": str(PRETRAINED)},
        "head": {"dense": [64], "dropout": 0.3},
        "phase1": {"epochs": epochs, "optimizer": "rmsprop", "learning_rate": 1e-3},
        "training": {"cache_features": way["cache_features"], "resume_dir": state},
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
        "epoch_s": float(np.median(timer.times)),
        "phase_s": total,
        "test_accuracy": float(np.mean(probabilities.argmax(1) == y_true)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    require_example()
    before = load()
    results: dict[str, list[dict]] = {name: [] for name in WAYS}
    with tempfile.TemporaryDirectory() as state:
        def measure(_: int) -> dict:
            row = {}
            for name, way in WAYS.items():
                results[name].append(run(way, args.epochs, state))
                row[f"{name}: s/epoch"] = results[name][-1]["epoch_s"]
            return row

        loads = repeat(args.repeats, measure)
    summary = {name: medians(runs) for name, runs in results.items()}
    cached = summary["cached features"]
    speedup = {name: row["epoch_s"] / cached["epoch_s"] for name, row in summary.items()
               if name != "cached features"}
    print(f"phase 1, {args.epochs} epochs, median of {args.repeats} runs")
    print(table(["", "s/epoch", "phase s", "test accuracy"],
                [[name, row["epoch_s"], row["phase_s"], row["test_accuracy"]]
                 for name, row in summary.items()]))
    for name, ratio in speedup.items():
        gap = 100 * (cached["test_accuracy"] - summary[name]["test_accuracy"])
        print(f"cached features per epoch vs {name}: {ratio:.1f}x faster "
              f"(target at least 5x: {'met' if ratio >= 5 else 'missed'}); "
              f"accuracy difference {gap:+.2f} points (target within 1)")
    write_results("phase1_cache", {
        "epochs": args.epochs, "repeats": args.repeats, "summary": summary,
        "speedup_per_epoch": speedup, "target_speedup": 5,
        "load_at_each_repeat": [r["load_at_start"] for r in loads], "runs": results,
    }, before)


if __name__ == "__main__":
    main()
