"""How ``eph observe`` shows each sample: a live table on a terminal, plain lines elsewhere."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from harness.observe.nat_pools import nat_lines
from harness.observe.outlook import Outlook, Verdict
from harness.observe.paths import STATES, PathSnapshot
from harness.observe.session import HostView
from harness.units import human_duration

__all__ = ["PlainView", "TerminalView", "host_line", "namespace_lines", "path_line"]

_STYLE = {
    Verdict.OK: "green",
    Verdict.FILLING: "yellow",
    Verdict.WARN: "yellow",
    Verdict.DANGER: "red",
    Verdict.FULL: "bold red",
}
_SHORT = {"ESTABLISHED": "estab", "TIME_WAIT": "tw", "SYN_SENT": "syn", "CLOSE_WAIT": "cw"}


def _eta(seconds: float) -> str:
    return "-" if math.isnan(seconds) else human_duration(seconds)


def _states(row: list[int]) -> str:
    parts = [
        f"{_SHORT.get(state.name, state.name.lower())} {count}"
        for state, count in zip(STATES, row, strict=True)
        if count
    ]
    return ", ".join(parts) or "-"


def host_line(host: HostView, snap: PathSnapshot) -> str:
    s, c, r = host.settings, host.counters, host.rates
    low, high = s.port_range
    conntrack = (
        f", conntrack {c.get('conntrack_count')}/{s.conntrack_max}" if s.conntrack_max else ""
    )
    return (
        f"range {low}-{high} ({snap.host_usable:,} usable), reserved {s.reserved or 'none'},"
        f" tw_reuse {s.tw_reuse}; TIME_WAIT {c.get('sockstat_tw')},"
        f" TWRecycled {r.get('tw_recycled', 0):.0f}/s,"
        f" ActiveOpens {r.get('active_opens', 0):.0f}/s,"
        f" TCPTimeWaitOverflow {c.get('timewait_overflow')}{conntrack};"
        f" {snap.paths_total} paths, {snap.sockets:,} client sockets,"
        f" sample {host.sample_ms:.1f} ms"
    )


def namespace_lines(host: HostView, rows: int) -> list[str]:
    """With every namespace: a line of counters per namespace, the busiest first."""
    if not host.namespaces:
        return []
    ranked = sorted(host.namespaces, key=lambda v: -v.rates.get("active_opens", 0.0))
    lines = []
    for view in ranked[:rows]:
        c, r = view.namespace.counters, view.rates
        lines.append(
            f"netns {view.namespace.label}: ActiveOpens {r.get('active_opens', 0):.0f}/s,"
            f" AttemptFails {r.get('attempt_fails', 0):.0f}/s, TIME_WAIT {c.get('sockstat_tw')},"
            f" TWRecycled {r.get('tw_recycled', 0):.0f}/s,"
            f" TCPTimeWaitOverflow {c.get('timewait_overflow')}"
        )
    if len(ranked) > rows:
        lines.append(f"netns: {len(ranked) - rows} more")
    return lines


def owners_text(snap: PathSnapshot, i: int, *, hint: bool = True) -> str:
    """Who holds the path's ports, e.g. ``python3[4242] 120, 150 unattributed``."""
    if snap.owners is None or snap.unattributed is None or (snap.other and i == len(snap) - 1):
        return ""
    named = [f"{o.comm}[{o.pid}] {o.ports}" for o in snap.owners[i]]
    loose = int(snap.unattributed[i])
    if loose:
        why = " (TIME_WAIT has no owner: --trace names who opened them)" if hint else ""
        named.append(f"{loose} unattributed{why}")
    return ", ".join(named)


def path_line(snap: PathSnapshot, look: Outlook, i: int) -> str:
    rate = snap.new_per_s[i]
    owners = owners_text(snap, i)
    return (
        f"{snap.label(i)}: {int(snap.ports[i])}/{int(snap.usable[i])} ports"
        f" ({snap.occupancy[i]:.0%}), {_states(snap.states[i].tolist())},"
        f" new {'-' if math.isnan(rate) else f'{rate:.0f}'}/s,"
        f" exhausted in {_eta(float(look.time_to_exhaustion_s[i]))}: {look.verdicts[i]}"
        + (f"; held by {owners}" if owners else "")
    )


class PlainView:
    """A few plain lines every ``every_s`` seconds: for logs, CI and pipes."""

    def __init__(self, stream: TextIO = sys.stdout, every_s: float = 5.0, rows: int = 5) -> None:
        self.stream, self.every_s, self.rows = stream, every_s, rows
        self._last = -math.inf

    def show(self, snap: PathSnapshot, look: Outlook, host: HostView) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        stamp = time.strftime("%H:%M:%S", time.localtime(snap.time))
        lines = [f"{stamp} {host_line(host, snap)}"]
        lines += [f"  {line}" for line in namespace_lines(host, self.rows)]
        lines += [f"  {line}" for line in (nat_lines(host.nat, self.rows) if host.nat else [])]
        lines += [f"  {path_line(snap, look, i)}" for i in range(min(self.rows, len(snap)))]
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


def _bar(fraction: float, style: str, width: int = 20) -> Text:
    filled = min(width, round(fraction * width))
    bar = Text("█" * filled, style=style)
    bar.append("·" * (width - filled), style="dim")
    bar.append(f" {fraction:.0%}")
    return bar


class TerminalView:
    """A live table refreshed each sample (rich)."""

    def __init__(self, console: Console | None = None, rows: int = 20) -> None:
        self.console = console or Console()
        self.rows = rows
        self._live = Live(console=self.console, auto_refresh=False, transient=False)
        self._live.start()

    def show(self, snap: PathSnapshot, look: Outlook, host: HostView) -> None:
        table = Table(expand=True, show_edge=False, pad_edge=False)
        for name, justify in (
            ("path", "left"),
            ("occupancy", "left"),
            ("ports", "right"),
            ("states", "left"),
            ("new/s", "right"),
            ("exhausted in", "right"),
            ("verdict", "left"),
            ("held by", "left"),
        ):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for i in range(min(self.rows, len(snap))):
            verdict = look.verdicts[i]
            style = _STYLE[verdict]
            rate = snap.new_per_s[i]
            table.add_row(
                snap.label(i),
                _bar(float(snap.occupancy[i]), style),
                f"{int(snap.ports[i]):,}/{int(snap.usable[i]):,}",
                _states(snap.states[i].tolist()),
                "-" if math.isnan(rate) else f"{rate:,.0f}",
                _eta(float(look.time_to_exhaustion_s[i])),
                Text(str(verdict), style=style),
                owners_text(snap, i, hint=False),
            )
        nat = [Text(line) for line in (nat_lines(host.nat, self.rows) if host.nat else [])]
        head = Text(host_line(host, snap), style="dim")
        spaces = [Text(line, style="dim") for line in namespace_lines(host, 5)]
        self._live.update(Group(head, *spaces, *nat, table), refresh=True)

    def close(self) -> None:
        self._live.stop()
