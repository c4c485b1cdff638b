"""The summary of a run, first from its records alone: :func:`summarize` puts the
sections of one scan (:mod:`harness.report.scan`) and the run's own facts into a
:class:`~harness.summary.Summary`; the analysis (``harness.report.analysis``) adds
the rest."""

from __future__ import annotations

from harness.report.scan import RecordScan
from harness.summary import Conservation, Http, Kernel, Listener, Summary

__all__ = ["summarize"]


def summarize(
    scan: RecordScan,
    *,
    scenario: str,
    started_at: str,
    duration_s: float,
    interrupted: bool,
    kernel: Kernel,
    listener: Listener | None = None,
    locust_requests: int | None = None,
    lossy_link: bool = False,
    datagrams: bool = False,
    http: Http | None = None,
) -> Summary:
    """The summary's first sections, from the records alone; analysis adds the rest."""
    connections = scan.connections(duration_s)
    summary = Summary(
        scenario=scenario,
        interrupted=interrupted,
        started_at=started_at,
        duration_s=round(duration_s, 3),
        connections=connections,
        ports=scan.ports(kernel),
        exhaustion=scan.first_exhaustion(),
        outages=scan.outages(),
        kernel=kernel,
        conservation=_conservation(
            connections.attempted,
            connections.succeeded,
            listener,
            locust_requests,
            lossy_link,
            datagrams,
            http,
        ),
    )
    if listener is not None:
        summary.listener = listener
    if http is not None:
        summary.http = http
    return summary


def _conservation(
    attempted: int,
    succeeded: int,
    listener: Listener | None,
    locust_requests: int | None,
    lossy_link: bool = False,
    datagrams: bool = False,
    http: Http | None = None,
) -> Conservation:
    """Every attempt recorded, counted by Locust, and (if connected) accepted by our listener.

    Over a lab link that loses packets the last check is reported but not judged:
    a client is connected once it sends the handshake's final ACK, and when that
    ACK (and the FIN after it) is lost the server never accepts the connection.
    """
    result = Conservation(records=attempted, ok=True)
    checks = []
    if locust_requests is not None:
        result.locust_requests = locust_requests
        expected = attempted
        if http is not None and http.locust_requests != attempted:
            expected = result.records_as_locust_requests = http.locust_requests
        result.records_match_locust = locust_requests == expected
        checks.append(result.records_match_locust)
    # every answer the listener wrote is a response the client may have read: 400s too
    served = (
        listener.requests + (listener.bad_requests or 0)
        if listener is not None and listener.requests is not None
        else None
    )
    if http is not None and served is not None:
        result.listener_requests = served
        result.requests_match_listener = served == http.requests
        if not lossy_link:
            checks.append(result.requests_match_listener)
    if listener is not None:
        result.listener_accepted = listener.accepted
        result.succeeded_match_listener = listener.accepted == succeeded
        if lossy_link:
            result.listener_check = "not judged: the lab's link loses packets"
        elif datagrams:
            # a UDP "success" is a local connect(); its datagram may still be dropped
            result.listener_check = "not judged: UDP datagrams may be dropped"
        else:
            checks.append(result.succeeded_match_listener)
    result.ok = all(checks)
    return result
