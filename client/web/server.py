"""The viewer's local web server: 127.0.0.1 only, one-time URL token, Host and Origin checks.

Who may talk to it, and why (docs/viewer.md, "Security"):
- it listens on 127.0.0.1 only, on a free port: nothing off this machine can connect;
- the URL printed at start carries an unguessable token (256 bits). Its first use is exchanged
  for an HttpOnly, SameSite=Strict cookie and the token is spent: a copy of the URL (terminal
  scrollback, process list, browser history) opens nothing later. Every other request needs
  the cookie, so other local users and other local programs without it get 403;
- the Host header must name 127.0.0.1 or localhost on this port: a DNS-rebinding page
  (evil.example resolving to 127.0.0.1) sends its own host name and is refused;
- an Origin header, when present, must be this server's own; WebSockets and POSTs must carry
  one: another web site open in the same browser cannot drive the viewer (CSRF,
  cross-site WebSocket hijacking), even though the browser would send the cookie.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import secrets
import socket
import tempfile
import threading
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

import uvicorn
from fastapi import FastAPI, Query, WebSocket
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from pydantic import AfterValidator, BaseModel, Field
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
from client.web.backend import StreamRequest, ViewerBackend, error_json
from keyservice.errors import ArchiverFailed, ArchiverUnreachable, RequestRefused
from keyservice.names import CAMERA_NAME_PATTERN, CAMERA_NAME_RULE, is_camera_name

STATIC = Path(__file__).with_name("static")
MAX_MS = 2**63 - 1
LOOPBACK = "127.0.0.1"


@dataclass
class Access:
    """The secrets of one viewer process: the one-time URL token and the cookie it buys."""

    port: int
    url_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    cookie_value: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    token_spent: bool = False

    @property
    def cookie_name(self) -> str:
        return f"fusion_viewer_{self.port}"  # cookies ignore ports: one name per viewer process

    @property
    def hosts(self) -> set[str]:
        return {f"{LOOPBACK}:{self.port}", f"localhost:{self.port}"}

    @property
    def origins(self) -> set[str]:
        return {f"http://{host}" for host in self.hosts}

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/?token={self.url_token}"


_SECURITY_HEADERS = {
    # Only this server's own scripts, styles and media; nothing may frame the page.
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' "
                               "blob:; connect-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",       # the URL token never leaves in a Referer
    "cache-control": "no-store",            # decrypted video and lists stay out of disk caches
    "cross-origin-resource-policy": "same-origin",
}


class Guard:
    """ASGI middleware in front of every route: Host, Origin, URL token and cookie."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        websocket = scope["type"] == "websocket"
        refusal = self._refusal(scope, headers, websocket)
        if refusal is None and scope["type"] == "http" and scope["path"] == "/":
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if "token" in query:
                await self._exchange(query["token"][0], headers)(scope, receive,
                                                                  self._secure(send))
                return
        if refusal is None and not self._has_cookie(headers):
            refusal = ("Open the viewer with the URL printed by 'fusion-client view' (this "
                       "browser has no session for it).")
        if refusal is not None:
            if websocket:
                # Closing before accepting makes the server answer the upgrade with HTTP 403.
                await send({"type": "websocket.close", "code": 1008})
                return
            await JSONResponse({"error": "forbidden", "reason": refusal},
                               status_code=403)(scope, receive, self._secure(send))
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
        if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            return "Cross-site requests are refused."
        return None

    def _has_cookie(self, headers: dict[str, str]) -> bool:
        wanted = f"{self.access.cookie_name}={self.access.cookie_value}"
        return any(hmac.compare_digest(part.strip(), wanted)
                   for part in headers.get("cookie", "").split(";"))

    def _exchange(self, token: str, headers: dict[str, str]) -> Response:
        """Spend the one-time URL token for the session cookie."""
        if self._has_cookie(headers):
            return RedirectResponse("/", status_code=303)  # a reload of the printed URL
        with self._lock:
            good = (not self.access.token_spent
                    and hmac.compare_digest(token.encode(), self.access.url_token.encode()))
            if good:
                self.access.token_spent = True
        if not good:
            return JSONResponse({"error": "forbidden", "reason": "This viewer link is wrong or "
                                 "was used already; restart 'fusion-client view' for a new one."},
                                status_code=403)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(self.access.cookie_name, self.access.cookie_value, httponly=True,
                            samesite="strict", path="/")
        return response

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


class ExportRequest(BaseModel):
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
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

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
            return JSONResponse({"error": "bad_range", "reason": "The export range is empty."},
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
            return JSONResponse({"error": "not_ready", "reason": "Only a completely verified "
                                 "export can be downloaded."}, status_code=404)
        return FileResponse(export.path, media_type="video/mp2t", filename=export.path.name)

    @app.websocket("/api/stream")
    async def stream(websocket: WebSocket,
                     camera: Annotated[str, Query(pattern=CAMERA_NAME_PATTERN), AfterValidator(_camera)],
                     mode: Annotated[str, Query(pattern="^(live|range)$")],
                     from_ms: Annotated[int, Query(ge=0, le=MAX_MS)] = 0,
                     to_ms: Annotated[int, Query(ge=0, le=MAX_MS)] = 0,
                     start_ms: Annotated[int, Query(ge=0, le=MAX_MS)] = 0) -> None:
        await websocket.accept()
        request = StreamRequest(camera, mode == "live", from_ms, to_ms, start_ms)
        await pump(websocket, backend, request)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return Guard(app, access)


async def pump(websocket: WebSocket, backend: ViewerBackend, request: StreamRequest) -> None:
    """Runs the blocking stream in a thread and forwards its events, in order, to the page."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | bytes | None] = asyncio.Queue()
    stopped = threading.Event()
    sessions: list[ArchiverSession] = []

    def emit(item: dict[str, Any] | bytes | None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> None:
        try:
            backend.stream(request, emit, stopped, on_session=sessions.append)
        finally:
            emit(None)

    def stop() -> None:
        stopped.set()
        for session in sessions:
            session.close()  # unblocks a live stream waiting for the camera's next segment

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


def serve(backend: ViewerBackend, *, port: int = 0, open_browser: bool = True,
          announce: Callable[[str], None] = print) -> None:
    """Serve until Ctrl-C (uvicorn handles SIGINT/SIGTERM and shuts down cleanly)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, port))
    sock.listen(128)  # connections made right after the URL is printed wait in the backlog
    access = Access(sock.getsockname()[1])
    config = uvicorn.Config(create_app(backend, access), log_level="warning", lifespan="off",
                            ws="auto", timeout_graceful_shutdown=2, access_log=False)
    server = uvicorn.Server(config)
    launch: Path | None = None
    try:
        announce(access.url)
        if open_browser:
            launch = _launch_file(access.url)
            threading.Thread(target=webbrowser.open, args=(launch.as_uri(),),
                             daemon=True).start()
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # Ctrl-C is how the viewer ends (uvicorn re-raises the one it handled after a clean
        # shutdown; one before it started lands here directly).
        pass
    finally:
        sock.close()
        if launch is not None:
            launch.unlink(missing_ok=True)
