"""The ``compare`` pipeline: on one manifest and one base, five ways to use the base.

* ``feature_extraction``: the base as a fixed feature extractor, features computed once,
  scikit-learn's logistic regression on them (one node);
* ``head_only``: phase 1 alone (the new head on the frozen base);
* ``full``: phase 1 then phase 2, the whole recipe;
* ``scratch``: the same architecture from random weights, every layer trained for as many
  epochs as phases 1 and 2 together;
* ``partial``: phase 2 training only the base's top block (``compare.variants.partial``).

The Keras variants are the finetune pipeline's own nodes in a Kedro namespace each; a variant's
parameters are ``finetune`` with ``compare.variants.<variant>`` merged in. A variant's time is
the seconds its own training took (whatever order the runner runs the variants in), and each
logs into its own MLflow run nested under the pipeline's run (see
``headswap.hooks.NamespaceRunsHook``).
"""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline, pipeline

from headswap.pipelines import bound, finetune

from .nodes import (
    compare_variants,
    fit_logistic_regression,
    reinitialise_base,
    start_variant,
    summarise_variant,
)

VARIANTS = ("feature_extraction", "head_only", "full", "scratch", "partial")
HEAD_ONLY = ("check_parameters", "swap_head", "train_head", "evaluate_head_only")
TWO_PHASES = (*HEAD_ONLY[:-1], "fine_tune", "predict_test", "evaluate")
SHARED = ("check_parameters", "ingest_images", "load_base")


def _body(variant: str) -> tuple[Pipeline, str, list[str]]:
    """The variant's nodes (un-namespaced), its report and its histories."""
    recipe = finetune.recipe(params="finetune_params")
    if variant == "feature_extraction":
        nodes = recipe.only_nodes("check_parameters") + Pipeline([
            Node(fit_logistic_regression,
                 ["base_model", "manifest", "fit_options", "head_config",
                  "params:compare.logistic_regression"],
                 ["classification_report", "logistic_regression_history"],
                 name="fit_logistic_regression"),
        ])
        return nodes, "classification_report", ["logistic_regression_history"]
    if variant == "scratch":
        random_base = Node(reinitialise_base, ["base_model", "fit_options"],
                           "random_base_model", name="reinitialise_base")
        trained = pipeline(recipe.only_nodes(*HEAD_ONLY),
                           inputs={"base_model": "random_base_model"})
        return Pipeline([random_base]) + trained, "phase1_classification_report", ["phase1_history"]
    if variant == "head_only":
        return recipe.only_nodes(*HEAD_ONLY), "phase1_classification_report", ["phase1_history"]
    return (recipe.only_nodes(*TWO_PHASES), "classification_report",
            ["phase1_history", "phase2_history"])


def create_pipeline(**kwargs) -> Pipeline:
    """Shared manifest and base, then each variant in its namespace, then the comparison."""
    shared = finetune.create_pipeline().only_nodes(*SHARED)
    variants = []
    for variant in VARIANTS:
        body, report, histories = _body(variant)
        start = Node(
            bound(start_variant, variant=variant, from_scratch=variant == "scratch"),
            ["params:finetune", f"params:compare.variants.{variant}"], "finetune_params",
            name="start",
        )
        summary = Node(bound(summarise_variant, variant=variant), [report, *histories],
                       ["summary", "comparison_metrics"], name="summarise")
        variants.append(pipeline(
            Pipeline([start]) + body + Pipeline([summary]),
            namespace=variant,
            inputs={"manifest": "manifest", "base_model": "base_model"},
            outputs={"summary": f"{variant}_summary"},
            parameters={"finetune", f"compare.variants.{variant}",
                        *(["compare.logistic_regression"] if variant == "feature_extraction"
                          else [])},
        ))
    table = Node(compare_variants, [f"{v}_summary" for v in VARIANTS],
                 ["comparison_table", "comparison_table_json", "comparison_table_markdown",
                  "comparison_curves_plot"], name="compare_variants")
    return shared + sum(variants, Pipeline([])) + Pipeline([table])
