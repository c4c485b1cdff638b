"""Reading scenario files: TOML, ``--set`` overrides, and errors that point home.

Precedence, highest first: command line (``--set key.path=value``, a sweep's
``--vary`` point and ``--target``) > scenario file > the model's defaults. Unknown
keys are errors, with the closest valid key suggested; every error names where
the value was typed (the file and line, or the flag as given), the key path, the
value and what was expected. Files and programs the scenario names are checked
too (:mod:`harness.scenario.named_inputs`).
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from harness.errors import ScenarioError
from harness.scenario.definition import Scenario
from harness.scenario.named_inputs import check_inputs

__all__ = ["apply_override", "load_scenario", "parse_scenario"]


@dataclass(frozen=True)
class _Typed:
    """A value typed on the command line: an error in it is blamed on the flag."""

    flag: str  # "--set", "--vary", "--target"
    text: str  # as typed
    key: tuple[str, ...]

    def blames(self, loc: Sequence[str]) -> bool:
        n = min(len(loc), len(self.key))
        return n > 0 and tuple(loc[:n]) == self.key[:n]


def load_scenario(
    path: Path | str,
    overrides: Iterable[str] = (),
    *,
    targets: Sequence[str] = (),
    varies: Iterable[str] = (),
) -> Scenario:
    """Read, override and validate a scenario file, and check what it names.

    ``targets`` (the CLI's ``--target``) replace ``target.endpoints`` and drop
    ``[listener]``: the load goes to a server eph does not run. ``varies`` are
    overrides too, from a sweep's ``--vary``, and errors in them say so.
    """
    path = Path(path)
    if path.suffix == ".json":  # a resolved scenario, as a run directory keeps it
        return _load_resolved(path, [*overrides], [*varies])
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError("no such file", source=path) from None
    except OSError as exc:
        raise ScenarioError(f"cannot read: {exc.strerror}", source=path) from None
    except UnicodeDecodeError:
        raise ScenarioError("not UTF-8 text", source=path) from None
    return parse_scenario(text, source=path, overrides=overrides, targets=targets, varies=varies)


def _load_resolved(path: Path, overrides: Sequence[str], varies: Sequence[str]) -> Scenario:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ScenarioError(f"cannot read a resolved scenario: {exc}", source=path) from None
    typed = _apply_typed(raw, overrides, varies)
    return _validated(raw, "", path, typed)


def parse_scenario(
    text: str,
    *,
    source: Path | str = "<scenario>",
    overrides: Iterable[str] = (),
    targets: Sequence[str] = (),
    varies: Iterable[str] = (),
) -> Scenario:
    """A scenario from TOML ``text``, overridden, validated, and its inputs checked."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = _toml_error_line(str(exc))
        raise ScenarioError(f"malformed TOML: {exc}", source=source, line=line) from None
    typed: list[_Typed] = []
    if targets:
        raw.pop("listener", None)
        raw.setdefault("target", {})["endpoints"] = list(targets)
        typed += [
            _Typed("--target", t, ("target", "endpoints", str(i))) for i, t in enumerate(targets)
        ]
        load = raw.setdefault("load", {})
        if isinstance(load, dict) and "tls" not in load and _all_https(targets):
            load["tls"] = True  # TARGET=staging:443 speaks TLS unless the scenario says
    typed += _apply_typed(raw, overrides, varies)
    return _validated(raw, text, source, typed)


def _apply_typed(
    raw: dict[str, Any], overrides: Iterable[str], varies: Iterable[str]
) -> list[_Typed]:
    typed = []
    for flag, items in (("--set", overrides), ("--vary", varies)):
        for item in items:
            typed.append(_Typed(flag, item, tuple(apply_override(raw, item, flag=flag))))
    return typed


def _validated(
    raw: dict[str, Any], text: str, source: Path | str, typed: Sequence[_Typed]
) -> Scenario:
    """``raw`` as a Scenario whose named files and programs exist; an error is blamed
    on the flag that typed the value, else on the file and line that hold it."""
    try:
        scenario = Scenario.model_validate(raw)
    except ValidationError as exc:
        raise _scenario_error(exc, text, source, typed) from None
    try:
        check_inputs(scenario, source=source, line_of=lambda loc: _line_of(text, loc))
    except ScenarioError as exc:
        blamed = _blamed(exc.key.split(".") if exc.key else [], typed)
        if blamed is None:
            raise
        raise ScenarioError(
            exc.message, source=blamed, key=exc.key, value=exc.value, expected=exc.expected
        ) from None
    return scenario


def _blamed(loc: Sequence[str], typed: Sequence[_Typed]) -> str | None:
    """``--set load.users=abc`` when that flag typed the value at ``loc``, else None."""
    for item in reversed(typed):  # the last one typed wins, as it did when applied
        if item.blames(loc):
            return f"{item.flag} {item.text}"
    return None


def _all_https(targets: Sequence[str]) -> bool:
    return all(target.strip().rsplit(":", 1)[-1] == "443" for target in targets)


def apply_override(raw: dict[str, Any], item: str, *, flag: str = "--set") -> list[str]:
    """Apply one ``key.path=value`` to ``raw`` (the value is read as TOML, else as text);
    the key path it set. ``flag`` is where it was typed, for errors."""
    key, sep, value_text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ScenarioError(
            f"{flag} {item!r} is not key.path=value", source=flag, expected="e.g. load.users=10"
        )
    parts = key.split(".")
    _check_key_path(parts, source=flag)
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ScenarioError(f"'{part}' is not a table", source=flag, key=key)
        node = child
    node[parts[-1]] = value
    return parts


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


def _scenario_error(
    exc: ValidationError, text: str, source: Path | str, typed: Sequence[_Typed] = ()
) -> ScenarioError:
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
    blamed = _blamed(first_key.split(".") if first_key else [], typed)
    if blamed is not None:
        return ScenarioError(message, source=blamed, key=first_key)
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
