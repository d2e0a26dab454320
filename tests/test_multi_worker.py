"""`finetune.distribution: multi_worker_mirrored` across two worker processes on 127.0.0.1.

Two `kedro run --pipeline finetune --env test` processes in one project folder (the shared
storage of a cluster), each with the `TF_CONFIG` that names both and its own index, as the
README tells a user to start them. The chief (worker 0) writes the catalog's outputs and the
MLflow run; the other worker writes nothing. The per-epoch losses are compared with a
single-process run of the same parameters in the same folder: the same global batch (each
worker trains on half of it), the same data order, no dropout (each replica would draw its
own masks) and no feature cache (the multi-worker run trains phase 1 on images; the losses
are the same either way, but the comparison should not rest on it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from headswap.core import devices
from tests.conftest import copy_project, free_port, make_image_folder, mlflow_runs, small_cnn, stop
from tests.documented import documented, run_documented

#: Set in conf/test for both runs: no dropout and no feature cache (the same computation in
#: both), a log line per epoch with its loss.
SETTINGS = {"head": {"dropout": 0.0},
            "training": {"cache_features": False, "verbose": "epochs"}}
RUN_TIMEOUT_S = 600
#: Two replicas each average their half of a batch and the gradients are summed across them;
#: float32 sums in another order differ in the last digits.
LOSS_RTOL = 1e-4


def _files(project: Path) -> set[Path]:
    return {p.relative_to(project) for p in (project / "data").rglob("*") if p.is_file()}


def _losses(client, run) -> list[float]:
    history = client.get_metric_history(run.info.run_id, "epoch.loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


ROOT = Path(__file__).resolve().parents[1]

#: Each worker's share of every training batch, as Keras' `fit` distributes the datasets
#: (`experimental_distribute_dataset`), next to the undistributed batches.
SHARDS = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    from headswap.core import data, manifests
    manifest = manifests.ingest_image_folder(sys.argv[1], seed=0)[0]
    steps = -(-int((manifest["split"] == "train").sum()) // 16)  # one epoch's batches
    found = {}
    for name, cache in (("memory", 2**30), ("streamed", 0)):
        dataset = data.make_dataset(manifest, "train", (32, 32), 1, 16, shuffle=True,
                                    epoch=tf.Variable(3, dtype=tf.int64), cache_bytes=cache)
        def sums(images):
            return [round(float(v), 1) for v in tf.reduce_sum(images, axis=[1, 2, 3])]
        shards = iter(strategy.experimental_distribute_dataset(dataset))
        found[name] = {
            "full": [sums(x) for x, _ in dataset.take(steps)],
            "local": [sums(strategy.experimental_local_results(next(shards)[0])[0])
                      for _ in range(steps)]}
    print("RESULT" + json.dumps(found), flush=True)
""")


def _start_workers(command: list[str], cwd: Path, logs: list[Path]) -> list[subprocess.Popen]:
    """``command`` as two workers of one cluster on 127.0.0.1, each logging to its file."""
    cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
    workers = []
    for index, log in enumerate(logs):
        env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2",
               "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "src"),
               "TF_CONFIG": json.dumps({"cluster": cluster,
                                        "task": {"type": "worker", "index": index}})}
        with open(log, "w") as out:
            workers.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True))
    return workers


def _wait(workers: list[subprocess.Popen], logs: list[Path]) -> list[str]:
    """Both workers' logs once both have exited 0 (bounded), both stopped in any case."""
    try:
        codes = [w.wait(timeout=RUN_TIMEOUT_S) for w in workers]
    finally:
        for worker in workers:
            stop(worker)
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], texts[0][-3000:] + "\n----\n" + texts[1][-3000:]
    return texts


@pytest.mark.slow
def test_each_worker_trains_on_its_half_of_every_global_batch(tmp_path: Path):
    folder = make_image_folder(tmp_path / "images", per_class=20)
    logs = [tmp_path / "worker0.log", tmp_path / "worker1.log"]
    texts = _wait(_start_workers([sys.executable, "-c", SHARDS, str(folder)], ROOT, logs),
                  logs)
    (first, second) = (json.loads(re.search(r"RESULT(.*)", t).group(1)) for t in texts)
    for name in ("memory", "streamed"):
        full = first[name]["full"]
        assert full == second[name]["full"] and len(full) == 3  # 36 images: 16, 16, 4
        halves = zip(first[name]["local"], second[name]["local"], strict=True)
        for batch, (mine, theirs) in zip(full, halves, strict=True):
            assert len(mine) == len(theirs) == len(batch) // 2
            assert sorted(mine + theirs) == sorted(batch)  # the global batch, split in two


