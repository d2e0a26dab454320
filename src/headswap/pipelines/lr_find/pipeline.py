"""The ``lr_find`` pipeline: the learning-rate range test (see :mod:`headswap.core.lr_find`)
on the image folder and base of the ``finetune`` parameters.

* ``find_head_rate``: on the new head, base frozen (phase 1's first stage);
* ``train_head``: phase 1 as ``finetune.phase1`` sets it (``learning_rate: auto``: at the
  suggestion just found);
* ``find_fine_tune_rate``: on the phase-1 model, opened as phase 2's first stage opens it;
* ``report_rates``: the JSON report, the plot and the suggestions as metrics.

The range tests change no weights: the models they start from are those the finetune pipeline
would train.
"""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from headswap.pipelines import finetune

from .nodes import find_fine_tune_rate, find_head_rate, report_rates, train_head


def create_pipeline(**kwargs) -> Pipeline:
    """The head's range test, phase 1, the opened model's range test, the report."""
    return finetune.preparation() + finetune.new_head() + Pipeline([
        Node(find_head_rate, ["headswapped_model", "manifest", "finetune_config"],
             ["lr_find_phase1", "lr_find_phase1_stages"], name="find_head_rate"),
        Node(train_head, ["headswapped_model", "manifest", "lr_find_phase1_stages",
                          "finetune_config"], ["phase1_model", "phase1_history"],
             name="train_head"),
        Node(find_fine_tune_rate, ["phase1_model", "manifest", "finetune_config"],
             "lr_find_phase2", name="find_fine_tune_rate"),
        Node(report_rates, ["lr_find_phase1", "lr_find_phase2"],
             ["lr_find_report", "lr_find_plot", "lr_find_metrics"], name="report_rates"),
    ])
