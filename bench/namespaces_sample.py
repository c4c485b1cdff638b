"""From the root namespace: the cost of ``eph observe --all-namespaces``' sample.

Makes ``namespaces`` network namespaces and ``sockets`` client sockets spread
evenly over them (in each, ``bench/owners_sample.py --hold``: half in TIME_WAIT,
half held open by processes of their own). Then times 15 rounds, interleaved: a
sample of every namespace of the host, without owners and with owners (a new
index each round: every fd of /proc read again, the worst case), and what an SRE
would run instead, ``ss -tan`` and ``ss -tanp`` in each namespace (``ip netns
exec``), summed. Prints one JSON object. Run by ``bench/run.py --only namespaces``;
it needs root.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness.kernel.namespaces import NamespaceThread
from harness.kernel.netns import Namespace
from harness.observe.owners import OwnerIndex
from harness.observe.paths import PathSampler

BENCH = Path(__file__).resolve().parent
ROUNDS = 15


def main() -> None:
    sockets, count = int(sys.argv[1]), int(sys.argv[2])
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
    with contextlib.ExitStack() as stack:
        spaces = []
        for _ in range(count):
            ns = stack.enter_context(Namespace(prefix="ephbench"))
            ns.set_sysctl("net.ipv4.ip_local_port_range", (1024, 65000))
            subprocess.run(ns.command(["ip", "link", "set", "lo", "up"]), check=True)
            holder = subprocess.Popen(
                ns.command([sys.executable, str(BENCH / "owners_sample.py"),
                            str(sockets // count), "--hold"]),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
            stack.enter_context(holder)  # at the end: stdin closed (its cue), then waited for
            assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
            spaces.append(ns)
        inside = stack.enter_context(NamespaceThread())
        bare = PathSampler((1024, 65000), top=20, inside=inside)
        bare.sample()  # warm: imports, buffers, the namespaces found
        times: dict[str, list[float]] = {
            "sample_all": [],
            "sample_all_with_owners": [],
            "ss_tan_each": [],
            "ss_tanp_each": [],
        }
        snap = None
        for _ in range(ROUNDS):
            began = time.perf_counter()
            bare.sample()
            times["sample_all"].append((time.perf_counter() - began) * 1000)
            named = PathSampler(
                (1024, 65000), top=20, owners=OwnerIndex(refresh_s=0), inside=inside
            )
            began = time.perf_counter()
            snap = named.sample()
            times["sample_all_with_owners"].append((time.perf_counter() - began) * 1000)
            for name, args in (("ss_tan_each", ["ss", "-tan"]), ("ss_tanp_each", ["ss", "-tanp"])):
                began = time.perf_counter()
                for ns in spaces:
                    subprocess.run(ns.command(args), capture_output=True, check=True)
                times[name].append((time.perf_counter() - began) * 1000)
        assert snap is not None and snap.netns is not None
        medians = {f"{k}_ms": round(statistics.median(v), 1) for k, v in times.items()}
        print(
            json.dumps(
                {
                    "namespaces": count,
                    "namespaces_seen": len(bare._found),
                    "client_sockets": snap.sockets,
                    **medians,
                    "all_with_owners_over_ss_tanp_each": round(
                        medians["sample_all_with_owners_ms"] / medians["ss_tanp_each_ms"], 2
                    ),
                }
            )
        )


if __name__ == "__main__":
    main()
