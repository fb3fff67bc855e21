"""``create_app(settings)``: the Archiver's FastAPI application."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from archiver.archive import Archive, wall_clock_ms
from archiver.audit import AuditLog
from archiver.auth import Sessions, digest, ensure_admin_token
from archiver.cameras import CameraState
from archiver.deps import ApiError, Services
from archiver.metrics import ArchiverCollector, make_registry
from archiver.routers import admin, ingest, viewer
from archiver.rtsp import RtspSupervisor
from archiver.settings import Settings
from archiver.signing import open_signer
from archiver.storage import StorageFailed, StorageFull
from keyservice.certs import load_certificate
from keyservice.identity import Signer

log = logging.getLogger("archiver")
HEALTH_CHECK_S = 1.0


async def _watch_camera_health(archive: Archive, audit: AuditLog) -> None:
    """Flags cameras that stop sending (and come back) in the log and the audit log, once per
    change of state, so a silent camera is noticed even though it cannot be told of anything."""
    states: dict[str, CameraState] = {}
    while True:
        await asyncio.sleep(HEALTH_CHECK_S)
        now = archive.clock()
        for camera in await asyncio.to_thread(archive.db.cameras):
            health = archive.health.health(camera.name, now)
            before = states.get(camera.name, CameraState.WAITING)
            states[camera.name] = health.state
            if health.state == before or health.state == CameraState.WAITING:
                continue
            if health.state == CameraState.RECEIVING:
                log.info("camera %s: receiving again", camera.name)
            else:
                log.warning("camera %s: %s %s", camera.name, health.state.value, health.message)
            audit.record("archiver", f"camera.{health.state.value}", now, camera=camera.name,
                         last_segment_ms=health.last_segment_ms, message=health.message)


def create_app(settings: Settings, signer: Signer | None = None,
               clock: Callable[[], int] = wall_clock_ms) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        archive = Archive(settings, signer or open_signer(settings), clock=clock)
        admin_token, created = ensure_admin_token(settings.admin_token_path)
        if created:
            log.warning("created the admin token in %s (mode 0600)", settings.admin_token_path)
        audit = AuditLog(settings.audit_log_path)
        audit.record("archiver", "start", clock(), recovery=archive.recovery_actions)
        rtsp = RtspSupervisor(archive.ingest_segment, archive.health.puller_failed)
        services = Services(
            settings=settings, archive=archive,
            sessions=Sessions(settings.challenge_ttl_s, settings.session_ttl_s), audit=audit,
            admin_token_digest=digest(admin_token),
            site_ca=tuple(load_certificate(p.read_bytes()) for p in settings.site_ca_files),
            rtsp=rtsp)
        collector = ArchiverCollector(archive)
        app.state.services = services
        app.state.collector = collector
        app.state.registry = make_registry(collector)
        for camera in archive.db.cameras():
            if camera.rtsp_url:
                rtsp.start(camera.name, camera.rtsp_url)
        monitor = asyncio.create_task(_watch_camera_health(archive, audit))
        try:
            yield
        finally:
            monitor.cancel()
            await asyncio.to_thread(rtsp.stop_all)
            audit.record("archiver", "stop", clock())
            audit.close()
            archive.close()

    app = FastAPI(title="Fusion Archiver", version="1", lifespan=lifespan,
                  description="Encrypts camera streams at ingest and serves per-viewer "
                              "fusion streams.")
    app.add_middleware(ingest.UploadOrder)
    app.include_router(ingest.router)
    app.include_router(admin.router)
    app.include_router(viewer.router)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    def metrics(request: Request) -> PlainTextResponse:
        return PlainTextResponse(generate_latest(request.app.state.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    def _error(request: Request, status: int, code: str, message: str) -> JSONResponse:
        collector = getattr(request.app.state, "collector", None)
        if collector is not None:
            collector.count_error(status)
        return JSONResponse({"error": code, "message": message}, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(request, exc.status, exc.code, exc.message)

    @app.exception_handler(StorageFull)
    async def storage_full(request: Request, exc: StorageFull) -> JSONResponse:
        return _error(request, 507, "storage_full", str(exc))

    @app.exception_handler(StorageFailed)
    async def storage_failed(request: Request, exc: StorageFailed) -> JSONResponse:
        return _error(request, 503, "storage_failed", str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}"
            for err in exc.errors()[:5])
        return _error(request, 422, "invalid_request", f"Invalid request: {problems}.")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(request, exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(request, 500, "internal_error",
                      "The Archiver hit an unexpected error; see its log.")

    return app
