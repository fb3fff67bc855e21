"""The viewer's local web server: 127.0.0.1 only, a per-session secret held by the page,
Host and Origin checks.

Who may talk to it, and why (docs/viewer.md, "Security"):
- it listens on 127.0.0.1 only, on a free port: nothing off this machine can connect;
- the browser holds no ambient credential. Browsers ignore ports for cookies and SameSite
  treats every port of 127.0.0.1 as the same site, so a cookie would be sent to every other
  local web server the operator's browser visits, which could replay it. Instead:
  - the URL printed at start carries a one-time launch token (256 bits) in its fragment,
    which the browser never sends to any server (nor in a Referer);
  - the page spends it once (POST /api/session) for a session secret (256 bits) that it keeps
    in its memory only (no cookie, no storage) and sends with every API request
    (`Authorization: Bearer`) and as the first message of every WebSocket; a copy of the URL
    (scrollback, history) opens nothing later;
  - a finished export is downloaded with a single-use ticket, bound to that export and valid
    for a minute, minted on request by the page: a download link cannot carry a header;
- the Host header must name 127.0.0.1 or localhost on this port: a DNS-rebinding page
  (evil.example resolving to 127.0.0.1) sends its own host name and is refused;
- an Origin header, when present, must be this server's own; WebSockets and POSTs must carry
  one (defence in depth: without the secret they get nothing anyway).
"""

from __future__ import annotations

import asyncio
import hmac
import html
import os
import re
import secrets
import signal
import socket
import tempfile
import threading
import time
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs

import uvicorn
from fastapi import FastAPI, WebSocket
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import AfterValidator, BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from client.session import (
    ArchiverSession,
    LoginRefused,
    NoRecording,
    NotAuthorized,
    NotEnrolled,
    UnknownCamera,
    ViewerRevoked,
)
from client.web.backend import TileRequest, ViewerBackend, error_json
from keyservice.errors import ArchiverFailed, ArchiverUnreachable, RequestRefused
from keyservice.names import CAMERA_NAME_PATTERN, CAMERA_NAME_RULE, is_camera_name

__all__ = ["Access", "ExportRequest", "Guard", "SessionRequest", "StreamOpening", "create_app",
           "refusal_page", "serve"]

STATIC = Path(__file__).with_name("static")
MAX_MS = 2**63 - 1
LOOPBACK = "127.0.0.1"
TICKET_TTL_S = 60.0         # a download ticket: minted when the operator clicks, used at once
STREAM_AUTH_TIMEOUT_S = 10  # a WebSocket must authenticate this soon after opening
_EXPORT_FILE = re.compile(r"/api/exports/([0-9]{1,18})/file")
SPENT_LINK = ("This viewer link was used already: each link printed by 'fusion-client view' "
              "opens the viewer once, and a reloaded page forgets its session on purpose. "
              "Press Enter in the terminal where 'fusion-client view' runs for a new link (or "
              "restart it).")


@dataclass
class Access:
    """The secrets of one viewer process: the one-time launch token, the session secrets it
    bought, and single-use download tickets. None of them is ever a cookie."""

    port: int
    launch_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    launch_spent: bool = False
    sessions: list[str] = field(default_factory=list)
    tickets: dict[str, tuple[int, float]] = field(default_factory=dict)
    on_spent: Callable[[], None] | None = None  # e.g. delete the launch file: it opens nothing
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def hosts(self) -> set[str]:
        """The Host headers this server answers (a DNS-rebinding page sends another)."""
        return {f"{LOOPBACK}:{self.port}", f"localhost:{self.port}"}

    @property
    def origins(self) -> set[str]:
        """The Origin headers accepted: this server's own."""
        return {f"http://{host}" for host in self.hosts}

    @property
    def url(self) -> str:
        """The launch link printed on the terminal."""
        # The token is in the fragment: a browser sends it to no server, not even this one.
        return f"http://{LOOPBACK}:{self.port}/#token={self.launch_token}"

    def open_session(self, launch_token: str) -> str | None:
        """Spends the launch token (once, whoever presents it first) for the session secret."""
        with self.lock:
            if self.launch_spent or not hmac.compare_digest(launch_token.encode(),
                                                            self.launch_token.encode()):
                return None
            self.launch_spent = True
            secret = secrets.token_urlsafe(32)
            self.sessions.append(secret)
        if self.on_spent is not None:
            self.on_spent()
        return secret

    def new_launch(self) -> str:
        """A new one-time link (asked for on the terminal); an unspent earlier one stops
        working. Pages already open keep their sessions."""
        with self.lock:
            self.launch_token = secrets.token_urlsafe(32)
            self.launch_spent = False
        return self.url

    def session_ok(self, secret: str) -> bool:
        """True if ``secret`` is one of the session secrets bought with a launch token."""
        with self.lock:
            sessions = list(self.sessions)
        # Every candidate compared, in constant time each.
        return sum(hmac.compare_digest(secret.encode(), s.encode()) for s in sessions) > 0

    def bearer_ok(self, authorization: str) -> bool:
        """True if an Authorization header carries a session secret."""
        scheme, _, secret = authorization.partition(" ")
        return scheme.lower() == "bearer" and self.session_ok(secret.strip())

    def new_ticket(self, export_id: int) -> str:
        """A single-use download ticket for one export, valid TICKET_TTL_S."""
        ticket = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self.lock:
            self.tickets = {t: v for t, v in self.tickets.items() if v[1] > now}
            self.tickets[ticket] = (export_id, now + TICKET_TTL_S)
        return ticket

    def spend_ticket(self, ticket: str, export_id: int) -> bool:
        """A ticket opens one download of one export, once, within TICKET_TTL_S."""
        with self.lock:
            found = self.tickets.pop(ticket, None)
        return found is not None and found[0] == export_id and found[1] > time.monotonic()


