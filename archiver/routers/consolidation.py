"""Consolidation over HTTP (archiver/consolidation.py has the rules): the Archiver-to-Archiver
export, authenticated by the asking Archiver's signature (not by a viewer's or an admin's
token: a viewer must not be able to bulk-download the site's key streams), and the admin's
`consolidate` command."""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from archiver.consolidation import ExportRequest
from archiver.deps import AdminDep, CameraName, CameraPath, ServicesDep
from archiver.routers.streams import MAX_MS

router = APIRouter(prefix="/v1", tags=["consolidation"])


class ExportAsk(BaseModel):
    archiver: CameraName  # an Archiver's name follows the camera-name rule
    camera: CameraName
    from_ms: int = Field(ge=0, le=MAX_MS)
    to_ms: int = Field(ge=0, le=MAX_MS)
    issued_ms: int = Field(ge=0, le=MAX_MS)
    nonce: str = Field(pattern=r"^[0-9a-f]{32}$")
    signature: str = Field(max_length=256)


@router.post("/site/consolidation/export")
async def export(ask: ExportAsk, services: ServicesDep) -> Response:
    """Another Archiver of the site copies this one's records of a range, exactly as signed."""
    body = await run_in_threadpool(services.exporter.answer, ExportRequest(**ask.model_dump()))
    return Response(body, media_type="application/octet-stream")


class ConsolidationDone(BaseModel):
    camera: str
    archiver: str  # this one, which now holds the parts too
    parts: list[dict[str, object]]


@router.post("/admin/cameras/{camera}/consolidate")
async def consolidate(camera: CameraPath, actor: AdminDep, services: ServicesDep,
                      from_ms: int | None = Query(default=None, ge=0, le=MAX_MS),
                      to_ms: int | None = Query(default=None, ge=0, le=MAX_MS)
                      ) -> ConsolidationDone:
    """Fill this Archiver's gaps in ``camera`` from the Archivers that recorded them."""
    outcomes = await run_in_threadpool(services.consolidation.for_admin, actor, camera,
                                       from_ms, to_ms)
    return ConsolidationDone(camera=camera, archiver=services.settings.archiver_name,
                             parts=[o.to_json() for o in outcomes])
