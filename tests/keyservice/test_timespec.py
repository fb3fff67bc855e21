"""Time arguments: ISO 8601 (UTC unless an offset is given), relative, now; exact milliseconds."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyservice.errors import UsageError
from keyservice.timespec import format_duration, format_ms, parse_range, parse_time

NOW = 1_714_564_800_000  # 2024-05-01T12:00:00Z


def utc_ms(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=dt.UTC).timestamp()) * 1000


@pytest.mark.parametrize(("text", "expected"), [
    ("2024-05-01T12:00:00Z", utc_ms(2024, 5, 1, 12)),
    ("2024-05-01T12:00:00", utc_ms(2024, 5, 1, 12)),           # no offset: UTC, not local
    ("2024-05-01 12:00", utc_ms(2024, 5, 1, 12)),
    ("2024-05-01", utc_ms(2024, 5, 1)),
    ("2024-05-01T14:00:00+02:00", utc_ms(2024, 5, 1, 12)),      # offset honoured
    ("2024-05-01T07:30:00-04:30", utc_ms(2024, 5, 1, 12)),
    ("2024-05-01T12:00:00.250Z", utc_ms(2024, 5, 1, 12) + 250),
    ("2024-05-01T12:00:00.000999Z", utc_ms(2024, 5, 1, 12)),    # sub-ms truncated, not rounded
    ("now", NOW), ("NOW", NOW), ("  now ", NOW),
    ("-10m", NOW - 600_000), ("-2h", NOW - 7_200_000), ("-45s", NOW - 45_000),
    ("-1d", NOW - 86_400_000), ("-1h30m", NOW - 5_400_000), ("-1H", NOW - 3_600_000),
])
def test_parse_time(text: str, expected: int) -> None:
    assert parse_time(text, NOW) == expected


@pytest.mark.parametrize("text", [
    "", "yesterday", "-10", "10m", "+10m", "-m", "-10x", "2024-13-01", "2024-05-01T25:00",
    "1969-12-31T23:59:59Z", "-4000d", "-1h-30m",
])
def test_parse_time_refuses(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_time(text, NOW)
    assert info.value.exit_code == 2
    assert str(info.value).endswith(".")


def test_local_timezone_does_not_shift(monkeypatch: pytest.MonkeyPatch) -> None:
    import time
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert parse_time("2024-05-01T12:00:00", NOW) == utc_ms(2024, 5, 1, 12)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_range() -> None:
    assert parse_range("-10m", "now", NOW) == (NOW - 600_000, NOW)
    with pytest.raises(UsageError, match="before it starts"):
        parse_range("now", "-10m", NOW)
    with pytest.raises(UsageError, match="empty"):
        parse_range("2024-05-01T12:00:00Z", "2024-05-01T14:00:00+02:00", NOW)


@given(st.integers(min_value=0, max_value=2**41))
def test_format_round_trip(ms: int) -> None:
    text = format_ms(ms)
    assert text.endswith("Z")
    assert parse_time(text, NOW) == ms


def test_format() -> None:
    assert format_ms(utc_ms(2024, 5, 1, 12) + 7) == "2024-05-01T12:00:00.007Z"
    assert format_duration(850) == "850 ms"
    assert format_duration(12_500) == "12.5 s"
    assert format_duration(184_000) == "3 min 4 s"
    assert format_duration(7_500_000) == "2 h 5 min"
