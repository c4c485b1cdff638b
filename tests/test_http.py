"""HTTP and TLS load against nginx from Debian, in a namespace: what each connection
recorded (status, responses, handshake), and conservation counted three ways:
eph's records, Locust's requests and nginx's own access log."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from harness.kernel.netns import Namespace
from tests.conftest import ROOT, eph, run_dir_summary, write_scenario
from tests.servers import access_count, certificate, nginx

pytestmark = [pytest.mark.netns, pytest.mark.e2e]

ENGINES = ["locust", "uvloop"]


def _scenario(
    tmp_path: Path, endpoint: str, load: str, http: str = "", seconds: float = 1.5
) -> Path:
    return write_scenario(
        tmp_path / "http.toml",
        f"""
name = "http"
duration = "{seconds}s"
[target]
endpoints = ["{endpoint}"]
[load]
users = 8
rate = 300
connect_timeout = "1s"
io_timeout = "2s"
{load}
[load.http]
{http}
""",
    )


def _run(tmp_path: Path, ns: Namespace, scenario: Path) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path / "run"
    result = eph(["run", str(scenario), "--out", str(out)], cwd=tmp_path, prefix=ns.command([]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return out, run_dir_summary(out), result.stderr


def _locust_entries(out: Path) -> list[dict[str, Any]]:
    entries = json.loads((out / "locust.json").read_text())
    return [e for e in entries if e["method"] != "CPU"]


@pytest.mark.parametrize("engine", ENGINES)
def test_http_statuses_are_recorded_and_records_locust_and_nginx_agree(
    tmp_path: Path, netns: Namespace, engine: str
) -> None:
    with nginx(netns, tmp_path / "nginx", "127.0.0.1:8080", access_log=True) as prefix:
        scenario = _scenario(tmp_path, "127.0.0.1:8080", f'engine = "{engine}"')
        out, summary, _ = _run(tmp_path, netns, scenario)
    served = access_count(prefix)
    conns = summary["connections"]
    assert conns["attempted"] >= 10 and conns["failed"] == 0  # several, whatever the speed
    http = summary["http"]
    assert http["statuses"] == {"200": conns["attempted"]}
    assert http["requests"] == conns["attempted"] == served
    assert http["response_bytes"] > served * len("ok\n")  # headers included
    cons = summary["conservation"]
    assert cons["ok"] and cons["records_match_locust"] and cons["locust_requests"] == served
    # Locust reads like an HttpUser's: method and path
    (entry,) = _locust_entries(out)
    assert (entry["method"], entry["name"]) == ("GET", "/")
    table = pq.read_table(out / "connections.parquet")
    assert set(table.column("status").to_pylist()) == {200}
    assert set(table.column("requests").to_pylist()) == {1}


@pytest.mark.parametrize("engine", ENGINES)
def test_an_unexpected_status_is_a_failure_of_its_own_kind(
    tmp_path: Path, netns: Namespace, engine: str
) -> None:
    with nginx(netns, tmp_path / "nginx", "127.0.0.1:8080", access_log=True) as prefix:
        scenario = _scenario(
            tmp_path, "127.0.0.1:8080", f'engine = "{engine}"', 'path = "/unavailable"', 1.0
        )
        out, summary, _ = _run(tmp_path, netns, scenario)
    conns = summary["connections"]
    n = conns["attempted"]
    assert n >= 5  # several, however busy the machine (33 when the suite ran side by side)
    assert conns["io_errors"] == {"HTTP_503": n}  # connected, then the status failed
    assert summary["http"]["statuses"] == {"503": n}
    assert access_count(prefix) == n
    (entry,) = _locust_entries(out)
    assert entry["num_failures"] == n == entry["num_requests"]


@pytest.mark.parametrize("engine", ENGINES)
def test_head_is_answered_without_a_body_three_times_per_connection(
    tmp_path: Path, netns: Namespace, engine: str
) -> None:
    """method = "HEAD" against nginx, three requests per connection: nginx says how long
    the body would be and sends none; every response is read and none is waited for."""
    with nginx(netns, tmp_path / "nginx", "127.0.0.1:8080", access_log=True) as prefix:
        scenario = _scenario(
            tmp_path, "127.0.0.1:8080",
            f'engine = "{engine}"\nrequests_per_connection = 3', 'method = "HEAD"',
        )  # fmt: skip
        out, summary, _ = _run(tmp_path, netns, scenario)
    conns = summary["connections"]
    assert conns["attempted"] >= 5 and conns["failed"] == 0 and not conns["io_errors"], conns
    http = summary["http"]
    assert http["statuses"] == {"200": conns["attempted"]}
    assert http["requests"] == 3 * conns["attempted"] == access_count(prefix)
    assert summary["conservation"]["ok"], summary["conservation"]
    (entry,) = _locust_entries(out)
    assert entry["method"] == "HEAD" and entry["num_failures"] == 0
    table = pq.read_table(out / "connections.parquet")
    assert set(table.column("requests").to_pylist()) == {3}


def test_keep_alive_serves_n_requests_per_connection_over_one_port(
    tmp_path: Path, netns: Namespace
) -> None:
    """requests_per_connection = 5: five requests in nginx's log per connection, one local
    port each; Locust counts requests, eph's records count connections."""
    # Without reuse, a port in TIME_WAIT is never taken again, so every connection has
    # a port of its own. With it (loopback's default), connect() may take back one of
    # this run's own: its starting offset per destination comes from a table shared by
    # every namespace of the host, which other tests' connects toward 127.0.0.1:8080
    # move (measured once side by side: 269 ports for 280 connections).
    netns.set_sysctl("net.ipv4.tcp_tw_reuse", 0)
    with nginx(netns, tmp_path / "nginx", "127.0.0.1:8080", access_log=True) as prefix:
        scenario = _scenario(
            tmp_path,
            "127.0.0.1:8080",
            'engine = "uvloop"\nrequests_per_connection = 5\nmax_connections = 200',
            seconds=5,
        )
        out, summary, _ = _run(tmp_path, netns, scenario)
    table = pq.read_table(out / "connections.parquet")
    connections = table.num_rows
    assert connections >= 100  # max_connections stops the run (checked between flushes)
    assert set(table.column("requests").to_pylist()) == {5}
    ports = set(zip(table.column("local_port").to_pylist(), strict=True))
    assert len(ports) == connections  # one port per connection, however many requests
    assert access_count(prefix) == 5 * connections == summary["http"]["requests"]
    assert summary["http"]["requests_per_connection"] == 5.0
    cons = summary["conservation"]
    assert cons["locust_requests"] == cons["records_as_locust_requests"] == 5 * connections
    assert cons["ok"]


