"""Every ``kedro run`` command that README.md and docs/ show in a code block is run by a test
exactly as written, or is listed in :data:`NEEDS` with what the test suite lacks to run it.

A test runs a documented command through ``tests/documented.py``'s ``run_documented``,
``run_documented_session`` or ``documented``, which take the documented text itself (its
placeholder paths swapped for the test's; when it names no ``--env``, ``KEDRO_ENV`` gives the
test environment, whose sizes make it run in seconds). :data:`RUN_BY` says which test runs
each; this module checks that the list is complete and that each named test does pass that
very text to one of those helpers. It runs nothing itself, so it costs no CI time.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
HELPERS = {"run_documented", "run_documented_session", "documented"}

#: Each documented command and the test that runs it, ``tests/<module>.py::<function>``
#: (a fixture or a test).
RUN_BY = {
    "kedro run": "tests/test_your_own_images.py::user_project",
    "kedro run --pipeline predict --params predict.path=/data/new_photos":
        "tests/test_your_own_images.py::user_project",
    'kedro run --params "finetune.data.path=/data/flowers,finetune.base.path=/models/'
    'my_base.keras"':
        "tests/test_your_own_images.py::test_a_csv_of_paths_and_labels_trains_and_predict_"
        "scores_it",
    "kedro run --env example --pipeline example": "tests/test_pipelines.py::project",
    'kedro run --pipeline finetune --params "finetune.phase2.epochs=3,'
    'finetune.data.batch_size=16"':
        "tests/test_pipelines.py::test_cli_runs_finetune_with_both_pipeline_flags",
    "kedro run --pipeline finetune --params finetune.phase1.epochs=-1":
        "tests/test_pipelines.py::test_invalid_parameters_stop_before_any_node",
    "kedro run --pipeline finetune":
        "tests/test_pipelines.py::test_a_killed_run_resumes_into_the_same_mlflow_run_and_"
        "matches_an_uninterrupted_one",
    'kedro run --pipeline finetune --params "finetune.training.resume=true"':
        "tests/test_pipelines.py::test_a_killed_run_resumes_into_the_same_mlflow_run_and_"
        "matches_an_uninterrupted_one",
    "kedro run --env example --pipeline finetune": "tests/test_notebook.py::project",
    "kedro run --pipeline data": "tests/test_compare.py::project",
    "kedro run --pipeline pretrain": "tests/test_compare.py::project",
    "kedro run --pipeline compare": "tests/test_compare.py::project",
    "kedro run --pipeline label_efficiency": "tests/test_label_efficiency.py::project",
    "kedro run --pipeline lr_find":
        "tests/test_tune.py::test_lr_find_suggests_rates_that_train_where_30_times_more_does_"
        "worse",
    'kedro run --pipeline finetune --params "finetune.phase1.learning_rate=auto"':
        "tests/test_tune.py::test_auto_rates_are_logged_and_a_killed_run_resumes_with_them",
    "kedro run --pipeline tune":
        "tests/test_tune.py::test_two_processes_share_one_study_each_trial_once_in_a_nested_run",
    'kedro run --pipeline predict --params "predict.path=/some/folder"':
        "tests/test_model_use.py::test_predict_pipeline_on_the_test_split_gives_the_"
        "evaluations_predictions",
    'kedro run --pipeline finetune --params "finetune.distribution=multi_worker_mirrored"':
        "tests/test_multi_worker.py::test_two_workers_train_as_one_process_and_only_the_chief_"
        "writes",
}

#: Documented commands that no test runs, and why.
NEEDS = {
    'kedro run --pipeline finetune --params "finetune.distribution=mirrored"':
        "GPUs: it spreads training over a machine's GPUs (without one, MirroredStrategy has "
        "a single CPU replica); tests/test_acceleration.py checks the strategy on two logical "
        "CPU devices through headswap.core",
    'kedro run --pipeline finetune --params "finetune.distribution=mirrored,'
    'finetune.mixed_precision=true"':
        "a GPU with tensor cores: mixed precision is slower on CPU; "
        "tests/test_acceleration.py checks float16 training through headswap.core",
}


def documented_commands() -> dict[str, list[str]]:
    """Every ``kedro run`` line of a fenced code block of README.md and docs/ (a leading
    ``$ `` prompt and a trailing ``# comment`` left out), with the pages that show it."""
    found: dict[str, list[str]] = {}
    for page in PAGES:
        blocks = re.findall(r"^ *```[^\n]*\n(.*?)^ *```", page.read_text(), re.S | re.M)
        for line in (line for block in blocks for line in block.splitlines()):
            line = line.strip().removeprefix("$ ")
            if re.match(r"kedro\s+run\b", line):
                command = re.split(r"\s+#", line, maxsplit=1)[0].strip()
                found.setdefault(command, []).append(str(page.relative_to(ROOT)))
    return found


def _function(reference: str) -> ast.FunctionDef:
    path, name = reference.split("::")
    tree = ast.parse((ROOT / path).read_text())
    functions = [node for node in ast.walk(tree)
                 if isinstance(node, ast.FunctionDef) and node.name == name]
    assert len(functions) == 1, f"{reference}: no such function"
    return functions[0]


def _passed_to_helpers(function: ast.FunctionDef) -> set[str]:
    """The string constants a function passes to the documented-command helpers."""
    passed = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in HELPERS:
            passed |= {arg.value for arg in ast.walk(node) if isinstance(arg, ast.Constant)
                       and isinstance(arg.value, str)}
    return passed


def test_every_documented_command_is_run_by_a_test_or_says_why_not():
    commands = documented_commands()
    assert commands, "no kedro run command found: the pages moved?"
    missing = {c: pages for c, pages in commands.items() if c not in RUN_BY and c not in NEEDS}
    assert not missing, (
        f"documented but run by no test (add a run in a test through run_documented, then "
        f"the command to RUN_BY; or to NEEDS with the reason): {missing}")
    stale = sorted((set(RUN_BY) | set(NEEDS)) - set(commands))
    assert not stale, f"listed here but shown nowhere any more: {stale}"
    assert not set(RUN_BY) & set(NEEDS)


@pytest.mark.parametrize("command", sorted(RUN_BY))
def test_the_named_test_runs_the_command_as_written(command: str):
    function = _function(RUN_BY[command])
    if command in _passed_to_helpers(function):
        return
    # README's "three steps" are read from the README itself
    from tests.test_your_own_images import readme_steps

    calls = {getattr(node.func, "id", None) for node in ast.walk(function)
             if isinstance(node, ast.Call)}
    assert {"readme_steps", "run_documented"} <= calls and command in readme_steps()[1], (
        f"{RUN_BY[command]} does not pass {command!r} to {sorted(HELPERS)}")


@pytest.mark.parametrize("command", sorted(documented_commands()))
def test_every_documented_command_is_one_kedro_accepts(command: str):
    """Its options are those of Kedro's ``run`` and its pipeline is registered."""
    from kedro.framework.cli.project import run

    from headswap.pipeline_registry import register_pipelines

    args = shlex.split(command)[2:]
    context = run.make_context("kedro run", list(args))
    pipelines = [context.params["pipeline"]] if context.params["pipeline"] else []
    assert set(pipelines) <= set(register_pipelines()), command
    env = context.params["env"]
    assert env is None or (ROOT / "conf" / env).is_dir(), f"{command}: no conf/{env}"
