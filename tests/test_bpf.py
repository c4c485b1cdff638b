"""The eBPF recorder: its lines parsed in bulk, and its rows for clients eph did not write
matched against ``ss`` and the clients' own counts, in a namespace of their own."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.kernel import bpf
from harness.kernel.netns import Namespace
from harness.observe.trace import KernelTrace, start_trace
from harness.report import witness as witness_module
from harness.report.witness import kernel_witness
from harness.supervisor import Stage, Supervisor

from .conftest import EPH, ROOT, eph, require, run_dir_summary, write_scenario
from .tables import audit as audit_tuples

LO = socket.htonl(0x7F000001)  # 127.0.0.1 as the kernel holds it, read as a host u32


def _line(syn: int, est: int, close: int, last: int, fin: int, err: int, sport: int) -> str:
    fields = (
        syn,
        est,
        close,
        last | fin << 8 | err << 16,
        LO << 32 | LO,
        sport << 16 | 80,
        42,
        "my client",
    )
    return f"@r[{', '.join(str(f) for f in fields)}]: 1"


def _key(line: str) -> np.ndarray:
    """The map key bpftrace stores for a printed line: what the drainer reads."""
    *numbers, comm = line[len("@r[") : -len("]: 1")].split(", ")
    key = np.zeros(1, bpf.KEY_DTYPE)
    for name, value in zip(bpf.KEY_DTYPE.names[:-1], numbers, strict=True):
        key[name] = int(value)
    key["comm"] = comm.encode()
    return key.view(np.uint8).reshape(1, bpf.KEY_SIZE)


def test_kernel_rows_have_every_column_of_the_records_first() -> None:
    """kernel/ imports nothing of eph, so its schema repeats the records': it must not drift
    (the analysis reads either table)."""
    from harness.records import CORE_SCHEMA

    ours = bpf.KERNEL_CONNECTIONS_SCHEMA
    assert ours.names[: len(CORE_SCHEMA)] == CORE_SCHEMA.names
    for field in CORE_SCHEMA:
        assert ours.field(field.name).type == field.type, field.name


def test_lines_become_connection_columns(tmp_path: Path) -> None:
    text = tmp_path / "kernel.tsv"
    lines = [
        "Attaching 5 probes...",
        bpf.READY_LINE,
        _line(1_000_000, 1_250_000, 9_000_000, 5, 1, 0, 40000),  # we closed: TIME_WAIT
        _line(2_000_000, 2_100_000, 3_000_000, 9, 2, 0, 40001),  # the peer closed first
        _line(4_000_000, 0, 4_002_000, 2, 0, 99, 0),  # EADDRNOTAVAIL inside connect()
        _line(5_000_000, 5_001_000, 6_000_000, 1, 0, 104, 40002),  # reset
        _line(10_000_000, 10_001_000, 11_000_000, 5, 1, 0, 40000),  # the tuple, reused
        "",
        "@gen: 1",
    ]
    # the first two drained from the map, the rest printed by bpftrace at exit
    with bpf.RowWriter(tmp_path / "k.arrows", "here") as drained:
        drained.write(np.concatenate([_key(line) for line in lines[2:4]]))
    text.write_text("\n".join(lines[:2] + lines[4:]))
    read = bpf.convert(text, tmp_path / "k.arrows", tmp_path / "k.parquet", "here")
    assert (read.connections, read.skipped_lines) == (5, 3)
    rows = pq.read_table(tmp_path / "k.parquet").to_pylist()
    assert [r["start_ns"] for r in rows] == sorted(r["start_ns"] for r in rows)
    first, peer, failed, reset, again = rows
    assert (first["connect_us"], first["close_us"], first["close"]) == (250, 8000, "client")
    assert first["local_addr"] == first["remote_addr"] == "127.0.0.1"
    assert (first["comm"], first["pid"], first["engine"], first["host"]) == (
        "my client", 42, "kernel", "here",
    )  # fmt: skip
    assert first["time_wait_ns"] == 9_000_000
    assert first["time_wait_end_ns"] == 10_000_000  # the tuple's next SYN ended it
    assert again["time_wait_end_ns"] == 11_000_000 + bpf.TIME_WAIT_NS
    assert (peer["close"], peer["time_wait_ns"]) == ("server", 0)
    assert (failed["errno"], failed["local_port"], failed["close"], failed["connect_us"]) == (
        99, 0, "", 2,
    )  # fmt: skip
    assert (reset["close"], reset["io_errno"], reset["errno"]) == ("reset", 104, 0)
    # the run's analysis reads the kernel's rows as they are: same column names and values
    audit = audit_tuples(pq.read_table(tmp_path / "k.parquet"))
    assert (audit.distinct, audit.max_uses, audit.reused_out_of_time_wait) == (3, 2, 1)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 5_000),  # SYN, in ms
            st.integers(0, 90),  # lifetime, in ms
            st.sampled_from([0, 40000, 40001, 40002, 40003, 40004]),  # 0: no port
            st.booleans(),  # this side closed first (TIME_WAIT)
        ),
        min_size=1,
        max_size=60,
    ),
    st.integers(0, 60),
)
def test_a_large_trace_is_converted_in_partitions_as_a_small_one_is_whole(
    rows: list[tuple[int, int, int, bool]], drained_share: int
) -> None:
    """Above PARTITION_ROWS the rows are spread by local port, each partition sorted
    and the partitions merged: the same table, TIME_WAIT's ends and all, as one sort."""
    lines = []
    for syn_ms, life_ms, port, ours in rows:
        syn, close = syn_ms * 1_000_000, (syn_ms + life_ms) * 1_000_000 + 1
        if port == 0:
            lines.append(_line(syn, 0, syn + 2_000, 2, 0, 99, 0))
        else:
            lines.append(
                _line(syn, syn + 100_000, close, 5 if ours else 9, 1 if ours else 2, 0, port)
            )
    cut = min(drained_share, len(lines))
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        with bpf.RowWriter(tmp / "k.arrows", "here") as drained:
            if cut:
                drained.write(np.concatenate([_key(line) for line in lines[:cut]]))
        (tmp / "k.tsv").write_text("\n".join(lines[cut:]) + "\n")
        whole = bpf.convert(tmp / "k.tsv", tmp / "k.arrows", tmp / "whole.parquet", "here")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(bpf, "PARTITION_ROWS", 4)
            assert bpf._partitions(tmp / "k.tsv", tmp / "k.arrows") > 1 or len(lines) < 4
            parted = bpf.convert(tmp / "k.tsv", tmp / "k.arrows", tmp / "parts.parquet", "here")
        assert parted.connections == whole.connections == len(lines)
        one, many = pq.read_table(tmp / "whole.parquet"), pq.read_table(tmp / "parts.parquet")
        assert (np.diff(many.column("start_ns").to_numpy()) >= 0).all()
        assert sorted(map(_row_key, many.to_pylist())) == sorted(map(_row_key, one.to_pylist()))
        assert not [p for p in tmp.iterdir() if p.name.startswith(".")]  # no scratch left


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 20), st.sampled_from([0, 40000, 40001, 40002, 40003])),
        max_size=40,
    ),
    st.sets(st.integers(0, 39)),
    st.integers(1, 7),
)
def test_the_witness_spilled_by_partition_matches_as_held(
    rows: list[tuple[int, int]], dropped: set[int], partition_rows: int
) -> None:
    """A record per (second, local port; 0: EADDRNOTAVAIL), the kernel's account of
    them with some dropped: the witness held in memory and spilled to partitions agree."""
    second = 1_000_000_000
    ours = [(t * second, port, 0 if port else 99) for t, port in rows]
    seen = [(start + 7, port, e) for n, (start, port, e) in enumerate(ours) if n not in dropped]
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        _records(tmp / "ours.parquet", ours)
        _records(tmp / "seen.parquet", seen)
        held = kernel_witness(tmp / "ours.parquet", tmp / "seen.parquet")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(witness_module, "PARTITION_ROWS", partition_rows)
            spilled = kernel_witness(tmp / "ours.parquet", tmp / "seen.parquet")
    assert spilled == held
    assert held.matched <= len(seen)  # a dropped turn on a tuple shifts the later ones
    if not dropped & set(range(len(ours))):
        assert held.matched == len(ours) and held.only_in_kernel == held.only_in_records == 0


