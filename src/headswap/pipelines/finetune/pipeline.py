"""The ``finetune`` pipeline: images -> manifest -> base -> new head -> the phases -> reports.
Its inputs are the catalog's ``images`` (the folder or CSV ``finetune.data.path`` names) and
``pretrained_model`` (the network ``finetune.base`` names); another pipeline may map them to
its own datasets (the example's folder and base)."""

from kedro.pipeline import Node, Pipeline

from headswap.pipelines import bound

from .calibration_nodes import calibrate
from .nodes import (
    check_data_quality,
    check_parameters,
    describe_preprocessing,
    evaluate,
    evaluate_details,
    evaluate_head_only,
    explain_predictions,
    export_model,
    ingest_images,
    load_base,
    publish_model,
    summarise_training,
    swap_head,
    train_phase,
    write_model_card,
)


def preparation(params: str = "params:finetune") -> Pipeline:
    """The parameters checked once (``finetune_parameters``), the images ingested into
    ``manifest``, and the base loaded once and cut (``base_model``), with the parameters'
    image size resolved from it (``finetune_config``, the typed object the later nodes take):
    what every pipeline that trains on the user's images starts from. Nothing that makes the
    manifest takes the base, so the data layers keep one order where the base is an earlier
    stage's output (the example)."""
    return Pipeline([
        Node(check_parameters, params, "finetune_parameters", name="check_parameters"),
        Node(ingest_images, ["images", "finetune_parameters"],
             ["manifest", "skipped_images", "data_metrics", "images_name"],
             name="ingest_images"),
        Node(load_base, ["pretrained_model", "finetune_parameters"],
             ["base_model", "base_weights_report", "finetune_config"], name="load_base"),
    ])


def new_head() -> Pipeline:
    """``headswapped_model``: ``base_model`` with a new head sized for the manifest's
    classes."""
    return Pipeline([Node(swap_head, ["base_model", "manifest", "finetune_config"],
                          "headswapped_model", name="swap_head")])


#: The recipe's phases, in order (``FinetuneConfig.phases()``): a node each, named as users
#: know them.
PHASES = {"phase1": "train_head", "phase2": "fine_tune"}
#: The final model: the last phase's, calibrated (what is evaluated, published and exported).
LAST = "calibrated_model"


def phases() -> Pipeline:
    """A node per phase: each trains ``<phase>_model`` (and ``<phase>_history``) from the model
    the phase before it left, through :func:`headswap.core.fine_tune`."""
    nodes, model, before = [], "headswapped_model", []
    for phase, name in PHASES.items():
        nodes.append(Node(
            bound(train_phase, phase=phase),
            [model, "manifest", "finetune_config", "data_quality_report", *before],
            [f"{phase}_model", f"{phase}_history"], name=name,
        ))
        model, before = f"{phase}_model", [f"{phase}_history"]
    return Pipeline(nodes)


def calibration() -> Pipeline:
    """``calibrated_model`` (:data:`LAST`): the last phase's model with the temperature fitted
    on the validation split folded in, its ``unknown`` threshold, the calibration report and
    the statistics of its out-of-distribution score (``ood_statistics``), and its predictions
    on the test split (``test_predictions``, from the pass the calibration report makes)."""
    return Pipeline([
        Node(calibrate, [f"{list(PHASES)[-1]}_model", "manifest", "finetune_config"],
             [LAST, "calibration_report", "calibration_plot", "calibration_metrics",
              "ood_statistics", "test_predictions"], name="calibrate"),
    ])


def training() -> Pipeline:
    """The data-quality check, a new head on ``base_model``, the phases, the calibration, and
    the test split's reports."""
    return new_head() + Pipeline([
        Node(check_data_quality, ["manifest", "skipped_images", "base_model", "finetune_config"],
             ["data_quality_report", "data_quality_findings", "data_quality_plot",
              "data_quality_metrics"], name="check_data_quality"),
    ]) + phases() + calibration() + Pipeline([
        Node(evaluate_head_only, ["phase1_model", "manifest", "finetune_config"],
             ["phase1_classification_report", "phase1_test_metrics"],
             name="evaluate_head_only"),
        Node(evaluate, ["test_predictions", "manifest", "finetune_config"],
             ["classification_report", "classification_report_text",
              "confusion_matrix_plot", "test_metrics"], name="evaluate"),
        Node(evaluate_details, ["test_predictions", "manifest", "finetune_config"],
             ["confusion_matrix_counts", "confusion_matrix_normalised", "per_class_metrics",
              "misclassified_images", "misclassified_plot"], name="evaluate_details"),
        Node(summarise_training, [f"{phase}_history" for phase in PHASES],
             ["learning_curves_plot", "training_metrics"], name="summarise_training"),
    ])


def packaging() -> Pipeline:
    """What makes the fine-tuned model usable: the MLflow model that answers with class names
    (registered, ``champion`` alias) beside the plain Keras model, the exports, the model card
    and Grad-CAM heatmaps of its test predictions."""
    return Pipeline([
        Node(publish_model, [LAST, "manifest", "classification_report",
                             "images_name", "finetune_config", "calibration_report",
                             "ood_statistics"],
             "model_registry", name="publish_model"),
        Node(export_model, [LAST, "manifest", "finetune_config", "test_predictions"],
             ["model_exports", "export_checks", "export_metrics"], name="export_model"),
        Node(describe_preprocessing, [LAST, "finetune_config", "calibration_report",
                                      "ood_statistics"],
             "preprocessing", name="describe_preprocessing"),
        Node(write_model_card,
             ["manifest", "base_weights_report", "finetune_config", "phase1_history",
              "phase2_history", "classification_report", "phase1_classification_report",
              "images_name", "calibration_report", "export_checks"],
             "model_card", name="write_model_card"),
        Node(explain_predictions, [LAST, "test_predictions", "manifest",
                                   "finetune_config"],
             "grad_cam_plot", name="explain_predictions"),
    ])


def create_pipeline(**kwargs) -> Pipeline:
    """The finetune pipeline as users run it: the inputs, the recipe, then the fine-tuned model
    logged, registered and exported."""
    return preparation() + training() + packaging()
