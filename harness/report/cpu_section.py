"""CPU per connection against occupancy: the summary's ``cpu`` section.

Exhaustion shows first as system CPU: with most of the range in use, connect()
walks many candidate ports (``__inet_check_established``) before it finds a free
one, or fails having walked them all. ``cpu.parquet`` holds one row per load
process per records flush (``harness.load.cpu_meter``): the CPU it spent and the
attempts it recorded. Joined with the collector's occupancy at each interval's
middle, the rows answer how much system CPU an attempt costs as the range fills.

An interval's CPU is charged to the attempts recorded in it, which includes the
CPU of the eph process around connect() (Python, Locust, records) and, for the
uvloop engine, the Locust process that drives the child: the figure is what
the load costs per attempt, whose rise is the kernel's.
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa

from harness.summary import Cpu, CpuBand

__all__ = ["CPU_BINS", "cpu_section"]

CPU_BINS = (*(round(0.1 * n, 1) for n in range(10)), 1.01)  # tenths of the range


def _per_attempt(spent_us: float, attempts: int) -> float | None:
    return round(spent_us / attempts, 2) if attempts else None


def cpu_section(cpu: pa.Table | None, samples: pa.Table | None, usable: int | None) -> Cpu | None:
    """The summary's ``cpu`` section; None when the run recorded no CPU."""
    if cpu is None or not cpu.num_rows:
        return None
    stime = cpu.column("stime_us").to_numpy().astype(np.float64)
    utime = cpu.column("utime_us").to_numpy().astype(np.float64)
    attempts = cpu.column("attempts").to_numpy().astype(np.int64)
    processes = {
        (host, pid)
        for host, pid in zip(
            cpu.column("host").to_pylist(), cpu.column("pid").to_pylist(), strict=True
        )
    }
    total = int(attempts.sum())
    return Cpu(
        processes=len(processes),
        intervals=cpu.num_rows,
        attempts=total,
        succeeded=int(cpu.column("succeeded").to_numpy().sum()),
        system_s=round(float(stime.sum()) / 1e6, 3),
        user_s=round(float(utime.sum()) / 1e6, 3),
        system_us_per_attempt=_per_attempt(float(stime.sum()), total),
        user_us_per_attempt=_per_attempt(float(utime.sum()), total),
        by_occupancy=_by_occupancy(cpu, samples, usable),
    )


def interval_occupancy(cpu: pa.Table, samples: pa.Table, usable: int) -> np.ndarray | None:
    """Each interval's share of the usable ports in use toward the targets, at its
    middle (interpolated between samples); None without two samples."""
    # imported here: the occupancy module reads the summary model, which holds Cpu
    from harness.report.port_occupancy import IN_USE, scope_series

    times, in_use = scope_series(samples, IN_USE)
    if len(times) < 2:
        return None
    t_ns = cpu.column("t_ns").to_numpy()
    middle = t_ns - cpu.column("interval_ns").to_numpy() // 2
    return np.asarray(np.interp(middle, times, in_use) / usable)


def _by_occupancy(cpu: pa.Table, samples: pa.Table | None, usable: int | None) -> list[CpuBand]:
    if samples is None or not samples.num_rows or not usable:
        return []
    fraction = interval_occupancy(cpu, samples, usable)
    if fraction is None:
        return []
    stime = cpu.column("stime_us").to_numpy().astype(np.float64)
    utime = cpu.column("utime_us").to_numpy().astype(np.float64)
    attempts = cpu.column("attempts").to_numpy().astype(np.int64)
    bands = []
    for low, high in itertools.pairwise(CPU_BINS):
        band = (fraction >= low) & (fraction < high)
        if band.any():
            count = int(attempts[band].sum())
            bands.append(
                CpuBand(
                    occupancy=[low, min(high, 1.0)],
                    intervals=int(band.sum()),
                    attempts=count,
                    system_us_per_attempt=_per_attempt(float(stime[band].sum()), count),
                    user_us_per_attempt=_per_attempt(float(utime[band].sum()), count),
                )
            )
    return bands