_SECURITY_HEADERS = {
    # Only this server's own scripts, styles and media; nothing may frame the page.
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' "
                               "blob:; connect-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",       # no download ticket ever leaves in a Referer
    "cache-control": "no-store",            # decrypted video and lists stay out of disk caches
    "cross-origin-resource-policy": "same-origin",
}
NO_SESSION = ("Open the viewer with the link printed by 'fusion-client view' (this request "
              "carries no session of it).")


def refusal_page(reason: str) -> str:
    """What a browser shows when it navigates to something refused: a page, not raw JSON."""
    return ("<!doctype html><html lang=\"en\"><meta charset=\"utf-8\"><title>Fusion viewer"
            "</title><body style=\"font-family:sans-serif;max-width:40em;margin:3em auto\">"
            f"<h1>Fusion viewer</h1><p>{html.escape(reason)}</p></body></html>")


class Guard:
    """ASGI middleware in front of every route: Host, Origin, and the session secret (or a
    download ticket). The page and its static files are public: they hold no secret."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        websocket = scope["type"] == "websocket"
        refusal = self._refusal(scope, headers, websocket)
        # A WebSocket authenticates with its first message (the route checks it): a browser
        # cannot set headers on one, and a URL lands in logs and history.
        if refusal is None and not websocket and not self._authorized(scope, headers):
            refusal = NO_SESSION
        if refusal is not None:
            if websocket:
                # Closing before accepting makes the server answer the upgrade with HTTP 403.
                await send({"type": "websocket.close", "code": 1008})
                return
            response: Response
            if headers.get("sec-fetch-dest") == "document":
                response = HTMLResponse(refusal_page(refusal), status_code=403)
            else:
                response = JSONResponse({"error": "forbidden", "message": refusal},
                                        status_code=403)
            await response(scope, receive, self._secure(send))
            return
        await self.app(scope, receive, self._secure(send) if not websocket else send)

    def _refusal(self, scope: Scope, headers: dict[str, str], websocket: bool) -> str | None:
        if headers.get("host", "") not in self.access.hosts:
            return "The Host header does not name this viewer (DNS rebinding protection)."
        origin = headers.get("origin")
        if origin is not None and origin not in self.access.origins:
            return f"Requests from {origin} are refused: only the viewer's own page may call it."
        if origin is None and (websocket or scope.get("method") not in ("GET", "HEAD")):
            return "This request must come from the viewer's page (no Origin header)."
        if headers.get("sec-fetch-site") in ("cross-site", "same-site") and not (
                scope["path"] == "/" and scope.get("method") in ("GET", "HEAD")
                and headers.get("sec-fetch-mode") == "navigate"):
            # The page itself may be opened from elsewhere: the launch file (file://) forwards
            # to it as a cross-site navigation, and it holds no secret.
            return "Cross-site requests are refused."
        return None

    def _authorized(self, scope: Scope, headers: dict[str, str]) -> bool:
        path = scope["path"]
        method = scope.get("method")
        if method in ("GET", "HEAD") and (path == "/" or path.startswith("/static/")):
            return True   # the page itself: public, it holds no secret
        if method == "POST" and path == "/api/session":
            return True   # spends the launch token (the route checks it)
        if self.access.bearer_ok(headers.get("authorization", "")):
            return True
        found = _EXPORT_FILE.fullmatch(path)
        if found is not None and method == "GET":
            ticket = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("ticket")
            return bool(ticket) and self.access.spend_ticket(ticket[0], int(found.group(1)))
        return False

    @staticmethod
    def _secure(send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)
        return wrapped


def _camera(name: str) -> str:
    if not is_camera_name(name):  # the pattern alone lets '.' and '..' through
        raise ValueError(f"not a camera name ({CAMERA_NAME_RULE})")
    return name


CameraName = Annotated[str, Field(pattern=CAMERA_NAME_PATTERN), AfterValidator(_camera)]


class SessionRequest(BaseModel):
    """The page's one-time launch token, spent for a session secret."""

    launch: str = Field(max_length=100)


