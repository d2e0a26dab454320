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

import json
import re
import sys
from pathlib import Path

from common import (
    EXAMPLE,
    PRETRAINED,
    ROOT,
    argument_parser,
    finetune_command,
    latest_model_file,
    medians,
    project_copy,
    project_parameters,
    repeat,
    run_measured,
    start,
    table,
    write_results,
)

from headswap.config import FinetuneConfig, parse_finetune
from headswap.core import LayerSelection


def plain_command(cfg: FinetuneConfig, epochs1: int, epochs2: int) -> list[str]:
    head, phase1, phase2 = cfg.head, cfg.phase1, cfg.phase2
    unsupported = {
        "head.dense": head.dense if len(head.dense) != 1 else None,
        "head.pooling": head.pooling if head.pooling != "avg" else None,
        "phase1.stages": len(phase1.stages) or None,
        "phase2.stages": len(phase2.stages) or None,
        "phase1.optimizer": phase1.optimizer if phase1.optimizer != "rmsprop" else None,
        "phase2.optimizer": phase2.optimizer if phase2.optimizer != "adam" else None,
        "phase2.train": phase2.train if phase2.train != LayerSelection(all=True) else None,
        "base.source": cfg.base.source if cfg.base.source != "file" else None,
    }
    unsupported = {k: v for k, v in unsupported.items() if v is not None}
    if unsupported:
        raise SystemExit(f"The plain Keras program mirrors the example's settings only; the "
                         f"parameters set {unsupported}.")
    cut = cfg.base.cut_at
    return [
        sys.executable, str(ROOT / "benchmarks" / "plain_keras.py"),
        "--folder", str(EXAMPLE), "--base", str(latest_model_file(PRETRAINED)),
        "--cut-at", "features" if cut == "auto" else str(cut),
        "--image-size", *map(str, cfg.data.image_size),
        "--batch-size", str(cfg.data.batch_size), "--val-fraction", str(cfg.data.val_fraction),
        "--dense", str(head.dense[0]), "--dropout", str(head.dropout),
        "--epochs1", str(epochs1), "--rate1", str(phase1.learning_rate),
        "--epochs2", str(epochs2), "--rate2", str(phase2.learning_rate),
        "--seed", str(cfg.seed),
    ]


def node_seconds(output: str) -> dict[str, float]:
    """Seconds between each node's "Running node" and "Completed node" log lines (the log's
    timestamps have whole seconds), and the runner's own total."""
    started, spans = {}, {}
    for clock, what, node in re.findall(
        r"^(\d\d:\d\d:\d\d) .*?(Running|Completed) node: (\w+)", output, re.MULTILINE
    ):
        h, m, sec = map(int, clock.split(":"))
        at = h * 3600 + m * 60 + sec
        if what == "Running":
            started[node] = at
        elif node in started:
            spans[f"node {node}"] = float((at - started[node]) % 86400)
    total = re.search(r"Pipeline execution completed successfully in ([0-9.]+) sec", output)
    if total:
        spans["runner total"] = float(total.group(1))
    return spans


def pipeline_accuracy(output: str) -> float | None:
    found = re.findall(r"accuracy\s+([0-9.]+)\s+\d+", output)  # the classification report
    return float(found[-1]) if found else None


def main() -> None:
    parser = argument_parser(__doc__, repeats=3)
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of each phase (default: the parameters')")
    args, before = start(parser)
    cfg = parse_finetune(project_parameters())
    epochs1 = args.epochs if args.epochs is not None else cfg.phase1.epochs
    epochs2 = args.epochs if args.epochs is not None else cfg.phase2.epochs
    plain = plain_command(cfg, epochs1, epochs2)
    print(f"finetune pipeline vs plain Keras: {epochs1} + {epochs2} epochs, batch size "
          f"{cfg.data.batch_size}, {args.repeats} repeats")
    with project_copy() as project:
        pipeline = finetune_command({"phase1.epochs": epochs1, "phase2.epochs": epochs2})
        # once untimed: MLflow creates its database at the first run of a new project
        run_measured(finetune_command({"phase1.epochs": 1, "phase2.epochs": 1}),
                     project).check("warm-up kedro run")

        def measure(_: int) -> dict:
            ran = run_measured(pipeline, project).check("kedro run")
            keras_run = run_measured(plain + ["--out", str(project / "plain_keras")]).check(
                "plain Keras program")
            inside = json.loads(keras_run.output.strip().splitlines()[-1])
            nodes.append(node_seconds(ran.output))
            return {
                "pipeline_s": ran.wall_s, "plain_keras_s": keras_run.wall_s,
                "ratio": ran.wall_s / keras_run.wall_s,
                "difference_s": ran.wall_s - keras_run.wall_s,
                "pipeline_accuracy": pipeline_accuracy(ran.output),
                "plain_keras_accuracy": inside["test_accuracy"],
                "plain_keras_training_s": inside["phase1_s"] + inside["phase2_s"],
            }

        nodes: list[dict[str, float]] = []
        runs = repeat(args.repeats, measure)
    summary = medians(runs)
    breakdown = medians(nodes) if nodes and nodes[0] else {}
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
    verdict = "meets" if summary["ratio"] <= 1.10 else "misses"
    print(f"pipeline / plain Keras wall time: {summary['ratio']:.2f} (median of per-repeat "
          f"ratios; target at most 1.10: {verdict} it); the pipeline takes "
          f"{summary['difference_s']:.1f} s longer (median)")
    name = "pipeline_overhead" if args.epochs is None else f"pipeline_overhead_epochs{args.epochs}"
    write_results(name, {
        "epochs": [epochs1, epochs2], "batch_size": cfg.data.batch_size,
        "repeats": args.repeats, "pipeline_command": " ".join(pipeline[1:]),
        "plain_keras_command": " ".join(Path(c).name if c == sys.executable else c
                                        for c in plain),
        "summary": summary, "pipeline_breakdown_s": breakdown, "target_ratio": 1.10,
        "runs": runs,
    }, before)


if __name__ == "__main__":
    main()
