"""Time arguments of the three CLIs, one parser (fusion-client's --from/--to, fusion-archiver's
holds): ISO 8601 (UTC unless an offset is given), relative (``-10m``, ``-2h``, ``-1h30m``,
``-45s``, ``-1d``) or ``now``. Everything is integer milliseconds since the
Unix epoch, the unit of the fusion stream format.

Pure: the current time is passed in, so the parsing is deterministic and testable.
"""

from __future__ import annotations

import datetime as dt
import re

from keyservice.errors import UsageError

_UNITS_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_RELATIVE = re.compile(r"^-((?:\d+[smhd])+)$")
_PART = re.compile(r"(\d+)([smhd])")
# Ten years back is far beyond any archive; larger values are almost certainly typos.
_MAX_RELATIVE_MS = 10 * 366 * _UNITS_MS["d"]
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def parse_time(text: str, now_ms: int) -> int:
    """One point in time, in ms since the epoch. Raises UsageError with an example on bad input."""
    value = text.strip()
    if not value:
        raise UsageError("Empty time; give ISO 8601 (2024-05-01T12:00:00Z), a relative time "
                         "(-10m, -2h) or 'now'.")
    if value.lower() == "now":
        return now_ms
    relative = _RELATIVE.match(value.lower())
    if relative:
        delta = sum(int(n) * _UNITS_MS[unit] for n, unit in _PART.findall(relative.group(1)))
        if delta > _MAX_RELATIVE_MS:
            raise UsageError(f"The relative time {text!r} reaches more than ten years back.")
        return now_ms - delta
    return _parse_iso(value, text)


def _parse_iso(value: str, original: str) -> int:
    # fromisoformat (3.11) accepts "Z", offsets, "T" or " ", fractions and date-only forms.
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"Cannot read the time {original!r}; give ISO 8601 "
                         "(2024-05-01T12:00:00Z or 2024-05-01T14:00:00+02:00), a relative time "
                         "(-10m, -2h) or 'now'.") from None
    if when.tzinfo is None:
        # UTC unless an offset is given: the Archiver's clock and the index are UTC, and a
        # viewer's local zone must not silently shift an evidence export.
        when = when.replace(tzinfo=dt.UTC)
    # Exact integer arithmetic (no float timestamp): an export boundary must not drift by 1 ms.
    ms = (when - _EPOCH) // dt.timedelta(milliseconds=1)
    if ms < 0:
        raise UsageError(f"The time {original!r} is before 1970.")
    return ms


def parse_range(start: str, end: str, now_ms: int) -> tuple[int, int]:
    """A playback range [start, end] in ms; refuses empty and inverted ranges."""
    from_ms = parse_time(start, now_ms)
    to_ms = parse_time(end, now_ms)
    if to_ms < from_ms:
        raise UsageError(f"The range ends ({format_ms(to_ms)}) before it starts "
                         f"({format_ms(from_ms)}); check --from and --to.")
    if to_ms == from_ms:
        raise UsageError(f"The range {format_ms(from_ms)} .. {format_ms(to_ms)} is empty; "
                         "give a later --to.")
    return from_ms, to_ms


def format_ms(ms: int) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2024-05-01T12:00:00.250Z (what the summary prints)."""
    when = dt.datetime.fromtimestamp(ms // 1000, dt.UTC).replace(microsecond=(ms % 1000) * 1000)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_duration(ms: int) -> str:
    """A short human duration: 850 ms, 12.5 s, 3 min 4 s, 2 h 5 min."""
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    seconds = ms // 1000
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
