"""The kernel's account of every client connection, beside the samples: ``--trace``.

A :class:`KernelTrace` starts the eBPF recorder (:mod:`harness.kernel.bpf`) through
the supervisor, in the observe stage, filtered to one network namespace; waits
until its probes are attached, so nothing made after :meth:`KernelTrace.start`
returns is missed; and at :meth:`KernelTrace.finish` stops it and turns its
lines into a connections table (``connections.parquet`` for an observation,
``kernel_connections.parquet`` beside a run's own records). Where tracing
cannot run (no root, no BTF, no recorder) :func:`start_trace` says why in one
line and returns ``None``: the sampling goes on without it.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.errors import RunError
from harness.kernel import bpf
from harness.kernel.bpfmap import MapNotFound
from harness.kernel.recorder import OpenCount
from harness.records import host_name
from harness.supervisor import Child, Stage, Supervisor

__all__ = ["TALLY_FILE", "TRACE_FILES", "KernelTrace", "TraceResult", "start_trace"]

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0  # compiling and attaching the program
STOP_GRACE_S = 10.0
# bpftrace 0.17 can miss a SIGTERM: seen twice in about 100 stops under load, its one
# thread back in epoll_wait with the signal taken and no exit (killed 10 s later,
# with the rows it would print at exit). It stops 0.2 s after a SIGTERM it sees.
TERM_AGAIN_S = 1.0
SETTLE_S = 0.2  # after the stop request: lines of connections that were closing
SETTLE_QUIET_S = 0.5  # eph's loader: the open count has not fallen for this long
SETTLE_LIMIT_S = 5.0  # eph's loader: at most this long for the last closes
TRACE_FILES = ("kernel.tsv", "kernel.err", "kernel.arrows", "kernel-drain.err")
TALLY_FILE = "kernel-tally.json"  # the drained rows' failures and latency, live (observe)


@dataclass(frozen=True)
class TraceResult:
    """What the recorder saw; written to ``kernel.json``."""

    connections: int
    skipped_lines: int
    lost_events: int  # bpftrace's lost events and rows its reader cleared unprinted
    missed_events: int  # state changes the recorder did not see: at most as many rows missing
    netns: int
    table: str
    # time.time_ns() - time.monotonic_ns() at the end: the rows' CLOCK_MONOTONIC
    # stamps on the samples' wall clock
    wall_minus_monotonic_ns: int
    # bpftrace's exit status when it had ended before eph stopped it (rows after its
    # end are missing, and its skipped events could not be read); None: eph stopped it
    exited_early: int | None = None
    # eph's loader: state changes the kernel skipped for its first program that the
    # second took (docs/kernel.md, "The recorder's misses"); None with bpftrace
    rescued_events: int | None = None
    recorder: str = "eph"  # "eph" (its own loader) or "bpftrace"


class KernelTrace:
    """The recorder of one namespace, writing into ``directory``."""

    def __init__(
        self,
        children: Supervisor,
        directory: Path,
        netns: int,
        tally: bool = False,
        recorder: str | None = None,
    ) -> None:
        self._children = children
        self.directory = directory
        self.netns = netns
        self.tally = directory / TALLY_FILE if tally else None
        self.text = directory / "kernel.tsv"
        self.stderr = directory / "kernel.err"
        self.drained = directory / "kernel.arrows"
        self.child: Child | None = None
        self.drainer: Child | None = None
        # "eph" (its own loader, where make setup built it) or "bpftrace"
        self.recorder = recorder or ("eph" if bpf.loader_built() else "bpftrace")

    def start(self) -> None:
        """Start the recorder and wait until every probe is attached."""
        self.text.unlink(missing_ok=True)
        with open(self.text, "wb") as out, open(self.stderr, "wb") as err:
            self.child = self._children.start(
                "kernel trace",
                bpf.recorder_command(self.netns, own=self.recorder == "eph"),
                stage=Stage.OBSERVE,
                grace=STOP_GRACE_S,
                term_again_s=TERM_AGAIN_S,
                death_signal=signal.SIGTERM,
                env=bpf.recorder_env(),
                stdout=out,
                stderr=err,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not bpf.ready(self.text):
            if self.child.poll() is not None or time.monotonic() > deadline:
                self._children.stop(self.child, grace=1.0)
                raise RunError(f"the kernel recorder did not start: {_tail(self.stderr)}")
            time.sleep(0.05)
        with open(self.directory / "kernel-drain.err", "wb") as err:
            self.drainer = self._children.start(
                "kernel trace drain",
                bpf.drain_command(self.child.pid, self.drained, host_name(), self.tally),
                stage=Stage.OBSERVE,
                death_signal=signal.SIGTERM,
                stderr=err,
            )
        logger.info("tracing client connections of netns %d in the kernel", self.netns)

    def settle(self) -> None:
        """Wait for the state changes of sockets that were closing (and a flush).

        eph's loader counts the connections it follows that have not closed yet: wait
        until none is left, or the count stops falling for :data:`SETTLE_QUIET_S` (a
        connection held open), at most :data:`SETTLE_LIMIT_S`. In make test's busiest
        phase, a fixed 0.2 s left 71 of a flat-out churn's 52,224 connections without a
        row, none of them missed: they had not reached CLOSE when the recorder stopped.
        bpftrace's recorder keeps no such count, and gets :data:`SETTLE_S`."""
        time.sleep(SETTLE_S)
        if self.recorder != "eph" or self.child is None or self.child.poll() is not None:
            return
        try:
            count = OpenCount(self.child.pid)
        except (OSError, MapNotFound) as exc:
            logger.debug("no count of open connections to settle on: %s", exc)
            return
        with count:
            deadline, lowest, quiet_since = time.monotonic() + SETTLE_LIMIT_S, None, 0.0
            while (now := time.monotonic()) < deadline:
                left = count.left()
                if left <= 0:
                    return
                if lowest is None or left < lowest:
                    lowest, quiet_since = left, now
                elif now - quiet_since >= SETTLE_QUIET_S:
                    return
                time.sleep(0.02)

    def finish(self, table: str = "connections.parquet") -> TraceResult:
        """Stop the recorder; its lines as ``table`` in the directory."""
        if self.child is not None and self.child.poll() is None:
            self.settle()
        # the drainer's last drain first, then the recorder prints what closed since, at
        # exit, and (eph's loader) what it missed; bpftrace's misses are read before
        missed = 0
        exited_early = self.child.poll() if self.child is not None else None
        for child in (self.drainer, self.child):
            if child is not None:
                if child is self.child and child.poll() is None:
                    missed = bpf.missed_events(child.pid)
                self._children.stop(child)
        code = self.drainer.returncode if self.drainer is not None else None
        # stopped before it had set its handler (a trace of a second or less): it never
        # drained, so every row is in what the recorder printed at exit
        never_drained = code == -signal.SIGTERM and not self.drained.exists()
        if code not in (0, None) and not never_drained:
            logger.warning(
                "the kernel trace's map drainer failed (%s); the recorder printed the rows instead",
                _tail(self.directory / "kernel-drain.err"),
            )
        read = bpf.convert(self.text, self.drained, self.directory / table, host_name())
        result = TraceResult(
            connections=read.connections,
            skipped_lines=read.skipped_lines,
            lost_events=bpf.lost_events(_read(self.stderr)) + read.lost,
            missed_events=read.missed if read.missed is not None else missed,
            netns=self.netns,
            table=table,
            wall_minus_monotonic_ns=time.time_ns() - time.monotonic_ns(),
            exited_early=exited_early,
            rescued_events=read.rescued,
            recorder=self.recorder,
        )
        (self.directory / "kernel.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
        if exited_early is not None:
            logger.warning(
                "the kernel recorder had exited (%d) before the trace's end: connections"
                " after that have no row (%s)",
                exited_early,
                _tail(self.stderr),
            )
        if result.lost_events:
            logger.warning("bpftrace lost %d events: connections are missing", result.lost_events)
        if result.missed_events:
            logger.warning(
                "the kernel skipped %d of the recorder's events (a busy CPU): up to as many"
                " connections have no row",
                result.missed_events,
            )
        return result


def start_trace(
    children: Supervisor,
    directory: Path,
    netns: Path = Path("/proc/self/ns/net"),
    tally: bool = False,
) -> KernelTrace | str:
    """A started recorder of namespace ``netns`` (default: this process's), or why the
    kernel or the host cannot trace, in one line (also logged). ``tally``: keep the
    live failures and latency per destination in :data:`TALLY_FILE`."""
    reason = bpf.unavailable()
    if reason is None:
        trace = KernelTrace(children, directory, bpf.netns_inode(netns), tally)
        try:
            trace.start()
            return trace
        except RunError as exc:
            reason = str(exc)
        # eph's program may not load on this kernel (its verifier, its BTF): bpftrace's
        # records too, with its skips counted
        if trace.recorder == "eph" and bpf.bpftrace_unavailable() is None:
            logger.warning("%s; recording with bpftrace instead", reason)
            trace = KernelTrace(children, directory, trace.netns, tally, recorder="bpftrace")
            try:
                trace.start()
                return trace
            except RunError as exc:
                reason = str(exc)
    logger.warning("no kernel trace: %s; sampling goes on", reason)
    return reason


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _tail(path: Path, lines: int = 3) -> str:
    text = _read(path).strip().splitlines()
    kept = [line for line in text if "RLIMIT_MEMLOCK" not in line]  # bpftrace's usual noise
    return " | ".join(kept[-lines:]) if kept else "(no output)"
