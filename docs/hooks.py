"""MkDocs hooks: the reference pages' tables, generated from the code at every build.

A page holds a marker such as ``<!-- generated: scenario-keys -->``; the build puts
the table in its place, so that the manual can never be older than the code:

- ``scenario-keys``: every key a scenario may hold, from the pydantic model, with
  its type, default, and the comment beside it in ``harness/scenario/definition.py``;
- ``summary-keys``: every key of ``summary.json``, from its JSON Schema.

The command line's reference comes from the click parser itself (mkdocs-click).
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

MARKER = re.compile(r"<!-- generated: ([a-z-]+) -->")


def on_page_markdown(markdown: str, **_: Any) -> str:
    return MARKER.sub(lambda m: GENERATORS[m.group(1)](), markdown)


# ----------------------------------------------------------------- scenario keys


def scenario_keys() -> str:
    from harness.scenario import Scenario

    rows = ["| key | type | default | what it is |", "| --- | --- | --- | --- |"]
    for path, field, model in _walk(Scenario, ()):
        notes = _comments(model).get(path[-1], "")
        rows.append(
            f"| `{'.'.join(path)}` | {_type(field.annotation)} | {_default(field)} |"
            f" {_cell(notes)} |"
        )
    return "\n".join(rows)


def _walk(model: type[BaseModel], prefix: tuple[str, ...]) -> Any:
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        yield path, field, model
        section = _section(field.annotation)
        if section is not None:
            yield from _walk(section, path)


def _section(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section(arg)
        if found is not None:
            return found
    return None


def _type(annotation: Any) -> str:
    text = _type_name(annotation)
    return f"`{text}`".replace("|", "\\|")


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base = typing.get_args(annotation)[0]
        if base is float and any(
            "_duration" in repr(meta) for meta in typing.get_args(annotation)[1:]
        ):
            return "duration"
        return _type_name(base)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        inner = _type_name(args[0]) if args else "any"
        return f"list of {inner}" if origin is list else f"[{inner}, {inner}]"
    if origin is dict:
        return "table"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "table"
        members = getattr(annotation, "__members__", None)
        if members:
            return " or ".join(repr(m.value) for m in members.values())
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__
        )
    if annotation is type(None):
        return "none"
    return str(annotation)


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return ""
    if isinstance(value, BaseModel):
        return "(table)"
    if hasattr(value, "value"):
        value = value.value
    return f"`{json.dumps(value)}`".replace("|", "\\|")


def _comments(model: type[BaseModel]) -> dict[str, str]:
    """Each field's comment in the model's source: the one on its line, else the lines
    of comment right above it."""
    try:
        source = inspect.getsource(model)
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    above: list[str] = []
    for line in source.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        field = re.match(r"^\s{4}(\w+)\s*:", line)
        if field:
            inline = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            found[field.group(1)] = inline or " ".join(above)
        above = []
    return found


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# ----------------------------------------------------------------- summary keys


def summary_keys() -> str:
    from harness.summary import summary_schema

    schema = summary_schema()
    rows = ["| key | type | what it is |", "| --- | --- | --- |"]
    for path, node in _schema_walk(schema, schema, ()):
        rows.append(
            f"| `{'.'.join(path)}` | {_schema_type(schema, node)} |"
            f" {_cell(' '.join(str(node.get('description', '')).split()))} |"
        )
    return "\n".join(rows)


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref:
        resolved: dict[str, Any] = schema["$defs"][ref.rsplit("/", 1)[-1]]
        return resolved
    for key in ("anyOf", "oneOf"):
        for option in node.get(key, []):
            if option.get("type") != "null":
                inner = _resolve(schema, option)
                if "properties" in inner or "items" in inner:
                    return inner
    return node


def _schema_walk(schema: dict[str, Any], node: dict[str, Any], prefix: tuple[str, ...]) -> Any:
    target = _resolve(schema, node)
    if target.get("type") == "array" and "items" in target:
        target = _resolve(schema, target["items"])
        prefix = (*prefix[:-1], prefix[-1] + "[]") if prefix else prefix
    for name, child in target.get("properties", {}).items():
        path = (*prefix, name)
        described = {**_resolve(schema, child), **child}
        yield path, described
        if len(path) < 4:
            yield from _schema_walk(schema, child, path)


def _schema_type(schema: dict[str, Any], node: dict[str, Any]) -> str:
    def name(n: dict[str, Any]) -> str:
        if "$ref" in n:
            return "object"
        if "anyOf" in n:
            return " or ".join(name(o) for o in n["anyOf"])
        kind = n.get("type", "any")
        if kind == "array":
            return f"array of {name(n.get('items', {}))}"
        return str(kind)

    return f"`{name(node)}`".replace("|", "\\|")


GENERATORS = {"scenario-keys": scenario_keys, "summary-keys": summary_keys}


def on_page_content(html: str, **_: Any) -> str:
    """click 8.2+ marks an option without a default with a sentinel that mkdocs-click
    prints as it is: show nothing there instead."""
    return html.replace("<code>Sentinel.UNSET</code>", "")
