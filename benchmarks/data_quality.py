"""Recall and false alarms of the data-quality checks (headswap.core.quality) on injected faults.

A clean folder of real images is written: ``--per-class`` Fashion-MNIST training images of
each of the five target classes (5-9: Sandal, Shirt, Sneaker, Bag, Ankle boot), upscaled to
``--size`` pixels RGB PNG, and split by ``headswap.core.manifests.ingest_image_folder``. The
"base" is a small CNN (``headswap.project.example.compact_cnn``) trained for a few epochs on the
other five classes (0-4), with other images; its pooled features feed the label-issue check.

The checks run on the clean folder (false alarms: what they find there), then on a copy laid
out as ``train/ val/ test/`` with faults injected, ``--each`` of every duplicate kind, from
distinct source images:

* exact copies: within the class, into another class (conflicting labels), into a later
  split (a training image copied into val/test: leakage);
* near-duplicates: the same, re-encoded as JPEG quality 70-85 and resized by 5-10% up or down;
* label noise: ``--noise`` of the original images moved into another class's folder;
* three unreadable files (empty, truncated, not an image), which ingest lists as skipped.

Recall of each injected kind: exact and near pairs found as such; conflicting-label and
across-split pairs found with that scope; moved images among the top-k label issues (k = the
number moved), and all wrongly labelled images (the moved ones and the copies put under
another label) among the top-k (k = their number). False alarms: the duplicates found in the
clean folder, and those found in the injected one that no injection explains. The
near-duplicate threshold is swept. Then the time of the duplicate check on a folder of
``--speed-images`` 28x28 PNGs (Fashion-MNIST, all ten classes, three times), its findings
there (with the pixels' difference and correlation of each pair, to judge them), and the
recall of near-duplicates injected into it. Prints the figures; writes
benchmarks/results/data_quality.json.

    python benchmarks/data_quality.py [--per-class 200] [--size 64] [--each 15] [--noise 0.03]
        [--speed-images 5000] [--base-epochs 3] [--seed 0] [--figure PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd
from common import write_result
from PIL import Image

from headswap.core import fingerprints, quality
from headswap.core.manifests import ingest_image_folder
from headswap.project.example import CLASS_NAMES, find_fashion_mnist, load_split

ROOT = Path(__file__).resolve().parents[1]
SOURCE_CLASSES, TARGET_CLASSES = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
SWEEP = (4.0, 8.0, 12.0, 16.0, 20.0, 24.0, 32.0)
FEATURE_SIDE = 28  # the base's input size


def png(pixels: np.ndarray, size: int) -> bytes:
    """A 28x28 grey image as PNG bytes: ``size`` pixels a side RGB (bicubic), or as it is."""
    image = Image.fromarray(pixels)
    if size != pixels.shape[0]:
        image = image.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def reencoded(raw: bytes, rng: np.random.Generator) -> bytes:
    """``raw`` resized by 5-10% (up or down) and saved as JPEG quality 70-85."""
    image = Image.open(io.BytesIO(raw)).convert("RGB")
    factor = 1 + rng.choice([-1, 1]) * rng.uniform(0.05, 0.10)
    side = max(8, round(image.width * factor))
    buffer = io.BytesIO()
    image.resize((side, side), Image.Resampling.BICUBIC).save(
        buffer, format="JPEG", quality=int(rng.integers(70, 86)))
    return buffer.getvalue()


def train_base(images: np.ndarray, labels: np.ndarray, epochs: int, seed: int) -> Any:
    """A compact CNN trained briefly on the source classes; returns its pooled-feature model."""
    import keras

    from headswap.project.example import pretrain_compact_cnn

    model, history = pretrain_compact_cnn(images, labels, filters=(32, 64, 128), epochs=epochs,
                                          batch_size=128, learning_rate=3e-3, val_fraction=0.1,
                                          seed=seed)
    print(f"base: source-task val accuracy {history['val_accuracy'][-1]:.3f}", flush=True)
    return keras.Model(model.input, model.get_layer("avg_pool").output)


def features(extractor: Any, paths: list[str]) -> np.ndarray:
    """The base's pooled features of each image (grey, resized to the base's input size)."""
    side = (FEATURE_SIDE, FEATURE_SIDE)
    pixels = np.stack([np.asarray(Image.open(p).convert("L").resize(side, Image.Resampling.BOX),
                                  dtype="float32") for p in paths])
    return extractor.predict(pixels[..., None], batch_size=256, verbose=0)


def duplicate_counts(found: pd.DataFrame) -> dict[str, int]:
    return {f"{kind}/{scope}": int(((found["kind"] == kind) & (found["scope"] == scope)).sum())
            for kind in ("exact", "near") for scope in quality.SCOPES}


def inject(manifest: pd.DataFrame, root: Path, each: int, noise: float,
           rng: np.random.Generator) -> tuple[list[dict[str, Any]], list[str]]:
    """Copy the clean folder to ``root/<split>/<class>/`` with faults; the injected pairs and
    the paths of the moved (mislabelled) images."""
    labels = sorted(manifest["label"].unique())
    later = {"train": ("val", "test"), "val": ("test",)}

    def target(row: pd.Series, scope: str) -> tuple[str, str]:
        if scope == "conflicting_labels":
            return row.split, str(rng.choice([n for n in labels if n != row.label]))
        if scope == "across_splits":
            return str(rng.choice(later[row.split])), row.label
        return row.split, row.label

    order = rng.permutation(len(manifest))
    kinds = [(k, s) for k in ("exact", "near") for s in quality.SCOPES]
    moved_count = round(noise * len(manifest))
    leak_sources = [i for i in order if manifest.split.iat[i] != "test"]
    used: set[int] = set()
    plan = []
    for kind, scope in kinds:
        pool = leak_sources if scope == "across_splits" else order
        chosen = [i for i in pool if i not in used][:each]
        used.update(chosen)
        plan += [(kind, scope, i) for i in chosen]
    moved = [i for i in order if i not in used][:moved_count]
    new_path = {}
    for i, row in enumerate(manifest.itertuples()):
        split, label = row.split, row.label
        if i in moved:
            label = str(rng.choice([n for n in labels if n != row.label]))
        path = root / split / label / Path(row.path).name
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(row.path, path)
        new_path[i] = str(path)
    pairs = []
    for n, (kind, scope, i) in enumerate(plan):
        row = manifest.iloc[i]
        split, label = target(row, scope)
        raw = Path(row.path).read_bytes()
        name = f"copy{n:03d}_{Path(row.path).stem}" + (".png" if kind == "exact" else ".jpg")
        path = root / split / label / name
        path.write_bytes(raw if kind == "exact" else reencoded(raw, rng))
        pairs.append({"kind": kind, "scope": scope, "source": new_path[i], "copy": str(path),
                      "labels_differ": label != row.label, "splits_differ": split != row.split})
    broken = root / "train" / labels[0]
    (broken / "empty.png").write_bytes(b"")
    (broken / "truncated.png").write_bytes(Path(new_path[0]).read_bytes()[:100])
    (broken / "notes.jpg").write_bytes(b"not an image")
    return pairs, [new_path[i] for i in moved]


def recall(found: pd.DataFrame, pairs: list[dict[str, Any]], max_near: int) -> dict[str, Any]:
    """Of the injected pairs, the share found as the right kind / scope."""
    rows = {frozenset((a, b)): r for a, b, r in zip(found["path"], found["other_path"],
                                                    found.itertuples(), strict=True)
            if r.kind == "exact" or r.distance <= max_near}

    def share(selected: list[dict[str, Any]], ok: Any) -> dict[str, Any]:
        hits = sum(1 for p in selected if (r := rows.get(frozenset((p["source"], p["copy"]))))
                   is not None and ok(r))
        return {"injected": len(selected), "found": hits,
                "recall": round(hits / len(selected), 4) if selected else None}

    return {
        "exact": share([p for p in pairs if p["kind"] == "exact"], lambda r: r.kind == "exact"),
        "near": share([p for p in pairs if p["kind"] == "near"], lambda r: r.kind == "near"),
        "conflicting_labels": share([p for p in pairs if p["labels_differ"]],
                                    lambda r: r.scope == "conflicting_labels"),
        "across_splits": share([p for p in pairs if p["splits_differ"]],
                               lambda r: r.split != r.other_split),
    }


def unexplained(found: pd.DataFrame, pairs: list[dict[str, Any]], max_near: int) -> int:
    """Duplicate rows (within ``max_near``) that no injected pair accounts for."""
    injected = {frozenset((p["source"], p["copy"])) for p in pairs}
    kept = found[(found["kind"] == "exact") | (found["distance"] <= max_near)]
    return sum(frozenset((a, b)) not in injected
               for a, b in zip(kept["path"], kept["other_path"], strict=True))


def top_k(issues: pd.DataFrame, wrong: list[str], also_wrong: list[str]) -> dict[str, Any]:
    """How many of the ``wrong``-labelled images are among the top k = len(wrong) label
    issues, and what else is there (``also_wrong``: other images with a wrong label)."""
    top = set(issues["path"].head(len(wrong)))
    return {"injected": len(wrong), "found_in_top_k": len(top & set(wrong)),
            "recall_at_k": round(len(top & set(wrong)) / max(len(wrong), 1), 4),
            "top_k_also_wrong_labels": len(top & set(also_wrong)),
            "flagged_anywhere": int(issues["path"].isin(wrong).sum()),
            "candidates": len(issues)}


def probe_accuracy(feats: np.ndarray, labels: pd.Series, seed: int) -> float:
    """Out-of-fold accuracy of the label-issue check's classifier on the clean labels: how
    well the base's features separate the classes (its errors compete with the label noise)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    return round(float(cross_val_score(quality.probe(), feats, labels, cv=cv).mean()), 4)


