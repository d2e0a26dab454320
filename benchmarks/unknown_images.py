"""Unknown images: how the fine-tuned example model's `unknown` threshold and OOD score treat
images of classes it never saw, against its own test split; and its calibration.

The embedded example pretrains its base on five Fashion-MNIST classes (0-4: T-shirt/top,
Trouser, Pullover, Dress, Coat) and fine-tunes on the other five (5-9). The first five are the
unseen classes here: ``--unseen-per-class`` of their official *test* images each (never in
any training), decoded as the run's test images are (PNG files through the same decoder).

A copy of the project runs ``kedro run --env <env> --pipeline example`` (data, pretrain,
finetune; ``--env test``: the test suite's sizes, about a minute; ``--env example``: the
example as documented), unless ``--project`` names a project where the example already ran.
Then, with the run's calibrated model (``calibrated_model``) and its ``min_confidence``
(the ``auto`` threshold, at ``finetune.calibration.target_precision`` on validation):

* the share labelled ``unknown`` (top probability below ``min_confidence``) of the test
  split (seen classes) and of the unseen-class images;
* AUROC of separating unseen from seen images by the OOD score the predictions carry
  (``ood_score``, as the :class:`~headswap.core.predict.Classifier` computes it from the
  statistics in the run's ``preprocessing.json``: the Mahalanobis distance of the head
  features to the nearest training class mean, :mod:`headswap.core.ood`), and, for
  comparison (not in the predictions), by the energy (``-logsumexp(logits)``), the max-logit
  score (``-max(logits)``) and ``1 - max probability``; and the share of unseen images each
  keeps at the score that keeps 95% of the seen ones (FPR at 95% TPR: lower is better);
* the share of seen and unseen images scored above ``ood_threshold``, the validation split's
  95% quantile of the ``ood_score`` stored with the model;
* the calibration report's temperature and ECE (15 bins) before and after, test and
  validation.

Prints the figures; writes benchmarks/results/unknown_images.json.

    python benchmarks/unknown_images.py [--env test|example] [--unseen-per-class 1000]
        [--project PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd
from common import ENV, ROOT, latest_model_file, load, project_parameters, table, write_result
from PIL import Image
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score

from headswap.core import calibration, data, manifests, sources
from headswap.core.predict import Classifier, read_preprocessing
from headswap.project.example import CLASS_NAMES, find_fashion_mnist, load_split


def run_example(project: Path, env: str) -> float:
    """``kedro run --env <env> --pipeline example`` in ``project``; its wall time."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "kedro", "run", "--env", env, "--pipeline", "example"],
        cwd=project, env={**os.environ, **ENV}, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"kedro run failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return time.perf_counter() - started


def copy_of_project(folder: Path) -> Path:
    """conf/ (without local settings), src/ and pyproject.toml of this project in ``folder``."""
    for name in ("conf", "src"):
        shutil.copytree(ROOT / name, folder / name,
                        ignore=shutil.ignore_patterns("local", "__pycache__", "*.egg-info"))
    (folder / "conf" / "local").mkdir()
    shutil.copy(ROOT / "pyproject.toml", folder)
    return folder


def latest_json(path: Path) -> dict[str, Any]:
    return json.loads(latest_model_file(path).read_text())


def unseen_manifest(folder: Path, per_class: int | None, seed: int) -> pd.DataFrame:
    """The unseen classes' official test images as PNG files under ``folder``, as a manifest
    of one split (``test``), labelled with their own class names."""
    params = project_parameters("example")
    dirs = [str(ROOT / d) if not Path(d).is_absolute() and d != "keras" else d
            for d in params["fashion_mnist_dirs"]]
    images, labels = load_split(find_fashion_mnist(dirs), "test")
    rng = np.random.default_rng(seed)
    rows = []
    for cls in params["source_classes"]:
        index = np.flatnonzero(labels == cls)
        if per_class is not None and per_class < len(index):
            index = np.sort(rng.choice(index, per_class, replace=False))
        for i in index:
            path = folder / CLASS_NAMES[cls] / f"unseen_{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            Image.fromarray(images[i]).save(buffer, format="PNG")
            path.write_bytes(buffer.getvalue())
            rows.append({"path": str(path), "label": CLASS_NAMES[cls], "split": "test"})
    return pd.DataFrame(rows)


