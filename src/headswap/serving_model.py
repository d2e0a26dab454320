"""The MLflow model's code (MLflow's "models from code"): :func:`headswap.serving.log_classifier`
logs this file, and loading the model runs it."""

from mlflow.models import set_model

from headswap.serving import ImageClassifierModel

set_model(ImageClassifierModel())
