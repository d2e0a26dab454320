"""The recipe over several seeds: the `compare` pipeline's table as mean and spread.

Runs ``kedro run --pipeline compare --params finetune.seed=<seed>`` (with ``--params`` added,
e.g. an older recipe's settings) for each seed, in a throw-away copy of the project, and
reads each run's comparison table (test accuracy of feature extraction with a logistic
regression, the head alone, the full recipe, from scratch, partial) and the full recipe's
histories: the validation accuracy and loss at the last epoch of phase 1 and the first of
phase 2 (the "dip" when phase 2 opens). Prints the mean and spread (min-max) of each over
the seeds; writes benchmarks/results/recipe_seeds[_<label>].json.

    python benchmarks/recipe_seeds.py [--seeds 42 43 44] [--params "finetune.phase2.lr=..."]
                                      [--label before]
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from common import (
    argument_parser,
    kedro_command,
    project_copy,
    run_measured,
    start,
    table,
    write_result,
)


def newest(project: Path, relative: str) -> Path:
    """The newest version of a Kedro-versioned file of the project copy."""
    path = project / relative
    return sorted(path.glob(f"*/{path.name}"))[-1]


def full_recipe_opening(project: Path) -> dict[str, float]:
    """The full variant's validation accuracy and loss at the end of phase 1 and after the
    first epoch of phase 2."""
    histories = {phase: json.loads(newest(
        project, f"data/07_model_output/compare/full/{phase}_history.json").read_text())
        for phase in ("phase1", "phase2")}
    first, second = histories["phase1"], histories["phase2"]
    return {
        "phase1_last_val_accuracy": first["val_accuracy"][-1],
        "phase2_first_val_accuracy": second["val_accuracy"][0],
        "phase2_min3_val_accuracy": min(second["val_accuracy"][:3]),
        "dip_val_accuracy": first["val_accuracy"][-1] - second["val_accuracy"][0],
        "dip_val_loss": second["val_loss"][0] - first["val_loss"][-1],
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argument_parser(__doc__, repeats=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--params", default="", help="more --params for every run")
    parser.add_argument("--label", default="", help="suffix of the results file")
    args, before = start(parser)
    runs = []
    with project_copy() as project:
        for seed in args.seeds:
            params = ",".join(p for p in (f"finetune.seed={seed}", args.params) if p)
            ran = run_measured(kedro_command("run", "--pipeline", "compare", "--params", params),
                               project).check(f"compare, seed {seed}")
            rows = json.loads(newest(project, "data/08_reporting/comparison.json").read_text())
            accuracy = {row["variant"]: row["test_accuracy"] for row in rows}
            runs.append({"seed": seed, "wall_s": ran.wall_s, "test_accuracy": accuracy,
                         **full_recipe_opening(project)})
            print(f"  seed {seed}: {accuracy}, dip {runs[-1]['dip_val_accuracy']:+.3f} "
                  f"({ran.wall_s:.0f} s)", flush=True)
    variants = list(runs[0]["test_accuracy"])
    summary = {v: spread([r["test_accuracy"][v] for r in runs]) for v in variants}
    opening = {k: spread([r[k] for r in runs]) for k in runs[0]
               if k.startswith(("phase", "dip"))}
    print(f"\ntest accuracy over seeds {args.seeds}" + (f" ({args.params})" if args.params else ""))
    print(table(["variant", "mean", "min", "max"],
                [[v, s["mean"], s["min"], s["max"]] for v, s in summary.items()]))
    print("\nthe full recipe's phase-2 opening (validation)")
    print(table(["", "mean", "min", "max"],
                [[k, s["mean"], s["min"], s["max"]] for k, s in opening.items()]))
    name = "recipe_seeds" + (f"_{args.label}" if args.label else "")
    write_result(name, {"seeds": args.seeds, "params": args.params,
                        "test_accuracy": summary, "phase2_opening": opening},
                 details={"runs": runs}, libraries=["kedro-mlflow"], load_before=before)


if __name__ == "__main__":
    main()
