"""The ``label_efficiency`` pipeline: the ``compare`` pipeline's variants at several counts of
labelled images per class, on the example.

* ``write_label_efficiency_folder``: the example's target folder with the largest count of
  labelled images per class (``label_efficiency.example`` merged into ``example``) and all
  the official test images; ingested once into ``manifest`` (the finetune ingest node: its
  seeded train/val split), and the same pretrained base loaded once;
* for each count N, in the namespace ``labels_<N>``: ``select_labels`` keeps N labelled images
  per class, in the manifest's train/val proportion, nested (the images of a smaller count
  are among those of a larger one), the test split whole; then the ``compare`` variants and
  their comparison table, every dataset under ``labels_<N>.`` (``labels_10.full.fine_tuned_model``);
* ``collect_counts``: one long table (labels_per_class, variant, test_accuracy, macro_f1,
  trainable_params, wall_time_s) and the figure of test accuracy against labels per class.

The counts shape the pipeline (one namespace each), so they are an argument of
:func:`create_pipeline`, not a parameter; ``pipeline_registry.py`` passes
:data:`LABELS_PER_CLASS`. Each variant's time is the seconds its own training took, whatever
order the runner runs the counts and variants in. In MLflow each count has a run nested under
the pipeline's run and each variant a run nested under its count's (see
``headswap.project.mlflow_run.MlflowRunHook``).
"""

from __future__ import annotations

from collections.abc import Sequence

from kedro.pipeline import Node, Pipeline, pipeline

from headswap.pipelines import bound, compare, finetune

from .nodes import (
    collect_counts,
    ingest_parameters,
    select_labels,
    write_example_folder,
)

#: The counts of labelled (train + val) images per class that ``kedro run --pipeline
#: label_efficiency`` compares (read by ``pipeline_registry.py``).
LABELS_PER_CLASS = (10, 30, 100, 300)


def namespace(count: int) -> str:
    """The namespace of one count's nodes and datasets: ``labels_<count>``."""
    return f"labels_{count}"


def _counts(labels_per_class: Sequence[int]) -> tuple[int, ...]:
    counts = sorted({int(c) for c in labels_per_class})
    if not counts or counts[0] < 2 or len(counts) != len(labels_per_class):
        raise ValueError(
            f"labels_per_class must be distinct integers of at least 2 (one training and one "
            f"validation image per class); got {tuple(labels_per_class)}. Correct the counts "
            "passed to label_efficiency.create_pipeline in pipeline_registry.py."
        )
    return tuple(counts)


def create_pipeline(labels_per_class: Sequence[int] = LABELS_PER_CLASS, **kwargs) -> Pipeline:
    """The example's folder, ingested once, and the base; then the compare variants at each
    count of ``labels_per_class``; then the table and figure across counts."""
    counts = _counts(labels_per_class)
    prepare = Pipeline([
        Node(bound(write_example_folder, labels_per_class=counts[-1]),
             ["params:example", "params:label_efficiency.example"],
             ["label_efficiency_images", "label_efficiency_folder"],
             name="write_label_efficiency_folder"),
        Node(ingest_parameters, ["params:finetune", "label_efficiency_folder"],
             "label_efficiency_finetune", name="ingest_parameters"),
    ])
    shared = pipeline(finetune.preparation(params="label_efficiency_finetune"),
                      inputs={"images": "label_efficiency_images",
                              "pretrained_model": "pretrained_base"})
    variants = compare.variants()
    parameters = {name.removeprefix("params:") for name in variants.inputs()
                  if name.startswith("params:")} | {"label_efficiency.seed"}
    per_count = [
        pipeline(
            Pipeline([Node(bound(select_labels, labels_per_class=count),
                           ["ingested_manifest", "params:label_efficiency.seed"],
                           ["manifest", "data_metrics"], name="select_labels")]) + variants,
            namespace=namespace(count),
            inputs={"ingested_manifest": "manifest", "base_model": "base_model"},
            outputs={"comparison_table": f"{namespace(count)}_comparison_table"},
            parameters=parameters,
        )
        for count in counts
    ]
    collect = Node(
        bound(collect_counts, labels_per_class=counts),
        [f"{namespace(count)}_comparison_table" for count in counts],
        ["label_efficiency_table", "label_efficiency_table_json",
         "label_efficiency_table_markdown", "label_efficiency_plot"],
        name="collect_counts",
    )
    return prepare + shared + sum(per_count, Pipeline([])) + Pipeline([collect])
