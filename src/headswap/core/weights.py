"""Loading weights into a model by layer name and shape, with a report of what was loaded.

Keras 3 ``load_weights`` matches ``.keras`` and ``.weights.h5`` files to a model by structure
(the n-th Dense layer gets the n-th Dense layer's weights), whatever the layers are called, so
a new head can silently receive an old head's weights. Here each weighted layer of the file is
matched to the model's layer of the same name and loaded only when every weight has the same
shape; everything else is left as it is and reported.

Names that Keras made up (``conv2d_3``, ``batch_normalization``) change with every process
that builds a model, so they identify nothing: such layers are paired in order among the
automatically named layers of the same kind (the n-th ``conv2d*`` of the file with the n-th
``conv2d*`` of the model), again only when the shapes agree.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import keras
import numpy as np

from headswap.core.bases import PREPROCESS_PREFIX, BaseLoadError, load_model_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerWeights:
    """The weights of one layer of a file: the layer's name and its arrays, in its own order."""

    name: str
    arrays: list[np.ndarray]

    @property
    def params(self) -> int:
        """Number of values in the arrays."""
        return int(sum(a.size for a in self.arrays))

    @property
    def shapes(self) -> list[list[int]]:
        """Shape of each array."""
        return [list(a.shape) for a in self.arrays]


def weighted_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of ``model`` that hold weights, looking inside nested models, in order.

    The fixed preprocessing layers this project puts in front of a base are left out.
    """
    found: list[keras.layers.Layer] = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(weighted_layers(layer))
        elif layer.weights and not layer.name.startswith(f"{PREPROCESS_PREFIX}_"):
            found.append(layer)
    return found


def read_layer_weights(path: str | Path, allow_unsafe: bool = False) -> list[LayerWeights]:
    """The weighted layers of a ``.keras``, ``.weights.h5`` or legacy ``.h5`` file, by name.

    A ``.keras`` model is loaded in Keras safe mode (``allow_unsafe`` lifts it); the ``.h5``
    formats are only read, so no code in them runs.
    """
    path = Path(path)
    if not path.is_file():
        raise BaseLoadError(
            f"No weights file at {path}. Give `weights_file` as an existing .keras, "
            ".weights.h5 or .h5 file."
        )
    name = path.name.lower()
    if name.endswith(".keras"):
        model = load_model_file(path, allow_unsafe)
        layers = [
            LayerWeights(layer.name, [np.asarray(w) for w in layer.get_weights()])
            for layer in weighted_layers(model)
        ]
    elif name.endswith(".weights.h5"):
        layers = _read_weights_h5(path)
    elif name.endswith((".h5", ".hdf5")):
        layers = _read_legacy_h5(path)
    else:
        raise BaseLoadError(
            f"`weights_file`={str(path)!r}: unknown format. Give a .keras model, a "
            ".weights.h5 file (model.save_weights) or a legacy .h5 model or weights file."
        )
    return [layer for layer in layers if not layer.name.startswith(f"{PREPROCESS_PREFIX}_")]


def _read_weights_h5(path: Path) -> list[LayerWeights]:
    """Layers of a Keras 3 ``.weights.h5`` file: each ``layers/.../vars`` group is one layer."""
    found: list[tuple[list[Any], LayerWeights]] = []
    unnamed: list[str] = []

    def visit(key: str, item: Any) -> None:
        if not (isinstance(item, h5py.Group) and key.startswith("layers/")
                and key.endswith("/vars") and len(item)):
            return
        if "name" not in item.attrs:
            unnamed.append(key)
            return
        arrays = [np.asarray(item[k][()]) for k in sorted(item, key=int)]
        found.append((_natural_key(key), LayerWeights(_text(item.attrs["name"]), arrays)))

    with h5py.File(path, "r") as file:
        file.visititems(visit)
    if unnamed:
        raise BaseLoadError(
            f"{path} does not record layer names (it was written by an older Keras), so its "
            "layers can only be matched by position, which may put weights into the wrong "
            "layers. Give the .keras file of the model it was saved from instead."
        )
    return [layer for _, layer in sorted(found, key=lambda item: item[0])]


def _read_legacy_h5(path: Path) -> list[LayerWeights]:
    """Layers of a legacy ``.h5`` model or weights file (the format ``keras.applications``
    downloads); a nested model's group is split into its layers by the weight names."""
    found: list[LayerWeights] = []
    with h5py.File(path, "r") as file:
        group = file.get("model_weights", file)
        layer_names = _attribute(group, "layer_names")
        if not layer_names:
            raise BaseLoadError(
                f"{path} is not a Keras model or weights file (it lists no layers)."
            )
        for layer_name in layer_names:
            layer_group = group[layer_name]
            owners: dict[str, list[np.ndarray]] = {}
            for weight in _attribute(layer_group, "weight_names"):
                parts = weight.split("/")
                own = weight.startswith(f"{layer_name}/") and len(parts) == 2
                owner = layer_name if own or len(parts) < 2 else parts[-2]
                owners.setdefault(owner, []).append(np.asarray(layer_group[weight][()]))
            found.extend(LayerWeights(owner, arrays) for owner, arrays in owners.items())
    return found


