"""The MLflow model's code (MLflow's "models from code"):
:func:`headswap.project.serving.log_classifier` logs this file, and loading the model runs it."""

from mlflow.models import set_model

from headswap.project.serving import ImageClassifierModel

set_model(ImageClassifierModel())
