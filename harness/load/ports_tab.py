"""A "Ports" tab in Locust's web UI: live per-path occupancy of the load host.

Built with Locust's own extension points (``examples/extend_web_ui.py`` in
Locust's repository): ``extended_tabs`` and ``extended_tables`` in the web UI's
template arguments declare the tab, and every ``/stats/requests`` poll that
the page already makes carries the rows as ``extended_stats``. A Flask
Blueprint adds ``/eph/ports.json`` for scripts. The rows come from
``harness.observe.feed``, sampled at most once a second.

Locust keeps unknown keys of ``web_ui.template_args`` across its own updates
(Locust 2.30 to 2.47); ``tests/test_ports_tab.py`` fails if a release stops.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request
from locust import events
from locust.env import Environment

from harness.observe.feed import PORTS_COLUMNS, PortsFeed

__all__ = ["TAB_KEY", "install", "register"]

TAB_KEY = "eph-ports"
logger = logging.getLogger(__name__)


def install(environment: Environment, feed: PortsFeed) -> None:
    """Add the tab to ``environment``'s web UI (nothing when it has none)."""
    web_ui = environment.web_ui
    app = web_ui.app if web_ui is not None else None
    if web_ui is None or app is None:
        return
    web_ui.template_args["extended_tabs"] = [{"title": "Ports", "key": TAB_KEY}]
    web_ui.template_args["extended_tables"] = [
        {"key": TAB_KEY, "structure": [{"key": k, "title": t} for k, t in PORTS_COLUMNS]}
    ]
    blueprint = Blueprint("eph_ports", __name__)

    @blueprint.route("/eph/ports.json")
    def ports_json() -> Response:
        return jsonify(_rows(feed))

    def add_ports(response: Response) -> Response:
        if request.path != "/stats/requests" or not response.is_json:
            return response
        body = response.get_json()
        body["extended_stats"] = [{"key": TAB_KEY, "data": _rows(feed)}]
        response.set_data(json.dumps(body))
        return response

    app.after_request(add_ports)
    app.register_blueprint(blueprint)


def _rows(feed: PortsFeed) -> list[dict[str, Any]]:
    try:
        return feed.rows()
    except OSError as exc:  # sock_diag refused (no privilege, odd kernel): say so in the tab
        logger.warning("ports tab: cannot sample sockets: %s", exc)
        return [{"path": f"cannot sample sockets: {exc}"}]


def register(top: int = 20) -> None:
    """Install the tab on Locust's ``init`` event: call at import of a locustfile."""

    def on_init(environment: Environment, **_: Any) -> None:
        install(environment, PortsFeed(top=top))

    events.init.add_listener(on_init)  # type: ignore[no-untyped-call]  # Locust: no annotations