def _row_key(row: dict[str, object]) -> tuple[str, ...]:
    return tuple(str(row[name]) for name in sorted(row))


def _records(path: Path, rows: list[tuple[int, int, int]]) -> None:
    """A records table: (start_ns, local_port, errno) toward 127.0.0.1:80."""
    n = len(rows)
    addr = pa.DictionaryArray.from_arrays(pa.array([0] * n, pa.int32()), ["127.0.0.1"])
    pq.write_table(
        pa.table(
            {
                "start_ns": pa.array([r[0] for r in rows], pa.int64()),
                "local_addr": addr,
                "local_port": pa.array([r[1] for r in rows], pa.uint16()),
                "remote_addr": addr,
                "remote_port": pa.array([80] * n, pa.uint16()),
                "errno": pa.array([r[2] for r in rows], pa.uint16()),
            }
        ),
        path,
    )


@pytest.mark.parametrize("partition_rows", [2_000_000, 2], ids=["held", "spilled"])
def test_the_witness_matches_tuples_by_turn_and_failures_by_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, partition_rows: int
) -> None:
    monkeypatch.setattr(witness_module, "PARTITION_ROWS", partition_rows)
    ours, seen = tmp_path / "ours.parquet", tmp_path / "seen.parquet"
    second = 1_000_000_000
    _records(ours, [(0, 40000, 0), (5 * second, 40000, 0), (1, 0, 99), (2, 0, 99), (3, 41, 0)])
    _records(seen, [(10, 40000, 0), (5 * second + 10, 40000, 0), (7, 0, 99), (9, 40005, 0)])
    witness = kernel_witness(ours, seen)
    assert (witness.records, witness.kernel_connections, witness.matched) == (5, 4, 3)
    assert (witness.only_in_records, witness.only_in_kernel) == (2, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.parquet", "seen.parquet"]
    missing = kernel_witness(ours, None, reason="kernel tracing needs root (eBPF)")
    assert (missing.available, missing.reason) == (False, "kernel tracing needs root (eBPF)")


def _require_recorder(kind: str = "loader") -> None:
    """Root, BTF, and the recorder: eph's loader with its program built (``loader``) or
    bpftrace and tracefs (mounted here when it is not). Under make test a missing one
    fails, whichever it is: make test builds the program, so the loader is tested."""
    require(bpf.unavailable())
    if kind == "loader":
        built = bpf.loader_built()
        require(None if built else "the recorder's program is not built (make recorder)")
    else:
        require(None if shutil.which("bpftrace") else "bpftrace is not installed")


@pytest.fixture(params=["loader", "bpftrace"])
def recorder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each recorder in turn: eph's own loader, and bpftrace where it is not built."""
    kind = str(request.param)
    monkeypatch.setenv("EPH_RECORDER", kind)
    _require_recorder(kind)
    return kind


CLIENT = """
import errno, json, socket, sys
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(1024)
counts = {"ok": 0, "eaddrnotavail": 0, "other": 0}
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    code = s.connect_ex(server.getsockname())
    key = "ok" if code == 0 else "eaddrnotavail" if code == errno.EADDRNOTAVAIL else "other"
    counts[key] += 1
    if code == 0:
        conn, _ = server.accept()
        s.close()  # this side's FIN first: TIME_WAIT here once the server's FIN comes
        conn.recv(1)
        conn.close()
    else:
        s.close()
print(json.dumps({**counts, "port": server.getsockname()[1]}))
"""


def _time_wait(ns: Namespace, remote_port: int) -> int:
    """Client timewait sockets toward ``remote_port``: TIME-WAIT, and FIN-WAIT-2 once
    their socket is closed (the kernel keeps those as timewait sockets too)."""
    args = ["ss", "-tanH", "state", "time-wait", "state", "fin-wait-2"]
    out = subprocess.run(ns.command(args), capture_output=True, text=True).stdout
    peers = [line.split()[-1] for line in out.splitlines() if line.strip()]
    return sum(peer.rsplit(":", 1)[1] == str(remote_port) for peer in peers)


@pytest.mark.netns
def test_recorder_rows_for_clients_eph_did_not_write_match_ss(
    tmp_path: Path, netns: Namespace, recorder: str
) -> None:
    subprocess.run(netns.command(["ip", "link", "set", "lo", "up"]), check=True)
    netns.set_sysctl("net.ipv4.ip_local_port_range", [40000, 40099])
    netns.set_sysctl("net.ipv4.tcp_tw_reuse", 0)
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    with Supervisor() as children:
        trace = KernelTrace(children, tmp_path, bpf.netns_inode(Path("/run/netns") / netns.name))
        trace.start()
        client = subprocess.run(
            netns.command([sys.executable, str(script), "130"]),
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        counted = json.loads(client.stdout)
        in_time_wait = _time_wait(netns, counted["port"])
        server = children.start(
            "http.server",
            netns.command([sys.executable, "-m", "http.server", "-b", "127.0.0.1", "8765"]),
            stage=Stage.TARGET, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_for_port(netns, 8765)
        for _ in range(10):  # HTTP/1.0: both close at once, the one first is either
            subprocess.run(
                netns.command(["curl", "-sf", "-o", "/dev/null", "http://127.0.0.1:8765/"]),
                check=True, timeout=10,
            )  # fmt: skip
        curl_time_wait = _time_wait(netns, 8765)
        children.stop(server)
        result = trace.finish()
    rows = pq.read_table(tmp_path / result.table)
    comm = np.array(rows.column("comm").to_pylist())
    errno_ = rows.column("errno").to_numpy()
    close = np.array(rows.column("close").to_pylist())
    tw = rows.column("time_wait_ns").to_numpy()
    python = comm == Path(sys.executable).name[:15]  # the kernel's comm: the exec'd name
    usable = 100 - (40000 <= counted["port"] <= 40099)  # the script's own server took one?
    assert (counted["ok"], counted["eaddrnotavail"], counted["other"]) == (usable, 130 - usable, 0)
    assert np.count_nonzero(python & (errno_ == 0)) == counted["ok"]
    assert np.count_nonzero(python & (errno_ == 99)) == counted["eaddrnotavail"]
    assert np.count_nonzero(python & (close == "client") & (tw > 0)) == in_time_wait == usable
    ports = rows.column("local_port").to_numpy()[python & (errno_ == 0)]
    assert len(set(ports)) == usable and set(ports) <= set(range(40000, 40100))
    curl = comm == "curl"
    assert np.count_nonzero(curl) == 10
    assert set(close[curl]) <= {"server", "client"}
    assert np.count_nonzero(curl & (close == "client")) == np.count_nonzero(curl & (tw > 0))
    assert np.count_nonzero(curl & (tw > 0)) == curl_time_wait
    assert set(rows.column("remote_port").to_numpy()[curl]) == {8765}
    assert rows.num_rows == 140  # nothing from outside the namespace, no server sockets
    assert result.lost_events == 0


# ten connections the client shuts down while the server holds its side, then closed by
# the server one every 0.2 s: each client socket waits in FIN_WAIT2 until its turn (an
# orphan would not: closed, it goes on as a timewait socket at once)
LATE_CLOSES = r"""
import socket, time
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(16)
clients = [socket.create_connection(server.getsockname()) for _ in range(10)]
accepted = [server.accept()[0] for _ in range(10)]
for c in clients:
    c.shutdown(socket.SHUT_WR)
print("closed", flush=True)
for a in accepted:
    time.sleep(0.2)
    a.close()
"""


@pytest.mark.netns
def test_the_recorder_waits_for_the_last_closes(tmp_path: Path, netns: Namespace) -> None:
    """Stopped while its last connections are still closing (the server slow to answer
    their FIN), eph's recorder waits while they close: every row is there."""
    _require_recorder()
    subprocess.run(netns.command(["ip", "link", "set", "lo", "up"]), check=True)
    with Supervisor() as children:
        trace = KernelTrace(children, tmp_path, bpf.netns_inode(Path("/run/netns") / netns.name))
        trace.start()
        client = subprocess.Popen(
            netns.command([sys.executable, "-c", LATE_CLOSES]), stdout=subprocess.PIPE, text=True
        )
        with client:
            assert client.stdout is not None and client.stdout.readline().strip() == "closed"
            result = trace.finish()  # 2 s of closes still to come
            assert client.wait(timeout=30) == 0
    rows = pq.read_table(tmp_path / result.table)
    assert rows.num_rows == 10, (result, rows.column("close").to_pylist())
    assert set(rows.column("close").to_pylist()) == {"client"}


THREE = r"""
import socket
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(8)
for _ in range(3):
    socket.create_connection(server.getsockname()).close()
"""


@pytest.mark.netns
def test_a_program_that_cannot_load_gives_way_to_bpftrace(
    tmp_path: Path,
    netns: Namespace,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """eph's program refused (here: not an object at all; elsewhere a verifier or a
    kernel's BTF) is said, and bpftrace records instead."""
    _require_recorder()
    _require_recorder("bpftrace")
    broken = tmp_path / "broken.bpf.o"
    broken.write_bytes(b"not an ELF object")
    monkeypatch.setenv("EPH_RECORDER_OBJECT", str(broken))
    subprocess.run(netns.command(["ip", "link", "set", "lo", "up"]), check=True)
    with Supervisor() as children:
        trace = start_trace(children, tmp_path, Path("/run/netns") / netns.name)
        assert isinstance(trace, KernelTrace) and trace.recorder == "bpftrace", trace
        subprocess.run(netns.command([sys.executable, "-c", THREE]), check=True, timeout=30)
        result = trace.finish()
    assert (result.recorder, result.connections) == ("bpftrace", 3), result
    said = caplog.text
    assert "the kernel recorder did not start" in said and "not a proper ELF object" in said, said
    assert "Unknown error" not in said and "drainer failed" not in said, said
    assert "recording with bpftrace instead" in said, said


def _wait_for_port(ns: Namespace, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            ns.command(["ss", "-tlnH", f"sport = :{port}"]), capture_output=True, text=True
        ).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


SCENARIO = """
name = "traced"
duration = "2s"
[target]
endpoints = ["127.0.0.1:9000"]
[listener]
[load]
engine = "uvloop"
users = 10
spawn_rate = 100
rate = 0
close = "client"
backoff = "20ms"
"""


@pytest.mark.netns
@pytest.mark.e2e
def test_run_trace_witnesses_every_record_and_failure(tmp_path: Path, netns: Namespace) -> None:
    """100 ports, no reuse: 100 successes then EADDRNOTAVAIL, every one seen by the kernel."""
    _require_recorder()
    netns.set_sysctl("net.ipv4.ip_local_port_range", [40000, 40099])
    netns.set_sysctl("net.ipv4.tcp_tw_reuse", 0)
    scenario = write_scenario(tmp_path / "s.toml", SCENARIO)
    out = tmp_path / "run"
    result = eph(
        ["run", str(scenario), "--trace", "--out", str(out)], cwd=tmp_path,
        prefix=netns.command([]),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = run_dir_summary(out)
    witness = summary["kernel_witness"]
    assert witness["available"] is True, witness
    assert witness["records"] == summary["connections"]["attempted"] > 100
    # exact: every record has its kernel row and no row is more (docs/kernel.md, "The
    # recorder's misses": a change the kernel skips for one program, the other takes)
    kernel_json = json.loads((out / "kernel.json").read_text())
    assert kernel_json["exited_early"] is None, kernel_json  # eph stopped it, and read it live
    assert kernel_json["missed_events"] == kernel_json["lost_events"] == 0, kernel_json
    assert witness["lost_events"] == 0, witness
    assert witness["matched"] == witness["kernel_connections"], (witness, kernel_json)
    assert witness["only_in_kernel"] == witness["only_in_records"] == 0, (witness, kernel_json)
    kernel = pq.read_table(out / "kernel_connections.parquet")
    port = kernel.column("remote_port").to_numpy()
    # Locust's workers (load.processes "auto") connect to their master beside the load:
    # the kernel sees those too, and the witness leaves them out
    chosen = summary["load_processes"]
    to_master = np.count_nonzero(port == (chosen["master_port"] or -1))
    assert to_master >= (chosen["count"] if chosen["count"] > 1 else 0), chosen
    errno_ = kernel.column("errno").to_numpy()[port == 9000]
    assert summary["connections"]["succeeded"] == np.count_nonzero(errno_ == 0)
    assert summary["connections"]["failed"] == np.count_nonzero(errno_ == 99) > 0
    assert set(errno_[errno_ != 0]) == {99}


# flat out for 3 s, 20 users with no pause: the load at its fastest
FLAT_OUT = (
    SCENARIO.replace('duration = "2s"', 'duration = "3s"')
    .replace("users = 10", "users = 20")
    .replace('backoff = "20ms"', 'backoff = "0s"')
)


@pytest.mark.netns
@pytest.mark.e2e
@pytest.mark.parametrize(
    ("ports", "tw_reuse"),
    [((10000, 60999), 1), ((40000, 40999), 0)],
    ids=["churn", "refused"],
)
def test_the_recorder_misses_nothing_under_load_however_many_the_range_refuses(
    tmp_path: Path, netns: Namespace, ports: tuple[int, int], tw_reuse: int
) -> None:
    """Every connect of a flat-out load has its kernel row: tens of thousands of whole
    connections a second (``churn``: ports come back through tcp_tw_reuse), or a
    thousand and then a storm of connects the range refuses (``refused``).

    The churn's softirqs are what interrupt a recorder's program: bpftrace's one
    tracepoint program missed 300 to 1,900 state changes in such runs, and this fails
    with it (docs/kernel.md, "The recorder's misses")."""
    _require_recorder()
    netns.set_sysctl("net.ipv4.ip_local_port_range", list(ports))
    netns.set_sysctl("net.ipv4.tcp_tw_reuse", tw_reuse)
    scenario = write_scenario(tmp_path / "s.toml", FLAT_OUT)
    out = tmp_path / "run"
    result = eph(
        ["run", str(scenario), "--trace", "--out", str(out), "--no-report"], cwd=tmp_path,
        prefix=netns.command([]),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = run_dir_summary(out)
    connections, witness = summary["connections"], summary["kernel_witness"]
    kernel_json = json.loads((out / "kernel.json").read_text())
    said = (connections, witness, kernel_json)
    if tw_reuse:
        assert connections["succeeded"] == connections["attempted"] > 10_000, said
    else:
        assert connections["failed"] > 10 * connections["succeeded"] > 0, said
    assert kernel_json["recorder"] == "eph", said
    assert kernel_json["missed_events"] == kernel_json["lost_events"] == 0, said
    assert witness["records"] == connections["attempted"] == witness["matched"], said
    assert witness["only_in_records"] == witness["only_in_kernel"] == 0, said


@pytest.mark.netns
@pytest.mark.e2e
def test_observe_trace_writes_connections_of_any_client(tmp_path: Path, netns: Namespace) -> None:
    _require_recorder()
    subprocess.run(netns.command(["ip", "link", "set", "lo", "up"]), check=True)
    out = tmp_path / "obs"
    args = [*EPH, "observe", "--trace", "--out", str(out), "--duration", "30s", "--plain"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "observe.log"
    with Supervisor() as children, log.open("wb") as stderr:
        observer = children.start(
            "observe", netns.command([*args, "--no-report"]), stage=Stage.OBSERVE, env=env,
            stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not ((out / "host.arrows").exists() and (out / "host.arrows").stat().st_size):
            assert observer.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        server = children.start(
            "http.server",
            netns.command([sys.executable, "-m", "http.server", "-b", "127.0.0.1", "8766"]),
            stage=Stage.TARGET, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_for_port(netns, 8766)
        for _ in range(5):
            subprocess.run(
                netns.command(["curl", "-sf", "-o", "/dev/null", "http://127.0.0.1:8766/"]),
                check=True, timeout=10,
            )  # fmt: skip
        children.stop(server)
        children.stop(observer, grace=60)
    assert observer.returncode == 0, log.read_text(errors="replace")[-3000:]
    rows = pq.read_table(out / "connections.parquet")
    kernel = json.loads((out / "kernel.json").read_text())
    said = f"{kernel}\n{log.read_text(errors='replace')[-3000:]}"
    assert rows.num_rows == 5 and kernel["missed_events"] == 0, said
    assert set(rows.column("comm").to_pylist()) <= {"curl"}, said
    assert set(rows.column("remote_port").to_pylist()) <= {8766}, said
    assert kernel["connections"] == rows.num_rows


def test_without_root_it_says_why_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with Supervisor() as children:
        reason = start_trace(children, tmp_path)
        assert not children.running
    assert reason == "kernel tracing needs root (eBPF)"
    assert [r.getMessage() for r in caplog.records] == [
        "no kernel trace: kernel tracing needs root (eBPF); sampling goes on"
    ]
    monkeypatch.setattr(bpf, "BTF", tmp_path / "no-btf")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert bpf.unavailable() == f"kernel tracing needs BTF ({tmp_path / 'no-btf'} is missing)"
    monkeypatch.setattr(bpf, "BTF", tmp_path)
    monkeypatch.setenv("EPH_RECORDER", "bpftrace")  # as where make setup built nothing
    assert bpf.unavailable("no-such-bpftrace") == (
        "kernel tracing needs its program built (make setup: clang and libbpf-dev)"
        " or bpftrace (apt-get install bpftrace)"
    )


def test_the_recorder_is_ephs_own_where_built_and_bpftrace_where_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _require_recorder()  # make test builds the program: the loader is what it tests
    monkeypatch.delenv("EPH_RECORDER", raising=False)
    assert bpf.recorder_command(4026531840) == [
        sys.executable, "-m", "harness.kernel.recorder", "4026531840"
    ]  # fmt: skip
    monkeypatch.setenv("EPH_RECORDER", "bpftrace")
    command = bpf.recorder_command(4026531840)
    assert command[0] == "bpftrace" and command[-1] == "4026531840"


CLIENT_150 = """
import os, socket
host, port = os.environ["EPH_TARGET"].rsplit(":", 1)
counts = [0, 0]
for _ in range(150):
    s = socket.socket()
    counts[s.connect_ex((host, int(port))) != 0] += 1
    s.close()
print(*counts)
"""

LAB = """
name = "lab-trace"
duration = "10s"
[target]
endpoints = ["127.0.0.1:9000"]
[listener]
[kernel]
ip_local_port_range = [40000, 40099]
tcp_tw_reuse = 0
[collector]
interval = "100ms"
"""


@pytest.mark.netns
@pytest.mark.e2e
def test_lab_exec_trace_records_the_users_client(tmp_path: Path) -> None:
    _require_recorder()
    client = tmp_path / "client.py"
    client.write_text(CLIENT_150)
    scenario = write_scenario(tmp_path / "lab.toml", LAB)
    out = tmp_path / "lab"
    result = eph(
        [
            "lab",
            str(scenario),
            "--exec",
            f"{sys.executable} {client}",
            "--trace",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ok, failed = map(int, (out / "exec.stdout").read_text().split())
    # a port can come back while its previous connection is only just closing: a few
    # more than 100 (docs/kernel.md "Reuse")
    assert 100 <= ok <= 110 and ok + failed == 150
    rows = pq.read_table(out / "connections.parquet")
    errno_ = rows.column("errno").to_numpy()
    seen = {int(e): int(n) for e, n in zip(*np.unique(errno_, return_counts=True), strict=True)}
    kernel_json = (out / "kernel.json").read_text()
    assert seen == {0: ok, 99: failed}, (seen, kernel_json)
    assert rows.num_rows == 150
    assert np.count_nonzero(rows.column("time_wait_ns").to_numpy()) >= 100


def test_trace_options_say_what_they_need() -> None:
    from click.testing import CliRunner

    from harness.cli import cli

    observe = CliRunner().invoke(cli, ["observe", "--trace", "--duration", "1s"])
    assert observe.exit_code == 2 and "give --out DIR" in observe.output
    lab = CliRunner().invoke(cli, ["lab", str(ROOT / "scenarios/default.toml"), "--trace"])
    assert lab.exit_code == 2 and "--trace in a lab goes with --exec" in lab.output


def test_the_drainers_tally_counts_failures_by_errno_and_latency_by_bucket(tmp_path: Path) -> None:
    """What eph observe --trace serves live: per destination, failures by errno and the
    connects' latency in ``le`` buckets (a connect of exactly 250 µs is in le=0.00025)."""
    lines = [
        _line(1_000_000, 1_250_000, 9_000_000, 5, 1, 0, 40000),  # 250 µs
        _line(2_000_000, 2_100_000, 3_000_000, 9, 2, 0, 40001),  # 100 µs
        _line(4_000_000, 0, 4_002_000, 2, 0, 99, 0),  # EADDRNOTAVAIL
        _line(5_000_000, 0, 5_002_000, 2, 0, 99, 0),  # EADDRNOTAVAIL
        _line(6_000_000, 1_006_000_000, 1_100_000_000, 1, 0, 104, 40002),  # 1 s, then reset
    ]
    tally = tmp_path / "tally.json"
    with bpf.RowWriter(tmp_path / "k.arrows", "here", tally) as drained:
        assert json.loads(tally.read_text())["destinations"] == {}  # there before any row
        drained.write(np.concatenate([_key(line) for line in lines[:3]]))
        drained.write(np.concatenate([_key(line) for line in lines[3:]]))
    found = json.loads(tally.read_text())
    assert found["rows"] == 5 and found["buckets_s"] == list(bpf.LATENCY_BUCKETS_S)
    entry = found["destinations"]["127.0.0.1:80"]
    assert entry["failed"] == {"99": 2}
    assert entry["connected"] == 3  # a reset after connecting is a connect that connected
    assert entry["sum_s"] == pytest.approx(0.00025 + 0.0001 + 1.0)
    le = dict(zip([*bpf.LATENCY_BUCKETS_S, "inf"], entry["buckets"], strict=True))
    assert (le[0.0001], le[0.00025], le[1.0]) == (1, 1, 1) and sum(le.values()) == 3
