"""fusion-client's time arguments: the one parser of the three CLIs, keyservice.timespec (kept
here under its old name for code that imports it from the client)."""

from __future__ import annotations

from keyservice.timespec import format_duration, format_ms, parse_range, parse_time

__all__ = ["format_duration", "format_ms", "parse_range", "parse_time"]
