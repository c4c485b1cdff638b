"""eph's locustfile: ``locust -f harness/locustfile.py`` (web UI and usual flags) or ``eph run``.

The scenario comes from ``EPH_SCENARIO`` (default ``scenarios/default.toml``);
see ``harness.users`` for every variable. Locust's ``--host`` replaces the
scenario's target endpoints. Only one User class is bound here, for the
scenario's engine, so Locust runs exactly that one.
"""

from harness import users as _users

scenario = _users.scenario_from_environ()
_users.install(scenario)
EphUser = _users.user_class(scenario.load.engine)
