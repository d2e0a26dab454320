"""The finetune pipeline against a plain Keras program doing the same work.

Both run as users run them, each in a fresh process, alternately: ``kedro run --pipeline
finetune`` (MLflow tracking on, in a throw-away copy of the project so that its runs and
versioned outputs do not land in yours) and ``benchmarks/plain_keras.py`` with the same image
folder, base, cut, head, batch size, optimizers, rates and epochs, read from
``conf/base/parameters_finetune.yml``; the plain program also evaluates as the recipe asks
(classification report, confusion-matrix and learning-curve plots, the model saved). What the
pipeline does beyond that (the phase-1 evaluation, the per-image predictions, confusion
tables, the misclassified grid, versioned copies of every stage, MLflow logging) counts as its
overhead. Prints the median wall time of each and their ratio; writes
benchmarks/results/pipeline_overhead.json (pipeline_overhead_epochs<N>.json with --epochs).

    python benchmarks/pipeline_overhead.py [--repeats 3] [--epochs N]   # N: each phase
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import (
    EXAMPLE,
    PRETRAINED,
    alternate_with_plain,
    argument_parser,
    finetune_command,
    latest_model_file,
    medians,
    plain_command,
    project_copy,
    project_parameters,
    run_measured,
    start,
    table,
    write_result,
)

from headswap.project.config import parse_finetune

TARGET = 1.25  # pipeline / plain Keras wall time on the example's defaults


def main() -> None:
    parser = argument_parser(__doc__, repeats=3)
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of each phase (default: the parameters')")
    args, before = start(parser)
    cfg = parse_finetune(project_parameters())
    epochs1 = args.epochs if args.epochs is not None else cfg.phase1.epochs
    epochs2 = args.epochs if args.epochs is not None else cfg.phase2.epochs
    plain = plain_command(cfg, epochs1, epochs2, EXAMPLE, latest_model_file(PRETRAINED))
    print(f"finetune pipeline vs plain Keras: {epochs1} + {epochs2} epochs, batch size "
          f"{cfg.data.batch_size}, {args.repeats} repeats")
    with project_copy() as project:
        pipeline = finetune_command({"phase1.epochs": epochs1, "phase2.epochs": epochs2})
        # once untimed: MLflow creates its database at the first run of a new project
        run_measured(finetune_command({"phase1.epochs": 1, "phase2.epochs": 1}),
                     project).check("warm-up kedro run")
        runs, breakdown = alternate_with_plain(pipeline, plain, project, args.repeats)
    summary = medians(runs)
    print(table(
        ["", "wall s (median)", "test accuracy"],
        [["kedro run --pipeline finetune", summary["pipeline_s"], summary["pipeline_accuracy"]],
         ["plain Keras program", summary["plain_keras_s"], summary["plain_keras_accuracy"]]],
    ))
    if breakdown:
        print("where the pipeline's time goes (median s; node times from whole-second log "
              "timestamps):")
        print(table(["", "s"], [[k, v] for k, v in breakdown.items()]
                    + [["outside the runner (start-up, hooks, exit)",
                        summary["pipeline_s"] - breakdown.get("runner total", 0.0)]]))
    verdict = "meets" if summary["ratio"] <= TARGET else "misses"
    print(f"pipeline / plain Keras wall time: {summary['ratio']:.2f} (median of per-repeat "
          f"ratios; target at most {TARGET}: {verdict} it); the pipeline takes "
          f"{summary['difference_s']:.1f} s longer (median)")
    name = "pipeline_overhead" if args.epochs is None else f"pipeline_overhead_epochs{args.epochs}"
    write_result(name, {
        "epochs": [epochs1, epochs2], "batch_size": cfg.data.batch_size,
        "repeats": args.repeats, "summary": summary, "pipeline_breakdown_s": breakdown,
        "target_ratio": TARGET,
    }, details={
        "pipeline_command": " ".join(pipeline[1:]),
        "plain_keras_command": " ".join(Path(c).name if c == sys.executable else c
                                        for c in plain),
        "runs": runs,
    }, libraries=["kedro-mlflow"], load_before=before)


if __name__ == "__main__":
    main()
