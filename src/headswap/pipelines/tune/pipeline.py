"""The ``tune`` pipeline: an Optuna search over the finetune recipe's settings (see
:mod:`headswap.project.tuning`).

* the image folder ingested and the base loaded once (the finetune nodes, as ``compare``);
* ``search_recipe``: trials of the study in ``tune.storage`` (shared with every other process
  that runs this pipeline on that storage and study), each a nested MLflow run; every trial of
  the study as a table, the best settings as a parameters file for ``conf/local/`` (and in
  memory, for the next node: another process's newer file must not be read instead);
* ``evaluate_best``: the best settings trained again and evaluated on the test split, which
  the search never saw.
"""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from headswap.pipelines import finetune

from .nodes import evaluate_best, search_recipe


def create_pipeline(**kwargs) -> Pipeline:
    """The shared inputs, the search, the best settings' test report."""
    return finetune.preparation() + Pipeline([
        Node(search_recipe, ["base_model", "manifest", "params:finetune", "params:tune"],
             ["tune_trials", "tune_best_parameters", "tune_best_settings", "tune_metrics"],
             name="search_recipe"),
        Node(evaluate_best, ["base_model", "manifest", "params:finetune", "tune_best_settings"],
             ["tune_best_report", "tune_best_report_text", "tune_best_metrics"],
             name="evaluate_best"),
    ])
