"""How much pretraining the example's base needs: its time against what fine-tuning reaches.

For each variant ``<images per source class>x<epochs>``, in a throw-away copy of the project:
``kedro run --nodes extract_source_task,pretrain_base --params
example.source_per_class=<images>,pretrain.epochs=<epochs>`` (the pretraining node's time is
read from the log), then, on that base, ``kedro run --pipeline finetune --params
finetune.seed=<seed>`` for each seed: the test accuracy of phase 1 (the head alone) and of the
full recipe, as mean and spread (min-max). Writes benchmarks/results/pretraining.json.

    python benchmarks/pretraining.py [--variants 6000x4 3000x4 6000x2 3000x3 2000x4]
                                     [--seeds 42 43 44]
"""

from __future__ import annotations

import re
import statistics

from common import (
    argument_parser,
    kedro_command,
    node_seconds,
    pipeline_accuracy,
    project_copy,
    run_measured,
    start,
    table,
    write_result,
)


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argument_parser(__doc__, repeats=1)
    parser.add_argument("--variants", nargs="+",
                        default=["6000x4", "3000x4", "6000x2", "3000x3", "2000x4"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    args, before = start(parser)
    results = []
    with project_copy() as project:
        for variant in args.variants:
            images, epochs = (int(v) for v in variant.split("x"))
            pretrained = run_measured(kedro_command(
                "run", "--nodes", "extract_source_task,pretrain_base", "--params",
                f"example.source_per_class={images},pretrain.epochs={epochs}"), project,
            ).check(f"pretraining {variant}")
            seconds = node_seconds(pretrained.output)["node pretrain_base"]
            runs = []
            for seed in args.seeds:
                ran = run_measured(kedro_command("run", "--pipeline", "finetune", "--params",
                                                 f"finetune.seed={seed}"), project,
                                   ).check(f"finetune on {variant}, seed {seed}")
                head = re.findall(r"Phase 1 \(head only\): test accuracy ([0-9.]+)", ran.output)
                runs.append({"seed": seed, "head_only": float(head[-1]),
                             "full": pipeline_accuracy(ran.output)})
                print(f"  {variant}: seed {seed}: {runs[-1]}", flush=True)
            results.append({
                "variant": variant, "images_per_class": images, "epochs": epochs,
                "pretrain_s": seconds, "runs": runs,
                **{key: spread([r[key] for r in runs]) for key in ("head_only", "full")},
            })
    print(table(
        ["images per class x epochs", "pretraining s", "head only (mean)", "full (mean)",
         "full (min)", "full (max)"],
        [[r["variant"], r["pretrain_s"], r["head_only"]["mean"], r["full"]["mean"],
          r["full"]["min"], r["full"]["max"]] for r in results],
    ))
    write_result("pretraining", {
        "seeds": args.seeds,
        "variants": {r["variant"]: {k: v for k, v in r.items() if k not in ("variant", "runs")}
                     for r in results},
    }, details={"runs": {r["variant"]: r["runs"] for r in results}},
        libraries=["kedro-mlflow"], load_before=before)


if __name__ == "__main__":
    main()
