"""The live per-path rows that Locust's "Ports" tab shows (``harness.load.ports_tab``).

Samples on demand, at most once per ``min_interval_s`` whatever the number of
browsers polling, so the load process pays one sock_diag dump a second at most.
Rows are plain dicts of display-ready values: the tab renders them as they are.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from harness.capacity.port_model import reserved_spans
from harness.observe.outlook import outlook
from harness.observe.paths import STATES, PathSampler
from harness.observe.session import Settings

__all__ = ["PORTS_COLUMNS", "PortsFeed"]

# (key, title) of each column, in the tab's order
PORTS_COLUMNS = (
    ("path", "Path (local -> remote)"),
    ("ports", "Ports in use"),
    ("usable", "Usable"),
    ("occupancy", "Occupancy"),
    ("states", "States"),
    ("new_per_s", "New/s"),
    ("exhausted_in", "Exhausted in"),
    ("verdict", "Verdict"),
)


@dataclass
class PortsFeed:
    top: int = 20
    min_interval_s: float = 1.0
    settings: Settings = field(default_factory=Settings.read)
    _sampler: PathSampler | None = field(default=None, repr=False)
    _rows: list[dict[str, Any]] = field(default_factory=list, repr=False)
    _at: float = field(default=-math.inf, repr=False)

    def rows(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        if now - self._at >= self.min_interval_s:
            self._rows, self._at = self._sample(), now
        return self._rows

    def _sample(self) -> list[dict[str, Any]]:
        if self._sampler is None:
            s = self.settings
            self._sampler = PathSampler(s.port_range, reserved_spans(s.reserved), top=self.top)
        snap = self._sampler.sample()
        look = outlook(
            snap,
            tw_reuse=self.settings.tw_reuse,
            timestamps=self.settings.timestamps,
            reuse_delay_ms=self.settings.reuse_delay_ms,
        )
        rows = []
        for i in range(len(snap)):
            rate = float(snap.new_per_s[i])
            tte = float(look.time_to_exhaustion_s[i])
            states = snap.states[i].tolist()
            rows.append(
                {
                    "path": snap.label(i),
                    "ports": int(snap.ports[i]),
                    "usable": int(snap.usable[i]),
                    "occupancy": f"{snap.occupancy[i]:.1%}",
                    "states": ", ".join(
                        f"{st.name} {n}" for st, n in zip(STATES, states, strict=True) if n
                    ),
                    "new_per_s": "-" if math.isnan(rate) else round(rate, 1),
                    "exhausted_in": "-" if math.isnan(tte) else f"{tte:.1f} s",
                    "verdict": str(look.verdicts[i]),
                }
            )
        return rows
