"""The source layout keeps its two layers apart: the library (``headswap.core``) imports neither
Kedro, MLflow nor the project; only the pipeline registry imports the pipelines; no pipeline
imports another's nodes; no module grows past about 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "headswap"
MODULES = sorted(SRC.rglob("*.py"))
MAX_LINES = 420  # "about 400": a module past it mixes topics and is split by topic


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from x import y`` gives ``x`` and
    ``x.y``, since ``y`` may be a module)."""
    names = set()
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_the_modules_are_found():
    names = {module_name(p) for p in MODULES}
    assert {"headswap.core.fit", "headswap.project.config", "headswap.pipeline_registry",
            "headswap.pipelines.finetune.nodes"} <= names


@pytest.mark.parametrize("path", [p for p in MODULES if "core" in p.relative_to(SRC).parts[:1]],
                         ids=module_name)
def test_the_library_imports_no_kedro_mlflow_or_project(path: Path):
    outside = {name for name in imported(path)
               if name.split(".")[0] in {"kedro", "kedro_mlflow", "kedro_datasets", "mlflow"}
               or name.startswith(("headswap.project", "headswap.pipelines"))
               or name in {"headswap.settings", "headswap.pipeline_registry"}}
    assert not outside, f"{module_name(path)} imports {sorted(outside)}"


def test_only_the_registry_imports_the_pipelines():
    importers = {module_name(p) for p in MODULES
                 if not module_name(p).startswith("headswap.pipelines")
                 and any(n.startswith("headswap.pipelines") for n in imported(p))}
    assert importers == {"headswap.pipeline_registry"}


def test_no_pipeline_imports_another_pipelines_nodes():
    for path in SRC.glob("pipelines/*/*.py"):
        own = path.parent.name
        foreign = {n for n in imported(path)
                   if n.startswith("headswap.pipelines.") and n.endswith(".nodes")
                   and n.split(".")[2] != own}
        assert not foreign, f"{module_name(path)} imports {sorted(foreign)}"


def test_no_module_is_over_about_400_lines():
    long = {module_name(p): n for p in MODULES
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
