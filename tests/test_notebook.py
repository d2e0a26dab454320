"""notebooks/explore_run.ipynb, executed as Jupyter runs it: a real kernel started in the
notebook's own folder, ``notebooks/``, of a project copy in which the example ran once. No
environment is named, so the project's ``conf/base/mlflow.yml`` applies, with its relative
``sqlite:///mlflow.db``, as for a user who opens the notebook after ``kedro run``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import copy_project, mlflow_runs, run_sessions
from tests.documented import run_documented_session

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_run.ipynb"
CLASSES = ["Ankle boot", "Bag", "Sandal", "Shirt", "Sneaker"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project in which the example ran once (env test, the project's
    mlflow.db): ``data`` and ``pretrain``, then finetune on the example as documented (its
    conf/example at conf/test's sizes); with a ``notebooks/`` folder as in the repository."""
    path = copy_project(tmp_path_factory.mktemp("project"))
    run_sessions(path, ["data", "pretrain"])
    run_documented_session(path, "kedro run --env example --pipeline finetune")
    (path / "notebooks").mkdir()
    return path


@pytest.mark.parametrize("folder", ["notebooks", "."], ids=["from-notebooks", "from-project"])
def test_the_explore_run_notebook_reads_the_newest_run(project: Path, folder: str,
                                                        monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), (
        "commit the notebook without outputs")
    monkeypatch.delenv("KEDRO_ENV", raising=False)  # conf/base's mlflow.yml, as for a user
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(project / folder)}}).execute()
    text = "\n".join(
        str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
        for cell in code for output in cell.outputs)
    assert f"Tracking URI: sqlite:///{project / 'mlflow.db'}" in text
    finished = [r for r in mlflow_runs(project)[1]
                if "test.accuracy" in r.data.metrics and r.info.status == "FINISHED"]
    assert finished and finished[-1].info.run_id in text  # the newest run with test results
    assert all(name in text for name in CLASSES)
    images = [o for cell in code for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # learning curves, confusion matrix, misclassified images
    assert not (project / "notebooks" / "mlflow.db").exists()  # no second, empty store
