"""The summary's nat section and its findings, from hand-made collector files."""

from __future__ import annotations

import errno
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from harness.report import ondisk
from harness.report.nat_section import nat_findings, nat_section, scan_for_nat

from .tables import connections_table, write_nat

S = 1_000_000_000


def _records(connect_us: list[int], errnos: list[int]) -> pa.Table:
    """A connection every 0.1 s; each lives 10 ms past its connect."""
    rows = [
        (i * S // 10, c + 10_000, 40000 + i, e)
        for i, (c, e) in enumerate(zip(connect_us, errnos, strict=True))
    ]
    table = connections_table(rows)
    index = table.schema.get_field_index("connect_us")
    return table.set_column(index, "connect_us", pa.array(connect_us, pa.uint32()))


def test_a_full_pool_with_dropped_syns_is_named_not_called_an_outage(tmp_path: Path) -> None:
    t = [i * S // 2 for i in range(8)]
    write_nat(tmp_path, t, in_use=[1, 2, 4, 4, 4, 4, 4, 4], dropped=[0, 0, 0, 2, 4, 6, 8, 8])
    connects = [100, 100, 100, 100, 1_000_500, 3_001_000, 100, 100, 0, 0]
    errnos = [0] * 8 + [errno.ETIMEDOUT] * 2
    nat = nat_section(tmp_path, _records(connects, errnos))
    assert nat is not None
    [pool] = nat.destinations
    assert (pool.pool_ports, pool.peak_in_use, pool.full_at_s) == (4, 4, 1.0)
    assert nat.drops["insert_failed"] == 8 and nat.drops["drop"] == 8
    assert (nat.slow_connects, nat.connect_timeouts) == (2, 2)
    assert nat.retransmission_steps == {"1": 1, "2": 1}
    assert nat.exhausted is True
    assert nat.exhausted_at_s == 0.4  # the first connect a dropped SYN slowed
    [finding] = nat_findings(nat)
    assert finding.startswith("NAT pool exhausted: 198.51.100.1:20000-20003 (4 ports")
    assert "(1 at ~1 s, 1 at ~3 s)" in finding
    assert "not a server outage" in finding


def test_drops_without_a_full_pool_are_an_insert_race(tmp_path: Path) -> None:
    t = [i * S // 2 for i in range(4)]
    write_nat(tmp_path, t, in_use=[1, 2, 2, 1], dropped=[0, 1, 1, 1], pool=100)
    nat = nat_section(tmp_path, _records([100, 1_000_100], [0, 0]))
    assert nat is not None and nat.exhausted is False
    assert nat.destinations[0].full_at_s is None
    assert "without its pool being full" in nat_findings(nat)[0]


def test_time_wait_entries_that_held_nothing_are_said_so(tmp_path: Path) -> None:
    table = write_nat(tmp_path, [0, S], in_use=[3, 3], dropped=[0, 0], pool=100)
    mine = pc.equal(table.column("destination"), "127.0.0.1:9000")
    time_wait = pc.if_else(mine, pa.scalar(3, pa.uint32()), table.column("time_wait"))
    table = table.set_column(table.schema.get_field_index("time_wait"), "time_wait", time_wait)
    pq.write_table(table, tmp_path / "router" / "nat.parquet")
    nat = nat_section(tmp_path, _records([100], [0]))
    assert nat is not None
    assert "Its 3 TIME_WAIT entries held nothing" in nat_findings(nat)[0]


def test_no_collector_no_section(tmp_path: Path) -> None:
    assert nat_section(tmp_path, _records([100], [0])) is None
    assert nat_findings(None) == []


def test_a_pool_full_from_the_first_connect_still_gets_its_sustained_rate(
    tmp_path: Path,
) -> None:
    """Exhausted at 0 s (the first connect was already slowed) is a time, not a none."""
    t = [i * S // 2 for i in range(8)]
    write_nat(tmp_path, t, in_use=[4] * 8, dropped=[0, 2, 4, 6, 8, 8, 8, 8])
    connects = [1_000_100] + [100] * 29
    nat = nat_section(tmp_path, _records(connects, [0] * 30))
    assert nat is not None and nat.exhausted is True
    assert nat.exhausted_at_s == 0.0
    assert nat.sustained_rate_per_s is not None


@pytest.mark.parametrize("batch_rows", [1, 3, 7])
def test_the_section_is_the_same_for_a_run_held_or_scanned_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_rows: int
) -> None:
    """One implementation for every size: the records held in memory, or read from
    Parquet a few rows at a time (as a run past 2 million rows is), give one section,
    sustained rate included. The bug it guards: runs on disk had no nat section."""
    t = [i * S // 2 for i in range(8)]
    write_nat(tmp_path, t, in_use=[1, 2, 4, 4, 4, 4, 4, 4], dropped=[0, 0, 0, 2, 4, 6, 8, 8])
    connects = [100, 100, 100, 100, 1_000_500, 3_001_000] + [100] * 22 + [0, 0]
    errnos = [0] * 28 + [errno.ETIMEDOUT] * 2
    table = _records(connects, errnos)
    held = nat_section(tmp_path, table, hold_s=0.5)
    path = tmp_path / "connections.parquet"
    pq.write_table(table, path, row_group_size=batch_rows)
    monkeypatch.setattr(ondisk, "BATCH_ROWS", batch_rows)
    scanned = nat_section(tmp_path, ondisk.OnDisk(path, table.num_rows), hold_s=0.5)
    assert held is not None and held.exhausted and held.sustained_rate_per_s is not None
    assert scanned == held
    assert scan_for_nat(table).lifetime_s(0.0) == pytest.approx(0.01)  # 10 ms past connect
