"""The ``finetune`` pipeline: image folder -> manifest -> base -> new head -> two phases -> reports."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    evaluate,
    evaluate_head_only,
    fine_tune,
    ingest_images,
    load_base,
    package_model,
    summarise_training,
    swap_head,
    train_head,
)

P = "params:finetune"


def create_pipeline(after: dict[str, list[str]] | None = None, **kwargs) -> Pipeline:
    """The finetune pipeline.

    ``after`` maps a node name (``ingest_images``, ``load_base``) to datasets it must wait for
    when this pipeline runs after others in one ``kedro run`` (the example's data and base).
    """
    after = after or {}
    return Pipeline(
        [
            Node(ingest_images, [P, *after.get("ingest_images", [])],
                 ["manifest", "skipped_images", "data_metrics"], name="ingest_images"),
            Node(load_base, [P, *after.get("load_base", [])],
                 ["base_model", "base_weights_report"], name="load_base"),
            Node(swap_head, ["base_model", "manifest", P], "headswapped_model", name="swap_head"),
            Node(train_head, ["headswapped_model", "manifest", P],
                 ["phase1_model", "phase1_history"], name="train_head"),
            Node(fine_tune, ["phase1_model", "manifest", P, "phase1_history"],
                 ["phase2_model", "phase2_history"], name="fine_tune"),
            Node(evaluate_head_only, ["phase1_model", "manifest", P],
                 ["phase1_classification_report", "phase1_test_metrics"],
                 name="evaluate_head_only"),
            Node(evaluate, ["phase2_model", "manifest", P],
                 ["classification_report", "classification_report_text",
                  "confusion_matrix_plot", "test_metrics"],
                 name="evaluate"),
            Node(summarise_training, ["phase1_history", "phase2_history"],
                 ["learning_curves_plot", "training_metrics"], name="summarise_training"),
            Node(package_model, "phase2_model", "mlflow_model", name="package_model"),
        ]
    )