def pixel_difference(a: str, b: str) -> dict[str, float]:
    """Mean absolute difference (0-255) and correlation of two images' grey pixels."""
    x, y = (np.asarray(Image.open(p).convert("L"), dtype=float).ravel() for p in (a, b))
    return {"pixel_mean_abs_diff": round(float(np.abs(x - y).mean()), 2),
            "pixel_correlation": round(float(np.corrcoef(x, y)[0, 1]), 4)}


def timed(function: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--each", type=int, default=15, help="injected pairs of each kind")
    parser.add_argument("--noise", type=float, default=0.03, help="share of images moved")
    parser.add_argument("--speed-images", type=int, default=5000)
    parser.add_argument("--base-epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", type=Path, help="save the quality figure (PNG) here")
    args = parser.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]
    rng = np.random.default_rng(args.seed)
    fmnist = find_fashion_mnist(["/usr/share/datasets/fashion-mnist",
                                 str(ROOT / "data" / "01_raw" / "fashion-mnist")])
    images, labels = load_split(fmnist, "train")
    source = np.flatnonzero(np.isin(labels, SOURCE_CLASSES))
    source = np.sort(rng.choice(source, 12000, replace=False))
    extractor, base_s = timed(train_base, images[source], labels[source], args.base_epochs,
                              args.seed)
    chosen = np.concatenate([rng.choice(np.flatnonzero(labels == c), args.per_class,
                                        replace=False) for c in TARGET_CLASSES])
    near = fingerprints.NEAR_DISTANCE
    with tempfile.TemporaryDirectory(prefix="headswap-quality-") as tmp:
        clean = Path(tmp) / "clean"
        for i in chosen:
            path = clean / CLASS_NAMES[labels[i]] / f"fm_{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png(images[i], args.size))
        manifest, _ = ingest_image_folder(clean, 0.2, 0.2, args.seed)
        clean_dups = quality.find_duplicates(manifest, near_distance=max(SWEEP))
        clean_features = features(extractor, manifest["path"].tolist())
        clean_issues = quality.find_label_issues(manifest, clean_features, args.seed)
        probe = probe_accuracy(clean_features, manifest["label"], args.seed)

        pairs, moved = inject(manifest, Path(tmp) / "injected", args.each, args.noise, rng)
        dirty, skipped = ingest_image_folder(Path(tmp) / "injected", 0.2, 0.2, args.seed)
        found, dup_s = timed(quality.find_duplicates, dirty, near_distance=max(SWEEP))
        feats, feat_s = timed(features, extractor, dirty["path"].tolist())
        issues, issue_s = timed(quality.find_label_issues, dirty, feats, args.seed)
        default = found[(found["kind"] == "exact") | (found["distance"] <= near)]
        table, summary = quality.class_balance(dirty)
        report = quality.quality_report(dirty, skipped, default, issues, summary)
        findings = quality.findings_table(skipped, default, issues)
        if args.figure:
            quality.quality_figure(table, report).savefig(args.figure, dpi=100)
        copies = [p["copy"] for p in pairs if p["labels_differ"]]  # a wrong label too
        wrong_class = top_k(issues, moved, copies)
        wrong_label = top_k(issues, moved + copies, [])

        speed = Path(tmp) / "speed"
        per = args.speed_images // 10
        for c in range(10):
            for i in rng.choice(np.flatnonzero(labels == c), per, replace=False):
                path = speed / CLASS_NAMES[c] / f"fm_{i:05d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(png(images[i], 28))
        speed_manifest, _ = ingest_image_folder(speed, 0.2, 0.2, args.seed)
        runs = [timed(quality.find_duplicates, speed_manifest, near_distance=max(SWEEP))
                for _ in range(3)]
        speed_dups = runs[-1][0]
        speed_pairs, speed_rows = [], []
        for n, i in enumerate(rng.choice(len(speed_manifest), args.each * 4, replace=False)):
            row = speed_manifest.iloc[i]
            copy = Path(row.path).with_name(f"near{n:03d}.jpg")
            copy.write_bytes(reencoded(Path(row.path).read_bytes(), rng))
            speed_rows.append((str(copy), row.label, row.split))
            speed_pairs.append({"kind": "near", "scope": "within_class", "source": row.path,
                                "copy": str(copy), "labels_differ": False,
                                "splits_differ": False})
        speed_injected = pd.concat([speed_manifest, pd.DataFrame(
            speed_rows, columns=["path", "label", "split"])], ignore_index=True)
        speed_found = quality.find_duplicates(speed_injected, near_distance=max(SWEEP))
        speed_near = [{"path": Path(r.path).name, "other_path": Path(r.other_path).name,
                       "labels": [r.label, r.other_label], "distance": float(r.distance),
                       **pixel_difference(r.path, r.other_path)}
                      for r in speed_dups[speed_dups["distance"] <= near].itertuples()]

    def sweep_row(t: int) -> dict[str, Any]:
        kept = found[(found["kind"] == "exact") | (found["distance"] <= t)]
        return {"near_distance": t,
                "near_recall": recall(kept, pairs, t)["near"]["recall"],
                "clean_false_alarms": int((clean_dups["distance"] <= t).sum()),
                "near_recall_28px": recall(speed_found, speed_pairs, t)["near"]["recall"],
                "false_alarms_28px": int((speed_dups["distance"] <= t).sum()),
                "injected_folder_unexplained": unexplained(found, pairs, t)}

    results = {
        "folder": {"images": len(manifest), "classes": [CLASS_NAMES[c] for c in TARGET_CLASSES],
                   "size": args.size, "splits": manifest["split"].value_counts().to_dict()},
        "injected": {"pairs_per_kind_and_scope": args.each, "moved_images": len(moved),
                     "unreadable_files": 3, "images_after": len(dirty)},
        "near_distance_default": near,
        "hash_bits": fingerprints.HASH_BITS,
        "recall": {**recall(found, pairs, near), "wrong_class_top_k": wrong_class,
                   "wrong_label_top_k": wrong_label},
        "label_check_probe_accuracy_clean": probe,
        "false_alarms_clean": {"duplicates": duplicate_counts(
            clean_dups[clean_dups["distance"] <= near]), "label_issue_candidates": len(
            clean_issues)},
        "injected_folder_unexplained_duplicates": unexplained(found, pairs, near),
        "sweep": [sweep_row(t) for t in SWEEP],
        "report": report,
        "findings_rows": len(findings),
        "seconds": {"base_training": round(base_s, 2),
                    "find_duplicates": round(dup_s, 3), "features": round(feat_s, 3),
                    "find_label_issues": round(issue_s, 3), "images": len(dirty)},
        "speed": {"images": len(speed_manifest), "size": 28,
                  "find_duplicates_seconds": [round(s, 3) for _, s in runs],
                  "median_seconds": round(statistics.median(s for _, s in runs), 3),
                  "false_alarms": duplicate_counts(
                      speed_dups[speed_dups["distance"] <= near]),
                  "near_pairs": speed_near},
    }
    print(json.dumps({k: results[k] for k in ("recall", "label_check_probe_accuracy_clean",
                                              "false_alarms_clean",
                                              "injected_folder_unexplained_duplicates",
                                              "seconds", "speed")}, indent=2))
    print(pd.DataFrame(results["sweep"]).to_string(index=False))
    print("problems:", *report["problems"], sep="\n  ")
    speed = results["speed"]
    write_result("data_quality", {
        **{k: v for k, v in results.items() if k not in ("report", "speed")},
        "speed": {k: v for k, v in speed.items()
                  if k not in ("find_duplicates_seconds", "near_pairs")},
    }, details={"report": results["report"],
                "speed": {k: speed[k] for k in ("find_duplicates_seconds", "near_pairs")}},
        libraries=["pandas", "scipy", "pillow", "matplotlib"], load_before=load_before)


if __name__ == "__main__":
    main()
