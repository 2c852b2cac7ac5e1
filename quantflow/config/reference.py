"""Every configuration field as one row: dotted path, type, default, title and description.

The text comes from the fields themselves (their docstrings and Field titles), so the Prefect
run form, the JSON schema, `quantflow fields`, the command-line flags' help and
docs/configuration.md all show one text, written once.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from quantflow.errors import ConfigError


@dataclass(frozen=True)
class FieldRow:
    path: str  # "validation.perplexity.max_increase_pct"; list items as "tasks[].name"
    type: str
    default: str  # "required" when the field has none
    title: str | None  # only a title given on purpose, not pydantic's generated one
    description: str
    examples: tuple[Any, ...] = ()


def _submodel(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The config model a field holds (directly, optionally, or as list items) and the path
    suffix that reaches it."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args:
        inner, _ = _submodel(args[0])
        return inner, "[]"
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            inner, suffix = _submodel(arg)
            if inner is not None:
                return inner, suffix
    return None, ""


def type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return annotation.__name__
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]"
    return str(annotation).replace("typing.", "")


_REQUIRED = object()


def _default_of(field: Any, parent: BaseModel | None, name: str) -> Any:
    """The field's default where its section is used with its own default (the perplexity
    source defaults to wikitext, though a TextSource has no default data set)."""
    if parent is not None:
        return getattr(parent, name)
    return _REQUIRED if field.is_required() else field.get_default(call_default_factory=True)


def _default_text(value: Any) -> str:
    if value is _REQUIRED:
        return "required"
    if isinstance(value, BaseModel):
        return "(see below)"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return f"({len(value)} entries)"
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def field_rows(model: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None) -> list[FieldRow]:
    """Every field of `model`, depth first: a section's row comes before its fields'.
    `defaults`: the section's default instance, whose values are its fields' defaults."""
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        inner, suffix = _submodel(field.annotation)
        value = _default_of(field, defaults, name)
        rows.append(FieldRow(path=path, type=type_name(field.annotation), default=_default_text(value),
                             title=field.title, description=" ".join((field.description or "").split()),
                             examples=tuple(field.examples or ())))
        if inner is not None:
            rows.extend(field_rows(inner, f"{path}{suffix}.", value if isinstance(value, inner) else None))
    return rows


def select(rows: list[FieldRow], prefix: str, what: str = "PipelineConfig") -> list[FieldRow]:
    """The rows at or under `prefix` ("quant", "validation.perplexity.window"); an unknown
    prefix is an error that suggests the nearest field names."""
    if not prefix:
        return rows
    chosen = [r for r in rows if r.path == prefix or r.path.startswith(prefix + ".")
              or r.path.startswith(prefix + "[].")]
    if not chosen:
        near = difflib.get_close_matches(prefix, [r.path for r in rows], n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(near)}?" if near else "; `quantflow fields` lists them all"
        raise ConfigError("quantflow fields", [f"{what} has no field {prefix!r}{hint}"])
    return chosen


def render_text(rows: list[FieldRow]) -> str:
    import textwrap

    out = []
    for r in rows:
        title = f"  ({r.title})" if r.title else ""
        out.append(f"{r.path}: {r.type} = {r.default}{title}")
        out.extend(textwrap.wrap(r.description, 92, initial_indent="    ", subsequent_indent="    "))
        if r.examples:
            out.append(f"    e.g. {', '.join(json.dumps(e) for e in r.examples)}")
    return "\n".join(out) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(model: type[BaseModel]) -> str:
    """docs/configuration.md: one table per top-level section."""
    rows = field_rows(model)
    out = ["# Configuration reference", "",
           "Generated from the configuration models by `quantflow fields --markdown` (a test checks "
           "that this page matches them). The same text is each field's description in the Prefect "
           "UI's run form and in the JSON schema. `quantflow fields PREFIX` prints one section in a "
           "terminal.", ""]
    top = [r for r in rows if "." not in r.path]
    plain = [r for r in top if not any(x.path.startswith(r.path + ".") or x.path.startswith(r.path + "[].")
                                       for x in rows)]
    sections = [r for r in top if r not in plain]
    header = ["| field | type | default | what it does |", "|---|---|---|---|"]

    def line(r: FieldRow) -> str:
        title = f"**{_cell(r.title)}**. " if r.title else ""
        examples = f" E.g. {', '.join(f'`{json.dumps(e)}`' for e in r.examples)}." if r.examples else ""
        return f"| `{r.path}` | {_cell(r.type)} | `{_cell(r.default)}` | {title}{_cell(r.description)}{examples} |"

    out += ["## Run", "", *header, *(line(r) for r in plain), ""]
    for section in sections:
        out += [f"## `{section.path}`", "", _cell(section.description), "", *header]
        out += [line(r) for r in select(rows, section.path)[1:]]
        out.append("")
    return "\n".join(out)