class StreamOpening(BaseModel):
    """The first message of a stream WebSocket: the session secret, then what to play."""

    secret: str = Field(max_length=100)
    camera: CameraName
    mode: Literal["live", "range"]
    from_ms: int = Field(default=0, ge=0, le=MAX_MS)
    to_ms: int = Field(default=0, ge=0, le=MAX_MS)
    start_ms: int = Field(default=0, ge=0, le=MAX_MS)


class ExportRequest(BaseModel):
    """A verified export of a recorded range to a file."""

    camera: CameraName
    from_ms: int = Field(ge=0, le=MAX_MS)
    to_ms: int = Field(ge=0, le=MAX_MS)


# The page's HTTP status for each error class, by its exit code (keyservice/exits.py's path).
_BAD_GATEWAY = {ArchiverUnreachable.exit_code, ArchiverFailed.exit_code}
_FORBIDDEN = {RequestRefused.exit_code, NotEnrolled.exit_code, ViewerRevoked.exit_code,
              NotAuthorized.exit_code, LoginRefused.exit_code}
_NOT_FOUND = {UnknownCamera.exit_code, NoRecording.exit_code}


def _forbidden_json(exc: BaseException) -> JSONResponse:
    body = error_json(exc)
    code = body["code"]
    status = 502 if code in _BAD_GATEWAY else 403 if code in _FORBIDDEN \
        else 404 if code in _NOT_FOUND else 500
    return JSONResponse(body, status_code=status)


