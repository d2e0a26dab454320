"""The documentation: every parameter key is described in the schema, the generated reference
shows each key with its description, the README stays a short entry point whose links lead
somewhere, and the site builds with ``mkdocs build --strict``."""

from __future__ import annotations

import functools
import html
import importlib.util
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def _hook():
    """docs/hooks/parameters.py, the MkDocs hook that generates the parameter reference."""
    spec = importlib.util.spec_from_file_location("docs_parameters_hook",
                                                  ROOT / "docs" / "hooks" / "parameters.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _models(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def schema_keys() -> list[tuple[str, type[BaseModel], str]]:
    """Every parameter key of the validated sections: (dotted key, model, field name)."""
    keys = []

    def walk(model: type[BaseModel], prefix: str, seen: tuple) -> None:
        for name, info in model.model_fields.items():
            if info.exclude:  # not a parameter (set by the code)
                continue
            keys.append((f"{prefix}.{name}", model, name))
            for nested in _models(info.annotation):
                if nested not in seen:
                    walk(nested, f"{prefix}.{name}", (*seen, nested))

    for top, model in _hook().roots().items():
        walk(model, top, (model,))
    return keys


def test_every_parameter_key_has_a_description():
    keys = schema_keys()
    assert len(keys) > 100  # finetune, predict and tune, with every nested section
    missing = [key for key, model, name in keys
               if len((model.model_fields[name].description or "").split()) < 2]
    assert not missing, (
        "describe these keys with a docstring under the field (use_attribute_docstrings): "
        + ", ".join(missing))


def test_the_reference_shows_every_key_with_its_description():
    hook = _hook()
    for top, model in hook.roots().items():
        text = hook.reference(top)
        shown = {(s.model, row["key"]): row for s in hook.sections(top, model)
                 for row in s.rows}
        for key, owner, name in schema_keys():
            if not key.startswith(f"{top}."):
                continue
            row = shown.get((owner, name))
            assert row is not None, f"{key} is missing from the reference"
            assert hook.prose(owner.model_fields[name].description) in row["description"]
            assert row["type"] and row["default"], key
        for section in hook.sections(top, model):
            assert f"### `{section.path}`" in text
            for row in section.rows:
                assert f"| `{row['key']}` | {row['type']} |" in text


def test_the_readme_is_short_and_its_links_lead_somewhere():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


@pytest.mark.slow
def test_the_site_builds_strict_with_every_key_described(tmp_path: Path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-5000:]
    page = (site / "configuration" / "index.html").read_text()
    words = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())
    for key, owner, name in schema_keys():
        description = _hook().prose(owner.model_fields[name].description)
        plain = " ".join(re.sub(r"`([^`]*)`", r" \1 ", description).split())
        assert plain in words, f"{key}: its description is not on the page"
    assert 'id="p-finetune-phase2"' in page
    started = (site / "getting-started" / "index.html").read_text()
    started = " ".join(html.unescape(re.sub(r"<[^>]+>", "", started)).split())
    assert "Your own images, in three steps" in started  # included from the README
    assert "kedro run --pipeline predict --params predict.path=" in started


@functools.cache
def _benchmarks_hook():
    """docs/hooks/benchmarks.py, the MkDocs hook that makes docs/benchmarks.md's tables from
    the committed benchmarks/results/*.json."""
    spec = importlib.util.spec_from_file_location("docs_benchmarks_hook",
                                                  ROOT / "docs" / "hooks" / "benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_result_says_where_it_comes_from():
    import json
    from datetime import datetime, timedelta

    paths = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert paths, "no committed benchmark result"
    for path in paths:
        record = json.loads(path.read_text())
        missing = {"benchmark", "date", "command", "machine", "versions", "load_average",
                   "figures"} - record.keys()
        assert not missing, (f"{path.name} lacks {sorted(missing)}: write it with "
                             "benchmarks/common.py's write_result (re-run its benchmark)")
        assert record["benchmark"] == path.stem
        assert datetime.fromisoformat(record["date"]).utcoffset() == timedelta(0), path.name
        assert record["command"].startswith("python benchmarks/"), path.name
        machine = record["machine"]
        assert machine["cpu"] and machine["logical_cores"] >= 1 and machine["memory_gib"] > 0
        assert isinstance(machine["gpu"], list), path.name
        for library in ("python", "tensorflow", "keras", "kedro", "mlflow", "numpy",
                        "scikit-learn"):
            assert record["versions"].get(library), f"{path.name}: no {library} version"
        assert record["figures"], f"{path.name} has no figures"


def test_the_benchmarks_page_shows_every_result_with_its_figures():
    import math

    hook = _benchmarks_hook()
    page = hook.render_page((ROOT / "docs" / "benchmarks.md").read_text())
    assert "<!-- benchmark" not in page  # every marker replaced
    results = hook.results()
    assert results
    for name, record in results.items():
        header = f"| `benchmarks/results/{name}.json` | |"
        assert page.count(header) == 1, f"{name} is not on the page (or twice)"
        section = page[page.index(header):].split("\n\n", 1)[0]
        assert f"| command | `{record['command']}` |" in section
        if "date" in record:  # its presence is the test above's to check
            assert record["date"] in section
        for value in record.get("versions", {}).values():
            assert str(value) in section
        rows = hook.figures(record)
        assert rows
        for key, value in rows:
            assert f"| `{key}` | {hook.figure(value)} |" in section, f"{name}: {key}"

        def numbers(value):
            if isinstance(value, dict):
                return [n for v in value.values() for n in numbers(v)]
            if isinstance(value, list):
                return [n for v in value for n in numbers(v)]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            return [value] if ok and math.isfinite(value) else []

        shown_from = record["figures"] if "figures" in record else [v for _, v in rows]
        for number in numbers(shown_from):  # every figure, shown to 4 significant digits
            shown = hook.figure(number)
            assert shown in section, f"{name}: {number}"
            assert float(shown.replace(",", "")) == pytest.approx(number, rel=6e-4), number
