"""Phase 1 with cached base features against the ordinary image pipeline.

Runs phase 1 (frozen base, new head) on the example's target folder three ways, alternately,
several times: on cached features (the default), on images (``cache_features: false``) kept
decoded in memory (they fit the default ``cache_memory_mb``), and on images streamed from
disk every epoch (``cache_memory_mb: 0``). Prints the median per-epoch time (epochs after the
first), the whole phase and the test accuracy of each, and the per-epoch speed-up of the
cached features; writes benchmarks/results/phase1_cache.json.

Phase 1 runs as the finetune pipeline runs it: ``headswap.core.fit`` with the options
``parse_finetune`` makes of these parameters (per-epoch backups included, since
``training.resume`` is on by default; each run backs up into a folder of its own). The
training data, images or features, is iterated afresh each epoch, in an order keyed on an
``epoch`` variable that a callback sets as each epoch begins. (Figures recorded before that
came from one dataset laid out over all the epochs of the phase, ``make_dataset``'s former
``epochs=(first, count)``, iterated once across the whole ``fit``.)

    kedro run --pipeline data && kedro run --pipeline pretrain   # the example, once
    python benchmarks/phase1_cache.py [--repeats 3] [--epochs 30]
"""

from __future__ import annotations

import tempfile
import time

import keras
import numpy as np
from common import (
    EXAMPLE,
    PRETRAINED,
    argument_parser,
    example_model,
    latest_model_file,
    medians,
    repeat,
    start,
    table,
    write_result,
)

from headswap.core import data, evaluation, fit, manifests
from headswap.project.config import parse_finetune

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


def run(way: dict, epochs: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="headswap-phase1-") as state:
        params = {
            "data": {"path": str(EXAMPLE), "image_size": 28,
                     **({"cache_memory_mb": way["cache_memory_mb"]} if "cache_memory_mb" in way
                        else {})},
            "base": {"path": str(latest_model_file(PRETRAINED))},
            "head": {"dense": [64], "dropout": 0.3},
            "phase1": {"epochs": epochs, "optimizer": "rmsprop", "learning_rate": 1e-3},
            "training": {"cache_features": way["cache_features"], "resume_dir": state},
        }
        cfg = parse_finetune(params)
        manifest = manifests.ingest_image_folder(cfg.data.path, seed=cfg.seed)[0]
        keras.utils.set_random_seed(cfg.seed)
        model = example_model(cfg.head.dense, cfg.head.dropout)
        timer = EpochTimer()
        options = cfg.fit_options()
        options.extra_callbacks = [timer]
        start = time.perf_counter()
        fit(model, manifest, cfg.phase1.stages_list(), options, name="phase1")
        total = time.perf_counter() - start
    test = data.make_dataset(manifest, "test", cfg.data.image_size, 1, 256)
    y_true, probabilities = evaluation.predict(model, test)
    return {
        "epoch_s": float(np.median(timer.times)),
        "phase_s": total,
        "test_accuracy": float(np.mean(probabilities.argmax(1) == y_true)),
    }


def main() -> None:
    parser = argument_parser(__doc__, repeats=3)
    parser.add_argument("--epochs", type=int, default=30)
    args, before = start(parser)
    results: dict[str, list[dict]] = {name: [] for name in WAYS}

    def measure(_: int) -> dict:
        row = {}
        for name, way in WAYS.items():
            results[name].append(run(way, args.epochs))
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
    write_result("phase1_cache", {
        "epochs": args.epochs, "repeats": args.repeats, "summary": summary,
        "speedup_per_epoch": speedup, "target_speedup": 5,
    }, details={"load_at_each_repeat": [r["load_at_start"] for r in loads], "runs": results},
        load_before=before)


if __name__ == "__main__":
    main()
