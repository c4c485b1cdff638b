import pytest

from harness.units import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("100ms", 0.1),
        ("10s", 10.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("250us", 0.00025),
        (" 1.5s ", 1.5),
        ("0ms", 0.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["10", "ten s", "10 sec", "-1s", "", "1.s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("seconds", [0.0, 0.001, 0.1, 1.0, 1.5, 60.0, 90.0, 7200.0, 0.0125])
def test_format_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)
