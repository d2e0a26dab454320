"""Installing without apt: the example finds Fashion-MNIST's IDX files in the folders it is
given, in order; `make example` leaves apt alone when the files are in the project (and says
what to do where there is no apt-get); a plain virtual environment installs the project with
pip and its example reads the files from the project's data/01_raw/fashion-mnist."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from headswap.core.errors import InputError
from headswap.project.example import KERAS, find_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
       "t10k-labels-idx1-ubyte")
DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def idx_files(folder: Path, suffix: str = ".gz") -> Path:
    """The four file names in ``folder`` (their contents do not matter to the search)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in IDX:
        (folder / f"{name}{suffix}").write_bytes(b"")
    return folder


def test_the_first_folder_with_all_four_files_wins(tmp_path: Path):
    empty, partial = tmp_path / "empty", tmp_path / "partial"
    empty.mkdir()
    idx_files(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    second, third = idx_files(tmp_path / "second", ""), idx_files(tmp_path / "third")
    assert find_fashion_mnist([str(empty), str(partial), str(second), str(third)]) == second
    assert find_fashion_mnist([str(third), str(second)]) == third


def test_the_keras_entry_is_keras_cache_under_keras_home(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    cache = idx_files(tmp_path / "keras_home" / "datasets" / "fashion-mnist")
    assert find_fashion_mnist([str(tmp_path / "missing"), KERAS]) == cache


def test_no_folder_with_the_files_says_where_to_put_them(tmp_path: Path):
    with pytest.raises(InputError) as error:
        find_fashion_mnist([str(tmp_path / "a"), str(tmp_path / "b")])
    message = str(error.value)
    assert str(tmp_path / "a") in message and str(tmp_path / "b") in message
    assert "data/01_raw/fashion-mnist/" in message and "train-images-idx3-ubyte.gz" in message
    assert "apt-get install dataset-fashion-mnist" in message and "network" in message


def make_dry_run(folder: Path, target: str, path: str, *variables: str) -> str:
    """What ``make -n <target>`` in ``folder`` (a copy of the Makefile) would run, with
    ``PATH=path`` and Debian's package looked for where it is not."""
    shutil.copy(ROOT / "Makefile", folder / "Makefile")
    result = subprocess.run(
        [shutil.which("make"), "-n", target, f"PYTHON={sys.executable}",
         "FASHION_MNIST=/nonexistent/x.gz", *variables],
        cwd=folder, env={**os.environ, "PATH": path}, capture_output=True, text=True, timeout=60,
        check=True)
    return result.stdout


def bin_folder(folder: Path, *programs: str) -> str:
    """A PATH of one folder with links to ``programs`` (those make's recipes look up)."""
    folder.mkdir()
    for program in programs:
        found = shutil.which(program)
        if found:
            (folder / program).symlink_to(found)
    return str(folder)


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_example_installs_no_apt_package_when_the_files_are_in_the_project(tmp_path):
    idx_files(tmp_path / "data" / "01_raw" / "fashion-mnist")
    path = bin_folder(tmp_path / "bin", "id", "sh", "python3")
    (Path(path) / "apt-get").write_text("#!/bin/sh\nexit 1\n")  # there, never to be run
    (Path(path) / "apt-get").chmod(0o755)
    commands = make_dry_run(tmp_path, "example", path)
    assert "apt-get" not in commands
    assert "-m pip install -e ." in commands
    assert "-m kedro run --env example --pipeline example" in commands
    (tmp_path / "data" / "01_raw" / "fashion-mnist" / "train-images-idx3-ubyte.gz").unlink()
    assert "apt-get install -y dataset-fashion-mnist" in make_dry_run(tmp_path, "data", path)


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_without_apt_get_or_the_files_says_what_to_do(tmp_path: Path):
    path = bin_folder(tmp_path / "bin", "id", "sh", "python3")
    commands = make_dry_run(tmp_path, "data", path)
    assert "No apt-get here" in commands and "data/01_raw/fashion-mnist/" in commands
    assert "apt-get install" not in commands


@pytest.mark.slow
def test_a_plain_virtual_environment_installs_with_pip_and_reads_the_projects_files(
    tmp_path: Path,
):
    """``pip install --no-deps -e .`` of a copy of the project into a new virtual environment
    (its dependencies: those of this one, not downloaded again), the four IDX files copied
    into the copy's data/01_raw/fashion-mnist; the example's loader, with the folders that
    conf/base lists, reads them from there."""
    import yaml

    source = next((d for d in (ROOT / "data/01_raw/fashion-mnist", DEBIAN)
                   if all((d / f"{name}.gz").is_file() for name in IDX)), None)
    if source is None:
        pytest.skip("Fashion-MNIST is not on this machine (make install-test installs it)")
    project = tmp_path / "project"
    for name in ("conf", "src"):
        shutil.copytree(ROOT / name, project / name,
                        ignore=shutil.ignore_patterns("local", "__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, project)
    shutil.copytree(source, project / "data/01_raw/fashion-mnist")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # this environment's packages, seen from the new one (a venv's --system-site-packages
    # shows the base interpreter's only)
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                              "--no-deps", "-e", str(project)], capture_output=True, text=True,
                             timeout=600, check=False)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]

    folders = yaml.safe_load((project / "conf/base/parameters_data.yml").read_text())[
        "example"]["fashion_mnist_dirs"]
    check = textwrap.dedent(f"""
        import headswap
        from headswap.project.example import find_fashion_mnist, load_split
        folder = find_fashion_mnist({folders!r})
        images, labels = load_split(folder, "test")
        print(headswap.__file__, folder.resolve(), images.shape, labels.shape)
    """)
    # without PYTHONPATH: a Kedro session of an earlier test in this process points it at
    # that test's project
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([python, "-c", check], cwd=project, capture_output=True, text=True,
                            timeout=300, check=False,
                            env={**environment, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    module, folder, *shapes = result.stdout.split()
    assert module == str(project / "src/headswap/__init__.py")
    assert folder == str(project / "data/01_raw/fashion-mnist")
    assert " ".join(shapes) == "(10000, 28, 28) (10000,)"
