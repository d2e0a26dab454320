"""Data quality of an image manifest before training: duplicates, label issues, class balance.

* :func:`find_duplicates`: exact duplicates (the same bytes, by SHA-256) and near-duplicates
  (the same picture re-encoded, resized or recompressed: 256-bit DCT perceptual hashes that
  differ in few of their reliable bits, :mod:`headswap.core.fingerprints`), each pair
  classified as within a class, across classes (``conflicting_labels``) or across splits
  (``across_splits``: leakage that inflates the test score).
* :func:`find_label_issues`: images whose given label disagrees with confident out-of-fold
  predictions of a linear classifier (:func:`probe`) on the caller's features (e.g. a base's
  frozen pooled features), found and ranked as in confident learning (Northcutt et al., 2021).
* :func:`class_balance`: images per class and split, the imbalance ratio and the class
  weights ``class_weight: balanced`` would use (:func:`headswap.core.train.class_weights`).
* :func:`quality_report`, :func:`findings_table`, :func:`quality_figure`: a JSON-able
  summary (with the ``problems`` that should stop a run), one table of all findings, and a
  figure of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from headswap.core.errors import InputError
from headswap.core.fingerprints import NEAR_DISTANCE, close_pairs, fingerprints
from headswap.core.sources import SKIPPED_COLUMNS, SPLITS
from headswap.core.train import class_weights

logger = logging.getLogger(__name__)


DUPLICATE_COLUMNS = ["kind", "scope", "path", "other_path", "label", "other_label", "split",
                     "other_split", "distance", "group"]
LABEL_ISSUE_COLUMNS = ["path", "label", "suggested", "confidence", "score", "split"]
FINDING_COLUMNS = ["finding", "scope", "severity", "path", "label", "split", "other_path",
                   "other_label", "other_split", "value", "detail"]
SCOPES = ("conflicting_labels", "across_splits", "within_class")


def _exact_pairs(digests: list[str | None], order: list[int], table: pd.DataFrame
                 ) -> tuple[list[tuple[int, int]], list[int]]:
    """Pairs of identical files and one representative row per distinct content.

    Within a group of identical files, each (label, split) is represented by its first file:
    every other file is paired with it, and the representatives with each other; so a group
    of k copies gives fewer than k + (label, split combinations)^2 / 2 rows, and every
    conflict and leak in it is shown."""
    groups: dict[str, list[int]] = {}
    for i in order:
        if digests[i] is not None:
            groups.setdefault(digests[i], []).append(i)
    pairs, representatives = [], []
    for members in groups.values():
        representatives.append(members[0])
        heads: dict[tuple[str, str], int] = {}
        for i in members:
            key = (table["label"].iat[i], table["split"].iat[i])
            if key in heads:
                pairs.append((heads[key], i))
            else:
                pairs.extend((h, i) for h in heads.values())
                heads[key] = i
    return pairs, representatives


def find_duplicates(
    manifest: pd.DataFrame,
    read: Callable[[str], bytes] | None = None,
    near_distance: float = NEAR_DISTANCE,
) -> pd.DataFrame:
    """Exact and near-duplicate pairs among the images of ``manifest`` (path, label, split).

    Each file is read with ``read`` (default: a local path's bytes; pass e.g. an fsspec
    reader for remote files). ``exact``: the same bytes. ``near``: different bytes
    whose perceptual hashes (:func:`perceptual_hash`) lie within ``near_distance``
    (:func:`close_pairs`; a negative value turns the near check off); one file of each
    exact group takes part.

    One row per pair (:data:`DUPLICATE_COLUMNS`): ``kind`` (exact | near), ``scope``
    (``conflicting_labels`` if the labels differ, else ``across_splits`` if the splits
    differ, else ``within_class``), the two images (``path`` is the one in the earlier
    split: train, val, test), the hash ``distance`` (0 for exact) and ``group``, the
    connected set of duplicates the pair belongs to. Problems first: conflicts, then leaks.
    Files that cannot be read or decoded are logged and left out.
    """
    table = manifest[["path", "label", "split"]].astype(str).reset_index(drop=True)
    rank = table["split"].map({s: i for i, s in enumerate(SPLITS)}).fillna(len(SPLITS))
    order = np.lexsort((table["path"], table["label"], rank)).tolist()
    digests, hashes = fingerprints(table["path"].tolist(), read)
    pairs, representatives = _exact_pairs(digests, order, table)
    rows = [(i, j, "exact", 0.0) for i, j in pairs]
    candidates = [i for i in representatives if hashes[i] is not None]
    if near_distance >= 0 and len(candidates) > 1:
        values = np.frombuffer(b"".join(hashes[i] for i in candidates), dtype=np.uint8)
        values = values.reshape(len(candidates), -1)
        for a, b, distance in close_pairs(values, near_distance):
            rows.append((candidates[int(a)], candidates[int(b)], "near",
                         round(float(distance), 1)))
    position = {row: k for k, row in enumerate(order)}
    pairs = [(*sorted((i, j), key=position.__getitem__), kind, d) for i, j, kind, d in rows]
    first, second = (np.array([p[k] for p in pairs], dtype=np.int64) for k in (0, 1))
    path, label, split = (table[c].to_numpy() for c in ("path", "label", "split"))
    found = pd.DataFrame({
        "kind": [p[2] for p in pairs],
        "scope": np.where(label[first] != label[second], "conflicting_labels",
                          np.where(split[first] != split[second], "across_splits",
                                   "within_class")),
        "path": path[first], "other_path": path[second], "label": label[first],
        "other_label": label[second], "split": split[first], "other_split": split[second],
        "distance": np.array([p[3] for p in pairs], dtype=float),
        "group": _components(len(table), list(zip(first, second, strict=True)))[first],
    }, columns=DUPLICATE_COLUMNS)
    found = found.assign(_scope=found["scope"].map(SCOPES.index)).sort_values(
        ["_scope", "kind", "group", "path", "other_path"])
    found = found.drop(columns="_scope").reset_index(drop=True)
    found["group"] = pd.factorize(found["group"])[0]  # numbered 0, 1, ... as listed
    return found


def _components(size: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """The connected component of each of ``size`` nodes linked by ``pairs``."""
    edges = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(size, size))
    return connected_components(graph, directed=False)[1]


def probe() -> Pipeline:
    """The label-issue check's classifier: linear discriminant analysis on standardised
    features, its covariance shrunk as Ledoit and Wolf choose (no iterations and no setting:
    on 4,000 images of 1,280 features, 5-fold, in a quarter of a logistic regression's time;
    on benchmarks/data_quality.py's 1,090 images in a tenth, finding more of the labels
    injected wrong)."""
    return make_pipeline(StandardScaler(),
                         LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto"))


def find_label_issues(
    manifest: pd.DataFrame, features: np.ndarray, seed: int, folds: int = 5
) -> pd.DataFrame:
    """Images whose label disagrees with confident out-of-fold predictions, most suspect first.

    The :func:`probe` classifier (on ``features``: one row per manifest row, e.g. a base's
    frozen pooled features) predicts every image's class probabilities out of fold
    (stratified ``folds``-fold, seeded by ``seed``). As in confident learning (Northcutt et
    al., 2021), class j's threshold is the mean probability of j over the images labelled
    j; an image is a candidate when the most probable class among those whose threshold it
    reaches is not its label (an off-diagonal entry of the confident joint), or when
    another class is the most probable and its label's probability is below that label's
    threshold. (With well-separated features the thresholds come close to 1, and a group
    of images mislabelled alike, which props itself up across folds, falls short of them.)

    One row per candidate (:data:`LABEL_ISSUE_COLUMNS`): ``path``, ``label``, ``suggested``
    (that class), ``confidence`` (its probability), ``score`` (1 - the probability of the
    given label: self-confidence ranking) and ``split``; ranked by ``score``.
    """
    features = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    if len(features) != len(manifest):
        raise InputError(f"`features` has {len(features)} rows; the manifest has "
                         f"{len(manifest)} images: give one feature row per image, in order.")
    names, y = np.unique(manifest["label"].astype(str).to_numpy(), return_inverse=True)
    smallest = int(np.bincount(y).min()) if len(names) else 0
    if len(names) < 2 or smallest < 2:
        raise InputError("Label issues need at least two classes of two images or more.")
    cv = StratifiedKFold(n_splits=max(2, min(folds, smallest)), shuffle=True, random_state=seed)
    probs = cross_val_predict(probe(), features, y, cv=cv, method="predict_proba")
    thresholds = np.array([probs[y == j, j].mean() for j in range(len(names))])
    confident = np.where(probs >= thresholds, probs, -np.inf)
    off_diagonal = np.isfinite(confident.max(axis=1)) & (confident.argmax(axis=1) != y)
    rows, predicted = np.arange(len(y)), probs.argmax(axis=1)
    unsure = (predicted != y) & (probs[rows, y] < thresholds[y])
    issue = off_diagonal | unsure
    suggested = np.where(off_diagonal, confident.argmax(axis=1), predicted)
    found = pd.DataFrame({
        "path": manifest["path"].astype(str).to_numpy(),
        "label": names[y],
        "suggested": names[suggested],
        "confidence": probs[rows, suggested],
        "score": 1.0 - probs[rows, y],
        "split": manifest["split"].astype(str).to_numpy(),
    })[issue]
    return found.sort_values(["score", "path"], ascending=[False, True]).reset_index(drop=True)


def class_balance(manifest: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Images per class and split, and a summary of the balance.

    The table has one row per class: ``label``, a column per split, ``total`` and ``weight``,
    the class weight ``class_weight: balanced`` gives it in training
    (:func:`headswap.core.train.class_weights` on the training labels: inversely
    proportional to the training count, the mean over training images 1). The summary holds
    the counts, ``imbalance_ratio`` (the largest class's training count over the
    smallest's; None when a class has no training image), the largest and smallest class,
    the weights and the classes missing from each split.
    """
    labels, splits = manifest["label"].astype(str), manifest["split"].astype(str)
    names = sorted(labels.unique().tolist())
    counts = pd.crosstab(labels, splits).reindex(index=names, columns=list(SPLITS),
                                                 fill_value=0).astype(int)
    train = counts["train"]
    index = {name: i for i, name in enumerate(names)}
    train_labels = labels[splits == "train"].map(index).to_numpy(dtype=int)
    weights = class_weights(train_labels, names, "balanced")
    auto = class_weights(train_labels, names, "auto")
    table = counts.assign(total=counts.sum(axis=1),
                          weight=[weights[index[n]] for n in names])
    table = table.rename_axis("label").rename_axis(None, axis=1).reset_index()
    summary = {
        "images": len(manifest),
        "classes": len(names),
        "counts": {split: {n: int(c) for n, c in counts[split].items()} for split in SPLITS},
        "imbalance_ratio": float(train.max() / train.min()) if train.min() > 0 else None,
        "largest_class": str(train.idxmax()) if names else None,
        "smallest_class": str(train.idxmin()) if names else None,
        "class_weights": {n: round(weights[index[n]], 6) for n in names},
        # what `class_weight: auto` trains with: the weights above when imbalanced, else none
        "class_weight_auto": ({n: round(auto[index[n]], 6) for n in names}
                              if auto is not None else None),
        "missing": {split: [n for n in names if counts.at[n, split] == 0] for split in SPLITS},
    }
    return table, summary


