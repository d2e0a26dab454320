"""Peak memory of the finetune pipeline on the example's folder and on one ten times larger.

Writes a 10x folder (1,000 labelled training images per class instead of 100, from
Fashion-MNIST's training images of the target classes, by the data pipeline's own node; the
test images are the same) into a temporary folder, then runs ``kedro run --pipeline finetune``
on each folder with the same epochs, alternately, in fresh processes, and records each
process's peak resident memory (``wait4``) and wall time. Prints the medians and the 10x/1x
ratio (target: at most 1.15); writes benchmarks/results/peak_memory.json.

    python benchmarks/peak_memory.py [--repeats 3] [--epochs 2] [--cache-mb N]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import (
    EXAMPLE,
    argument_parser,
    finetune_command,
    medians,
    project_copy,
    project_parameters,
    repeat,
    run_measured,
    start,
    table,
    write_example_folder,
    write_result,
)

from headswap.core import data, manifests, sources
from headswap.project.config import parse_finetune


def main() -> None:
    parser = argument_parser(__doc__, repeats=3)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each phase")
    parser.add_argument("--cache-mb", type=int, default=None,
                        help="finetune.data.cache_memory_mb (default: the parameters')")
    args, before = start(parser)
    cfg = parse_finetune(project_parameters())
    budget = args.cache_mb if args.cache_mb is not None else cfg.data.cache_memory_mb
    size, channels = cfg.data.image_size, 1
    with tempfile.TemporaryDirectory(prefix="headswap-10x-") as tmp, project_copy() as project:
        big = Path(tmp) / "fashion-mnist-target-10x"
        print(f"writing the 10x folder to {big} ...", flush=True)
        write_example_folder(big, labels_per_class=1000)
        folders = {"1x": EXAMPLE, "10x": big}
        splits = {}
        for name, folder in folders.items():
            manifest, _ = manifests.ingest_image_folder(folder, cfg.data.val_fraction,
                                                   cfg.data.test_fraction, cfg.seed)
            counts = manifest["split"].value_counts().to_dict()
            train_mb = data.decoded_bytes(counts["train"], size, channels) / 2**20
            splits[name] = {"images": counts, "decoded_train_mb": train_mb,
                            "train_kept_in_memory": bool(budget) and train_mb <= budget}

        def command(folder: Path) -> list[str]:
            return finetune_command({
                "data.path": folder, "phase1.epochs": args.epochs,
                "phase2.epochs": args.epochs, "data.cache_memory_mb": budget,
            })

        def measure(_: int) -> dict:
            row = {}
            for name, folder in folders.items():
                ran = run_measured(command(folder), project).check(f"kedro run on {name}")
                row[f"{name} peak_rss_mb"], row[f"{name} wall_s"] = ran.peak_rss_mb, ran.wall_s
            row["ratio"] = row["10x peak_rss_mb"] / row["1x peak_rss_mb"]
            return row

        print(f"kedro run --pipeline finetune, {args.epochs} + {args.epochs} epochs, "
              f"cache_memory_mb {budget}, {args.repeats} repeats", flush=True)
        runs = repeat(args.repeats, measure)
    summary = medians(runs)
    print(table(
        ["folder", "train/val/test images", "decoded train MiB", "peak RSS MiB", "wall s"],
        [[name, "/".join(str(splits[name]["images"][s]) for s in sources.SPLITS),
          splits[name]["decoded_train_mb"], summary[f"{name} peak_rss_mb"],
          summary[f"{name} wall_s"]] for name in folders],
    ))
    verdict = "met" if summary["ratio"] <= 1.15 else "missed"
    print(f"peak RSS 10x / 1x: {summary['ratio']:.3f} (target at most 1.15: {verdict})")
    write_result("peak_memory", {
        "epochs_per_phase": args.epochs, "cache_memory_mb": budget, "repeats": args.repeats,
        "folders": splits, "summary": summary, "target_ratio": 1.15,
    }, details={"runs": runs}, libraries=["kedro-mlflow"], load_before=before)


if __name__ == "__main__":
    main()
