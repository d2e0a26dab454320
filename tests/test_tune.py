"""The ``lr_find`` and ``tune`` pipelines on the example at test size (conf/test), run as the
README tells a user to (``kedro run --pipeline ...`` in a copy of the project), with a real
MLflow backend and a real Optuna storage."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import keras
import optuna
import pandas as pd
import pytest
import yaml

from headswap.core import FitOptions, Stage, fit
from headswap.project.config import parse_finetune
from tests.conftest import copy_project, kedro_cli, kill_in_phase2, mlflow_runs, run_sessions
from tests.documented import conf_environment, documented, run_documented
from tests.test_compare import _latest

pytestmark = pytest.mark.slow

ENV = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2",
       "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project where the example's ``data`` and ``pretrain`` ran (env test)."""
    path = copy_project(tmp_path_factory.mktemp("tune"))
    run_sessions(path, ["data", "pretrain"])
    return path


def _two_epochs(model_path: Path, manifest: pd.DataFrame, stage: Stage) -> list[float]:
    """The training loss of each of two epochs of ``stage`` from the saved model."""
    model = keras.saving.load_model(model_path, compile=False)
    options = FitOptions(image_size=(28, 28), batch_size=16, verbose=0)
    return fit(model, manifest, [stage.model_copy(update={"epochs": 2})], options)["loss"]


def test_lr_find_suggests_rates_that_train_where_30_times_more_does_worse(
    project: Path, monkeypatch
):
    result = run_documented(project, "kedro run --pipeline lr_find")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads(_latest(project, "data/08_reporting/lr_find.json").read_text())
    assert _latest(project, "data/08_reporting/lr_find.png").stat().st_size > 0
    client, runs = mlflow_runs(project)
    run = runs[-1]
    assert run.info.run_name.startswith("lr_find - ") and run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "lr_find")}
    assert {"lr_find/lr_find_report.json", "lr_find/lr_find_plot.png"} <= artifacts

    monkeypatch.chdir(project)  # the manifest's paths are the project's
    manifest = pd.read_csv(_latest(project, "data/02_intermediate/manifest.csv"), dtype=str,
                           keep_default_na=False)
    phases = {  # the model each test started from, and how its phase trains (conf/test)
        "phase1": (_latest(project, "data/06_models/headswapped_model.keras"),
                   Stage(epochs=2, learning_rate=1.0, optimizer="rmsprop")),
        "phase2": (_latest(project, "data/06_models/phase1_model.keras"),
                   Stage(epochs=2, learning_rate=1.0, optimizer="adam", train="all")),
    }
    # the new head's curve falls well out of its noise; the phase-1 model's is flat within it
    # (the test-size example's base learns little more), so it suggests nothing
    assert report["phase1"]["drop"] > 2 * report["phase1"]["noise"]
    assert report["phase2"]["drop"] < report["phase2"]["noise"]
    assert report["suggested_learning_rates"]["phase2"] is None
    assert "lr_find.phase2.suggested_learning_rate" not in run.data.metrics
    assert "Learning-rate range test: no suggestion." in result.stdout + result.stderr
    for phase, (model_path, stage) in phases.items():
        test = report[phase]
        suggestion = report["suggested_learning_rates"][phase]
        assert suggestion == test["suggestion"]
        assert test["minimum"] <= test["learning_rates"][-1] and test["stopped"]
        if suggestion is None:
            continue
        assert run.data.metrics[f"lr_find.{phase}.suggested_learning_rate"] == pytest.approx(
            suggestion)
        good = _two_epochs(model_path, manifest, stage.model_copy(
            update={"learning_rate": suggestion}))
        high = _two_epochs(model_path, manifest, stage.model_copy(
            update={"learning_rate": 30 * suggestion}))
        assert good[1] < good[0], f"{phase}: {suggestion:.3g} does not train: {good}"
        assert not math.isfinite(high[1]) or high[1] > good[1], (
            f"{phase}: 30 x {suggestion:.3g} trains as well: {high} against {good}")


