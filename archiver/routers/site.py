"""The site as a viewer sees it (issue 21, item 3): where a camera's range was recorded (its
placements, each with its Archiver's name and URL), the site's Archivers, and the redirect a
stream request gets when another Archiver holds its range. HTTP only: the rules are
archiver/services/routing.py.

Redirect, not proxy: the viewer fetches the ciphertext from the Archiver that signed it, so no
Archiver carries (or could alter) another's streams, and none becomes a bottleneck.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from archiver.deps import CameraPath, CamerasDep, RoutingDep, ViewerDep
from archiver.routers.streams import MAX_MS
from archiver.services.routing import Holder, RoutingService
from keyservice.identity import fingerprint
from keyservice.wire import ErrorCode

router = APIRouter(prefix="/v1", tags=["site"])


class CopyView(BaseModel):
    archiver: str
    url: str | None


class PlacementView(BaseModel):
    archiver: str
    url: str | None
    since_ms: int
    until_ms: int | None
    copies: list[CopyView] = Field(default_factory=list, description=(
        "Every Archiver that holds a copy of this range, in the camera's order (more than "
        "one: a redundant camera, each copy signed by its own Archiver)"))


class Placements(BaseModel):
    """Who recorded a camera in a range, oldest first (``archiver``: the one that answers)."""

    camera: str
    archiver: str
    placements: list[PlacementView]


class SiteArchiver(BaseModel):
    name: str
    url: str
    fingerprint: str
    certificate: str
    heartbeat_ms: int | None


def held_elsewhere(request: Request, camera: str, holder: Holder) -> JSONResponse:
    """307 to the holder's URL with the same path and query (the viewer's nonce with it), and
    a body naming the holder: the viewer checks it before it follows."""
    assert holder.url is not None
    target = holder.url.rstrip("/") + request.url.path
    if request.url.query:
        target += "?" + request.url.query
    return JSONResponse(
        {"error": ErrorCode.HELD_ELSEWHERE, "archiver": holder.archiver, "url": holder.url,
         "message": f"Camera '{camera}''s range is held by Archiver '{holder.archiver}' at "
                    f"{holder.url}; ask it there."},
        status_code=307, headers={"Location": target})


async def redirect_if_elsewhere(request: Request, routing: RoutingService, camera: str,
                                from_ms: int | None, to_ms: int | None) -> JSONResponse | None:
    """None when this Archiver answers [from_ms, to_ms] itself; else the 307 to the one that
    holds it (a range of several Archivers, or an unknown holder, is a Refused)."""
    route = await run_in_threadpool(routing.route, camera, from_ms, to_ms)
    if route.local:
        return None
    return held_elsewhere(request, camera, routing.check(camera, route))


@router.get("/cameras/{camera}/placements")
async def placements(camera: CameraPath, viewer: ViewerDep, cameras: CamerasDep,
                     routing: RoutingDep,
                     from_ms: int | None = Query(default=None, ge=0, le=MAX_MS),
                     to_ms: int | None = Query(default=None, ge=0, le=MAX_MS)) -> Placements:
    """Which Archiver of the site recorded the camera when, in [from_ms, to_ms] (all of its
    history without bounds): a viewer plays each part from its Archiver."""
    await run_in_threadpool(cameras.authorize, viewer, camera)
    found = await run_in_threadpool(routing.placements, camera, from_ms, to_ms)
    return Placements(camera=camera, archiver=routing.name,
                      placements=[PlacementView(**h.to_json()) for h in found])  # type: ignore[arg-type]


@router.get("/site/archivers")
async def site_archivers(viewer: ViewerDep, routing: RoutingDep) -> list[SiteArchiver]:
    """The site's Archivers (the registry): the only URLs a viewer follows a redirect to."""
    rows = await run_in_threadpool(routing.archivers)
    out = []
    for row in rows:
        try:
            cert = x509.load_der_x509_certificate(row.certificate)
        except ValueError:
            continue  # a registry row without a usable certificate is no Archiver to follow
        out.append(SiteArchiver(name=row.name, url=row.url, fingerprint=fingerprint(cert).hex(),
                                certificate=cert.public_bytes(Encoding.PEM).decode(),
                                heartbeat_ms=row.heartbeat_ms))
    return out