@pytest.mark.slow
def test_two_workers_train_as_one_process_and_only_the_chief_writes(tmp_path: Path,
                                                                   monkeypatch):
    project = copy_project(tmp_path / "project")
    make_image_folder(project / "data" / "01_raw" / "shapes", per_class=20)
    (project / "models").mkdir()
    small_cnn((32, 32, 1), num_classes=4).save(project / "models" / "user_cnn.keras")
    conf = project / "conf" / "test" / "parameters.yml"
    params = yaml.safe_load(conf.read_text())
    params["finetune"].update(seed=7, base={"source": "file", "path": "models/user_cnn.keras"})
    params["finetune"]["data"].update(path="data/01_raw/shapes", image_size=[32, 32])
    params["finetune"]["head"].update(SETTINGS["head"])
    params["finetune"].setdefault("training", {}).update(SETTINGS["training"])
    conf.write_text(yaml.safe_dump(params))

    # The single-process reference, as a user runs it (docs/pipelines/finetune.md).
    reference = run_documented(project, "kedro run --pipeline finetune")
    assert reference.returncode == 0, reference.stderr[-3000:]
    client, runs = mlflow_runs(project)
    (single,) = runs
    before = _files(project)

    logs = [tmp_path / "worker0.log", tmp_path / "worker1.log"]
    # Each worker runs the command of docs/scaling.md.
    monkeypatch.setenv("KEDRO_ENV", "test")
    command = [sys.executable, "-m", *documented(
        'kedro run --pipeline finetune --params "finetune.distribution=multi_worker_mirrored"')]
    chief_log, worker_log = _wait(_start_workers(command, project, logs), logs)
    assert "2 workers, 2 replicas in sync; this process is the chief" in chief_log
    assert "2 workers, 2 replicas in sync; this process is a worker (it writes nothing)" \
        in worker_log
    for log in (chief_log, worker_log):  # they leave together, neither reported crashed
        assert "Waiting for the other workers to finish their pipeline" in log
        assert "unhealthy" not in log

    # One new MLflow run, from the chief, with the single process's losses epoch by epoch.
    client, runs = mlflow_runs(project)
    assert len(runs) == 2 and runs[0].info.run_id == single.info.run_id
    multi = runs[1]
    assert multi.info.status == "FINISHED"
    assert multi.data.params["finetune.distribution"] == "multi_worker_mirrored"
    expected, found = _losses(client, single), _losses(client, multi)
    assert len(found) == 5  # phase 1 (3 epochs) and phase 2 (2) of conf/test
    np.testing.assert_allclose(found, expected, rtol=LOSS_RTOL)
    assert found[-1] < found[0]
    # The worker trained the same model: its log shows the chief's losses.
    pattern = re.compile(r"phase\d: epoch \d+/\d+ \([^)]*\): loss ([0-9.]+)")
    assert pattern.findall(worker_log) == pattern.findall(chief_log)
    assert len(pattern.findall(worker_log)) == 5

    # One new version of each versioned output, the chief's; the worker wrote nothing.
    version = multi.data.tags["run_id"]
    new = _files(project) - before
    assert new and all(version in path.parts for path in new)
    datasets = {path.parts[: path.parts.index(version)] for path in new}
    old_version = single.data.tags["run_id"]
    assert datasets == {path.parts[: path.parts.index(old_version)] for path in before
                        if old_version in path.parts}


@pytest.mark.parametrize(("cluster", "task", "chief", "workers"), [
    (None, None, True, 1),  # no cluster: the process alone
    ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 0}, True, 2),
    ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 1}, False, 2),
    ({"chief": ["c:1"], "worker": ["a:1", "b:1"]}, {"type": "chief", "index": 0}, True, 3),
    ({"chief": ["c:1"], "worker": ["a:1", "b:1"]}, {"type": "worker", "index": 0}, False, 3),
])
def test_the_chief_is_the_chief_task_else_worker_0(cluster, task, chief, workers, monkeypatch):
    if cluster is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
    assert devices.is_chief() is chief
    assert devices.worker_count() == workers
