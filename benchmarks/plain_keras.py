"""Fine-tuning written as a plain Keras program: the work of the finetune pipeline without it.

Reads an image folder with train/ and test/ class folders (and val/; without it validation is
carved out of train/), loads a saved model, cuts it at a layer, puts a new head on it, trains
the head on the frozen base, unfreezes the base (BatchNormalization stays in inference mode),
recompiles with a lower rate (warmed up linearly, then decayed to 0 along a cosine, when
asked), trains again (training and validation images cached in memory, as TensorFlow's
tutorials do) and evaluates on the test images the way the recipe asks, as one would by hand:
scikit-learn's classification report printed, a confusion-matrix plot, learning curves over
both phases and the fine-tuned model saved (into --out, a temporary folder by default). Prints
one JSON line of results.

    python benchmarks/plain_keras.py --folder data/01_raw/fashion-mnist-target \
        --base data/06_models/pretrained_base.keras/<version>/pretrained_base.keras
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True)
    parser.add_argument("--base", required=True, help="a .keras model file")
    parser.add_argument("--cut-at", default="features", help="the base's last layer")
    parser.add_argument("--image-size", type=int, nargs=2, default=(28, 28))
    parser.add_argument("--color-mode", default="grayscale")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--dense", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--epochs1", type=int, default=200)
    parser.add_argument("--rate1", type=float, default=3e-3)
    parser.add_argument("--optimizer1", choices=("adam", "rmsprop"), default="adam")
    parser.add_argument("--epochs2", type=int, default=30)
    parser.add_argument("--rate2", type=float, default=3e-4)
    parser.add_argument("--cosine2", action="store_true", help="phase 2: cosine decay to 0")
    parser.add_argument("--warmup2", type=int, default=0, help="phase 2: warmup epochs")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=None, help="folder for the plots and the model")
    args = parser.parse_args()
    start = time.perf_counter()

    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(args.seed)
    options = {"image_size": tuple(args.image_size), "color_mode": args.color_mode,
               "batch_size": args.batch_size, "seed": args.seed}
    if os.path.isdir(f"{args.folder}/val"):  # the folder gives the validation images
        train, val = (keras.utils.image_dataset_from_directory(f"{args.folder}/{split}",
                                                               **options)
                      for split in ("train", "val"))
    else:
        train, val = keras.utils.image_dataset_from_directory(
            f"{args.folder}/train", validation_split=args.val_fraction, subset="both", **options
        )
    test = keras.utils.image_dataset_from_directory(f"{args.folder}/test", shuffle=False,
                                                    **options)
    names = train.class_names
    # as TensorFlow's tutorials configure datasets for performance: decoded images kept in
    # memory after the first epoch, batches reshuffled, the next batch prepared during a step
    train = train.cache().shuffle(1000, seed=args.seed).prefetch(tf.data.AUTOTUNE)
    val = val.cache().prefetch(tf.data.AUTOTUNE)
    test = test.prefetch(tf.data.AUTOTUNE)

    pretrained = keras.models.load_model(args.base)
    base = keras.Model(pretrained.input, pretrained.get_layer(args.cut_at).output, name="base")
    base.trainable = False
    inputs = keras.Input(shape=base.input_shape[1:])
    x = base(inputs, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(args.dense, activation="relu")(x)
    x = keras.layers.Dropout(args.dropout)(x)
    outputs = keras.layers.Dense(len(names), activation="softmax")(x)
    model = keras.Model(inputs, outputs)

    loss, metrics = keras.losses.SparseCategoricalCrossentropy(), ["accuracy"]
    optimizer1 = {"adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop}
    model.compile(optimizer1[args.optimizer1](args.rate1), loss, metrics=metrics)
    phase1 = time.perf_counter()
    first = model.fit(train, validation_data=val, epochs=args.epochs1, verbose=2)
    phase1 = time.perf_counter() - phase1

    base.trainable = True
    for layer in base.layers:  # Keras 3: keep BatchNormalization in inference mode
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    rate2 = args.rate2
    if args.cosine2 or args.warmup2:
        steps = len(train)
        warmup = min(args.warmup2, max(args.epochs2 - 1, 0)) * steps
        rate2 = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else args.rate2, max(args.epochs2 * steps - warmup, 1),
            alpha=0.0 if args.cosine2 else 1.0,
            warmup_target=args.rate2 if warmup else None, warmup_steps=warmup)
    model.compile(keras.optimizers.Adam(rate2), loss, metrics=metrics)
    phase2 = time.perf_counter()
    second = model.fit(train, validation_data=val, epochs=args.epochs1 + args.epochs2,
                       initial_epoch=args.epochs1, verbose=2)
    phase2 = time.perf_counter() - phase2

    import matplotlib
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay, classification_report

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y_true = np.concatenate([y for _, y in test])
    y_pred = model.predict(test, verbose=0).argmax(axis=1)
    print(classification_report(y_true, y_pred, target_names=names, digits=4))
    report = classification_report(y_true, y_pred, target_names=names,
                                   output_dict=True)
    out = Path(args.out or tempfile.mkdtemp(prefix="plain-keras-"))
    out.mkdir(parents=True, exist_ok=True)
    display = ConfusionMatrixDisplay.from_predictions(
        y_true, y_pred, display_labels=names, xticks_rotation=45
    )
    display.figure_.savefig(out / "confusion_matrix.png", dpi=110)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        for prefix in ("", "val_"):
            values = first.history[prefix + key] + second.history[prefix + key]
            ax.plot(range(1, len(values) + 1), values, label=prefix + key)
        ax.axvline(args.epochs1 + 0.5, linestyle=":", color="grey")
        ax.legend()
    figure.savefig(out / "learning_curves.png", dpi=110)
    model.save(out / "model.keras")
    print(json.dumps({"test_accuracy": report["accuracy"], "phase1_s": phase1,
                      "phase2_s": phase2, "in_process_s": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