@pytest.mark.parametrize("engine", ENGINES)
def test_tls_with_the_servers_ca_verifies_and_times_the_handshake(
    tmp_path: Path, netns: Namespace, engine: str
) -> None:
    ca, cert, key = certificate(tmp_path / "pki", "staging.test", "127.0.0.1")
    with nginx(
        netns, tmp_path / "nginx", "127.0.0.1:8443", access_log=True, tls=(cert, key)
    ) as prefix:
        scenario = _scenario(
            tmp_path,
            "127.0.0.1:8443",
            f'engine = "{engine}"\n[load.tls]\nserver_name = "staging.test"\nca_file = "{ca}"',
        )
        out, summary, _ = _run(tmp_path, netns, scenario)
    conns = summary["connections"]
    http = summary["http"]
    assert conns["failed"] == 0 and conns["io_errors"] == {}
    assert http["tls_handshakes"] == conns["attempted"] == http["requests"] == access_count(prefix)
    assert 0 < http["tls_handshake_ms"]["p50"] < 1000
    table = pq.read_table(out / "connections.parquet")
    connect, tls = table.column("connect_us").to_numpy(), table.column("tls_us").to_numpy()
    assert (tls > connect).all()  # the handshake ends after connect() answered
    assert summary["conservation"]["ok"]


