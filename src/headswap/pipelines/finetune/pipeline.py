"""The ``finetune`` pipeline: images -> manifest -> base -> new head -> two phases -> reports.
Its inputs are the catalog's ``images`` (the folder or CSV ``finetune.data.path`` names) and
``pretrained_model`` (the network ``finetune.base`` names); another pipeline may map them to
its own datasets (the example's folder and base)."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    check_parameters,
    describe_preprocessing,
    evaluate,
    evaluate_details,
    evaluate_head_only,
    explain_predictions,
    export_model,
    fine_tune,
    ingest_images,
    load_base,
    predict_test,
    publish_model,
    summarise_training,
    swap_head,
    train_head,
    write_model_card,
)

CONFIGS = ["data_config", "base_config", "head_config", "augmentation", "fit_options",
           "phase1_stages", "phase2_stages", "evaluation_config", "registry_config",
           "export_config"]


def recipe(params: str = "params:finetune") -> Pipeline:
    """The recipe on ``images`` (an image source) and ``pretrained_model`` (a Keras model).

    ``params`` holds the finetune parameters: another pipeline that reuses these nodes
    (``compare``) feeds them its own parameters through a dataset.
    """
    return Pipeline([
        Node(check_parameters, params, CONFIGS, name="check_parameters"),
        Node(ingest_images, ["images", "data_config", "fit_options"],
             ["manifest", "skipped_images", "data_metrics", "images_name"],
             name="ingest_images"),
        Node(load_base, ["pretrained_model", "base_config", "fit_options"],
             ["base_model", "base_weights_report"], name="load_base"),
        Node(swap_head, ["base_model", "manifest", "head_config", "augmentation", "fit_options"],
             "headswapped_model", name="swap_head"),
        Node(train_head, ["headswapped_model", "manifest", "phase1_stages", "fit_options"],
             ["phase1_model", "phase1_history"], name="train_head"),
        Node(fine_tune, ["phase1_model", "manifest", "phase2_stages", "fit_options",
                         "phase1_history"],
             ["phase2_model", "phase2_history"], name="fine_tune"),
        Node(evaluate_head_only, ["phase1_model", "manifest", "fit_options", "evaluation_config"],
             ["phase1_classification_report", "phase1_test_metrics"],
             name="evaluate_head_only"),
        Node(predict_test, ["phase2_model", "manifest", "fit_options"], "test_predictions",
             name="predict_test"),
        Node(evaluate, ["test_predictions", "manifest", "evaluation_config"],
             ["classification_report", "classification_report_text",
              "confusion_matrix_plot", "test_metrics"], name="evaluate"),
        Node(evaluate_details, ["test_predictions", "manifest", "evaluation_config"],
             ["confusion_matrix_counts", "confusion_matrix_normalised", "per_class_metrics",
              "misclassified_images", "misclassified_plot"], name="evaluate_details"),
        Node(summarise_training, ["phase1_history", "phase2_history"],
             ["learning_curves_plot", "training_metrics"], name="summarise_training"),
    ])


def packaging() -> Pipeline:
    """What makes the fine-tuned model usable: the MLflow model that answers with class names
    (registered, ``champion`` alias) beside the plain Keras model, the exports, the model card
    and Grad-CAM heatmaps of its test predictions."""
    return Pipeline([
        Node(publish_model, ["phase2_model", "manifest", "classification_report",
                             "images_name", "registry_config", "fit_options"],
             "model_registry", name="publish_model"),
        Node(export_model, ["phase2_model", "manifest", "export_config", "fit_options"],
             "model_exports", name="export_model"),
        Node(describe_preprocessing, ["phase2_model", "fit_options"], "preprocessing",
             name="describe_preprocessing"),
        Node(write_model_card,
             ["manifest", "base_weights_report", "head_config", "phase1_stages",
              "phase2_stages", "phase1_history", "phase2_history", "classification_report",
              "phase1_classification_report", "images_name", "registry_config", "fit_options"],
             "model_card", name="write_model_card"),
        Node(explain_predictions, ["phase2_model", "test_predictions", "manifest",
                                   "evaluation_config", "fit_options"],
             "grad_cam_plot", name="explain_predictions"),
    ])


def create_pipeline(**kwargs) -> Pipeline:
    """The finetune pipeline as users run it: the recipe, then the fine-tuned model logged,
    registered and exported."""
    return recipe() + packaging()
