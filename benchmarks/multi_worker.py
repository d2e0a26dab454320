"""Phase 2 on conf/test: one process against two workers (multi_worker_mirrored) on this machine.

Each repeat runs ``kedro run --pipeline finetune --env test`` in a throw-away copy of the
project, once as one process and once as two worker processes on 127.0.0.1 (each with the
``TF_CONFIG`` that names both and its own index), with the same global batch, no dropout and no
feature cache, so that both train the same model on the same batches. Prints phase 2's
seconds per epoch (the phase's time over its epochs, its first epoch's tracing included) and
how far apart the two runs' per-epoch training losses are; writes
benchmarks/results/multi_worker.json.

    python benchmarks/multi_worker.py [--repeats 3] [--epochs 2]   # phase 2's epochs

Two workers on one machine share its cores and talk over gRPC: expect them to be slower than
one process; the point of running them here is that they train the same model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (
    ENV,
    argument_parser,
    kedro_command,
    medians,
    project_copy,
    repeat,
    start,
    table,
    write_result,
)

PARAMS = {"finetune.head.dropout": 0.0, "finetune.training.cache_features": False}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def phase2(project: Path) -> dict:
    """The newest phase-2 history of the project."""
    histories = sorted((project / "data" / "07_model_output" / "phase2_history.json").glob(
        "*/phase2_history.json"))
    return json.loads(histories[-1].read_text())


def run(project: Path, params: dict, workers: int) -> None:
    command = kedro_command("run", "--pipeline", "finetune", "--env", "test", "--params",
                            ",".join(f"{k}={v}" for k, v in params.items()))
    cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(workers)]}
    processes = []
    with tempfile.TemporaryDirectory() as logs:
        for index in range(workers):
            env = {**os.environ, **ENV}
            if workers > 1:
                env["TF_CONFIG"] = json.dumps({"cluster": cluster,
                                               "task": {"type": "worker", "index": index}})
            with open(Path(logs) / f"{index}.log", "w") as log:
                processes.append(subprocess.Popen(command, cwd=project, env=env, stdout=log,
                                                  stderr=subprocess.STDOUT))
        codes = [p.wait(timeout=1800) for p in processes]
        if any(codes):
            output = (Path(logs) / f"{codes.index(next(c for c in codes if c))}.log").read_text()
            raise SystemExit(f"kedro run failed ({codes}):\n{output[-4000:]}")


def main() -> None:
    parser = argument_parser(__doc__, repeats=3)
    parser.add_argument("--epochs", type=int, default=2, help="phase 2's epochs")
    args, load_before = start(parser)
    params = {**PARAMS, "finetune.phase2.epochs": args.epochs}

    def measure(_: int) -> dict:
        found = {}
        with project_copy() as project:
            for name, workers in (("one_process", 1), ("two_workers", 2)):
                extra = {"finetune.distribution": "multi_worker_mirrored"} if workers > 1 else {}
                run(project, {**params, **extra}, workers)
                history = phase2(project)
                found[f"{name}_s_per_epoch"] = history["seconds"] / len(history["epoch"])
                found[f"{name}_loss"] = history["loss"]
        one, two = found.pop("one_process_loss"), found.pop("two_workers_loss")
        found["loss_max_rel_diff"] = max(abs(a - b) / abs(a) for a, b in zip(one, two,
                                                                              strict=True))
        return found

    runs = repeat(args.repeats, measure)
    summary = medians(runs)
    print(table(["", "phase 2 s/epoch"],
                [["1 process", summary["one_process_s_per_epoch"]],
                 ["2 workers", summary["two_workers_s_per_epoch"]]]))
    print(f"per-epoch training loss, largest relative difference: "
          f"{max(r['loss_max_rel_diff'] for r in runs):.2e}")
    write_result("multi_worker", {"epochs": args.epochs, "params": params, "median": summary},
                 details={"runs": runs}, libraries=["kedro-mlflow"], load_before=load_before)


if __name__ == "__main__":
    sys.exit(main())
