"""Project pipelines."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from headswap.pipelines import compare, data, finetune, pretrain


def register_pipelines() -> dict[str, Pipeline]:
    """``data``, ``pretrain`` and ``finetune``; the default runs all three as the example.
    ``compare`` (not in the default) sets the finetune recipe against its alternatives.

    In the default pipeline the finetune nodes also wait for the example's image folder and
    pretrained base, so that one ``kedro run`` prepares, pretrains and then fine-tunes.
    """
    example = data.create_pipeline() + pretrain.create_pipeline() + finetune.create_pipeline(
        after={"ingest_images": ["example_folder"], "load_base": ["pretrain_history"]}
    )
    return {
        "data": data.create_pipeline(),
        "pretrain": pretrain.create_pipeline(),
        "finetune": finetune.create_pipeline(),
        "compare": compare.create_pipeline(),
        "__default__": example,
    }
