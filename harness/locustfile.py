"""eph's locustfile: ``locust -f harness/locustfile.py`` (web UI and usual flags) or ``eph run``.

The scenario comes from ``EPH_SCENARIO`` (default ``scenarios/default.toml``);
see ``harness.load.users`` for every variable. Locust's ``--host`` replaces the
scenario's target endpoints. One User class, ``EphUser``, runs the scenario's
engine; an ``eph worker`` (``EPH_WORKER=1``) gets its scenario from the master.
"""

import os
from pathlib import Path

from harness.load import hooks as _hooks
from harness.load import ports_tab as _ports_tab
from harness.load import users as _users


def _finish(path: Path, locust_requests: int) -> None:
    """Plain ``locust -f``: nobody else will merge the records and write the report."""
    from harness.run.finalize import finalize  # heavy (the report): only at the end

    finalize(path, locust_requests=locust_requests)


scenario = None if os.environ.get("EPH_WORKER") == "1" else _users.scenario_from_environ()
_hooks.install(scenario, _finish)
EphUser = _users.user_class()
_ports_tab.register()  # the web UI's "Ports" tab: live occupancy per path
