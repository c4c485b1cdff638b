"""One supervisor for every child process: each dies with eph, all stop in one order.

Every process eph runs beside itself (the embedded listener, the collectors,
Locust, the uvloop engines under Locust, the lab's relay and stand-in service,
the unprivileged lab's inner run) starts through :meth:`Supervisor.start`.

Dying with eph, even on SIGKILL
    Each child asks the kernel for a death signal (``PR_SET_PDEATHSIG``, in a
    ``preexec_fn``: between fork and exec) sent the moment this process dies.
    It survives the exec of ``ip netns exec`` and ``unshare``, which exec the
    command in place, so a child in a lab namespace has it too. Grandchildren
    take it from their own parent the same way: Locust starts its uvloop
    engines through a supervisor of its own, and its ``--processes`` workers set
    it after Locust forks them (``die_with_parent_after_fork``). A killed eph
    thus takes its whole tree down, link by link. Load and targets get SIGKILL
    (nobody is left to read what they would finish); collectors, the relay and
    the service get SIGTERM, which they handle by writing their files and exiting.
    The kernel sends it when the forking *thread* ends: start children from the
    main thread or one that outlives them.

Stopping in one order
    :meth:`Supervisor.close` (also the end of a ``with`` block) stops the children
    still running stage by stage, in :class:`Stage` order: the load first, so no
    connection starts after; then the collectors, so their last sample sees the
    load gone; then the targets, whose accept queues drain; then the lab's link.
    Every stop, of one child or of a stage, is :meth:`Supervisor.stop`: SIGTERM to
    each, up to its grace period to exit, then SIGKILL; what remains of its
    process group is killed too (Locust's forks); then it is reaped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from enum import IntEnum
from types import FrameType, TracebackType
from typing import IO, Any

from harness.kernel.parent_death import death_signal_preexec

__all__ = ["DEFAULT_GRACE", "Child", "Interrupt", "Stage", "Supervisor"]

logger = logging.getLogger(__name__)

DEFAULT_GRACE = 10.0  # seconds a child has between SIGTERM and SIGKILL, unless told otherwise
_POLL = 0.02  # seconds between looks at a stopping child

_File = int | IO[Any] | None


class Stage(IntEnum):
    """What a child does for a run, in the order children stop (lowest first)."""

    LOAD = 1  # Locust and its workers, engines; a nested eph: no connection starts after
    OBSERVE = 2  # collectors: their last sample sees the load gone
    TARGET = 3  # the listener, the stand-in service: their accept queues drain
    LINK = 4  # the lab's relay between namespaces: the wire goes last


class Child:
    """A process started by a :class:`Supervisor`: its name for logs, stage and grace."""

    def __init__(
        self,
        name: str,
        proc: subprocess.Popen[Any],
        stage: Stage,
        grace: float,
        own_group: bool,
        term_again_s: float | None = None,
    ) -> None:
        self.name = name
        self.proc = proc
        self.stage = stage
        self.grace = grace
        self.own_group = own_group
        self.term_again_s = term_again_s

    def __repr__(self) -> str:
        return f"Child({self.name!r}, pid={self.pid}, {self.stage.name})"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """Its exit code (``-N`` for signal N) once stopped; ``None`` before."""
        return self.proc.returncode

    def poll(self) -> int | None:
        """Its exit code if it has exited, else ``None``; it is not reaped here.

        Left unreaped, its pid cannot be reused, so signalling it and its process
        group stays safe until :meth:`Supervisor.stop` reaps it.
        """
        if self.proc.returncode is not None:
            return self.proc.returncode
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped already (gevent's child watcher): ask Popen
            return self.proc.poll()
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def _signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def _wait(self, deadline: float) -> bool:
        """Whether it exited by ``deadline`` (monotonic seconds); SIGTERM again every
        ``term_again_s`` meanwhile, if set."""
        again = None if self.term_again_s is None else time.monotonic() + self.term_again_s
        while self.poll() is None:
            now = time.monotonic()
            if now >= deadline:
                return False
            if again is not None and self.term_again_s is not None and now >= again:
                self._signal(signal.SIGTERM)
                again = now + self.term_again_s
            time.sleep(_POLL)
        return True

    def _reap(self) -> int:
        if self.own_group and self.proc.returncode is None:  # its pid is still its own
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)  # whatever it forked and left behind
        return self.proc.wait()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


class Supervisor:
    """Starts children that die with this process, and stops them in :class:`Stage` order.

    ``with Supervisor() as children: children.start("collector", args, stage=...)``;
    leaving the block stops whatever still runs and closes the children's pipes.
    """

    def __init__(self) -> None:
        self._running: list[Child] = []
        self._started: list[Child] = []

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        finally:
            for child in self._started:
                child._close_pipes()

    @property
    def running(self) -> list[Child]:
        return list(self._running)

    def start(
        self,
        name: str,
        args: Sequence[str],
        *,
        stage: Stage,
        grace: float = DEFAULT_GRACE,
        death_signal: int = signal.SIGKILL,
        own_group: bool = True,
        term_again_s: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: _File = None,
        stdout: _File = None,
        stderr: _File = None,
        text: bool = False,
    ) -> Child:
        """Start ``args`` as a child that gets ``death_signal`` when this process dies.

        ``own_group``: in a session and process group of its own, so that a Ctrl-C
        at the terminal reaches eph alone (eph stops its children in order) and the
        stop can kill whatever the child forked. ``grace``: seconds from SIGTERM to
        SIGKILL when it is stopped. ``term_again_s``: while it has not stopped, SIGTERM
        again this often (for a program that can miss one: bpftrace 0.17).
        """
        proc: subprocess.Popen[Any] = subprocess.Popen(
            list(args),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=None if env is None else dict(env),
            text=text,
            start_new_session=own_group,
            preexec_fn=death_signal_preexec(death_signal),
        )
        child = Child(name, proc, stage, grace, own_group, term_again_s)
        self._running.append(child)
        self._started.append(child)
        logger.debug("started %s (pid %d): %s", name, proc.pid, " ".join(args))
        return child

    def stop(self, *children: Child, grace: float | None = None) -> None:
        """The one way children stop: SIGTERM to each; up to its grace period (or
        ``grace``) to exit; SIGKILL; the rest of its process group killed; reaped."""
        start = time.monotonic()
        try:
            for child in children:
                child._signal(signal.SIGTERM)
            for child in children:
                wait = child.grace if grace is None else grace
                if not child._wait(start + wait):
                    logger.error(
                        "%s (pid %d) did not stop in %.0f s; killing it",
                        child.name,
                        child.pid,
                        wait,
                    )
                    child._signal(signal.SIGKILL)
        except BaseException:  # interrupted while waiting: none may be left running
            for child in children:
                child._signal(signal.SIGKILL)
            raise
        finally:
            for child in children:
                code = child._reap()
                if child in self._running:
                    self._running.remove(child)
                logger.debug("%s (pid %d) stopped: %s", child.name, child.pid, code)

    def close(self) -> None:
        """Stop every child still running, one :class:`Stage` at a time, in order."""
        try:
            for stage in sorted({child.stage for child in self._running}):
                self.stop(*[child for child in self._running if child.stage is stage])
        finally:
            if self._running:  # an interrupted close: the rest at once
                self.stop(*self._running, grace=0.0)


class Interrupt:
    """SIGINT/SIGTERM as a flag while a run lasts: it stops, keeping what it recorded."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Interrupt:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.set:
            logger.warning(
                "%s: stopping the run and keeping what was recorded", signal.Signals(signum).name
            )
        self.set = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
