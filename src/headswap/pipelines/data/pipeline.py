"""The ``data`` pipeline: the example's source task and target image folder."""

from kedro.pipeline import Node, Pipeline

from headswap.project import example

from .nodes import extract_source_task


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(extract_source_task, "params:example", "source_task", name="extract_source_task"),
            Node(example.target_folder, "params:example", ["example_images", "example_summary"],
                 name="write_target_folder"),
        ]
    )
