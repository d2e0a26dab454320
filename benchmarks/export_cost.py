"""The cost of the checked exports: the finetune pipeline's export step against a plain program's.

On the realistic benchmark's model shape (MobileNetV2 cut at ``out_relu``, 96x96 RGB, a new
head of 5 classes; random weights: a conversion's cost does not depend on them) and 250 test
and 100 training JPEGs written once into a temporary folder, alternately in one process:

* project: ``headswap.core.export.export_model`` of all five formats (SavedModel, TFLite
  float32, dynamic-range and int8, ONNX), each scored on the 250 test images against the
  model's test predictions as soon as it is written (``export_check.split_checks`` and its
  ``add`` as ``written``), as the pipeline's ``export_model`` node does (the predictions come
  from the run's ``calibrate`` pass, made here before the clock starts);
* project unchecked: the same exports without their check;
* plain: ``benchmarks/plain_keras.py``'s ``export``, the same five files with the public
  converters as one writes them by hand (``model.export``, ``TFLiteConverter``,
  ``tf2onnx.convert.from_keras``), unchecked.

Prints the seconds of each side (median of the repeats), their ratios, and the project's
seconds per format for its export and for its check; writes benchmarks/results/export_cost.json.

    python benchmarks/export_cost.py [--repeats 3]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from common import argument_parser, load, medians, table, write_result
from PIL import Image
from plain_keras import export as plain_export

SIZE, CLASSES, TEST, TRAIN = 96, 5, 250, 100


def image_folder(root: Path) -> pd.DataFrame:
    """A manifest of ``TEST`` test and ``TRAIN`` training JPEGs of drawn noise, in
    ``CLASSES`` classes."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(TEST + TRAIN):
        label = f"class_{i % CLASSES}"
        path = root / label / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
        rows.append((str(path), label, "test" if i < TEST else "train"))
    return pd.DataFrame(rows, columns=["path", "label", "split"])


def model() -> Any:
    import keras

    from headswap.core import bases, heads

    base = keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), weights=None)
    return heads.attach_head(bases.cut_model(base, "out_relu"), CLASSES, "avg", [], 0.2)


def main() -> None:
    parser = argument_parser(__doc__, repeats=3)
    args = parser.parse_args()
    before = load()
    from headswap.core import export, export_check, manifests
    from headswap.core.evaluation import predict_split

    with tempfile.TemporaryDirectory(prefix="headswap-export-cost-") as tmp:
        manifest = image_folder(Path(tmp) / "images")
        names = manifests.class_names(manifest)
        classifier = model()
        representative = export_check.representative_images(manifest, (SIZE, SIZE), 3, TRAIN)
        predictions = predict_split(classifier, manifest, "test", (SIZE, SIZE))
        runs = []
        for i in range(args.repeats):
            row: dict[str, Any] = {}
            sides = ["project", "project_unchecked", "plain"]
            for side in sides if i % 2 == 0 else sides[::-1]:
                folder = Path(tmp) / f"{side}-{i}"
                started = time.perf_counter()
                if side == "plain":
                    plain_export(classifier, folder, list(export.FORMATS), representative, names)
                    row["plain_s"] = time.perf_counter() - started
                    continue
                timings: dict[str, float] = {}
                if side == "project_unchecked":
                    export.export_model(classifier, folder, names, export.FORMATS,
                                        representative=representative, timings=timings)
                    row["project_unchecked_s"] = time.perf_counter() - started
                    continue
                # as the pipeline's node: each export checked as soon as it is written
                checks = export_check.split_checks(classifier, manifest, (SIZE, SIZE), TEST,
                                                   predictions=predictions)
                export.export_model(classifier, folder, names, export.FORMATS,
                                    representative=representative, timings=timings,
                                    written=checks.add)
                checked = checks.table(export_seconds=timings)
                row["project_s"] = time.perf_counter() - started
                row.update({f"project_{name}_s": s for name, s in timings.items()})
                row.update({f"project_{r.format}_check_s": r.check_s
                            for r in checked.iloc[1:].itertuples()})
                row["project_all_within_tolerance"] = bool(
                    checked["within_tolerance"].iloc[1:].all())
            row["ratio"] = row["project_s"] / row["plain_s"]
            row["ratio_without_check"] = row["project_unchecked_s"] / row["plain_s"]
            runs.append(row)
            print(f"  repeat {i + 1}/{args.repeats}: project {row['project_s']:.1f} s "
                  f"(unchecked {row['project_unchecked_s']:.1f} s), plain "
                  f"{row['plain_s']:.1f} s, ratio {row['ratio']:.3f}", flush=True)
    figures: dict[str, Any] = medians(runs)
    figures["all_within_tolerance"] = all(run["project_all_within_tolerance"] for run in runs)
    print(table(["", "seconds (median)"], [[key, value] for key, value in figures.items()]))
    write_result("export_cost", {**figures, "repeats": args.repeats, "test_images": TEST,
                                 "representative_images": TRAIN, "image_size": SIZE},
                 details={"runs": runs}, libraries=("tf2onnx", "onnxruntime"),
                 load_before=before)


if __name__ == "__main__":
    main()