def features(model: Any, manifest: pd.DataFrame, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(features, labels)`` of a split: what the model's last Dense layer takes."""
    two = calibration.with_features(model)
    size, channels = tuple(model.inputs[0].shape[1:3]), model.inputs[0].shape[-1]
    out, labels = [], []
    for images, y in data.make_dataset(manifest, split, size, channels, 64):
        out.append(np.asarray(two.predict_on_batch(images)[1], dtype=np.float64))
        labels.append(np.asarray(y))
    return np.concatenate(out), np.concatenate(labels).astype(int)


def shipped_scores(classifier: Classifier, manifest: pd.DataFrame) -> np.ndarray:
    """The ``ood_score`` the classifier gives the test split of ``manifest``, in its order."""
    paths = sources.local_paths(manifests.split_arrays(manifest, "test")[0])
    table, problems = classifier.predict(list(paths), batch_size=64)
    if problems:
        raise SystemExit(f"{len(problems)} images could not be classified: {problems}")
    return table["ood_score"].to_numpy(dtype=np.float64)


def scores(model: Any, feats: np.ndarray, shipped: np.ndarray) -> dict[str, np.ndarray]:
    """Each OOD score of the images (higher: more unusual): the shipped one first, then those
    it is compared with."""
    logits = calibration.logits_of(model, feats)
    probabilities = calibration.tempered(logits)
    return {"ood_score": shipped, "energy": -logsumexp(logits, axis=1),
            "max_logit": -logits.max(axis=1),
            "one_minus_max_probability": 1 - probabilities.max(axis=1)}


def fpr_at_95_tpr(seen: np.ndarray, unseen: np.ndarray) -> float:
    """The share of unseen images scored at or below the score that keeps 95% of the seen."""
    return float((unseen <= np.quantile(seen, 0.95)).mean())


def measure(project: Path, unseen_per_class: int | None, seed: int) -> dict[str, Any]:
    import keras

    data = project / "data"
    model = keras.saving.load_model(latest_model_file(data / "06_models/calibrated_model.keras"),
                                    compile=False)
    manifest = pd.read_csv(latest_model_file(data / "02_intermediate/manifest.csv"), dtype=str,
                           keep_default_na=False)
    report = latest_json(data / "08_reporting/calibration_report.json")
    settings = read_preprocessing(latest_model_file(data / "06_models/preprocessing.json"))
    threshold, statistics = settings["min_confidence"], settings["ood"]
    if statistics is None:
        raise SystemExit("The run stored no ood_score statistics with its model.")
    classifier = Classifier(model, tuple(manifests.class_names(manifest)),
                            settings["image_size"], settings["resize"], ood=statistics)
    seen_f, seen_y = features(model, manifest, "test")
    seen_shipped = shipped_scores(classifier, manifest)
    with tempfile.TemporaryDirectory(prefix="headswap-unseen-") as tmp:
        unseen = unseen_manifest(Path(tmp), unseen_per_class, seed)
        unseen_f, _ = features(model, unseen, "test")
        unseen_shipped = shipped_scores(classifier, unseen)
    seen_logits, unseen_logits = (calibration.logits_of(model, f) for f in (seen_f, unseen_f))
    seen_p, unseen_p = calibration.tempered(seen_logits), calibration.tempered(unseen_logits)
    t = 0.0 if threshold is None else threshold
    seen_scores = scores(model, seen_f, seen_shipped)
    unseen_scores = scores(model, unseen_f, unseen_shipped)
    reference = statistics.threshold
    truth = np.r_[np.zeros(len(seen_logits)), np.ones(len(unseen_logits))]
    return {
        "images": {"seen_test": len(seen_logits), "unseen": len(unseen_logits),
                   "seen_classes": sorted(set(manifest["label"])),
                   "unseen_classes": sorted(set(unseen["label"]))},
        "min_confidence": threshold,
        "target_precision": report["min_confidence"]["target_precision"],
        "unknown_share": {"seen_test": float((seen_p.max(axis=1) < t).mean()),
                          "unseen": float((unseen_p.max(axis=1) < t).mean())},
        "seen_test_accuracy": float((seen_p.argmax(axis=1) == seen_y).mean()),
        "seen_test_precision_answered": calibration.coverage_and_precision(
            seen_p, seen_y, threshold)[1],
        "ood_threshold": reference,
        "above_ood_threshold": {"seen_test": float((seen_shipped > reference).mean()),
                                "unseen": float((unseen_shipped > reference).mean())},
        "auroc": {name: float(roc_auc_score(truth, np.r_[seen_scores[name],
                                                         unseen_scores[name]]))
                  for name in seen_scores},
        "fpr_at_95_tpr": {name: fpr_at_95_tpr(seen_scores[name], unseen_scores[name])
                          for name in seen_scores},
        "calibration": {"method": report["method"], "temperature": report["temperature"],
                        "bins": report["bins"],
                        "test_ece_before": report["test"]["ece_before"],
                        "test_ece": report["test"]["ece"],
                        "val_ece_before": report["validation"]["ece_before"],
                        "val_ece": report["validation"]["ece"],
                        "val_images": report["validation"]["images"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="example",
                        help="the environment the example runs in (test: small, example: full)")
    parser.add_argument("--project", type=Path,
                        help="a project where the example already ran (default: run it in a "
                             "throw-away copy)")
    parser.add_argument("--unseen-per-class", type=int, default=1000,
                        help="unseen-class test images per class (1000: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    load_before = load()
    run_s = None
    if args.project:
        figures = measure(args.project.resolve(), args.unseen_per_class, args.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="headswap-bench-") as tmp:
            project = copy_of_project(Path(tmp))
            run_s = run_example(project, args.env)
            figures = measure(project, args.unseen_per_class, args.seed)
    figures = {"env": None if args.project else args.env, **figures,
               "example_run_s": None if run_s is None else round(run_s, 1)}
    print(table(["images", "labelled unknown"],
                [[f"seen (test split, {figures['images']['seen_test']})",
                  figures["unknown_share"]["seen_test"]],
                 [f"unseen classes ({figures['images']['unseen']})",
                  figures["unknown_share"]["unseen"]]]))
    print(f"min_confidence {figures['min_confidence']} (target precision "
          f"{figures['target_precision']} on validation)")
    print(table(["score", "AUROC", "FPR at 95% TPR"],
                [[name, figures["auroc"][name], figures["fpr_at_95_tpr"][name]]
                 for name in figures["auroc"]]))
    above = figures["above_ood_threshold"]
    print(f"ood_threshold {figures['ood_threshold']:.4g} (validation 95% quantile): above it "
          f"{above['seen_test']:.1%} of the seen test images, {above['unseen']:.1%} of the "
          "unseen")
    cal = figures["calibration"]
    print(f"temperature {cal['temperature']:.4g}; test ECE {cal['test_ece_before']:.4f} -> "
          f"{cal['test_ece']:.4f}, validation ECE {cal['val_ece_before']:.4f} -> "
          f"{cal['val_ece']:.4f} ({cal['bins']} bins)")
    write_result("unknown_images", figures, libraries=["scipy", "pillow"],
                 load_before=load_before)


if __name__ == "__main__":
    main()
