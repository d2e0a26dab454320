"""Running the ``kedro run`` commands that README.md and docs/ show, exactly as written, in a
copy of the project (tests/test_documented_commands.py checks that each is run through these)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import variable_kept


def documented(command: str, replace: dict[str, str] | None = None) -> list[str]:
    """A ``kedro run ...`` command as README.md or docs/ show it, split as a shell splits it,
    with the docs' placeholder paths (``/data/flowers``...) swapped for the test's:
    ``["kedro", "run", ...]``, to run as ``python -m kedro run ...``.
    tests/test_documented_commands.py checks that every command
    the docs show is run through this, by some test, with the docs' own text."""
    for placeholder, value in (replace or {}).items():
        assert placeholder in command, placeholder
        command = command.replace(placeholder, value)
    args = shlex.split(command)
    assert args[:2] == ["kedro", "run"], command
    return args


def _documented_env(project: Path, args: list[str], env: str | None) -> dict[str, str]:
    """The environment variables of a documented run: ``KEDRO_ENV=env`` for a command that
    names no ``--env`` (None: conf/local, as for a user); for ``--env example``, the project
    copy's conf/example gets conf/test's sizes first (the same pipelines, in seconds)."""
    variables = {k: v for k, v in os.environ.items() if k != "KEDRO_ENV"}
    if "--env" in args:
        named = args[args.index("--env") + 1]
        if named == "example":
            for path in (project / "conf" / "test").iterdir():
                shutil.copy(path, project / "conf" / "example" / path.name)
    elif env is not None:
        variables["KEDRO_ENV"] = env
    return variables


def run_documented(project: Path, command: str, replace: dict[str, str] | None = None,
                   env: str | None = "test", timeout: int = 600) -> subprocess.CompletedProcess:
    """A documented ``kedro run`` command (:func:`documented`), run in ``project`` in a
    subprocess, output captured; ``env`` is the environment when the command names none."""
    args = documented(command, replace)
    variables = {**_documented_env(project, args, env), "KEDRO_DISABLE_TELEMETRY": "true",
                 "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", *args], cwd=project, env=variables,
                          text=True, capture_output=True, timeout=timeout, check=False)


def run_documented_session(project: Path, command: str, env: str | None = "test") -> None:
    """A documented ``kedro run`` command run in this process by Kedro's own ``run`` command
    (cheaper than a subprocess: TensorFlow is imported once), from ``project``."""
    from kedro.framework.cli.project import run
    from kedro.framework.startup import bootstrap_project

    args = documented(command)
    variables = _documented_env(project, args, env)
    cwd = os.getcwd()
    os.chdir(project)
    try:
        with variable_kept("KEDRO_ENV"):
            if "KEDRO_ENV" in variables:
                os.environ["KEDRO_ENV"] = variables["KEDRO_ENV"]
            else:
                os.environ.pop("KEDRO_ENV", None)
            bootstrap_project(project)
            run.main(args=args[2:], prog_name="kedro run", standalone_mode=False)
    finally:
        os.chdir(cwd)


def conf_environment(project: Path, name: str, parameters: dict[str, Any]) -> str:
    """A configuration environment ``conf/<name>`` in ``project``: conf/test's with
    ``parameters`` merged in (nested dicts), so that a documented command runs exactly as
    written on settings a test needs; returns ``name`` (for ``env=`` above)."""
    def merge(into: dict, extra: dict) -> dict:
        for key, value in extra.items():
            into[key] = (merge(dict(into.get(key) or {}), value) if isinstance(value, dict)
                         else value)
        return into

    test = project / "conf" / "test"
    folder = project / "conf" / name
    folder.mkdir(exist_ok=True)
    for path in test.iterdir():
        shutil.copy(path, folder / path.name)
    params = yaml.safe_load((test / "parameters.yml").read_text())
    (folder / "parameters.yml").write_text(yaml.safe_dump(merge(params, parameters)))
    return name
