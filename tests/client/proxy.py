"""A small HTTP proxy in front of a real Archiver that can tamper with fusion streams in
transit: flip one byte inside a segment's ciphertext, cut the stream before its END record, or
answer every stream request with a stream saved earlier (the replay relay of issue 12, the CCTV
loop), optionally rewriting its header to name the new request. The Archiver and the viewer are
real; only the wire between them is hostile."""

from __future__ import annotations

import dataclasses
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

from keyservice.format import (
    End,
    Header,
    Segment,
    encode_record,
    stream_prefix,
)
from keyservice.framing import RecordSplitter

FUSION = "application/vnd.fusion-stream"


def record_spans(stream: bytes) -> list[tuple[object, int, int]]:
    """(record, start offset, end offset) of every record of a whole stream."""
    spans = []
    offset = len(stream_prefix())
    for record, raw in RecordSplitter().feed(stream):
        spans.append((record, offset, offset + len(raw)))
        offset += len(raw)
    return spans


def tamper(stream: bytes, mode: str, segment_index: int) -> bytes:
    spans = record_spans(stream)
    if mode == "flip":
        segments = [(s, e) for r, s, e in spans if isinstance(r, Segment)]
        start, end = segments[segment_index]
        out = bytearray(stream)
        out[end - 20] ^= 0x40  # inside the GCM ciphertext/tag of that segment
        return bytes(out)
    if mode == "truncate":
        [(_, start, _)] = [(r, s, e) for r, s, e in spans if isinstance(r, End)]
        return stream[:start]
    raise ValueError(mode)


def rewrite_header(stream: bytes, path: str) -> bytes:
    """Make a saved stream's header name the request in ``path`` (its nonce, and for live a
    fresh creation time and range): what a relay that reads the request can do. The END
    signature still covers the original header."""
    query = parse_qs(urlsplit(path).query)
    (header, start, end), *_ = record_spans(stream)
    assert isinstance(header, Header)
    now = time.time_ns() // 1_000_000
    changes: dict[str, object] = {"request_nonce": bytes.fromhex(query["nonce"][0])}
    if "duration_s" in query:
        begin = int(query["from_ms"][0]) if "from_ms" in query else now  # the viewer's start
        changes.update(created_ms=now, range_from_ms=begin,
                       range_to_ms=begin + int(float(query["duration_s"][0]) * 1000))
    else:
        changes.update(range_from_ms=int(query["from_ms"][0]),
                       range_to_ms=int(query["to_ms"][0]))
    new = encode_record(dataclasses.replace(header, **changes))  # type: ignore[arg-type]
    return stream[:start] + new + stream[end:]


def shift_start(path: str, shift_ms: int) -> str:
    """A live request's path with its from_ms moved later (what a relay can do to skip the
    first seconds of a live stream)."""
    parts = urlsplit(path)
    query = parse_qs(parts.query)
    query["from_ms"] = [str(int(query["from_ms"][0]) + shift_ms)]
    return f"{parts.path}?{urlencode(query, doseq=True)}"


class TamperingProxy:
    """Forwards to the Archiver. ``mode``: None (pass through), "flip", "truncate", "hold",
    "shift" (live requests, see __init__), or
    "replay": answer every fusion stream request with ``saved`` (set it to a stream recorded
    earlier), without asking the Archiver; ``rewrite`` also makes its header name the new
    request."""

    def __init__(self, upstream: str, verify: ssl.SSLContext | bool = True) -> None:
        self.upstream = upstream  # an HTTPS Archiver is verified with ``verify``
        # Answer recording requests with this (status, JSON body) instead of asking the
        # Archiver: a forged refusal, e.g. an unsigned "410 expired" for withheld video.
        self.refusal: tuple[int, dict[str, object]] | None = None
        self.mode: str | None = None
        self.segment_index = 2
        self.saved: bytes | None = None
        self.rewrite = False
        self.replayed = 0
        # Live requests: "hold" keeps each one back for hold_s before forwarding it (a slow or
        # hostile relay), "shift" moves its from_ms later by shift_ms; live_seen is set when
        # a live request arrived.
        self.hold_s = 0.0
        self.shift_ms = 0
        self.live_seen = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _replay(self) -> None:
                assert proxy.saved is not None
                data = rewrite_header(proxy.saved, self.path) if proxy.rewrite else proxy.saved
                proxy.replayed += 1
                self.send_response(200)
                self.send_header("Content-Type", FUSION)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _forward(self, method: str) -> None:
                path = urlsplit(self.path).path
                if proxy.mode == "replay" and path.endswith(("/recording", "/live")):
                    self._replay()
                    return
                if proxy.refusal is not None and path.endswith("/recording"):
                    status, answer = proxy.refusal
                    payload = json.dumps(answer).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                target = self.path
                if path.endswith("/live"):
                    proxy.live_seen.set()
                    if proxy.mode == "hold":
                        time.sleep(proxy.hold_s)
                    elif proxy.mode == "shift":
                        target = shift_start(self.path, proxy.shift_ms)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() in ("authorization", "content-type")}
                response = httpx.request(method, proxy.upstream + target, content=body,
                                         headers=headers, timeout=60,
                                         verify=verify)
                data = response.content
                media = response.headers.get("content-type", "")
                if (proxy.mode in ("flip", "truncate") and media.startswith(FUSION)
                        and response.status_code == 200):
                    data = tamper(data, proxy.mode, proxy.segment_index)
                self.send_response(response.status_code)
                self.send_header("Content-Type", media)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_POST(self) -> None:
                self._forward("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> TamperingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
