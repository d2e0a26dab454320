"""The ``finetune`` pipeline: image folder -> manifest -> base -> new head -> two phases -> reports."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    evaluate,
    evaluate_details,
    evaluate_head_only,
    fine_tune,
    ingest_images,
    load_base,
    package_model,
    predict_test,
    summarise_training,
    swap_head,
    train_head,
)

P = "params:finetune"


def create_pipeline(
    after: dict[str, list[str]] | None = None, params: str = P, **kwargs
) -> Pipeline:
    """The finetune pipeline.

    ``after`` maps a node name (``ingest_images``, ``load_base``) to datasets it must wait for
    when this pipeline runs after others in one ``kedro run`` (the example's data and base).
    ``params`` is the input holding the finetune parameters: another pipeline that reuses these
    nodes (``compare``) feeds them its own parameters through a dataset.
    """
    after = after or {}
    return Pipeline(
        [
            Node(ingest_images, [params, *after.get("ingest_images", [])],
                 ["manifest", "skipped_images", "data_metrics"], name="ingest_images"),
            Node(load_base, [params, *after.get("load_base", [])],
                 ["base_model", "base_weights_report"], name="load_base"),
            Node(swap_head, ["base_model", "manifest", params], "headswapped_model",
                 name="swap_head"),
            Node(train_head, ["headswapped_model", "manifest", params],
                 ["phase1_model", "phase1_history"], name="train_head"),
            Node(fine_tune, ["phase1_model", "manifest", params, "phase1_history"],
                 ["phase2_model", "phase2_history"], name="fine_tune"),
            Node(evaluate_head_only, ["phase1_model", "manifest", params],
                 ["phase1_classification_report", "phase1_test_metrics"],
                 name="evaluate_head_only"),
            Node(predict_test, ["phase2_model", "manifest", params], "test_predictions",
                 name="predict_test"),
            Node(evaluate, ["test_predictions", "manifest", params],
                 ["classification_report", "classification_report_text",
                  "confusion_matrix_plot", "test_metrics"],
                 name="evaluate"),
            Node(evaluate_details, ["test_predictions", "manifest", params],
                 ["confusion_matrix_counts", "confusion_matrix_normalised", "per_class_metrics",
                  "misclassified_images", "misclassified_plot"],
                 name="evaluate_details"),
            Node(summarise_training, ["phase1_history", "phase2_history"],
                 ["learning_curves_plot", "training_metrics"], name="summarise_training"),
            Node(package_model, "phase2_model", "mlflow_model", name="package_model"),
        ]
    )
