"""Scenarios: TOML files in ``scenarios/``, validated strictly.

``definition`` holds what a scenario may say, ``choices`` its named choices (plain
enums); ``loading`` reads a file or a run directory's resolved copy into it,
applying ``--set`` overrides. Names load on first use: a process that needs only a
choice (the listener and collector children of every run) does not build the model.
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:  # the names, for type checkers; loaded on first use below
    from harness.scenario.choices import (
        ClosePolicy,
        Emulation,
        Engine,
        ListenerClose,
        Protocol,
        Reply,
        Topology,
    )
    from harness.scenario.definition import (
        HttpConfig,
        NatConfig,
        Scenario,
        TlsConfig,
    )
    from harness.scenario.loading import apply_override, load_scenario, parse_scenario

_LAZY = {
    "ClosePolicy": "harness.scenario.choices",
    "Emulation": "harness.scenario.choices",
    "Engine": "harness.scenario.choices",
    "ListenerClose": "harness.scenario.choices",
    "Protocol": "harness.scenario.choices",
    "Reply": "harness.scenario.choices",
    "Topology": "harness.scenario.choices",
    "HttpConfig": "harness.scenario.definition",
    "NatConfig": "harness.scenario.definition",
    "Scenario": "harness.scenario.definition",
    "TlsConfig": "harness.scenario.definition",
    "apply_override": "harness.scenario.loading",
    "load_scenario": "harness.scenario.loading",
    "parse_scenario": "harness.scenario.loading",
}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'harness.scenario' has no attribute {name!r}")
    return getattr(_importlib.import_module(module), name)


__all__ = [
    "ClosePolicy",
    "Emulation",
    "Engine",
    "HttpConfig",
    "ListenerClose",
    "NatConfig",
    "Protocol",
    "Reply",
    "Scenario",
    "TlsConfig",
    "Topology",
    "apply_override",
    "load_scenario",
    "parse_scenario",
]
