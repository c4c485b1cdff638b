"""The kernel trace's conversion at size: ``python bench/trace_convert.py ROWS DIR``.

Writes ROWS drained rows (the recorder's Arrow stream, as its drainer writes them:
client connections over the default range, each through TIME_WAIT), then converts
them twice, each in a fresh process: partitioned (the default) and whole in memory
(``PARTITION_ROWS`` past the row count, as it was before). Prints JSON: seconds and
peak RSS of each."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from harness.kernel import bpf

_CONVERT = """
import json, resource, sys, time
from pathlib import Path
from harness.kernel import bpf
if sys.argv[1] == "whole":
    bpf.PARTITION_ROWS = 10**12
d = Path(sys.argv[2])
t = time.perf_counter()
read = bpf.convert(d / "none.tsv", d / "k.arrows", d / (sys.argv[1] + ".parquet"), "bench")
print(json.dumps({"rows": read.connections, "seconds": round(time.perf_counter() - t, 2),
    "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def write_rows(n: int, out: Path, step: int = 500_000) -> None:
    rng = np.random.default_rng(1)
    with bpf.RowWriter(out, "bench") as writer:
        for low in range(0, n, step):
            m = min(step, n - low)
            keys = np.zeros(m, bpf.KEY_DTYPE)
            syn = (np.arange(low, low + m) * 10_000).astype(np.uint64) + 1  # 100,000/s
            keys["syn_ns"], keys["est_ns"], keys["close_ns"] = syn, syn + 50_000, syn + 900_000
            keys["state"] = 5 | 1 << 8  # closed from FIN_WAIT2, this side first: TIME_WAIT
            keys["addrs"] = (0x0100007F << 32) | 0x0100007F
            ports = rng.integers(32768, 60999, m).astype(np.uint64)
            keys["ports"], keys["pid"], keys["comm"] = ports << 16 | 80, 42, b"client"
            writer.write(keys.view(np.uint8).reshape(m, bpf.KEY_SIZE))


def main() -> int:
    rows, directory = int(sys.argv[1]), Path(sys.argv[2])
    start = time.perf_counter()
    write_rows(rows, directory / "k.arrows")
    result: dict[str, object] = {"rows": rows, "written_s": round(time.perf_counter() - start, 1)}
    for how in ("partitioned", "whole"):
        out = subprocess.run(
            [sys.executable, "-c", _CONVERT, how, str(directory)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        result[how] = json.loads(out)
        (directory / f"{how}.parquet").unlink()
    result["bench_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
