"""eph: an ephemeral-port exhaustion harness.

The data's way through the package: ``scenario`` -> ``target`` (the listener) and
``load`` (the clients, under Locust) -> ``records`` and ``observe`` (the kernel's
view) -> ``run`` (merge, finalize) -> the analysis in ``report`` -> ``summary`` (the
contract) -> ``report.html``. docs/development/architecture.md draws the floors.

Importing ``harness`` imports neither locust nor matplotlib, nor anything else
heavy: the names below load on first use, so that ``eph`` can take over Ctrl-C
before it imports anything (``harness.__main__``).
"""

import importlib as _importlib
import typing as _typing

from harness.errors import (
    EndpointError,
    EphError,
    ListenerError,
    RunDirError,
    RunError,
    ScenarioError,
)

_LAZY = {
    "Endpoint": "harness.endpoints",
    "ResolvedEndpoint": "harness.endpoints",
    **dict.fromkeys(
        ("ClosePolicy", "Engine", "ListenerClose", "Reply", "Scenario", "load_scenario"),
        "harness.scenario",
    ),
}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'harness' has no attribute {name!r}")
    return getattr(_importlib.import_module(module), name)


__all__ = [
    "ClosePolicy",
    "Endpoint",
    "EndpointError",
    "Engine",
    "EphError",
    "ListenerClose",
    "ListenerError",
    "Reply",
    "ResolvedEndpoint",
    "RunDirError",
    "RunError",
    "Scenario",
    "ScenarioError",
    "load_scenario",
]

__version__ = "0.1.0"
