"""The finetune pipeline against plain Keras at a realistic size: MobileNetV2, 96-pixel RGB JPEGs.

The example is small by design (28x28 gray images, a 100k-parameter base); users bring photos
of 96-224 pixels and bases of millions of parameters, where the frozen base's forward pass
dominates phase 1. This benchmark makes, once, under ``data/01_raw/fashion-mnist-96``, an image
folder of the example's target classes written as 96x96 RGB JPEG files (``--train`` training
images per class, a fifth of them in ``val/`` so that both programs validate on the same
images, and ``--test`` test images per class: 4,000 in all by default: 2,000 test images, so
that an accuracy difference of one point is not lost in the test split's noise) and, under
``data/06_models/``, a MobileNetV2 (2.3 M parameters, its input scaling inside) pretrained
briefly on the example's source classes at that size (``--pretrain-images``,
``--pretrain-epochs``; BatchNormalization momentum 0.9, so that its moving statistics settle
within so few steps). Then, alternately, in fresh processes and the same throw-away copy of the
project: ``kedro run --pipeline finetune`` on that folder and base, and
``benchmarks/plain_keras.py`` doing the same work by hand, both with the Keras
transfer-learning guide's schedule (phase 1: Adam 1e-3, ``--epochs1`` 20; phase 2: the whole
base at Adam 1e-5, ``--epochs2`` 10; BatchNormalization in inference mode), the same cut
(``out_relu``), head, batch size and seed. Both write the exports of
``finetune.export.formats`` (by default all five): the pipeline in its ``export_model`` node,
which also scores each against the model on the test split; the plain program by hand with the
same converters, unchecked. Prints wall time, test accuracy and peak RSS of each, the time each
side spent on its exports and the ratio without them; writes
benchmarks/results/realistic.json.

    python benchmarks/realistic.py [--repeats 1] [--train 400] [--test 400]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import yaml
from common import (
    ROOT,
    alternate_with_plain,
    argument_parser,
    finetune_command,
    kedro_command,
    medians,
    plain_command,
    project_copy,
    project_parameters,
    run_measured,
    start,
    table,
    write_result,
)
from PIL import Image

from headswap.project import example
from headswap.project.config import merge_parameters, parse_finetune

SIZE = 96
TARGET_RATIO, ACCURACY_POINTS = 0.75, 0.01


def fashion_mnist() -> Path:
    dirs = project_parameters("example")["fashion_mnist_dirs"]
    return example.find_fashion_mnist([str(ROOT / d) if not os.path.isabs(d) else d
                                       for d in dirs])


def larger(image: np.ndarray) -> Image.Image:
    """A 28x28 gray Fashion-MNIST image as a 96x96 RGB picture."""
    return Image.fromarray(image).resize((SIZE, SIZE), Image.BICUBIC).convert("RGB")


def write_folder(train: int, test: int) -> Path:
    """``data/01_raw/fashion-mnist-96-<train>-<test>-val/{train,val,test}/<class>/*.jpg`` of
    the target classes, a fifth of each class's ``train`` images in ``val/``, so that both
    programs validate on the same images (files already there are kept)."""
    folder = ROOT / "data" / "01_raw" / f"fashion-mnist-{SIZE}-{train}-{test}-val"
    params = project_parameters("example")
    source = fashion_mnist()
    for split, per_class in (("train", train), ("test", test)):
        images, labels = example.load_split(source, split)
        chosen = example.select_classes(labels, params["target_classes"], per_class,
                                        params["seed"])
        for n, i in enumerate(chosen):
            into = "val" if split == "train" and n % per_class < per_class // 5 else split
            path = folder / into / example.CLASS_NAMES[labels[i]] / f"{i:05d}.jpg"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                larger(images[i]).save(path, quality=90)
    return folder


def pretrained_base(images: int, epochs: int) -> Path:
    """MobileNetV2 with its input scaling inside, pretrained on the source classes at 96x96
    (made once; its last feature map is ``out_relu``)."""
    path = ROOT / "data" / "06_models" / f"mobilenet_v2_{SIZE}_bn09_source{images}x{epochs}.keras"
    if path.exists():
        return path
    import keras
    import tensorflow as tf

    params = project_parameters("example")
    all_images, labels = example.load_split(fashion_mnist(), "train")
    chosen = example.select_classes(labels, params["source_classes"],
                                    images // len(params["source_classes"]), params["seed"])
    x = np.stack([np.asarray(larger(all_images[i])) for i in chosen])
    y = np.searchsorted(params["source_classes"], labels[chosen])
    keras.utils.set_random_seed(params["seed"])
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    scaled = keras.layers.Rescaling(1 / 127.5, offset=-1, name="rescale")(inputs)
    mobilenet = keras.applications.MobileNetV2(input_tensor=scaled, include_top=False,
                                               weights=None)
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(mobilenet.output)
    outputs = keras.layers.Dense(len(params["source_classes"]), activation="softmax",
                                 name="predictions")(pooled)
    model = keras.Model(inputs, outputs, name="mobilenet_v2_source")
    for layer in model.layers:  # Keras' 0.999 would leave the moving statistics of a brief
        if isinstance(layer, keras.layers.BatchNormalization):  # pretraining at their
            layer.momentum = 0.9                                 # initial values
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0).batch(32)
    model.fit(data, epochs=epochs, verbose=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


def main() -> None:
    parser = argument_parser(__doc__, repeats=1)
    parser.add_argument("--train", type=int, default=400, help="training images per class")
    parser.add_argument("--test", type=int, default=400, help="test images per class")
    parser.add_argument("--epochs1", type=int, default=20)
    parser.add_argument("--epochs2", type=int, default=10)
    parser.add_argument("--pretrain-images", type=int, default=2500)
    parser.add_argument("--pretrain-epochs", type=int, default=1)
    args, before = start(parser)
    folder = write_folder(args.train, args.test)
    base = pretrained_base(args.pretrain_images, args.pretrain_epochs)
    overrides = {
        "data": {"path": str(folder), "image_size": [SIZE, SIZE]},
        "base": {"path": str(base), "cut_at": "out_relu"},
        "phase1": {"epochs": args.epochs1, "learning_rate": 1e-3, "optimizer": "adam"},
        "phase2": {"epochs": args.epochs2, "learning_rate": 1e-5, "optimizer": "adam",
                   "schedule": "constant", "warmup_epochs": 0},
    }
    cfg = parse_finetune(merge_parameters(project_parameters(), overrides))
    plain = plain_command(cfg, args.epochs1, args.epochs2, folder, base, color_mode="rgb")
    images = sum(1 for _ in folder.rglob("*.jpg"))
    print(f"finetune pipeline vs plain Keras: MobileNetV2 at {SIZE}x{SIZE}, {images} JPEG "
          f"images, {args.epochs1} + {args.epochs2} epochs, {args.repeats} repeats", flush=True)
    with project_copy() as project:
        # once untimed: MLflow creates its database at the first run of a new project
        run_measured(finetune_command({"phase1.epochs": 1, "phase2.epochs": 1}),
                     project).check("warm-up kedro run")
        # an environment of its own (the runs' default is the example's)
        (project / "conf" / "realistic").mkdir()
        (project / "conf" / "realistic" / "parameters_finetune.yml").write_text(
            yaml.safe_dump({"finetune": overrides}))
        pipeline = kedro_command("run", "--pipeline", "finetune", "--env", "realistic")
        runs, breakdown = alternate_with_plain(pipeline, plain, project, args.repeats)
    summary = medians(runs)
    print(table(
        ["", "wall s", "test accuracy", "peak RSS MiB"],
        [["kedro run --pipeline finetune", summary["pipeline_s"], summary["pipeline_accuracy"],
          summary["pipeline_peak_rss_mb"]],
         ["plain Keras program", summary["plain_keras_s"], summary["plain_keras_accuracy"],
          summary["plain_keras_peak_rss_mb"]]],
    ))
    gap = summary["pipeline_accuracy"] - summary["plain_keras_accuracy"]
    print(f"pipeline / plain Keras wall time: {summary['ratio']:.2f} (target at most "
          f"{TARGET_RATIO}: {'meets' if summary['ratio'] <= TARGET_RATIO else 'misses'} it); "
          f"test accuracy difference {gap:+.4f} (target within {ACCURACY_POINTS}: "
          f"{'meets' if abs(gap) <= ACCURACY_POINTS else 'misses'} it)")
    print(f"exports: the pipeline's export_model node {summary['pipeline_export_s']:.0f} s "
          f"(the exports and their check on the test split), the plain program's "
          f"{summary['plain_keras_export_s']:.0f} s (the same exports, unchecked); the ratio "
          f"without them: {summary['ratio_without_exports']:.2f}")
    write_result("realistic", {
        "images": images, "image_size": SIZE, "epochs": [args.epochs1, args.epochs2],
        "repeats": args.repeats, "summary": summary, "pipeline_breakdown_s": breakdown,
        "target_ratio": TARGET_RATIO,
    }, details={
        "parameters": overrides,
        "plain_keras_command": " ".join(Path(c).name if c == sys.executable else c
                                        for c in plain),
        "runs": runs,
    }, libraries=["kedro-mlflow", "pillow", "pyyaml"], load_before=before)


if __name__ == "__main__":
    main()
