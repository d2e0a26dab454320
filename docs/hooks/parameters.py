"""MkDocs hook: the parameter reference, generated from the parameter schema when the site is
built, so that it cannot drift from the code.

A page asks for a reference with a marker on a line of its own:

* ``<!-- parameters: finetune -->`` (or ``predict``, ``tune``): a table per section of the
  pydantic model that validates those parameters (:data:`ROOTS`): every key with its type,
  default, allowed values and description (the field's docstring in
  ``src/headswap/project/config/`` and ``src/headswap/core/``). Where
  ``conf/base/parameters_<name>.yml`` sets another value, the default column shows it too.
* ``<!-- parameters-file: parameters_compare.yml -->``: that file of ``conf/base/`` as it is
  (parameters no schema validates: its comments are their documentation).

:func:`reference` is what the hook inserts; ``tests/test_docs.py`` checks it.
"""

from __future__ import annotations

import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf" / "base"
MARKER = re.compile(r"^<!-- parameters: (\w+) -->$", re.M)
FILE_MARKER = re.compile(r"^<!-- parameters-file: ([\w.]+) -->$", re.M)


def roots() -> dict[str, type]:
    """The top-level parameter key of each validated section, and its model."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from headswap.project.config import FinetuneConfig, PredictConfig, TuneConfig

    return {"finetune": FinetuneConfig, "predict": PredictConfig, "tune": TuneConfig}


@dataclass
class Section:
    """One table: the keys of one model at one place (``path``) of the parameters."""

    path: str
    model: type
    instance: Any = None  # the default object of this place, when there is one
    rows: list[dict[str, str]] = field(default_factory=list)
    same_as: str | None = None  # the path of an identical table shown earlier


def _model(annotation: Any) -> type | None:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (model := _model(arg)) is not None:
            return model
    return None


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def type_name(annotation: Any) -> str:
    """The annotation in words a YAML file's author reads."""
    from pydantic import BaseModel

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if _is_union(annotation):
        return " or ".join(dict.fromkeys(type_name(a) for a in args))
    if origin is typing.Literal:
        return " or ".join(dict.fromkeys(type_name(type(a)) for a in args))
    if origin is list:
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {type_name(args[1])}" if args else "mapping"
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return {bool: "boolean", int: "integer", float: "number", str: "text",
            typing.Any: "any"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def value_text(value: Any) -> str:
    """A value as it is written in a parameters file."""
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        value = value.model_dump(exclude_defaults=True)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def allowed(info: Any) -> str:
    """Literal values and numeric or length bounds of a field."""
    parts = []

    def literals(annotation: Any) -> None:
        if typing.get_origin(annotation) is typing.Literal:
            parts.extend(f"`{value_text(v)}`" for v in typing.get_args(annotation))
        for arg in typing.get_args(annotation):
            if typing.get_origin(annotation) is not typing.Literal:
                literals(arg)

    literals(info.annotation)
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥"}
    for item in info.metadata:
        for name, sign in signs.items():
            if getattr(item, name, None) is not None:
                parts.append(f"{sign} {value_text(getattr(item, name))}")
    return ", ".join(parts)


def _default(info: Any, instance: Any, name: str) -> tuple[bool, Any]:
    """``(has_default, default)`` of a field, read from the place's default object first."""
    from pydantic_core import PydanticUndefined

    if instance is not None:
        return True, getattr(instance, name)
    if info.default_factory is not None:
        return True, info.default_factory()
    if info.default is PydanticUndefined:
        return False, None
    return True, info.default


def _conf_value(path: str) -> tuple[bool, Any]:
    """The value ``conf/base/parameters_<top>.yml`` gives the key at ``path``, if it does."""
    top, *keys = path.split(".")
    file = CONF / f"parameters_{top}.yml"
    if not file.exists() or any(k.endswith("[]") or k.startswith("<") for k in keys):
        return False, None
    node: Any = (yaml.safe_load(file.read_text()) or {}).get(top)
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def anchor(path: str) -> str:
    return "p-" + re.sub(r"[^\w]+", "-", path).strip("-")


def sections(top: str, model: type) -> list[Section]:
    """The tables of one root model: a section per nested model, each followed by those of
    the models nested in it. A model shown before, at a place without defaults of its own, is
    shown once and referred to after that."""
    done: list[Section] = []

    def visit(section: Section) -> None:
        shown = next((s for s in done if s.model is section.model and s.instance is None
                      and section.instance is None and s.same_as is None), None)
        done.append(section)
        if shown is not None:
            section.same_as = shown.path
            return
        children: list[Section] = []
        _rows(section, children)
        for child in children:
            visit(child)

    visit(Section(top, model))
    return done


def _rows(section: Section, children: list[Section]) -> None:
    """Fill the rows of ``section``; add the sections of its nested models to ``children``."""
    for name, info in section.model.model_fields.items():
        if info.exclude:
            continue
        path = f"{section.path}.{name}"
        nested = _model(info.annotation)
        has_default, default = _default(info, section.instance, name)
        if nested is not None:
            origin = typing.get_origin(info.annotation)
            if origin is list:
                child_path, instance = f"{path}[]", None
            elif origin is dict:
                child_path, instance = f"{path}.<key>", None
            elif _is_union(info.annotation):
                child_path, instance = path, None
            else:
                child_path, instance = path, default if has_default else None
            children.append(Section(child_path, nested, instance))
        default_text = ""
        if nested is not None and typing.get_origin(info.annotation) is None:
            default_text = f"[below](#{anchor(path)})"
        elif has_default:
            default_text = f"`{value_text(default)}`"
        else:
            default_text = "required"
        given, conf = _conf_value(path)
        if given and nested is None and (not has_default or conf != _plain(default)):
            default_text += f" (conf/base: `{value_text(conf)}`)"
        elif given and not has_default and not default_text.startswith("[below]"):
            default_text += " (conf/base sets it)"
        description = prose(info.description or "")
        if nested is not None and typing.get_origin(info.annotation) in (list, dict):
            sub = f"{path}[]" if typing.get_origin(info.annotation) is list else \
                f"{path}.<key>"
            description += f" Keys of each: [below](#{anchor(sub)})."
        elif nested is not None and _is_union(info.annotation):
            description += f" Keys: [below](#{anchor(path)})."
        section.rows.append({
            "key": name, "path": path, "type": type_name(info.annotation),
            "default": default_text, "allowed": allowed(info), "description": description,
        })


def prose(text: str) -> str:
    """A docstring as one line of Markdown (Sphinx roles and double backticks as code)."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", " ".join(text.split()))
    return text.replace("``", "`")


def _plain(value: Any) -> Any:
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, tuple):
        return list(value)
    return value


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference(top: str) -> str:
    """The Markdown of the reference of the ``top`` parameters."""
    model = roots()[top]
    out = []
    for section in sections(top, model):
        out.append(f"### `{section.path}` {{#{anchor(section.path)}}}\n")
        if section.same_as:
            out.append(f"The same keys as [`{section.same_as}`](#{anchor(section.same_as)}).\n")
            continue
        doc = prose(section.model.__doc__ or "")
        if doc and not doc.startswith(section.model.__name__ + "("):
            out.append(doc + "\n")
        out.append("| key | type | default | allowed | description |")
        out.append("| --- | --- | --- | --- | --- |")
        for row in section.rows:
            out.append("| " + " | ".join(_cell(row[k]) if k != "key" else f"`{row['key']}`"
                                         for k in ("key", "type", "default", "allowed",
                                                   "description")) + " |")
        out.append("")
    return "\n".join(out)


def parameters_file(name: str) -> str:
    text = (CONF / name).read_text()
    return f"`conf/base/{name}`:\n\n```yaml\n{text.rstrip()}\n```\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs' hook: replace the markers of a page with the generated reference."""
    markdown = MARKER.sub(lambda m: reference(m.group(1)), markdown)
    return FILE_MARKER.sub(lambda m: parameters_file(m.group(1)), markdown)
