"""The ``pretrain`` pipeline: the example's base, trained on the source classes."""

from kedro.pipeline import Node, Pipeline

from .nodes import pretrain_base


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                pretrain_base,
                ["source_task", "params:pretrain"],
                ["pretrained_base", "pretrain_history"],
                name="pretrain_base",
            )
        ]
    )
