"""Pretrained bases: a model file of the user's, cut where its features end, and the image
size a base takes. Bases with known weights (``keras.applications``, keras-hub presets) are
:mod:`headswap.core.applications`.

Every base takes raw pixels (0-255): an architecture's own preprocessing is built from
built-in layers inside the model, so saved models load in Keras safe mode and the logged MLflow
model can be fed images as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import keras

from headswap.core.errors import InputError, first_line

logger = logging.getLogger(__name__)

BASE_NAME = "base"
PREPROCESS_PREFIX = "preprocess"


class BaseLoadError(InputError):
    """A pretrained base cannot be loaded as asked."""


def load_model_file(path: str | Path, allow_unsafe: bool = False) -> keras.Model:
    """Load a ``.keras`` or ``.h5`` model in Keras safe mode, without its training config."""
    file = Path(path)
    if not file.is_file():
        raise BaseLoadError(f"No model file at {file}. Give `path` as a .keras or .h5 model file.")
    try:
        model = keras.saving.load_model(file, compile=False, safe_mode=not allow_unsafe)
    except (TypeError, ValueError, OSError) as err:
        if "safe_mode" in str(err) or "Lambda" in str(err):
            raise BaseLoadError(
                f"{file} contains a Lambda layer (arbitrary Python code), which is refused in "
                "safe mode. Rebuild the model with built-in layers, or, only if you trust the "
                "file, set `allow_unsafe`: true."
            ) from err
        raise BaseLoadError(
            f"Keras could not load the model in {file}: {first_line(err)}. It must be a "
            "model saved with model.save() as .keras (or legacy .h5); a model using custom "
            "layer classes needs them registered with "
            "@keras.saving.register_keras_serializable and importable."
        ) from err
    logger.info("Loaded %s (%s layers) from %s", model.name, len(model.layers), file)
    return model


def cut_model(model: keras.Model, cut_at: str | int = "auto") -> keras.Model:
    """The part of ``model`` up to and including the layer ``cut_at``, as a new model.

    ``cut_at`` is a layer name, an index into ``model.layers`` (negative counts from the
    end, so ``-2`` is ``layers[-2].output``), or ``auto``: the last layer with a spatial
    (4-D) output, i.e. the feature map before the old head's pooling. Layers are those of
    ``model`` itself: a nested model (a ``keras.applications`` base called as one layer, as in
    the Keras transfer-learning guide) is one layer, kept or cut off whole.
    """
    if not isinstance(model, keras.Sequential) and not _has_graph(model):
        raise BaseLoadError(
            f"{model.name} is a subclassed model ({type(model).__name__}) without a graph of "
            "layers, so it cannot be cut at a layer. Save it as a Functional or Sequential "
            "model (or its feature extractor alone) and use that file."
        )
    if isinstance(model, keras.Sequential):
        inputs, outputs = None, {id(layer): layer.output for layer in model.layers}
    else:
        inputs, outputs = _retrace(model)
    layers = [layer for layer in model.layers if id(layer) in outputs]  # not the input layers
    if cut_at == "auto":
        spatial = [layer for layer in layers if len(outputs[id(layer)].shape) == 4]
        if not spatial:
            raise BaseLoadError(
                f"{model.name} has no layer with a spatial output; set `cut_at` to "
                "the name or index of the layer to keep up to."
            )
        layer = spatial[-1]
    elif isinstance(cut_at, int) or (isinstance(cut_at, str) and cut_at.lstrip("-").isdigit()):
        index = int(cut_at)
        if not -len(model.layers) <= index < len(model.layers):
            raise BaseLoadError(
                f"`cut_at`={index} is out of range: {model.name} has {len(model.layers)} "
                "layers."
            )
        layer = model.layers[index]
        if id(layer) not in outputs:
            raise BaseLoadError(f"`cut_at`={index} is {model.name}'s input: nothing to keep.")
    else:
        names = [layer.name for layer in layers]
        if cut_at not in names:
            nested = [inner.name for inner in layers if isinstance(inner, keras.Model)
                      and cut_at in [deep.name for deep in inner.layers]]
            inside = (f" It is inside the nested model {nested[0]!r}, which is kept or cut "
                      f"off whole: to keep it, cut at {nested[0]!r}." if nested else "")
            raise BaseLoadError(
                f"`cut_at`={cut_at!r} is not a layer of {model.name}.{inside} Its layers: "
                + ", ".join(names)
            )
        layer = model.get_layer(cut_at)
    logger.info("Cutting %s at layer %r", model.name, layer.name)
    if isinstance(model, keras.Sequential):
        # Re-run the kept layers on a new input: this also frees a batch size fixed by a
        # Sequential model that was first called on one batch.
        x = inputs = keras.Input(shape=tuple(model.inputs[0].shape)[1:], name="image")
        for kept in model.layers[: model.layers.index(layer) + 1]:
            x = kept(x)
        return keras.Model(inputs, x, name=BASE_NAME)
    return keras.Model(inputs, outputs[id(layer)], name=BASE_NAME)


def _retrace(model: keras.Model) -> tuple[Any, dict[int, Any]]:
    """``model``'s graph called again on new inputs of any batch size, sharing its layers:
    the new inputs and each layer's output there (by ``id``). A nested model's own
    ``.output`` belongs to its inner graph, so the outer graph's tensors are taken this way."""
    outputs: dict[int, Any] = {}

    def call(layer: keras.layers.Layer, *args: Any, **kwargs: Any) -> Any:
        output = layer(*args, **kwargs)
        outputs.setdefault(id(layer), output)  # a shared layer: its first call
        return output

    inputs = keras.tree.map_structure(
        lambda t: keras.Input(shape=tuple(t.shape)[1:], dtype=t.dtype, name=t.name), model.input
    )
    keras.models.clone_model(
        model, input_tensors=inputs, clone_function=lambda layer: layer, call_function=call
    )
    return inputs, outputs


def _has_graph(model: keras.Model) -> bool:
    """Whether ``model`` is a Functional model (symbolic inputs and outputs)."""
    try:
        return bool(model.inputs) and bool(model.outputs)
    except (AttributeError, ValueError):
        return False


def input_spec(model: keras.Model) -> tuple[int | None, int | None, int]:
    """(height, width, channels) of a model's single image input."""
    shape = model.inputs[0].shape
    if len(shape) != 4:
        raise BaseLoadError(
            f"{model.name} takes inputs of shape {tuple(shape)}; an image model takes "
            "(height, width, channels)."
        )
    return shape[1], shape[2], int(shape[3])


def image_size_for(model: keras.Model, image_size: tuple[int, int] | None) -> tuple[int, int]:
    """``image_size`` if set, else the model's own fixed input size."""
    if image_size is not None:
        return tuple(image_size)
    height, width, _ = input_spec(model)
    if height is None or width is None:
        raise BaseLoadError(
            f"The base ({model.name}) takes images of any size, so `image_size` has no default: "
            "set it, e.g. `image_size`: [224, 224]."
        )
    return height, width


def check_image_size(model: keras.Model, image_size: tuple[int, int]) -> None:
    """Raise if the model has a fixed input size other than ``image_size``."""
    height, width, _ = input_spec(model)
    if (height, width) != (None, None) and (height, width) != tuple(image_size):
        raise BaseLoadError(
            f"The base takes {height}x{width} images but `image_size` is "
            f"{image_size[0]}x{image_size[1]}. Set `image_size`: [{height}, {width}]."
        )
