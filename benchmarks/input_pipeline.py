"""Images per second of the input pipeline alone against the training step.

On the example's 5,000 test images: the input pipeline of ``headswap.core.data.make_dataset``
streaming from disk (read, decode, resize in parallel, batch, prefetch) and serving decoded
images kept in memory; and ``fit`` of the head-swapped model on batches already in memory,
with the base frozen (phase 1 on images) and with it trained (phase 2). The input pipeline
keeps up when it delivers more images per second than the step consumes. Prints the medians;
writes benchmarks/results/input_pipeline.json.

    python benchmarks/input_pipeline.py [--repeats 5] [--batch-size 32]
"""

from __future__ import annotations

import time

import keras
import numpy as np
from common import (
    EXAMPLE,
    argument_parser,
    example_model,
    medians,
    repeat,
    start,
    table,
    write_result,
)

from headswap.core import LayerSelection, data, manifests
from headswap.core.train import compile_model, make_optimizer, set_trainable


def images_per_second(dataset, count: int) -> float:
    start = time.perf_counter()
    for _ in dataset:
        pass
    return count / (time.perf_counter() - start)


class EpochClock(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def step_images_per_second(images: np.ndarray, labels: np.ndarray, batch_size: int,
                           train_base: bool, epochs: int = 3) -> float:
    """Images per second of ``fit`` on in-memory batches (epochs after the first)."""
    keras.utils.set_random_seed(0)
    model = example_model(dense=[64], dropout=0.3)
    set_trainable(model, LayerSelection(all=True) if train_base else None)
    compile_model(model, make_optimizer("adam", 3e-4))
    batches = data.array_dataset((images, labels), batch_size)
    clock = EpochClock()
    model.fit(batches, epochs=epochs, callbacks=[clock], verbose=0)
    return len(images) / float(np.median(clock.times[1:]))


def main() -> None:
    parser = argument_parser(__doc__, repeats=5)
    parser.add_argument("--batch-size", type=int, default=32)
    args, before = start(parser)
    manifest = manifests.ingest_image_folder(EXAMPLE)[0]
    size, channels, bs = (28, 28), 1, args.batch_size
    paths, labels = manifests.split_arrays(manifest, "test")
    images = data.decode_all(paths, size, channels)
    in_memory = data.array_dataset((images, labels), bs)
    print(f"{len(paths)} images of {size[0]}x{size[1]}x{channels}, batch size {bs}, "
          f"{args.repeats} repeats")

    def measure(_: int) -> dict:
        streamed = data.make_dataset(manifest, "test", size, channels, bs)
        return {
            "input streamed from disk": images_per_second(streamed, len(paths)),
            "input from memory": images_per_second(in_memory, len(paths)),
            "training step, base frozen": step_images_per_second(images, labels, bs, False),
            "training step, base trained": step_images_per_second(images, labels, bs, True),
        }

    runs = repeat(args.repeats, measure)
    summary = medians(runs)
    summary.pop("load_at_start")
    step = summary["training step, base trained"]
    print(table(["", "images/s (median)", "x the phase-2 step"],
                [[name, value, value / step] for name, value in summary.items()]))
    write_result("input_pipeline", {
        "images": len(paths), "image_size": list(size), "channels": channels,
        "batch_size": bs, "repeats": args.repeats, "images_per_second": summary,
        "streamed_over_phase2_step": summary["input streamed from disk"] / step,
    }, details={"runs": runs}, load_before=before)


if __name__ == "__main__":
    main()