def create_app(backend: ViewerBackend, access: Access) -> ASGIApp:
    """The viewer page's ASGI app over ``backend``, behind the Guard (Host, Origin, session
    secret or download ticket) that ``access`` holds the secrets of."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.post("/api/session", response_model=None)
    def open_session(body: SessionRequest) -> dict[str, str] | JSONResponse:
        secret = access.open_session(body.launch)
        if secret is None:
            return JSONResponse({"error": "link_spent", "message": SPENT_LINK}, status_code=403)
        return {"secret": secret}

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {"archiver": backend.session.url,
                "archiver_fingerprint": backend.login.archiver_fingerprint.hex(),
                "viewer_fingerprint": backend.login.viewer_fingerprint}

    @app.get("/api/cameras", response_model=None)
    async def cameras() -> list[dict[str, Any]] | JSONResponse:
        try:
            return await run_in_threadpool(backend.cameras)
        except Exception as exc:
            return _forbidden_json(exc)

    @app.post("/api/exports", status_code=202, response_model=None)
    def start_export(body: ExportRequest) -> dict[str, Any] | JSONResponse:
        if body.to_ms <= body.from_ms:
            return JSONResponse({"error": "bad_range", "message": "The export range is empty."},
                                status_code=422)
        return backend.start_export(body.camera, body.from_ms, body.to_ms).to_json()

    @app.get("/api/exports/{export_id}", response_model=None)
    def export_status(export_id: int) -> dict[str, Any] | JSONResponse:
        export = backend.export(export_id)
        if export is None:
            return JSONResponse({"error": "unknown_export"}, status_code=404)
        return export.to_json()

    @app.get("/api/exports/{export_id}/file", response_model=None)
    def export_file(export_id: int) -> FileResponse | JSONResponse:
        export = backend.export(export_id)
        if export is None or export.state != "done":
            return JSONResponse({"error": "not_ready", "message": "Only a completely verified "
                                 "export can be downloaded."}, status_code=404)
        return FileResponse(export.path, media_type="video/mp2t", filename=export.path.name)

    @app.post("/api/exports/{export_id}/ticket", response_model=None)
    def export_ticket(export_id: int) -> dict[str, str] | JSONResponse:
        export = backend.export(export_id)
        if export is None or export.state != "done":
            return JSONResponse({"error": "not_ready", "message": "Only a completely verified "
                                 "export can be downloaded."}, status_code=404)
        ticket = access.new_ticket(export_id)
        return {"url": f"/api/exports/{export_id}/file?ticket={ticket}"}

    @app.websocket("/api/stream")
    async def stream(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            first = await asyncio.wait_for(websocket.receive_text(), STREAM_AUTH_TIMEOUT_S)
            opening = StreamOpening.model_validate_json(first)
        except (TimeoutError, ValidationError, WebSocketDisconnect, KeyError, RuntimeError):
            # Nothing is said before the secret checked: not even what was wrong.
            await _close(websocket, "This stream needs the viewer's session and a valid request.")
            return
        if not access.session_ok(opening.secret):
            await _close(websocket, NO_SESSION)
            return
        request = TileRequest(opening.camera, opening.mode == "live", opening.from_ms,
                                opening.to_ms, opening.start_ms)
        await pump(websocket, backend, request)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return Guard(app, access)


async def _close(websocket: WebSocket, reason: str) -> None:
    try:
        await websocket.close(code=1008, reason=reason[:120])
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the other side is gone already


async def pump(websocket: WebSocket, backend: ViewerBackend, request: TileRequest) -> None:
    """Runs the blocking stream in a thread and forwards its events, in order, to the page."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | bytes | None] = asyncio.Queue()
    stopped = threading.Event()
    sessions: list[ArchiverSession] = []

    def emit(item: dict[str, Any] | bytes | None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the viewer stopped, nobody reads
            stopped.set()

    def work() -> None:
        try:
            backend.stream(request, emit, stopped, on_session=sessions.append)
        finally:
            emit(None)

    def stop() -> None:
        stopped.set()
        for session in sessions:
            # Unblocks a live stream waiting for the camera's next segment; the worker closes
            # its session itself (closing it from here would race the worker's reads).
            session.interrupt()

    async def watch_close() -> None:
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
        except (WebSocketDisconnect, RuntimeError):
            pass
        stop()

    worker = threading.Thread(target=work, daemon=True, name=f"stream-{request.camera}")
    worker.start()
    watcher = asyncio.create_task(watch_close())
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            # The page leaving (or the server shutting down) ends this at once, even while
            # the worker waits for a silent camera.
            await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            item = getter.result()
            if item is None:
                await websocket.close()
                break
            if isinstance(item, bytes):
                await websocket.send_bytes(item)
            else:
                await websocket.send_json(item)
    except (WebSocketDisconnect, RuntimeError, OSError, asyncio.CancelledError):
        pass
    finally:
        stop()
        watcher.cancel()


def _launch_file(url: str) -> Path:
    """A private (0600) HTML file that forwards to the URL, so the token does not appear on
    the browser's command line, where every local user could read it (as Jupyter does)."""
    fd, name = tempfile.mkstemp(prefix="fusion-viewer-", suffix=".html")
    with os.fdopen(fd, "w") as fh:
        fh.write(f'<!doctype html><meta http-equiv="refresh" content="0;url={url}">'
                 f'<p><a href="{url}">Open the Fusion viewer</a></p>')
    return Path(name)


def _new_links_on_enter(access: Access, announce: Callable[[str], None]) -> None:
    """Each Enter on the terminal prints a new one-time link (after a reload, for a second
    window). Raw reads of fd 0: a thread blocked in sys.stdin would hold its lock at exit."""
    while True:
        try:
            data = os.read(0, 1024)
        except OSError:
            return
        if not data:
            return
        for _ in range(data.count(b"\n")):
            announce(access.new_launch())


def serve(backend: ViewerBackend, *, port: int = 0, open_browser: bool = True,
          announce: Callable[[str], None] = print, new_links: bool = False) -> None:
    """Serve until Ctrl-C, SIGTERM or SIGHUP; every way out removes the launch file.
    new_links: Enter on standard input (the operator's terminal) prints a new link."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, port))
    sock.listen(128)  # connections made right after the URL is printed wait in the backlog
    access = Access(sock.getsockname()[1])
    config = uvicorn.Config(create_app(backend, access), log_level="warning", lifespan="off",
                            ws="auto", timeout_graceful_shutdown=2, access_log=False)
    server = uvicorn.Server(config)
    launch: list[Path] = []

    def forget_launch() -> None:
        # The file holds the one-time URL: gone once spent, and on every way out.
        for path in launch:
            path.unlink(missing_ok=True)

    def stop(signum: int, frame: FrameType | None) -> None:
        # Every way out is uvicorn's shutdown: a signal before it runs makes it return right
        # after its start-up; one while it runs is uvicorn's (SIGINT, SIGTERM), which raises it
        # again once stopped, landing here. Never an exception (a KeyboardInterrupt) from a
        # handler: it can land anywhere, even in a callback where Python only prints it, and
        # a Ctrl-C that escaped ended the viewer by the signal (status -2) after its cleanup.
        server.should_exit = True

    access.on_spent = forget_launch
    previous = {sig: signal.signal(sig, stop)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        announce(access.url)
        if open_browser:
            launch.append(_launch_file(access.url))
            threading.Thread(target=webbrowser.open, args=(launch[0].as_uri(),),
                             daemon=True).start()
        if new_links:
            threading.Thread(target=_new_links_on_enter, args=(access, announce), daemon=True,
                             name="new-links").start()
        server.run(sockets=[sock])
    finally:
        sock.close()
        forget_launch()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
