"""The fine-tuning library: image folders, pretrained bases, new heads, staged training and
evaluation, with no Kedro and no MLflow.

From Python (the Kedro project's ``finetune`` pipeline does the same, node by node)::

    from headswap.core import FitOptions, Stage, bases, evaluation, fine_tune, heads, manifests

    manifest, skipped = manifests.ingest_image_folder("images/")          # path, label, split
    base = bases.cut_model(bases.load_model_file("base.keras"))       # or keras_application
    model = heads.attach_head(base, len(manifests.class_names(manifest)), dense=[64], dropout=0.3,
                              seed=42)
    options = FitOptions(image_size=(28, 28), batch_size=32, seed=42)
    phases = {"phase1": [Stage(epochs=200, learning_rate=3e-3)],
              "phase2": [Stage(epochs=30, learning_rate=3e-4, train="all",
                               schedule="cosine", warmup_epochs=2)]}
    histories = fine_tune(model, manifest, phases, options)  # {phase name: history}
    print(evaluation.evaluate(model, manifest, options.image_size)["text"])
"""

from headswap.core import bases, data, evaluation, heads, manifests
from headswap.core.errors import InputError
from headswap.core.fit import FitOptions, History, fine_tune, fit, next_epoch
from headswap.core.recipe import Augmentation, Callbacks, LayerSelection, Stage

__all__ = [
    "Augmentation", "Callbacks", "FitOptions", "History", "InputError", "LayerSelection",
    "Stage", "bases", "data", "evaluation", "fine_tune", "fit", "heads", "manifests",
    "next_epoch",
]
