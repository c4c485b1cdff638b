import pytest

from harness.load.pacing import Pacer


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_slots_are_one_interval_apart() -> None:
    clock = FakeClock()
    pacer = Pacer(10, clock)
    delays = [pacer.delay() for _ in range(5)]  # five callers at the same instant
    assert delays == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_idle_time_earns_no_burst() -> None:
    clock = FakeClock()
    pacer = Pacer(10, clock)
    pacer.delay()
    clock.now += 5.0  # nobody asked for five seconds
    assert pacer.delay() == 0.0
    assert pacer.delay() == pytest.approx(0.1)


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="above 0"):
        Pacer(0)