@pytest.mark.parametrize("engine", ENGINES)
def test_raw_bytes_over_tls_reach_nginx_on_both_engines(
    tmp_path: Path, netns: Namespace, engine: str
) -> None:
    """No [load.http]: the scenario's own bytes (an HTTP/1.0 request) over TLS, the
    reply read to nginx's close. The uvloop engine did this only with HTTP before."""
    ca, cert, key = certificate(tmp_path / "pki", "staging.test", "127.0.0.1")
    request = "GET / HTTP/1.0\\r\\nHost: staging.test\\r\\n\\r\\n"
    with nginx(
        netns, tmp_path / "nginx", "127.0.0.1:8443", access_log=True, tls=(cert, key)
    ) as prefix:
        scenario = write_scenario(
            tmp_path / "raw-tls.toml",
            f"""
name = "raw-tls"
duration = "1.5s"
[target]
endpoints = ["127.0.0.1:8443"]
[load]
engine = "{engine}"
users = 8
rate = 300
io_timeout = "2s"
send = "{request}"
reply = "eof"
[load.tls]
server_name = "staging.test"
ca_file = "{ca}"
""",
        )
        out, summary, _ = _run(tmp_path, netns, scenario)
    conns = summary["connections"]
    assert conns["attempted"] >= 10 and conns["failed"] == 0 and conns["io_errors"] == {}, conns
    assert access_count(prefix) == conns["attempted"]  # each request reached nginx
    table = pq.read_table(out / "connections.parquet")
    connect, tls = table.column("connect_us").to_numpy(), table.column("tls_us").to_numpy()
    assert (tls > connect).all()  # the handshake timed apart, after connect() answered
    assert summary["conservation"]["ok"]


@pytest.mark.parametrize("engine", ENGINES)
def test_tls_verification_fails_clearly_without_the_ca(
    tmp_path: Path, netns: Namespace, engine: str
) -> None:
    _, cert, key = certificate(tmp_path / "pki", "staging.test")
    with nginx(netns, tmp_path / "nginx", "127.0.0.1:8443", access_log=True, tls=(cert, key)):
        scenario = _scenario(
            tmp_path,
            "127.0.0.1:8443",
            f'engine = "{engine}"\n[load.tls]\nserver_name = "staging.test"',
            seconds=1.0,
        )
        out, summary, _ = _run(tmp_path, netns, scenario)
    conns = summary["connections"]
    assert conns["attempted"] > 20
    assert conns["io_errors"] == {"TLS_VERIFY": conns["attempted"]}
    logs = "".join(p.read_text() for p in (out / "logs").iterdir())
    assert "TLS certificate verification failed for staging.test" in logs
    assert "self-signed" in logs or "unable to get local issuer" in logs


