"""How long one read of the conntrack table takes, by source (docs/kernel.md,
"Reading conntrack").

Builds the tests' NAT lab (three throwaway namespaces), fills the router's table
with client-closed connections (TIME_WAIT entries, SNATed), and times, inside
the router namespace, each source at each size: median of 7 reads.

    sudo .venv/bin/python docs/kernel/conntrack_cost.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.natlab import nat_lab

SIZES = (1_000, 10_000)
TIMING = r"""
import json, statistics, subprocess, time
from harness.kernel.conntrack import dump_conntrack

def proc():
    with open("/proc/net/nf_conntrack") as f:
        return len([line.split() for line in f])

def cli():
    out = subprocess.run(["conntrack", "-L"], capture_output=True, check=True).stdout
    return out.count(b"\n")

result = {}
for name, read in (("ctnetlink", lambda: len(dump_conntrack())), ("proc", proc), ("cli", cli)):
    times, counts = [], set()
    for _ in range(7):
        start = time.perf_counter()
        counts.add(read())
        times.append((time.perf_counter() - start) * 1000)
    result[name] = {"ms": round(statistics.median(times), 2), "entries": sorted(counts)}
print(json.dumps(result))
"""


def main() -> None:
    with nat_lab(pool="1024-65535") as lab:
        made = 0
        for size in SIZES:
            made += lab.churn(size - made)
            print(json.dumps({"made": made, **lab.in_router(TIMING)}), flush=True)


if __name__ == "__main__":
    main()
