"""Project pipelines."""

from __future__ import annotations

from kedro.pipeline import Pipeline, pipeline

from headswap.pipelines import (
    compare,
    data,
    finetune,
    label_efficiency,
    lr_find,
    predict,
    pretrain,
    tune,
)


def register_pipelines() -> dict[str, Pipeline]:
    """``finetune`` (the default) fine-tunes the base ``finetune.base`` names on the images
    ``finetune.data.path`` names. ``example`` runs the embedded example: ``data`` and
    ``pretrain`` make its image folder and its base, then finetune runs on them.
    ``predict`` classifies a folder of new images with a fine-tuned model.
    ``compare`` (not in the default) sets the finetune recipe against its alternatives;
    ``label_efficiency`` (not in the default) runs that comparison at each count of labelled
    images per class in ``label_efficiency.LABELS_PER_CLASS`` (10, 30, 100, 300).
    ``lr_find`` runs the learning-rate range test; ``tune`` searches the recipe's settings
    with Optuna (neither in the default).

    In the example the recipe's inputs are the example's outputs: the image folder the data
    pipeline writes and the base the pretrain pipeline trains.
    """
    example = data.create_pipeline() + pretrain.create_pipeline() + pipeline(
        finetune.create_pipeline(),
        inputs={"images": "example_images", "pretrained_model": "pretrained_base"},
    )
    return {
        "data": data.create_pipeline(),
        "pretrain": pretrain.create_pipeline(),
        "finetune": finetune.create_pipeline(),
        "predict": predict.create_pipeline(),
        "compare": compare.create_pipeline(),
        "label_efficiency": label_efficiency.create_pipeline(
            labels_per_class=label_efficiency.LABELS_PER_CLASS
        ),
        "lr_find": lr_find.create_pipeline(),
        "tune": tune.create_pipeline(),
        "example": example,
        "__default__": finetune.create_pipeline(),
    }
