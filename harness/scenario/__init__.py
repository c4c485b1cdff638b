"""Scenarios: TOML files in ``scenarios/``, validated strictly.

``model`` holds what a scenario may say; ``loading`` reads a file or a run
directory's resolved copy into it, applying ``--set`` overrides.
"""

from harness.scenario.definition import (
    ClosePolicy,
    Emulation,
    Engine,
    HttpConfig,
    ListenerClose,
    NatConfig,
    Protocol,
    Reply,
    Scenario,
    TlsConfig,
    Topology,
)
from harness.scenario.loading import apply_override, load_scenario, parse_scenario

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