def quality_report(
    manifest: pd.DataFrame,
    skipped: pd.DataFrame,
    duplicates: pd.DataFrame,
    label_issues: pd.DataFrame,
    balance: dict[str, Any] | tuple[pd.DataFrame, dict[str, Any]],
) -> dict[str, Any]:
    """A JSON-able summary of the checks: counts of each finding, and ``problems``.

    ``problems`` lists what should stop a run (when problems are to stop it): duplicates
    across splits (leakage: a validation or test image also in an earlier split) and
    duplicates with conflicting labels. ``warnings`` lists the rest worth a look: unreadable files,
    duplicates within a class, label-issue candidates, imbalance over 3 and missing classes.
    ``balance`` is :func:`class_balance`'s summary (or its whole result).
    """
    summary = balance[1] if isinstance(balance, tuple) else balance
    skipped = skipped.reindex(columns=SKIPPED_COLUMNS)
    leaks = duplicates[duplicates["split"] != duplicates["other_split"]]
    conflicts = duplicates[duplicates["label"] != duplicates["other_label"]]
    by_kind = {kind: {scope: int(((duplicates["kind"] == kind) & (duplicates["scope"] == scope)
                                  ).sum()) for scope in SCOPES} for kind in ("exact", "near")}
    duplicated = set(duplicates["path"]) | set(duplicates["other_path"])
    problems, warnings = [], []
    if len(leaks):
        leaked = set(leaks["other_path"])
        problems.append(f"{len(leaks)} duplicate pair(s) across splits: {len(leaked)} "
                        "validation/test image(s) also appear in an earlier split (leakage).")
    if len(conflicts):
        problems.append(f"{len(conflicts)} duplicate pair(s) with conflicting labels.")
    if len(skipped):
        warnings.append(f"{len(skipped)} unreadable file(s) left out.")
    within = int((duplicates["scope"] == "within_class").sum())
    if within:
        warnings.append(f"{within} duplicate pair(s) within a class (extra weight on them).")
    if len(label_issues):
        warnings.append(f"{len(label_issues)} image(s) whose label the features dispute.")
    ratio = summary.get("imbalance_ratio")
    if ratio is not None and ratio > 3:
        warnings.append(f"Class imbalance: the largest training class is {ratio:.1f}x the "
                        "smallest (class weights can compensate).")
    warnings += [f"No {split} images of class(es) {missing}."
                 for split, missing in summary.get("missing", {}).items() if missing]
    return {
        "images": len(manifest),
        "classes": int(manifest["label"].nunique()),
        "unreadable": len(skipped),
        "unreadable_reasons": {str(k): int(v) for k, v in
                               skipped["reason"].str.split(":").str[0].value_counts().items()},
        "duplicates": by_kind,
        "duplicate_pairs": len(duplicates),
        "duplicate_groups": int(duplicates["group"].nunique()),
        "duplicated_images": len(duplicated),
        "leakage_pairs": len(leaks),
        "conflicting_label_pairs": len(conflicts),
        "label_issues": len(label_issues),
        "label_issues_by_split": {str(k): int(v) for k, v in
                                  label_issues["split"].value_counts().items()},
        "imbalance_ratio": ratio,
        "class_weights": summary.get("class_weights", {}),
        "class_weight_auto": summary.get("class_weight_auto"),
        "problems": problems,
        "warnings": warnings,
    }


