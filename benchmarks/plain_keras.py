"""Fine-tuning written as a plain Keras program: the work of the finetune pipeline without it.

Reads an image folder with train/ and test/ class folders (and val/; without it validation is
carved out of train/), loads a saved model, cuts it at a layer, puts a new head on it, trains
the head on the frozen base, unfreezes the base (BatchNormalization stays in inference mode),
recompiles with a lower rate (warmed up linearly, then decayed to 0 along a cosine, when
asked), trains again (training and validation images cached in memory, as TensorFlow's
tutorials do) and evaluates on the test images the way the recipe asks, as one would by hand:
scikit-learn's classification report printed, a confusion-matrix plot, learning curves over
both phases and the fine-tuned model saved (into --out, a temporary folder by default), and,
with --export, the exports the pipeline writes, made with the public converters as one would by
hand (``model.export``, ``tf.lite.TFLiteConverter``, ``tf2onnx``; not checked). Prints one JSON
line of results.

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
    parser.add_argument("--export", nargs="*", default=[],
                        help="formats to export (finetune.export.formats' names)")
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
    export_s = time.perf_counter()
    if args.export:
        representative = np.concatenate([x for x, _ in train.take(-(-100 // args.batch_size))])
        export(model, out / "exports", args.export, representative[:100], names)
    export_s = time.perf_counter() - export_s
    print(json.dumps({"test_accuracy": report["accuracy"], "phase1_s": phase1,
                      "phase2_s": phase2, "export_s": export_s,
                      "in_process_s": time.perf_counter() - start}))


def export(model, folder: Path, formats: list[str], representative, names: list[str]) -> None:
    """The exports of ``formats`` in ``folder``: a SavedModel, TFLite files converted from it
    (float32, dynamic-range, full-integer int8 on ``representative`` images) and ONNX."""
    import tensorflow as tf

    folder.mkdir(parents=True, exist_ok=True)
    saved = folder / "saved_model" if "saved_model" in formats else Path(tempfile.mkdtemp())
    model.export(str(saved), format="tf_saved_model", verbose=False)
    for name, file in (("tflite", "model.tflite"), ("tflite_quantized", "model_quantized.tflite"),
                       ("tflite_int8", "model_int8.tflite")):
        if name not in formats:
            continue
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        if name != "tflite":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if name == "tflite_int8":
            converter.representative_dataset = lambda: ([x[None]] for x in representative)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = converter.inference_output_type = tf.int8
        (folder / file).write_bytes(converter.convert())
    if "onnx" in formats:
        import tf2onnx

        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="images")
        tf2onnx.convert.from_keras(model, input_signature=[spec], opset=17,
                                   output_path=str(folder / "model.onnx"))
    (folder / "labels.txt").write_text("".join(f"{name}\n" for name in names))


if __name__ == "__main__":
    main()
