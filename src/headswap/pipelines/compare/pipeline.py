"""The ``compare`` pipeline: on one manifest and one base, five ways to use the base.

* ``feature_extraction``: the base as a fixed feature extractor, features computed once,
  scikit-learn's logistic regression on them (one node);
* ``head_only``: phase 1 alone (the new head on the frozen base);
* ``full``: phase 1 then phase 2, the whole recipe;
* ``scratch``: the same architecture from random weights, every layer trained for as many
  epochs as phases 1 and 2 together;
* ``partial``: phase 2 training only the base's top block (``compare.variants.partial``).

Each Keras variant is the whole recipe in one call (:func:`headswap.project.training.train_recipe`)
with ``finetune`` and ``compare.variants.<variant>`` merged in (``head_only``: no phase 2;
``scratch``: random weights, phase 1 trains everything), in a Kedro namespace of its own. A
variant's time is the seconds its own training took (whatever order the runner runs the
variants in), and each logs into its own MLflow run nested under the pipeline's run (see
``headswap.project.mlflow_run.MlflowRunHook``).
"""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline, pipeline

from headswap.pipelines import bound, finetune

from .nodes import (
    compare_variants,
    fit_logistic_regression,
    start_variant,
    summarise_variant,
    train_variant,
)

VARIANTS = ("feature_extraction", "head_only", "full", "scratch", "partial")


def _train(variant: str) -> Node:
    """The node that trains (or fits) the variant: its histories and its test report."""
    if variant == "feature_extraction":
        return Node(fit_logistic_regression,
                    ["base_model", "manifest", "finetune_params",
                     "params:compare.logistic_regression"],
                    ["phases_history", "classification_report"], name="fit_logistic_regression")
    return Node(bound(train_variant, from_scratch=variant == "scratch"),
                ["base_model", "manifest", "finetune_params"],
                ["fine_tuned_model", "phases_history", "classification_report"], name="train")


def variants(shared: dict[str, str] | None = None) -> Pipeline:
    """Every variant in its namespace, on the datasets ``manifest`` and ``base_model`` (or
    those ``shared`` maps them to), then the comparison."""
    shared = shared or {"manifest": "manifest", "base_model": "base_model"}
    each = []
    for variant in VARIANTS:
        start = Node(
            bound(start_variant, variant=variant, from_scratch=variant == "scratch"),
            ["params:finetune", f"params:compare.variants.{variant}"], "finetune_params",
            name="start",
        )
        summary = Node(bound(summarise_variant, variant=variant),
                       ["phases_history", "classification_report"],
                       ["summary", "comparison_metrics"], name="summarise")
        each.append(pipeline(
            Pipeline([start, _train(variant), summary]),
            namespace=variant,
            inputs={"manifest": shared["manifest"], "base_model": shared["base_model"]},
            outputs={"summary": f"{variant}_summary"},
            parameters={"finetune", f"compare.variants.{variant}",
                        *(["compare.logistic_regression"] if variant == "feature_extraction"
                          else [])},
        ))
    table = Node(compare_variants, [f"{v}_summary" for v in VARIANTS],
                 ["comparison_table", "comparison_table_json", "comparison_table_markdown",
                  "comparison_curves_plot"], name="compare_variants")
    return sum(each, Pipeline([])) + Pipeline([table])


def create_pipeline(**kwargs) -> Pipeline:
    """The finetune pipeline's inputs (parameters, manifest, base), then the variants."""
    return finetune.preparation() + variants()