def findings_table(
    skipped: pd.DataFrame, duplicates: pd.DataFrame, label_issues: pd.DataFrame
) -> pd.DataFrame:
    """All findings in one table (:data:`FINDING_COLUMNS`), problems first.

    ``finding``: unreadable, exact_duplicate, near_duplicate or label_issue; ``severity``:
    problem (should stop a run: leakage, conflicting labels) or warning; ``value``: the
    hash distance of a duplicate, the score of a label issue, whose ``other_label`` is the
    suggested class."""
    duplicate = pd.DataFrame({
        "finding": duplicates["kind"].astype(str) + "_duplicate",
        "scope": duplicates["scope"],
        "severity": np.where(duplicates["scope"] == "within_class", "warning", "problem"),
        **{c: duplicates[c] for c in ("path", "label", "split", "other_path", "other_label",
                                      "other_split")},
        "value": duplicates["distance"].astype(float),
        "detail": duplicates["scope"].map({
            "conflicting_labels": "the same image under another label",
            "across_splits": "the same image in another split (leakage)",
            "within_class": "the same image twice in the class"}),
    })
    issues = pd.DataFrame({
        "finding": "label_issue", "scope": "label", "severity": "warning",
        "path": label_issues["path"], "label": label_issues["label"],
        "split": label_issues["split"], "other_label": label_issues["suggested"],
        "value": label_issues["score"],
        "detail": "the features suggest " + label_issues["suggested"].astype(str) + " (p="
                  + label_issues["confidence"].astype(float).round(2).astype(str) + ")",
    })
    skipped = skipped.reindex(columns=SKIPPED_COLUMNS)
    unreadable = pd.DataFrame({"finding": "unreadable", "scope": "file", "severity": "warning",
                               "path": skipped["path"], "detail": skipped["reason"]})
    parts = [p for p in (duplicate, issues, unreadable) if len(p)]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    table = table.reindex(columns=FINDING_COLUMNS)
    first = table["severity"].map({"problem": 0, "warning": 1})
    return table.assign(_first=first).sort_values("_first", kind="stable").drop(
        columns="_first").reset_index(drop=True)


