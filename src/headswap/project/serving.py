"""The fine-tuned classifier as an MLflow model that answers with class names.

``mlflow.pyfunc.load_model(uri).predict(df)`` takes a DataFrame with an ``image`` column:
file paths, or the images' bytes base64-encoded (what a REST client sends to
``mlflow models serve``). It returns, per row, the predicted class (``unknown`` when its
probability is below ``min_confidence``: a parameter, by default the threshold the finetune
run stored; 0 labels every image), its confidence, the out-of-distribution score
``ood_score`` (higher is more unusual: :mod:`headswap.core.ood`), the ``top_k`` classes
with their probabilities (``top_k`` is a parameter, default 3; ``top_1`` is the most
probable class also for an ``unknown`` image) and each class's probability. The Keras model
(raw pixels in, calibrated probabilities out), its class names, image size, resize mode,
``min_confidence`` and the ``ood_score``'s statistics travel inside the MLflow model as
artifacts, and the images are decoded exactly as in training (:mod:`headswap.core.predict`).
A model logged before the resize mode was recorded resizes with ``stretch``, as its
training did; one logged before the ``ood_score``'s statistics were gives NaN there.

Why not kedro-mlflow's ``pipeline_ml_factory``: its ``KedroPipelineModel`` deep-copies the
loaded catalog, Keras model included, on every ``predict`` call (measured in
``benchmarks/serving.py``), and logs each artifact dataset's whole folder, which for a
Kedro-versioned model is every version ever saved. This model loads the Keras model once
and classifies through the same function as the ``predict`` pipeline.
"""

import base64
import json
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import headswap
from headswap.core import calibration, inference, ood
from headswap.core.errors import InputError
from headswap.core.predict import TOP_K, Classifier

MODEL_NAME = "model"
KERAS_MODEL_NAME = "keras_model"
IMAGE_COLUMN = "image"
_REQUIREMENTS = ("tensorflow", "keras", "numpy", "pandas", "scikit-learn", "matplotlib",
                 "pydantic", "pillow", "mlflow")


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """MLflow's Python model around a :class:`~headswap.core.predict.Classifier`. It is logged
    as code (``serving_model.py``), not pickled: loading it runs no pickled object."""

    classifier: Classifier

    def load_context(self, context) -> None:
        spec = json.loads(Path(context.artifacts["classifier"]).read_text(encoding="utf-8"))
        model = keras.models.load_model(context.artifacts["keras_model"], compile=False)
        self.classifier = Classifier(model, tuple(spec["class_names"]),
                                     tuple(spec["image_size"]), spec.get("resize", "stretch"),
                                     spec.get("min_confidence"), ood.from_settings(spec))

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if IMAGE_COLUMN not in model_input.columns:
            raise MlflowException(
                f"The input has no {IMAGE_COLUMN!r} column (columns: "
                f"{', '.join(map(str, model_input.columns))}). Give one image per row in a "
                f"column {IMAGE_COLUMN!r}: a file path or the base64-encoded image file.",
                INVALID_PARAMETER_VALUE,
            )
        top_k = int((params or {}).get("top_k") or TOP_K)
        threshold = (params or {}).get("min_confidence")
        try:
            threshold = calibration.check_threshold(threshold, self.classifier.class_names)
        except InputError as err:
            raise MlflowException(str(err), INVALID_PARAMETER_VALUE) from None
        table, problems = self.classifier.predict(model_input[IMAGE_COLUMN].tolist(),
                                                  top_k=top_k)
        if threshold is not None:  # the request's own threshold in place of the model's
            table["predicted"] = calibration.refuse(table["top_1"], table["confidence"],
                                                    threshold)
        if problems:
            raise MlflowException(
                "Some images cannot be classified: "
                + "; ".join(f"row {i}: {reason}" for i, reason in sorted(problems.items())),
                INVALID_PARAMETER_VALUE,
            )
        return table.reset_index(drop=True)


def signature(class_names: list[str], top_k: int = TOP_K) -> ModelSignature:
    """Input: a string column ``image``; output: the columns of
    :func:`~headswap.core.predict.label_table`; parameters: ``top_k`` and ``min_confidence``
    (none given: the model's own)."""
    k = max(1, min(top_k, len(class_names)))
    outputs = [ColSpec("string", "predicted"), ColSpec("float", "confidence"),
               ColSpec("float", "ood_score")]
    for j in range(1, k + 1):
        outputs += [ColSpec("string", f"top_{j}"), ColSpec("float", f"top_{j}_probability")]
    outputs += [ColSpec("float", f"p[{name}]") for name in class_names]
    return ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
        outputs=Schema(outputs),
        params=ParamSchema([ParamSpec("top_k", "long", TOP_K),
                            ParamSpec("min_confidence", "double", None)]),
    )


def requirements() -> list[str]:
    """The installed versions of what loading and running the model imports."""
    return [f"{name}=={metadata.version(name)}" for name in _REQUIREMENTS]


def log_classifier(
    classifier: Classifier, example_image: str | Path, registered_model_name: str | None = None,
) -> ModelInfo:
    """Log ``classifier`` to the active MLflow run as the model ``model`` (with a signature
    and, as input example, ``example_image`` base64-encoded), registered under
    ``registered_model_name`` unless it is None. Returns MLflow's ``ModelInfo``."""
    example = pd.DataFrame(
        {IMAGE_COLUMN: [base64.b64encode(Path(example_image).read_bytes()).decode("ascii")]}
    )
    with tempfile.TemporaryDirectory(prefix="headswap_model_") as tmp:
        keras_file = Path(tmp) / "model.keras"
        classifier.model.save(keras_file)
        spec = Path(tmp) / "classifier.json"
        spec.write_text(json.dumps({"class_names": list(classifier.class_names),
                                    "image_size": list(classifier.image_size),
                                    "resize": classifier.resize,
                                    "min_confidence": classifier.min_confidence,
                                    **ood.to_settings(classifier.ood)}, indent=2))
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(Path(__file__).with_name("serving_model.py")),
            artifacts={"keras_model": str(keras_file), "classifier": str(spec)},
            signature=signature(list(classifier.class_names)),
            input_example=example,
            pip_requirements=requirements(),
            code_paths=[str(Path(headswap.__file__).parent)],
            registered_model_name=registered_model_name,
        )


def log_keras_model(model: keras.Model, example: np.ndarray) -> ModelInfo:
    """Log the plain Keras model (raw pixels in, probabilities out) to the active MLflow run
    as ``keras_model``, with the signature of ``example``, a batch of decoded images."""
    (probabilities,) = next(inference.outputs(model, [(example,)], 1))
    return mlflow.keras.log_model(
        model, name=KERAS_MODEL_NAME, signature=infer_signature(example, probabilities),
        pip_requirements=requirements()[:3],
    )


def load_classifier(model_uri: str) -> Classifier:
    """The :class:`Classifier` inside an MLflow model logged by :func:`log_classifier`
    (``runs:/<run id>/model``, ``models:/<name>@champion``, ...)."""
    model = mlflow.pyfunc.load_model(model_uri)
    python_model = model.unwrap_python_model()
    if not isinstance(python_model, ImageClassifierModel):
        raise InputError(
            f"{model_uri} is not an image classifier logged by a finetune run (it is a "
            f"{type(python_model).__name__}). Give the `model` of a finetune run."
        )
    return python_model.classifier