def _attribute(group: h5py.Group, name: str) -> list[str]:
    """A list-of-strings HDF5 attribute, also when h5py split it into ``name0``, ``name1``..."""
    if name in group.attrs:
        return [_text(value) for value in group.attrs[name]]
    values: list[str] = []
    chunk = 0
    while f"{name}{chunk}" in group.attrs:
        values.extend(_text(value) for value in group.attrs[f"{name}{chunk}"])
        chunk += 1
    return values


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _snake_case(name: str) -> str:
    """The default layer name Keras derives from a class name (``Conv2D`` -> ``conv2d``)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _auto_kind(layer: keras.layers.Layer) -> str | None:
    """``conv2d`` for a Conv2D layer Keras named ``conv2d`` or ``conv2d_<n>``; else None."""
    kind = _snake_case(type(layer).__name__)
    return kind if re.fullmatch(rf"{re.escape(kind)}(_\d+)?", layer.name) else None


def _unique(names: list[str], where: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise BaseLoadError(
                f"Two layers are named {name!r} in {where}, so weights cannot be matched by "
                "layer name. Rename one of them."
            )
        seen.add(name)


def pair_layers(
    layers: list[keras.layers.Layer], entries: list[LayerWeights]
) -> tuple[list[tuple[keras.layers.Layer, LayerWeights]], list[keras.layers.Layer],
           list[LayerWeights]]:
    """Pair model layers with file layers: (pairs, model layers left, file layers left).

    Layers with chosen names pair by equal name; automatically named ones in order within
    their kind (see the module docstring). Shapes are not looked at here.
    """
    kinds = {id(layer): _auto_kind(layer) for layer in layers}
    auto_kinds = sorted({kind for kind in kinds.values() if kind})

    def entry_kind(entry: LayerWeights) -> str | None:
        stem = re.sub(r"_\d+$", "", entry.name)
        return stem if stem in auto_kinds else None

    named = {e.name: e for e in entries if entry_kind(e) is None}
    _unique([e.name for e in entries if entry_kind(e) is None], "the weights file")
    _unique([layer.name for layer in layers if kinds[id(layer)] is None], "the model")
    pairs: list[tuple[keras.layers.Layer, LayerWeights]] = []
    for layer in layers:
        if kinds[id(layer)] is None and layer.name in named:
            pairs.append((layer, named[layer.name]))
    for kind in auto_kinds:
        own = [layer for layer in layers if kinds[id(layer)] == kind]
        theirs = [e for e in entries if entry_kind(e) == kind]
        pairs.extend(zip(own, theirs, strict=False))
    paired_layers = {id(layer) for layer, _ in pairs}
    paired_entries = {id(entry) for _, entry in pairs}
    order = {id(layer): i for i, layer in enumerate(layers)}
    pairs.sort(key=lambda pair: order[id(pair[0])])
    return (
        pairs,
        [layer for layer in layers if id(layer) not in paired_layers],
        [entry for entry in entries if id(entry) not in paired_entries],
    )


def load_weights_by_name(
    model: keras.Model, path: str | Path, allow_unsafe: bool = False
) -> dict[str, Any]:
    """Load the weights of the file at ``path`` into ``model`` by layer name and shape.

    Only layers whose every weight has the same shape are loaded; the rest of the model keeps
    its weights. Returns the report: ``matched``, ``missing`` (in the model, not in the file),
    ``unexpected`` (in the file, not in the model: skipped) and ``shape_mismatched`` layers
    with their parameter counts, and the totals under ``params``. Raises
    :class:`~headswap.core.bases.BaseLoadError` when no layer matches at all.
    """
    layers = weighted_layers(model)
    entries = read_layer_weights(path, allow_unsafe)
    pairs, missing, unexpected = pair_layers(layers, entries)
    matched: list[dict[str, Any]] = []
    mismatched: list[dict[str, Any]] = []
    for layer, entry in pairs:
        shapes = [list(w.shape) for w in layer.weights]
        if shapes == entry.shapes:
            layer.set_weights(entry.arrays)
            matched.append({"layer": layer.name, "file_layer": entry.name,
                            "params": _params(layer)})
        else:
            mismatched.append({"layer": layer.name, "file_layer": entry.name,
                               "params": _params(layer), "file_params": entry.params,
                               "shapes": shapes, "file_shapes": entry.shapes})
    report = {
        "weights_file": str(path),
        "matched": matched,
        "missing": [{"layer": layer.name, "params": _params(layer)} for layer in missing],
        "unexpected": [{"layer": e.name, "params": e.params} for e in unexpected],
        "shape_mismatched": mismatched,
    }
    report["params"] = {
        key: sum(item["params"] for item in report[key])
        for key in ("matched", "missing", "unexpected", "shape_mismatched")
    }
    if not matched:
        raise BaseLoadError(
            f"No layer of {path} matches a layer of {model.name} by name and weight shapes, so "
            "nothing was loaded. Is it a file of this model? " + summarise(report)
        )
    return report


def _params(layer: keras.layers.Layer) -> int:
    return int(sum(int(np.prod(w.shape)) for w in layer.weights))


def summarise(report: dict[str, Any], limit: int = 5) -> str:
    """One paragraph for the log: what a :func:`load_weights_by_name` report says."""

    def names(items: list[dict[str, Any]]) -> str:
        shown = [item["layer"] for item in items[:limit]]
        return ", ".join(shown) + (f" and {len(items) - limit} more" if len(items) > limit else "")

    def count(items: list[dict[str, Any]]) -> str:
        return f"{len(items)} layer" + ("" if len(items) == 1 else "s")

    params = report["params"]
    parts = [
        (f"Weights from {report['weights_file']}, matched by layer name and shape: "
         f"{count(report['matched'])} loaded ({params['matched']:,} parameters)")
    ]
    if report["missing"]:
        parts.append(
            f"{count(report['missing'])} of the model not in the file, kept as they were "
            f"({params['missing']:,} parameters): {names(report['missing'])}"
        )
    if report["unexpected"]:
        parts.append(
            f"{count(report['unexpected'])} of the file not in the model, skipped "
            f"({params['unexpected']:,} parameters): {names(report['unexpected'])}"
        )
    for item in report["shape_mismatched"][:limit]:
        parts.append(
            f"shape mismatch, not loaded: {item['layer']} {item['shapes']} in the model, "
            f"{item['file_layer']} {item['file_shapes']} in the file"
        )
    if len(report["shape_mismatched"]) > limit:
        parts.append(f"{len(report['shape_mismatched']) - limit} more shape mismatches")
    return "; ".join(parts) + "."