def test_auto_rates_are_logged_and_a_killed_run_resumes_with_them(project: Path):
    """``learning_rate: auto`` in phase 1 (in phase 2 the test-size example's curve is flat:
    no rate, see above); the run is killed in phase 2 and the same command continues it in
    the same MLflow run, with the same rate as a parameter, found again from the resume
    state."""
    env = {**ENV, "KEDRO_ENV": conf_environment(project, "auto", {"finetune": {
        "data": {"quality": "off"}, "export": {"formats": []},  # not what is resumed
        "phase1": {"epochs": 2}, "phase2": {"epochs": 6}}})}
    command = [sys.executable, "-m", *documented(  # docs/pipelines/lr_find.md
        'kedro run --pipeline finetune --params "finetune.phase1.learning_rate=auto"')]
    state = project / "data/05_model_input/resume"
    _, before = mlflow_runs(project)
    kill_in_phase2(command, project, env)
    found = {p.name.split("_")[0]: json.loads(p.read_text())["learning_rate"]
             for p in state.glob("*/phase*_stage1.lr_find.json")}
    assert set(found) == {"phase1"}

    resumed = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True,
                             timeout=600, check=False)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert "Resuming: logging into the interrupted MLflow run" in output
    assert "learning_rate auto, " in output and "as found before the interruption" in output
    client, runs = mlflow_runs(project)
    assert len(runs) == len(before) + 1, "the resumed run started a new MLflow run"
    run = client.get_run(runs[-1].info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["finetune.phase1.learning_rate"] == "auto"
    histories = {phase: json.loads(_latest(
        project, f"data/07_model_output/{phase}_history.json").read_text())
        for phase in ("phase1",)}
    rates = {m.step: m.value for m in client.get_metric_history(run.info.run_id,
                                                                 "epoch.learning_rate")}
    for phase, history in histories.items():
        rate = history["found_learning_rates"][0]
        assert rate == found[phase]
        assert float(run.data.params[f"lr_find.{phase}.learning_rate"]) == rate
        assert rates[history["epoch"][0]] == pytest.approx(rate)


def test_two_processes_share_one_study_each_trial_once_in_a_nested_run(project: Path):
    """Two ``kedro run --pipeline tune`` started together on one study finish its 4 trials
    (conf/test) between them, none twice, each trial an MLflow run nested under the run of
    the process that ran it; each writes the best parameters and their test report."""
    study = "shared"
    env = {**ENV, "KEDRO_ENV": conf_environment(project, study, {"tune": {"study": study}})}
    logs = [project / f"tune_{i}.log" for i in range(2)]
    processes = []
    for log in logs:
        with open(log, "w") as out:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", *documented("kedro run --pipeline tune")],
                cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=600) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)

    storage = f"sqlite:///{project / 'data/07_model_output/tune/optuna.db'}"
    trials = [t for t in optuna.load_study(study_name=study, storage=storage).trials
              if not t.user_attrs.get("over_budget")]
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}

    client, runs = mlflow_runs(project)
    parents = {r.info.run_id: r for r in runs if r.info.run_name.startswith("tune - ")}
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents.values())
    nested = [r for r in runs if r.data.tags.get("optuna.study") == study]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in nested) == [0, 1, 2, 3]
    by_number = {t.number: t for t in trials}
    for run in nested:
        trial = by_number[int(run.data.tags["optuna.trial"])]
        assert run.data.tags["mlflow.parentRunId"] in parents
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["trial_state"] == trial.state.name
        assert (run.data.tags.get("pruned") == "true") == (trial.state.name == "PRUNED")
        curve = client.get_metric_history(run.info.run_id, "epoch.val_accuracy")
        assert [m.value for m in sorted(curve, key=lambda m: m.step)] == pytest.approx(
            [trial.intermediate_values[s] for s in sorted(trial.intermediate_values)])
        assert {f"finetune.{k}" for k in trial.params} <= set(run.data.params)
    print({r.data.tags["optuna.trial"]: r.data.tags["mlflow.parentRunId"][:8] for r in nested},
          {t.number: t.state.name for t in trials})

    completed = {t.number: t for t in trials if t.state.name == "COMPLETE"}
    chosen = []
    for parent in parents.values():  # what each process wrote when its search ended
        version = parent.data.tags["run_id"]  # the Kedro run's version of its outputs
        folder = project / "data/08_reporting/tune"
        best = yaml.safe_load((folder / f"parameters_tuned.yml/{version}/parameters_tuned.yml")
                              .read_text())
        trial = next(t for t in completed.values() if best == {"finetune": t.user_attrs[
            "finetune"]})
        chosen.append(trial.value)
        report = json.loads((folder / f"best_classification_report.json/{version}/"
                                      "best_classification_report.json").read_text())
        assert parent.data.metrics["tune.best.test.accuracy"] == pytest.approx(
            report["accuracy"])
        # the same seed trains the same model: the trial's validation accuracy again
        assert parent.data.metrics["tune.best.val_accuracy"] == pytest.approx(trial.value)
        assert parent.data.metrics["tune.best_trial.val_accuracy"] == pytest.approx(
            trial.value)
    assert max(chosen) == max(t.value for t in completed.values())

    # ready to drop into a configuration folder: Kedro merges it over conf/base and the
    # parameter schema accepts the result
    tuned = project / "conf" / "tuned"
    tuned.mkdir()
    (tuned / "parameters_tuned.yml").write_text(yaml.safe_dump(best))
    from kedro.framework.session import KedroSession

    with KedroSession.create(project_path=project, env="tuned") as session:
        params = session.load_context().params["finetune"]
    cfg = parse_finetune(params)
    assert cfg.phase1.epochs == best["finetune"]["phase1"]["epochs"]
    assert cfg.head.dropout == best["finetune"]["head"]["dropout"]


def test_bad_tune_parameters_stop_with_one_message_before_any_trial(project: Path):
    result = kedro_cli(project, "run", "--pipeline", "tune", "--env", "test", "--params",
                       "tune.n_trials=0,tune.study=refused", timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Error: Invalid parameters:\n  tune.n_trials: got 0" in output
    assert "Traceback" not in output
    storage = f"sqlite:///{project / 'data/07_model_output/tune/optuna.db'}"
    if (project / "data/07_model_output/tune/optuna.db").exists():
        assert "refused" not in optuna.get_all_study_names(storage)
