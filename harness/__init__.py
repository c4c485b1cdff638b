"""eph: an ephemeral-port exhaustion harness.

The data's way through the package: ``scenario`` -> ``listener`` and the churn
clients (``churn``, ``client_gevent`` under Locust ``users``, ``client_uvloop``)
-> ``records`` -> ``summary`` -> ``report``, orchestrated by ``run``.

Importing ``harness`` imports neither locust nor matplotlib.
"""

from harness.endpoints import Endpoint, ResolvedEndpoint
from harness.errors import (
    EndpointError,
    EphError,
    ListenerError,
    RunDirError,
    RunError,
    ScenarioError,
)
from harness.scenario import ClosePolicy, Engine, ListenerClose, Reply, Scenario, load_scenario

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
