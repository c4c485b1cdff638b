"""Reading scenario files: TOML, ``--set`` overrides, and errors that point home.

Precedence, highest first: command line (``--set key.path=value`` and the CLI's
shortcuts) > scenario file > the model's defaults. Unknown keys are errors, with
the closest valid key suggested; every error names the file, the line, the key
path, the value and what was expected.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from harness.errors import ScenarioError
from harness.scenario.model import Scenario

__all__ = ["apply_override", "load_scenario", "parse_scenario"]


def load_scenario(
    path: Path | str, overrides: Iterable[str] = (), *, targets: Sequence[str] = ()
) -> Scenario:
    """Read, override and validate a scenario file.

    ``targets`` (the CLI's ``--target``) replace ``target.endpoints`` and drop
    ``[listener]``: the load goes to a server eph does not run.
    """
    path = Path(path)
    if path.suffix == ".json":  # a resolved scenario, as a run directory keeps it
        return _load_resolved(path, overrides)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError("no such file", source=path) from None
    except OSError as exc:
        raise ScenarioError(f"cannot read: {exc.strerror}", source=path) from None
    except UnicodeDecodeError:
        raise ScenarioError("not UTF-8 text", source=path) from None
    return parse_scenario(text, source=path, overrides=overrides, targets=targets)


def _load_resolved(path: Path, overrides: Iterable[str]) -> Scenario:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ScenarioError(f"cannot read a resolved scenario: {exc}", source=path) from None
    for item in overrides:
        apply_override(raw, item)
    try:
        return Scenario.model_validate(raw)
    except ValidationError as exc:
        raise _scenario_error(exc, "", path) from None


def parse_scenario(
    text: str,
    *,
    source: Path | str = "<scenario>",
    overrides: Iterable[str] = (),
    targets: Sequence[str] = (),
) -> Scenario:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = _toml_error_line(str(exc))
        raise ScenarioError(f"malformed TOML: {exc}", source=source, line=line) from None
    if targets:
        raw.pop("listener", None)
        raw.setdefault("target", {})["endpoints"] = list(targets)
        load = raw.setdefault("load", {})
        if isinstance(load, dict) and "tls" not in load and _all_https(targets):
            load["tls"] = True  # TARGET=staging:443 speaks TLS unless the scenario says
    for item in overrides:
        apply_override(raw, item)
    try:
        return Scenario.model_validate(raw)
    except ValidationError as exc:
        raise _scenario_error(exc, text, source) from None


def _all_https(targets: Sequence[str]) -> bool:
    return all(target.strip().rsplit(":", 1)[-1] == "443" for target in targets)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``key.path=value`` to ``raw``; the value is read as TOML, else as text."""
    key, sep, value_text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ScenarioError(
            f"--set {item!r} is not key.path=value", source="--set", expected="e.g. load.users=10"
        )
    parts = key.split(".")
    _check_key_path(parts, source="--set")
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ScenarioError(f"'{part}' is not a table", source="--set", key=key)
        node = child
    node[parts[-1]] = value


def _check_key_path(parts: Sequence[str], *, source: str) -> None:
    model: type[BaseModel] | None = Scenario
    for depth, part in enumerate(parts):
        if model is None:
            path = ".".join(parts[:depth])
            raise ScenarioError(
                f"'{path}' is a value, not a table", source=source, key=".".join(parts)
            )
        fields = model.model_fields
        if part not in fields:
            raise ScenarioError(
                _unknown_key_message(parts[: depth + 1], fields),
                source=source,
                key=".".join(parts),
            )
        model = _section_model(fields[part].annotation)


def _section_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _section_model(arg)
            if found is not None:
                return found
    return None


def _unknown_key_message(parts: Sequence[str], valid: Iterable[str]) -> str:
    path = ".".join(parts)
    close = difflib.get_close_matches(parts[-1], list(valid), n=1, cutoff=0.5)
    message = f"unknown key '{path}'"
    if close:
        message += f"; did you mean '{'.'.join([*parts[:-1], close[0]])}'?"
    else:
        message += f"; valid keys here: {', '.join(sorted(valid))}"
    return message


def _scenario_error(exc: ValidationError, text: str, source: Path | str) -> ScenarioError:
    lines = []
    first_key: str | None = None
    first_line: int | None = None
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        key = ".".join(loc)
        if error["type"] == "extra_forbidden":
            valid = _fields_at(loc[:-1])
            message = _unknown_key_message(loc, valid)
        elif error["type"] == "missing":
            message = f"missing required key '{key}'"
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
            if not isinstance(error["input"], dict):
                message += f" (got {error['input']!r})"
        lines.append(message)
        if first_key is None:
            first_key = key or None
            first_line = _line_of(text, loc)
    message = lines[0] if len(lines) == 1 else "; ".join(lines)
    return ScenarioError(message, source=source, key=first_key, line=first_line)


def _fields_at(loc: Sequence[str]) -> list[str]:
    model: type[BaseModel] | None = Scenario
    for part in loc:
        if model is None or part not in model.model_fields:
            return []
        model = _section_model(model.model_fields[part].annotation)
    return list(model.model_fields) if model else []


def _line_of(text: str, loc: Sequence[str]) -> int | None:
    """The line that sets ``loc`` (a best effort: TOML parsers keep no positions)."""
    keys = [part for part in loc if not part.isdigit()]
    if not keys:
        return None
    table, key = keys[:-1], keys[-1]
    current: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.match(r"^\[\s*([A-Za-z0-9_.\- ]+?)\s*\]", stripped)
        if header:
            current = [part.strip() for part in header.group(1).split(".")]
            if current == keys:
                return number
            continue
        if current == table and re.match(rf"^{re.escape(key)}\s*=", stripped):
            return number
    return None


def _toml_error_line(message: str) -> int | None:
    match = re.search(r"line (\d+)", message)
    return int(match.group(1)) if match else None
