"""MkDocs hook: the benchmarks' results, generated from the committed
``benchmarks/results/*.json`` when the site is built, so that no figure on the page can drift
from the file it comes from.

A page asks for results with a marker on a line of its own:

* ``<!-- benchmark-result: phase1_cache -->``: the table of ``benchmarks/results/<name>.json``
  (the command that wrote it, its date, machine, versions and load, then every figure), or a
  line saying that no result of that name is committed;
* ``<!-- benchmark-results -->``: a section with the table of every result file that no
  ``benchmark-result`` marker of the page shows;
* ``<!-- benchmarks-without-results -->``: a list of the benchmark scripts (those under
  ``benchmarks/`` that write a result) whose command no committed result records.

The files are written by ``benchmarks/common.py``'s ``write_result``: ``figures`` is what the
tables show; ``details`` (the per-repeat figures behind them) stays in the file.
:func:`render_page` is what the hook does to a page; ``tests/test_docs.py`` checks it.
"""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
ONE = re.compile(r"^<!-- benchmark-result: ([\w.-]+) -->$", re.M)
ALL = re.compile(r"^<!-- benchmark-results -->$", re.M)
WITHOUT = re.compile(r"^<!-- benchmarks-without-results -->$", re.M)
# Keys of a result that are not figures (the rest of a file written without ``figures``).
METADATA = ("benchmark", "date", "finished", "started", "command", "machine", "versions",
            "load_average", "load_average_before", "load_average_after", "details")
SIGNIFICANT = 4  # digits of a figure that is not a whole number


def results() -> dict[str, dict[str, Any]]:
    """Every committed result, by name (the file's stem), in name order."""
    return {path.stem: json.loads(path.read_text())
            for path in sorted(RESULTS.glob("*.json"))}


