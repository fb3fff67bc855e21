"""Resource limits applied before any route or authentication runs.

- ``RequestLimits`` (ASGI middleware): a body limit per route, checked on ``Content-Length``
  before a byte is read and enforced again on the bytes that arrive (chunked or lying bodies
  are cut); a deadline for the whole body; a per-client rate limit for logins; per-viewer
  concurrency and rate limits for viewer queries. Small bodies (every JSON route) are read here,
  bounded in size and time, and handed to the route only when complete.
- ``header_timeout_protocol``: uvicorn's h11 protocol with a deadline for the request line and
  headers. uvicorn has none (its keep-alive timer is cancelled by the first byte that arrives),
  and no ASGI middleware can see a request before its headers are complete, so this must live
  in the protocol class.
- ``RefusalAudit``: refused requests (401/403/408/413/429) audited per source per window: the
  first refusal of a source in a window at once, the rest as one summary line when the window
  ends, so a flood of bad requests costs at most two audit lines per source per window.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from archiver.audit import AuditLog
from keyservice.wire import VIEWER_BATCH_BYTES, ErrorCode

log = logging.getLogger("archiver")

KiB = 1024
# Every JSON body of the API fits in this (the largest is a PEM certificate of at most 64 KiB).
JSON_BODY_LIMIT = 256 * KiB
# Bodies up to this size are read by the middleware before the route runs; larger ones (camera
# segments) are streamed to the route, which reads them itself, and only counted here.
BUFFERED_LIMIT = 1024 * KiB
REFUSED_STATUSES = frozenset({401, 403, 408, 413, 429})


# --- the HTTP protocol: a header deadline ----------------------------------------------------------
def header_timeout_protocol(seconds: float,
                            base: type[H11Protocol] = H11Protocol) -> type[H11Protocol]:
    """uvicorn's h11 protocol (or ``base``), closing connections whose request line and headers
    are not complete within ``seconds`` of the connection opening or of the previous response
    ending (slow-loris on headers). Pass the result as uvicorn's ``http=``."""

    class HeaderTimeoutH11Protocol(base):  # type: ignore[valid-type, misc]
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self._in_request():
                self._disarm_header_timer()  # the headers are complete: the body has its own

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()  # the next request on this connection gets as long

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(seconds, self._header_timeout)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _in_request(self) -> bool:
            """A request's headers are complete and its response is not: the application (and
            the body deadline of RequestLimits) is in charge."""
            return (self.conn.their_state is not h11.IDLE and self.cycle is not None
                    and not self.cycle.response_complete)

        def _header_timeout(self) -> None:
            # Neither a new request's headers nor, after an early answer (403 before the body
            # was read), the rest of a body nobody reads came in time: close.
            self._header_timer = None
            if not self._in_request() and not self.transport.is_closing():
                log.warning("closed a connection whose request headers did not arrive within "
                            "%.0f s", seconds)
                self.transport.close()

    return HeaderTimeoutH11Protocol


