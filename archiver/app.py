"""``create_app(settings)``: the Archiver's FastAPI application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from archiver.archive import Archive, wall_clock_ms
from archiver.audit import AuditLog
from archiver.auth import secret_matches
from archiver.cameras import CameraState
from archiver.deps import ApiError, BearerDep, ServicesDep, services_of
from archiver.deps import api_error as to_api_error
from archiver.directory.snapshot import DirectoryUnreachable
from archiver.limits import REFUSED_STATUSES, Limits, RefusalAudit, RequestLimits
from archiver.metrics import ArchiverCollector, LeaseCollector, make_registry
from archiver.routers import admin, admins, audit, consolidation, grants, ingest, site, viewer
from archiver.services.container import ArchiverServices, create_services
from archiver.services.refused import Refused
from archiver.services.site_sync import start_directory_watch, start_site_changes
from archiver.settings import Settings
from archiver.storage import StorageFailed, StorageFull
from keyservice.identity import Signer
from keyservice.wire import ErrorCode

log = logging.getLogger("archiver")
HEALTH_CHECK_S = 1.0
# The last segment's time is saved this often (a change of state at once): one index write a
# minute per camera, not one per segment.
HEALTH_SAVE_MS = 60_000


async def _watch_camera_health(archive: Archive, audit: AuditLog) -> None:
    """Flags cameras that stop sending (and come back) in the log and the audit log, once per
    change of state, so a silent camera is noticed even though it cannot be told of anything."""
    states: dict[str, CameraState] = {}
    while True:
        await asyncio.sleep(HEALTH_CHECK_S)
        now = archive.clock()
        for camera in await asyncio.to_thread(archive.directory.cameras):
            health = archive.health.health(camera.name, now)
            before = states.get(camera.name, CameraState.WAITING)
            states[camera.name] = health.state
            if health.state == before or health.state == CameraState.WAITING:
                continue
            if health.state == CameraState.RECEIVING:
                # "again" only after a problem, not for the first segment of this run.
                log.info("camera %s: %s", camera.name, "receiving (first segment since start)"
                         if before == CameraState.WAITING else "receiving again")
            else:
                log.warning("camera %s: %s (%s)", camera.name, health.state.value,
                            health.message or "no reason known")
            audit.record("archiver", f"camera.{health.state.value}", now, camera=camera.name,
                         last_segment_ms=health.last_segment_ms, message=health.message)
        try:  # a change of state at once, the last segment's time every HEALTH_SAVE_MS
            await asyncio.to_thread(archive.save_health, HEALTH_SAVE_MS)
        except Exception:  # a full disk: the next tick tries again
            log.warning("could not save the cameras' health to the index")


async def _apply_retention(archive: Archive, expire_parts: Callable[[], int]) -> None:
    """Retention, continuously: a pass at start (it also finishes a removal a crash
    interrupted), then every retention_interval_s. A pass that fails is tried again later.
    ``expire_parts``: the same rule on consolidated parts (other Archivers' copies)."""
    waiting = False
    while True:
        if not archive.directory.reachable:
            # A hold made through another Archiver just before the outage may not be known
            # here: deleting by the holds last read could destroy evidence. Wait for it.
            if not waiting:
                log.warning("retention: pass skipped while the site directory is unreachable "
                            "(until it is back)")
            waiting = True
            await asyncio.sleep(archive.settings.retention_interval_s)
            continue
        waiting = False
        try:
            await asyncio.to_thread(expire_parts)
            report = await asyncio.to_thread(archive.retention.run)
            if report.files_removed:
                log.info("retention: removed %d archive day(s), %d bytes; shredded %d key "
                         "record(s) and %d epoch opener(s) in %.2f s", report.files_removed,
                         report.bytes_reclaimed, report.key_records_shredded,
                         report.epochs_shredded, report.seconds)
        except Exception:
            log.exception("the retention pass failed; trying again at the next one")
        await asyncio.sleep(archive.settings.retention_interval_s)


async def _consolidate(services: ArchiverServices) -> None:
    """In a site: every consolidate_every_s, the gaps other Archivers recorded in the cameras
    this one holds are copied here (archiver/consolidation.py). A failure is logged and tried
    again next time; recording never waits for it."""
    while True:
        await asyncio.sleep(services.settings.consolidate_every_s)
        try:
            await asyncio.to_thread(services.consolidation.run_once)
        except Exception:
            log.exception("the consolidation pass failed; trying again at the next one")


def create_app(settings: Settings, signer: Signer | None = None,
               clock: Callable[[], int] = wall_clock_ms,
               free_bytes: Callable[[], int] | None = None) -> FastAPI:
    """The Archiver's FastAPI application over ``create_services(settings, ...)`` (opened at
    start, closed at stop): the routers of archiver/routers/, the error answers, and the
    background work (camera health, retention passes, RTSP pullers, refusal summaries).
    ``signer``: the signing key (default: the data directory's SoftHSM token, or
    ``settings.signer_token_uri``); ``clock`` and ``free_bytes`` are for tests."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await asyncio.to_thread(create_services, settings, signer, clock, free_bytes)
        archive, audit, refusals = services.archive, services.audit, services.refusals
        assert refusals is not None and services.rtsp is not None
        collector = ArchiverCollector(archive)
        app.state.services = services
        app.state.collector = collector
        app.state.registry = make_registry(collector)
        app.state.registry.register(LeaseCollector(services.site.lease_status))
        # In the registry (refused if another live Archiver has the name), the cameras it
        # holds pulled, then heartbeats and re-reads them in a thread (archiver/registry.py).
        try:
            await asyncio.to_thread(services.site.start)
        except BaseException:
            await asyncio.to_thread(services.rtsp.stop_all)
            services.close()
            raise
        # In a site: other Archivers' authorization changes (NOTIFY, polling), off this loop.
        changes = await asyncio.to_thread(start_site_changes, services)
        # In a site: the directory's outages (snapshot.py), reconciled when it is back.
        watch = start_directory_watch(services, changes)
        app.state.directory_watch = watch

        async def flush_refusals() -> None:
            while True:
                await asyncio.sleep(refusals.window_s)
                try:
                    await asyncio.to_thread(refusals.flush_if_due)
                except Exception:  # a full disk: try again next window
                    log.warning("could not write the refused-access summary to the audit log")

        flusher = asyncio.create_task(flush_refusals())
        monitor = asyncio.create_task(_watch_camera_health(archive, audit))
        retention = asyncio.create_task(_apply_retention(archive, services.consolidation.expire))
        consolidating = (asyncio.create_task(_consolidate(services))
                         if settings.directory_url and settings.consolidate_every_s > 0 else None)
        try:
            yield
        finally:
            monitor.cancel()
            if consolidating is not None:
                consolidating.cancel()
            retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retention
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            if watch is not None:
                await asyncio.to_thread(watch.stop)
            if changes is not None:
                await asyncio.to_thread(changes.stop)
            await asyncio.to_thread(services.site.stop)
            await asyncio.to_thread(services.rtsp.stop_all)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(archive.save_health, 0)  # what the next start shows
            services.close()

    # The API's map is off unless asked for (--api-docs): it spares an attacker the survey.
    docs = settings.api_docs
    app = FastAPI(title="Fusion Archiver", version="1", lifespan=lifespan,
                  description="Encrypts camera streams at ingest and serves per-viewer "
                              "fusion streams.",
                  openapi_url="/openapi.json" if docs else None,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)
    app.add_middleware(ingest.UploadOrder)
    # Added after the others, so outside them: limits apply before anything else reads the
    # request (UploadOutcomes, outermost, reads nothing: it watches the answers).
    app.add_middleware(
        RequestLimits,
        limits=Limits(max_segment_bytes=settings.max_segment_bytes,
                      upload_timeout_s=settings.upload_timeout_s,
                      body_timeout_s=settings.body_timeout_s, login_rate=settings.login_rate,
                      login_burst=settings.login_burst,
                      viewer_concurrency=settings.viewer_concurrency,
                      viewer_streams=settings.viewer_streams,
                      viewer_rate=settings.viewer_rate, viewer_burst=settings.viewer_burst),
        refusals=_refusals_of, viewer_key=_viewer_of)
    # Outermost of all: it sees the answer to every segment upload, whoever gave it.
    app.add_middleware(ingest.UploadOutcomes)
    app.include_router(ingest.router)
    app.include_router(admin.router)
    app.include_router(viewer.router)
    app.include_router(site.router)
    app.include_router(consolidation.router)
    app.include_router(grants.router)
    app.include_router(admins.router)
    app.include_router(audit.router)

    @app.get("/healthz", tags=["health"])
    def healthz(request: Request) -> dict[str, object]:
        # 200 either way: a degraded Archiver still records and serves (a load balancer must
        # not take it out); "degraded" and the directory's state say what it cannot do.
        services = getattr(request.app.state, "services", None)
        link = services.archive.directory.link if services is not None else None
        # A disk that fails (its holder gave its cameras to their standbys, a standby takes
        # none over): only the state (unauthenticated: no path, no camera names; /metrics and
        # the log say more).
        disk = services.site.disk_status() if services is not None else None
        storage = ({"storage": {"state": disk["storage"]}}
                   if disk is not None and disk["storage"] != "ok" else {})
        if link is None:
            return {"status": "degraded" if storage else "ok", **storage}
        state = link.state()
        body = state.as_json(services.archive.clock())
        body.pop("where")  # unauthenticated: the directory's address is not said here
        return {"status": "ok" if state.state == "ok" and not storage else "degraded",
                "directory": body, **storage}

    def metrics_access(services: ServicesDep, credentials: BearerDep) -> None:
        # Ingest counts are a motion side channel: by default only the admin or the holder of
        # the metrics token (data dir, 0600) may scrape them.
        if services.settings.public_metrics:
            return
        if credentials is None:
            raise ApiError(401, ErrorCode.UNAUTHENTICATED, "Missing 'Authorization: Bearer' metrics "
                           "token (the file metrics-token in the data directory, or the admin "
                           "token).")
        token = credentials.credentials
        if not ((services.settings.bootstrap_token
                 and secret_matches(token, services.admin_token_digest))
                or (services.metrics_token_digest is not None
                    and secret_matches(token, services.metrics_token_digest))):
            raise ApiError(403, ErrorCode.FORBIDDEN, "This is neither the metrics nor the admin token.")

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse,
             dependencies=[Depends(metrics_access)])
    def metrics(request: Request) -> PlainTextResponse:
        return PlainTextResponse(generate_latest(request.app.state.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    def _error(request: Request, status: int, code: ErrorCode, message: str,
               body: dict[str, object] | None = None) -> JSONResponse:
        collector = getattr(request.app.state, "collector", None)
        if collector is not None:
            collector.count_error(status)
        return JSONResponse({**(body or {}), "error": code, "message": message},
                            status_code=status)

    def _refused(request: Request, exc: ApiError) -> None:
        refusals = _refusals_of(request.scope)
        if refusals is not None and exc.status in REFUSED_STATUSES:
            refusals.refused(request.client.host if request.client else "unknown", exc.status,
                             exc.code, path=request.url.path[:200], **exc.audit)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        # Audited (aggregated) in a worker thread: the first line of a window is fsynced. A
        # refusal that cannot be audited is still a refusal.
        try:
            await asyncio.to_thread(_refused, request, exc)
        except Exception:  # a refusal that cannot be audited is still refused
            log.warning("could not audit a refused request")
        return _error(request, exc.status, exc.code, exc.message, exc.body)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        # A service's refusal: its wire code's HTTP status (archiver/deps.py), then as above.
        return await api_error(request, to_api_error(exc))

    @app.exception_handler(StorageFull)
    async def storage_full(request: Request, exc: StorageFull) -> JSONResponse:
        return _error(request, 507, ErrorCode.STORAGE_FULL, str(exc))

    @app.exception_handler(DirectoryUnreachable)
    async def directory_unreachable(request: Request, exc: DirectoryUnreachable) -> JSONResponse:
        # Before StorageFailed's (its base class): a 503 with its own code, and when to retry.
        response = _error(request, 503, ErrorCode.DIRECTORY_UNREACHABLE, exc.message)
        response.headers["Retry-After"] = "5"
        return response

    @app.exception_handler(StorageFailed)
    async def storage_failed(request: Request, exc: StorageFailed) -> JSONResponse:
        return _error(request, 503, ErrorCode.STORAGE_FAILED, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}"
            for err in exc.errors()[:5])
        return _error(request, 422, ErrorCode.INVALID_REQUEST, f"Invalid request: {problems}.")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(request, exc.status_code, ErrorCode.HTTP_ERROR, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(request, 500, ErrorCode.INTERNAL_ERROR,
                      "The Archiver hit an unexpected error; see its log.")

    return app


def _refusals_of(scope: dict) -> RefusalAudit | None:
    services = services_of(scope)
    return services.refusals if services is not None else None


def _viewer_of(scope: dict, source: str) -> str | None:
    """The viewer a request's session belongs to (its limits are per viewer, not per session:
    more sessions give no more capacity); None without a valid session."""
    services = services_of(scope)
    if services is None:
        return None
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token:
                session = services.sessions.session(token.strip(), services.archive.clock())
                return f"viewer {session.fingerprint}" if session else None
    return None