def figure(value: Any) -> str:
    """A figure as the tables show it: whole numbers with thousands separators, others with
    :data:`SIGNIFICANT` significant digits (never an exponent), lists joined with commas."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == int(value) and abs(value) < 1e15:
            return f"{int(value):,}"
        decimals = max(0, SIGNIFICANT - 1 - math.floor(math.log10(abs(value))))
        text = f"{value:,.{decimals}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    if isinstance(value, (list, tuple)):
        return ", ".join(figure(v) for v in value) if value else "none"
    if isinstance(value, dict) and not value:
        return "none"
    return _escape(str(value))


def _escape(text: str) -> str:
    """Text safe in a Markdown table cell."""
    return re.sub(r"([\\`*_\[\]<>|])", r"\\\1", " ".join(text.split()))


def _label(item: dict[str, Any], index: int) -> tuple[str, str | None]:
    """How a list's dict is named in a key, and the key that names it: ``first_key=value``
    when its first value is a number or a string (``variant=3000x4``), else its index."""
    if item:
        key, value = next(iter(item.items()))
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return f"{key}={value if isinstance(value, str) else figure(value)}", key
    return str(index), None


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """The leaves of nested figures as (dotted key, value); a list of numbers or strings is
    one leaf, a list of dicts a leaf per value (each dict named by :func:`_label`)."""
    if isinstance(value, dict) and value:
        return [leaf for key, item in value.items()
                for leaf in flatten(item, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        out = []
        for i, item in enumerate(value):
            label, named_by = _label(item, i)
            rest = {k: v for k, v in item.items() if k != named_by}
            out += flatten(rest, f"{prefix}[{label}]") if rest else [(f"{prefix}[{label}]", "")]
        return out
    return [(prefix, value)]


def figures(record: dict[str, Any]) -> list[tuple[str, Any]]:
    """A result's figures, flattened (a file without ``figures``: every key but its
    metadata and its per-repeat lists)."""
    if "figures" in record:
        return flatten(record["figures"])
    return flatten({k: v for k, v in record.items()
                    if k not in METADATA and not k.endswith("runs")})


def _machine(machine: dict[str, Any] | None) -> str:
    if not machine:
        return "not recorded"
    cores = machine.get("logical_cores", machine.get("cores"))
    memory = machine.get("memory_gib")
    gpus = machine.get("gpu")
    parts = [machine.get("cpu") or "CPU not recorded",
             f"{cores} logical cores" if cores is not None else "cores not recorded",
             f"{figure(memory)} GiB memory" if memory is not None else "memory not recorded",
             ("GPU: " + "; ".join(gpus) if gpus else "no GPU") if "gpu" in machine
             else "GPU not recorded"]
    if machine.get("platform"):
        parts.append(machine["platform"])
    return _escape(", ".join(parts))


def _versions(versions: dict[str, Any] | None) -> str:
    if not versions:
        return "not recorded"
    return _escape(", ".join(f"{name} {version or 'not installed'}"
                             for name, version in versions.items()))


def _load(record: dict[str, Any]) -> str:
    load = record.get("load_average") or {"before": record.get("load_average_before"),
                                          "after": record.get("load_average_after")}
    before, after = load.get("before"), load.get("after")
    if not before and not after:
        return "not recorded"
    return ", ".join(f"{figure(values[0])} {when}" for when, values
                     in (("before", before), ("after", after)) if values)


def table(name: str, record: dict[str, Any]) -> str:
    """The table of one result: where it comes from, then its figures."""
    command = record.get("command")
    rows = [
        ("command", f"`{command}`" if command else "not recorded"),
        ("date (UTC)", _escape(record.get("date") or record.get("finished")
                               or "not recorded")),
        ("machine", _machine(record.get("machine"))),
        ("versions", _versions(record.get("versions"))),
        ("load average (1 min)", _load(record)),
        ("**figures**", ""),
        *((f"`{key}`", figure(value)) for key, value in figures(record)),
    ]
    return "\n".join([f"| `benchmarks/results/{name}.json` | |", "| --- | --- |",
                      *(f"| {key} | {value} |" for key, value in rows)]) + "\n"


def result(name: str, known: dict[str, dict[str, Any]] | None = None) -> str:
    """What a ``benchmark-result`` marker becomes."""
    known = results() if known is None else known
    if name not in known:
        return (f"*No result committed: `benchmarks/results/{name}.json` is not in the "
                "repository.*\n")
    return table(name, known[name])


def every_result(shown: set[str], known: dict[str, dict[str, Any]] | None = None) -> str:
    """What the ``benchmark-results`` marker becomes: a section per result not in ``shown``."""
    known = results() if known is None else known
    rest = [name for name in known if name not in shown]
    if not rest:
        return "*Every committed result is shown above.*\n"
    return "\n".join(f"### {name}\n\n{table(name, known[name])}" for name in rest)


def scripts() -> dict[str, str]:
    """The benchmark scripts that write a result, with their docstring's first line."""
    found = {}
    for path in sorted(BENCHMARKS.glob("*.py")):
        text = path.read_text()
        if path.name == "common.py" or not re.search(r"\bwrite_results?\(", text):
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        found[path.name] = doc.splitlines()[0] if doc else ""
    return found


def without_results(known: dict[str, dict[str, Any]] | None = None) -> str:
    """What the ``benchmarks-without-results`` marker becomes."""
    known = results() if known is None else known
    commands = [str(r.get("command") or "") for r in known.values()]
    missing = {name: doc for name, doc in scripts().items()
               if not any(f"benchmarks/{name}" in command for command in commands)}
    if not missing:
        return "*Every benchmark has a committed result.*\n"
    return "\n".join(f"- `benchmarks/{name}`: {doc.replace('``', '`').replace('|', '/')}"
                     for name, doc in missing.items()) + "\n"


def render_page(markdown: str) -> str:
    """``markdown`` with its markers replaced by the results they ask for."""
    known = results()
    shown = set(ONE.findall(markdown))
    markdown = ONE.sub(lambda m: result(m.group(1), known), markdown)
    markdown = ALL.sub(lambda m: every_result(shown, known), markdown)
    return WITHOUT.sub(lambda m: without_results(known), markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs' hook: replace the markers of a page with the results' tables."""
    return render_page(markdown)


def on_serve(server: Any, config: Any, builder: Any) -> Any:
    """``mkdocs serve``: rebuild when a result changes."""
    if RESULTS.is_dir():
        server.watch(str(RESULTS))
    return server