# --- token buckets ---------------------------------------------------------------------------------
@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Token buckets per key: ``rate`` requests a second on average, bursts of ``burst``.
    Bounded: the least recently used keys are dropped past ``max_keys``."""

    def __init__(self, rate: float, burst: int, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._rate, self._burst, self._max_keys, self._clock = rate, burst, max_keys, clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 if allowed, else the seconds to wait before the next request may pass."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.pop(key, None) or _Bucket(float(self._burst), now)
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
            bucket.stamp = now
            self._buckets[key] = bucket  # re-inserted: dict order is least recently used first
            while len(self._buckets) > self._max_keys:
                self._buckets.pop(next(iter(self._buckets)))
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return 0.0
            return (1 - bucket.tokens) / self._rate


# --- refused accesses, audited with aggregation ------------------------------------------------
@dataclass
class _Refusals:
    count: int = 0
    written: int = 0  # first lines written at once
    codes: dict[str, int] = field(default_factory=dict)


class RefusalAudit:
    """Counts refused requests per source (client address) per window. The first refusal of
    each kind (error code) of a source in a window is audited at once with its details; the
    window's total is summed up in one line when the window ends (``flush``). At most
    ``max_sources`` sources are tracked per window; the others count under ``"other"``."""

    def __init__(self, audit: AuditLog, clock_ms: Callable[[], int], window_s: float,
                 max_sources: int = 256, max_first_lines: int = 100) -> None:
        self._audit, self._clock_ms = audit, clock_ms
        self._window_ms = max(1, int(window_s * 1000))
        self._max_sources = max_sources
        # Many addresses (an IPv6 prefix) could each earn their first lines: capped per window,
        # so at most max_first_lines + max_sources + 1 lines are written per window in all.
        self._max_first_lines = max_first_lines
        self._first_lines = 0
        self._lock = threading.Lock()
        self._window_start = clock_ms()
        self._seen: dict[str, _Refusals] = {}

    @property
    def window_s(self) -> float:
        return self._window_ms / 1000

    def refused(self, source: str, status: int, code: str, **detail: Any) -> None:
        self.flush_if_due()
        with self._lock:
            key = source if (source in self._seen or len(self._seen) < self._max_sources) \
                else "other"
            entry = self._seen.setdefault(key, _Refusals())
            entry.count += 1
            entry.codes[code] = entry.codes.get(code, 0) + 1
            # The first of each kind in the window is written in full (a handful of kinds).
            first = entry.codes[code] == 1 and self._first_lines < self._max_first_lines
            if first:
                self._first_lines += 1
                entry.written += 1
            window = self._window_start
        if first:
            # Written outside the counting lock: the audit log has its own, and fsyncs.
            self._audit.record("anonymous", "access.refused", self._clock_ms(), source=source,
                               status=status, error=code, window_start_ms=window, **detail)

    def flush_if_due(self) -> None:
        if self._clock_ms() - self._window_start >= self._window_ms:
            self.flush()

    def flush(self) -> None:
        """Write one summary line per source that was refused more than once in the window."""
        now = self._clock_ms()
        with self._lock:
            seen, start = self._seen, self._window_start
            self._seen, self._window_start, self._first_lines = {}, now, 0
        for source, entry in seen.items():
            if entry.count > entry.written:  # more than the lines written at once
                self._audit.record("anonymous", "access.refused.summary", now, source=source,
                                   window_start_ms=start, window_end_ms=now, count=entry.count,
                                   errors=entry.codes)


# --- the middleware ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    max_segment_bytes: int
    upload_timeout_s: float
    body_timeout_s: float = 10.0
    login_rate: float = 5.0  # per second per client address
    login_burst: int = 50
    # Per viewer: requests being worked out (until their answer starts: the index searches),
    # and open streams (for their whole duration: a grid of live cameras is many).
    viewer_concurrency: int = 4
    viewer_streams: int = 32
    viewer_rate: float = 20.0  # viewer requests per second per viewer
    viewer_burst: int = 40


class _Refuse(Exception):
    def __init__(self, status: int, code: ErrorCode, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


class RequestLimits:
    """See the module docstring. ``refusals`` is looked up per request (it is created in the
    application's lifespan, after the middleware stack is built)."""

    def __init__(self, app: ASGIApp, limits: Limits,
                 refusals: Callable[[Scope], RefusalAudit | None],
                 viewer_key: Callable[[Scope, str], str | None]) -> None:
        self.app = app
        self.limits = limits
        self._refusals = refusals
        self._viewer_key = viewer_key
        self._logins = RateLimiter(limits.login_rate, limits.login_burst)
        self._queries = RateLimiter(limits.viewer_rate, limits.viewer_burst)
        self._working: dict[str, int] = {}  # viewer -> requests not yet answering
        self._streams: dict[str, int] = {}  # viewer -> requests open (streams included)

    def body_limit(self, method: str, path: str) -> int:
        if path.startswith("/ingest/"):
            return self.limits.max_segment_bytes if path.endswith(".ts") else BUFFERED_LIMIT
        if path == "/v1/grants":  # an access grant carries up to 8192 wrapped keys
            return BUFFERED_LIMIT
        if path == "/v1/admin/viewers/batch":  # up to VIEWER_BATCH_MAX certificates
            return VIEWER_BATCH_BYTES
        return JSON_BODY_LIMIT

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        source = _client(scope)
        viewer: str | None = None
        try:
            if path.startswith("/v1/sessions"):
                self._rate(self._logins, source, "logins from this address")
            elif path.startswith(("/v1/cameras", "/v1/grants", "/v1/site")):
                viewer = self._viewer_key(scope, source) or f"address {source}"
                self._rate(self._queries, viewer, "requests of this viewer")
                if self._working.get(viewer, 0) >= self.limits.viewer_concurrency:
                    raise _Refuse(429, ErrorCode.TOO_MANY_REQUESTS,
                                  f"This viewer already has {self.limits.viewer_concurrency} "
                                  "requests being searched; wait for one to answer.",
                                  {"Retry-After": "1"})
                if self._streams.get(viewer, 0) >= self.limits.viewer_streams:
                    raise _Refuse(429, ErrorCode.TOO_MANY_REQUESTS,
                                  f"This viewer already has {self.limits.viewer_streams} streams "
                                  "open; close one first.", {"Retry-After": "5"})
            limit = self.body_limit(method, path)
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                raise _Refuse(413, ErrorCode.TOO_LARGE,
                              f"The request body exceeds the limit of {limit} bytes.")
            if limit <= BUFFERED_LIMIT:
                receive = await self._buffered(receive, limit)
            else:
                receive = self._counted(receive, limit, self.limits.upload_timeout_s)
        except _Refuse as refusal:
            await self._answer(scope, send, refusal)
            return
        except _Disconnected:
            return
        if viewer is not None:
            _add(self._working, viewer, 1)
            _add(self._streams, viewer, 1)
        responded: list[bool] = [False]
        refused_here: list[_Refuse] = []

        async def guarded_send(message: Message) -> None:
            if refused_here:
                return  # this middleware answered already (a body cut off mid-way)
            if message["type"] == "http.response.start":
                if viewer is not None and not responded[0]:
                    _add(self._working, viewer, -1)  # searched: now it only streams
                responded[0] = True
            await send(message)

        async def guarded_receive() -> Message:
            try:
                return await receive()
            except _Refuse as refusal:
                if not responded[0]:
                    refused_here.append(refusal)
                    await self._answer(scope, send, refusal)
                return {"type": "http.disconnect"}

        try:
            await self.app(scope, guarded_receive, guarded_send)
        finally:
            if viewer is not None:
                if not responded[0]:
                    _add(self._working, viewer, -1)
                _add(self._streams, viewer, -1)

    def _rate(self, limiter: RateLimiter, key: str, what: str) -> None:
        wait = limiter.take(key)
        if wait:
            raise _Refuse(429, ErrorCode.TOO_MANY_REQUESTS, f"Too many {what}; retry in "
                          f"{math.ceil(wait)} s.", {"Retry-After": str(math.ceil(wait))})

    async def _buffered(self, receive: Receive, limit: int) -> Receive:
        """Read the whole (small) body now, within its size and time limits; the route gets it
        in one piece, then the original ``receive`` (which reports the disconnect)."""
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _Disconnected
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise _Refuse(413, ErrorCode.TOO_LARGE,
                                      f"The request body exceeds the limit of {limit} bytes.")
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise _Refuse(408, ErrorCode.BODY_TIMEOUT, "The request body did not arrive within "
                          f"{self.limits.body_timeout_s:.0f} s.") from None
        body: list[bytes] | None = [b"".join(chunks)]

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message = {"type": "http.request", "body": body[0], "more_body": False}
                body = None
                return message
            return await receive()

        return replay

    @staticmethod
    def _counted(receive: Receive, limit: int, timeout_s: float) -> Receive:
        """A streamed body (camera segments): cut when it exceeds ``limit`` or is not complete
        within ``timeout_s`` of the first read; the route's own checks come on top."""
        state = {"size": 0, "deadline": None, "done": False}

        async def counted() -> Message:
            if state["done"]:
                return await receive()
            if state["deadline"] is None:
                state["deadline"] = time.monotonic() + timeout_s
            try:
                async with asyncio.timeout(max(0.0, state["deadline"] - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                raise _Refuse(408, ErrorCode.UPLOAD_TIMEOUT, "The upload did not complete within "
                              f"{timeout_s:.0f} s.") from None
            if message["type"] == "http.request":
                state["size"] += len(message.get("body", b""))
                if state["size"] > limit:
                    raise _Refuse(413, ErrorCode.TOO_LARGE,
                                  f"The upload exceeds the limit of {limit} bytes.")
                state["done"] = not message.get("more_body", False)
            return message

        return counted

    async def _answer(self, scope: Scope, send: Send, refusal: _Refuse) -> None:
        refusals = self._refusals(scope)
        if refusals is not None:
            try:
                refusals.refused(_client(scope), refusal.status, refusal.code,
                                 path=scope["path"][:200])
            except Exception:  # a full disk must not turn a 429 into a 500
                log.warning("could not audit a refused request")
        body = json.dumps({"error": refusal.code, "message": refusal.message}).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        headers += [(k.lower().encode(), v.encode()) for k, v in refusal.headers.items()]
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _Disconnected(Exception):
    pass


def _add(counts: dict[str, int], key: str, delta: int) -> None:
    counts[key] = counts.get(key, 0) + delta
    if counts[key] <= 0:
        del counts[key]


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 refuses a malformed length before we see it
    return None

