"""How the Archiver is served: uvicorn, with an HTTP/1.1 protocol that never drops a request that
arrived whole.

Why this layer: cameras (ffmpeg's HLS muxer with ``-method PUT``) send the last chunk of a segment
and close the connection without reading the answer. When the complete body and the close reach
the server before the application has read the body (any segment under ffmpeg's 32 KB I/O buffer,
any burst), uvicorn's ``receive()`` answers ``http.disconnect`` and the buffered body is never
delivered, so the application cannot tell a finished upload from a cut-off one. The server is the
only place that knows whether the request ended (terminating chunk, full Content-Length) before
the peer went away, so the fix belongs in its protocol, not in a route: a request that arrived
whole is delivered whole, and ``http.disconnect`` follows; a request cut short still ends in
``http.disconnect`` and is refused by the route (nothing of it is archived).

Over HTTPS the same cameras must also close with a FIN, not a reset: see ``_ArchiverConfig``.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from archiver.limits import header_timeout_protocol
from archiver.memory import keep_freed_buffers
from archiver.settings import Settings
from keyservice.errors import KeyServiceError, UsageError
from keyservice.exitcodes import ExitCode

# On SIGTERM/SIGINT requests in progress get this long to finish (uploads; fusion streams end
# at once, see CompleteRequestH11Protocol.shutdown); then what is still open is cancelled and
# the shutdown (RTSP pullers archive what they hold) goes on, well within systemd's stop timeout.
SHUTDOWN_GRACE_S = 10


class _CompleteRequestCycle(RequestResponseCycle):
    """uvicorn's request/response cycle, except that a peer closing after sending the whole
    request does not swallow the request: its body is delivered first."""

    _whole_body_delivered = False

    async def receive(self) -> Any:
        if (self.disconnected and not self.more_body and not self.response_complete
                and not self._whole_body_delivered):
            # The request ended (h11 saw its end) before the peer closed: hand it over.
            self._whole_body_delivered = True
            body, self.body = bytes(self.body), bytearray()
            return {"type": "http.request", "body": body, "more_body": False}
        message = await super().receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            self._whole_body_delivered = True
        return message


class CompleteRequestH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with ``_CompleteRequestCycle`` as its request/response cycle."""

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        # uvicorn builds the cycle inside handle_events and offers no hook for its class; the
        # cycle's task has not run yet (it is only scheduled), so switching the class of the new
        # cycle here takes effect before the application's first receive().
        if self.cycle is not before and type(self.cycle) is RequestResponseCycle:
            self.cycle.__class__ = _CompleteRequestCycle

    def shutdown(self) -> None:
        # At shutdown uvicorn lets every request in progress finish. A request still being
        # received (an upload) does; a response already streaming is a fusion stream, and a live
        # one has no end of its own: it is ended as if the viewer had left (the connection
        # closes; the viewer sees a stream without its signed end, and plays again later).
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self.transport.close()
            return
        super().shutdown()


class _ArchiverConfig(uvicorn.Config):
    """uvicorn's configuration, with a TLS context that sends no TLS 1.3 session tickets.

    Why (issue 20: over HTTPS, 12 segments pushed, 4-6 archived, none counted): after a TLS 1.3
    handshake the server sends session tickets, unasked. A camera that sends its body and closes
    without reading anything (ffmpeg's HLS PUT) leaves them unread in its socket, and the kernel
    answers a close with unread data by a TCP reset instead of a FIN. The reset ends the
    connection at once, and asyncio's TLS layer drops the request data it holds still encrypted
    while the HTTP protocol has paused reading (a body over 64 KB): a whole upload arrives "cut
    off". Cameras do not resume TLS sessions (one connection per segment, new handshake), so the
    tickets bought nothing; without them the server sends nothing before its answer, the
    camera's close is a FIN, and the body is delivered whole (CompleteRequestH11Protocol)."""

    def load(self) -> None:
        super().load()
        if self.ssl is not None:
            self.ssl.num_tickets = 0


def uvicorn_config(app: Any, settings: Settings, log_level: str = "info") -> uvicorn.Config:
    """The one uvicorn configuration of the Archiver (the CLI, tests and benchmarks use it)."""
    return _ArchiverConfig(
        app, host=settings.host, port=settings.port, log_level=log_level,
        # Explicit, not "auto": with httptools installed, auto would pick a protocol without
        # the fix above.
        # With a deadline for request headers (archiver/limits.py: uvicorn has none).
        http=header_timeout_protocol(settings.header_timeout_s, CompleteRequestH11Protocol),
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        h11_max_incomplete_event_size=64 * 1024,  # headers bounded in size as well as in time
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None)


EXIT_ADDRESS_IN_USE = ExitCode.ADDRESS_IN_USE


class AddressInUse(KeyServiceError):
    """The address and port to listen on are taken (another Archiver, another program)."""

    exit_code = EXIT_ADDRESS_IN_USE


def bind_listeners(settings: Settings) -> list[socket.socket]:
    """The listening sockets, bound before anything else starts (the RTSP pullers, the
    signing token, the index): a port in use is found at once and nothing has run. uvicorn
    would find it only after the application's start-up, the pullers already pulling."""
    try:
        addresses = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"Cannot listen on {settings.host}: the host name does not resolve "
                         f"({exc.strerror}).") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(
                (a[0], a[1], a[2], "", a[4]) for a in addresses):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            # As asyncio's create_server: a restart may reuse the port at once (TIME_WAIT).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUse(f"Port {settings.port} on {settings.host} is already in use "
                               "(another Archiver or another program listens there): stop it, "
                               "or give another --port.") from None
        raise UsageError(f"Cannot listen on {settings.host} port {settings.port}: "
                         f"{exc.strerror}.") from None
    return sockets


def serve(app: Any, settings: Settings, log_level: str = "info",
          sockets: list[socket.socket] | None = None) -> None:
    """Serve ``app``; on ``sockets`` if given (bind_listeners), else uvicorn binds."""
    keep_freed_buffers()
    uvicorn.Server(uvicorn_config(app, settings, log_level)).run(sockets=sockets)