def quality_figure(table: pd.DataFrame, report: dict[str, Any]) -> Figure:
    """Class counts per split (``table`` from :func:`class_balance`) beside the counts of
    each finding (``report`` from :func:`quality_report`), problems in red."""
    figure = Figure(figsize=(12, max(4.0, 0.3 * len(table) + 2)), layout="constrained")
    counts, findings = figure.subplots(1, 2, width_ratios=(3, 2))
    positions = np.arange(len(table))
    height = 0.8 / len(SPLITS)
    for k, split in enumerate(SPLITS):
        counts.barh(positions + (k - 1) * height, table[split], height, label=split)
    counts.set_yticks(positions, table["label"])
    counts.invert_yaxis()
    ratio = report.get("imbalance_ratio")
    counts.set_title("Images per class and split (imbalance "
                     + (f"{ratio:.1f}x)" if ratio is not None else "undefined)"))
    counts.set_xlabel("images")
    counts.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    duplicates = report["duplicates"]
    bars = [(f"{kind} dup., {scope.replace('_', ' ')}", duplicates[kind][scope],
             scope != "within_class") for kind in ("exact", "near") for scope in SCOPES]
    bars += [("label issues", report["label_issues"], False),
             ("unreadable files", report["unreadable"], False)]
    names, values, severe = zip(*bars, strict=True)
    colours = ["tab:red" if s and v else "tab:gray" for s, v in zip(severe, values, strict=True)]
    drawn = findings.barh(np.arange(len(bars)), values, color=colours)
    findings.bar_label(drawn, padding=2)
    findings.set_yticks(np.arange(len(bars)), names)
    findings.invert_yaxis()
    findings.set_xlim(0, max(max(values), 1) * 1.15)
    verdict = f"{len(report['problems'])} problem(s)" if report["problems"] else "no problems"
    findings.set_title(f"Findings: {verdict}")
    findings.set_xlabel("pairs (duplicates) or images")
    return figure