def test_a_missing_ca_file_is_an_error_before_any_load(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "ca.pem"
    scenario = _scenario(tmp_path, "127.0.0.1:8443", f'[load.tls]\nca_file = "{missing}"')
    result = eph(["run", str(scenario), "--out", str(tmp_path / "run")], cwd=tmp_path)
    assert result.returncode != 0
    assert "load.tls.ca_file" in result.stderr and str(missing) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.paced  # a paced rate that must be reached
def test_the_keepalive_lever_sweep_exhausts_at_one_request_per_connection_not_at_five(
    tmp_path: Path,
) -> None:
    """scenarios/keepalive-lever.toml: the same 600 requests/s over 1,000 ports; one
    request per connection runs out when the model says, five never do."""
    out = tmp_path / "sweep"
    result = eph(
        [
            "sweep",
            str(ROOT / "scenarios" / "keepalive-lever.toml"),
            "--vary",
            "load.requests_per_connection=1,5",
            "--set",
            "duration=2500ms",
            "--set",
            # one process: two start their pacing apart, and the time to exhaustion
            # measured grows by that (1.78 s for the model's 1.67); the lever is the subject
            "load.processes=1",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with (out / "comparison.csv").open() as table:
        one, five = list(csv.DictReader(table))
    assert one["exhausted"] == "true" and five["exhausted"] == "false"
    assert int(one["distinct_tuples"]) == 1000  # every port, once
    assert float(one["model_time_to_exhaustion_s"]) == pytest.approx(1000 / 600, rel=0.01)
    assert float(one["measured_time_to_exhaustion_s"]) == pytest.approx(1000 / 600, rel=0.05)
    # five requests a connection: a fifth of the connections, each its own port
    points = sorted(p for p in out.iterdir() if p.is_dir())
    summary = run_dir_summary(points[1])
    connections = summary["connections"]["attempted"]
    assert connections == int(five["distinct_tuples"]) < 1000
    assert summary["http"]["requests"] == 5 * connections == summary["listener"]["requests"]
    assert summary["conservation"]["ok"]


def test_a_client_certificate_is_presented_and_insecure_skips_verification(
    tmp_path: Path, netns: Namespace
) -> None:
    """nginx asks for a client certificate signed by the CA: with cert_file/key_file the
    requests pass; without, nginx answers 400 (HTTP_400). insecure = true needs no CA."""
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("eph-client")
    pki = tmp_path / "pki"
    pki.mkdir()
    files = {
        "ca": ca.cert_pem,
        "server": server.cert_chain_pems[0],
        "server.key": server.private_key_pem,
        "client": client.cert_chain_pems[0],
        "client.key": client.private_key_pem,
    }
    for name, blob in files.items():
        blob.write_to_path(str(pki / name))
    prefix = tmp_path / "nginx"
    verify = f"ssl_client_certificate {pki / 'ca'}; ssl_verify_client on;"
    with nginx(netns, prefix, "127.0.0.1:8443", tls=(pki / "server", pki / "server.key"),
               extra=verify):  # fmt: skip
        ca_file = f'[load.tls]\nca_file = "{pki / "ca"}"'
        client_cert = f'cert_file = "{pki / "client"}"\nkey_file = "{pki / "client.key"}"'
        tables = {
            "mutual": f"{ca_file}\n{client_cert}",
            "anonymous": ca_file,
            "insecure": f"[load.tls]\ninsecure = true\n{client_cert}",
        }
        results = {}
        for label, table in tables.items():
            run = tmp_path / label
            run.mkdir()
            scenario = _scenario(run, "127.0.0.1:8443", f'engine = "uvloop"\n{table}', seconds=1)
            results[label] = _run(run, netns, scenario)[1]["connections"]
    assert results["mutual"]["failed"] == 0 and results["mutual"]["io_errors"] == {}
    assert results["insecure"]["io_errors"] == {} and results["insecure"]["attempted"] > 20
    anonymous = results["anonymous"]
    assert anonymous["io_errors"] == {"HTTP_400": anonymous["attempted"]}


def test_the_embedded_listener_serves_tls_the_clients_verify(tmp_path: Path) -> None:
    """[listener] with load.tls: a throwaway certificate in the run directory, its CA
    handed to the clients; every connection verified, every request answered."""
    scenario = write_scenario(
        tmp_path / "s.toml",
        """
name = "tls-lab"
duration = "1500ms"
[target]
endpoints = ["127.0.0.1:0"]
[listener]
[load]
engine = "locust"
users = 4
rate = 200
requests_per_connection = 2
tls = true
[load.http]
""",
    )
    out = tmp_path / "run"
    result = eph(["run", str(scenario), "--out", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = run_dir_summary(out)
    conns, http = summary["connections"], summary["http"]
    assert conns["attempted"] >= 10 and conns["failed"] == 0 and conns["io_errors"] == {}
    assert http["tls_handshakes"] == conns["attempted"]
    assert http["requests"] == 2 * conns["attempted"] == summary["listener"]["requests"]
    assert (out / "tls" / "ca.pem").exists()
    resolved = json.loads((out / "scenario.json").read_text())
    assert resolved["load"]["tls"]["ca_file"] == str(out / "tls" / "ca.pem")
    assert summary["conservation"]["ok"]


def test_connections_waiting_for_their_next_request_at_the_stop_are_recorded(
    tmp_path: Path,
) -> None:
    """A slow pace with keep-alive leaves most connections waiting for their next
    request's slot when the run stops, past the engine's bound: each is still recorded
    (ECANCELED after connect), so records and the listener's accepts agree."""
    scenario = write_scenario(
        tmp_path / "slow.toml",
        """
name = "slow"
duration = "1500ms"
[target]
endpoints = ["127.0.0.1:0"]
[listener]
[load]
engine = "uvloop"
users = 10
rate = 4
requests_per_connection = 3
connect_timeout = "500ms"
io_timeout = "500ms"
[load.http]
""",
    )
    out = tmp_path / "run"
    result = eph(["run", str(scenario), "--out", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = run_dir_summary(out)
    conns = summary["connections"]
    assert conns["attempted"] >= 3  # 4 requests/s: a connection starts every 0.75 s or so
    assert conns["io_errors"].get("ECANCELED", 0) > 0  # stopped while waiting
    assert summary["listener"]["accepted"] == conns["succeeded"] == conns["attempted"]
    assert summary["http"]["requests"] == summary["listener"]["requests"]
    assert summary["conservation"]["ok"]
