"""The ``predict`` pipeline: images (``predict.path``: a folder or CSV, local or remote) -> the
fine-tuned model's predictions (and a classification report when they are labelled)."""

from kedro.pipeline import Node, Pipeline

from .nodes import check_parameters, classify_images, list_images, report


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(check_parameters, "params:predict", "predict_config", name="check_predict_parameters"),
        Node(list_images, "prediction_images", ["images_to_classify", "unsupported_images"],
             name="list_images"),
        Node(classify_images,
             ["classifier", "images_to_classify", "unsupported_images", "predict_config"],
             ["predictions", "prediction_skipped_images"], name="classify_images"),
        Node(report, ["predictions", "prediction_skipped_images", "classifier",
                      "predict_config"],
             ["prediction_report", "prediction_report_text", "prediction_metrics"],
             name="report_predictions"),
    ])
