"""``eph worker``: a Locust worker of an ``eph run --master`` elsewhere, under the
supervisor like every other child of eph."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from harness.run.placement import LOCUSTFILE, STOP_GRACE
from harness.supervisor import Interrupt, Stage, Supervisor

__all__ = ["run_worker"]

logger = logging.getLogger(__name__)


def run_worker(
    *,
    master_host: str,
    master_port: int,
    out: Path,
    name: str | None = None,
    max_seconds: float = 7200.0,
) -> int:
    """``eph worker``: a Locust worker of an ``eph run --master`` elsewhere.

    Each test records into a new directory under ``out`` with a collector of this
    host, and ships it to the master at the end; the directory stays, and is all
    that is left if this worker dies (``eph report --collect-from`` reads it).
    Returns Locust's exit code once the master quits, at SIGINT/SIGTERM, or after
    ``max_seconds`` (a bound).
    """
    out.mkdir(mode=0o750, parents=True, exist_ok=True)
    env = {**os.environ, "EPH_WORKER": "1", "EPH_RUN_DIR": str(out)}
    if name:
        env["EPH_HOST_NAME"] = name
    args = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--worker"]
    args += ["--master-host", master_host, "--master-port", str(master_port)]
    args += ["--logfile", str(out / f"worker-{os.getpid()}.log")]
    log_path = out / f"worker-{os.getpid()}.out"
    with Interrupt() as interrupt, open(log_path, "ab") as log, Supervisor() as supervisor:
        locust = supervisor.start(
            "locust worker",
            args,
            stage=Stage.LOAD,
            grace=STOP_GRACE,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + max_seconds
        while locust.poll() is None and not interrupt.set and time.monotonic() < deadline:
            time.sleep(0.1)
        if locust.poll() is None and not interrupt.set:
            logger.error("the worker ran for %.0f s, its bound; stopping it", max_seconds)
    return locust.returncode if locust.returncode is not None else 1
