"""Access grants over HTTP: a viewer sends a grant it made, lists its grants, fetches one it
received and plays its range; an admin lists grants and decides on them. HTTP only: the rules
(who may grant what, two people deciding, the states) are archiver/services/grants.py.
"""

from __future__ import annotations

import base64
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from archiver.deps import (
    AdminDep,
    AdminPrincipalDep,
    GrantsDep,
    RoutingDep,
    SettingsDep,
    ViewerDep,
)
from archiver.grants import AccessGrantRow, GrantState
from archiver.routers.site import Placements, PlacementView, redirect_if_elsewhere
from archiver.routers.streams import STREAM_RESPONSES, NonceQuery, TimeQuery, ViewerStream
from keyservice.grants import MAX_GRANT_KEYS

router = APIRouter(prefix="/v1", tags=["grants"])
GrantIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]
# base64 of the largest grant (MAX_GRANT_KEYS entries of 77 bytes, plus its header)
MAX_GRANT_B64 = (MAX_GRANT_KEYS * 77 + 2048) * 4 // 3 + 4


class GrantCreate(BaseModel):
    grant: str = Field(max_length=MAX_GRANT_B64, description="The encoded grant, base64")
    note: str | None = Field(default=None, max_length=500, description="Why (case number...)")


class GrantInfo(BaseModel):
    grant_id: str
    camera: str
    from_ms: int
    to_ms: int
    grantor: str
    grantee: str
    keys: int
    created_ms: int
    state: GrantState
    decided_ms: int | None
    decided_by: str | None
    note: str | None


class GrantBlob(GrantInfo):
    grant: str


class Decision(BaseModel):
    note: str | None = Field(default=None, max_length=500)


def _info(row: AccessGrantRow) -> GrantInfo:
    return GrantInfo(grant_id=row.grant_id, camera=row.camera, from_ms=row.from_ms,
                     to_ms=row.to_ms, grantor=row.grantor, grantee=row.grantee,
                     keys=row.key_count, created_ms=row.created_ms, state=row.state,
                     decided_ms=row.decided_ms, decided_by=row.decided_by, note=row.note)


@router.post("/grants", status_code=201)
def create_grant(body: GrantCreate, viewer: ViewerDep, grants: GrantsDep) -> GrantInfo:
    return _info(grants.create(viewer, body.grant, body.note))


@router.get("/grants")
def my_grants(viewer: ViewerDep, grants: GrantsDep) -> list[GrantInfo]:
    """The grants this viewer made or received, in every state."""
    return [_info(r) for r in grants.of_viewer(viewer)]


@router.get("/grants/{grant_id}")
def fetch_grant(grant_id: GrantIdPath, viewer: ViewerDep, grants: GrantsDep) -> GrantBlob:
    fetched = grants.fetch(viewer, grant_id)
    return GrantBlob(**_info(fetched.row).model_dump(),
                     grant=base64.b64encode(fetched.blob).decode())


@router.get("/grants/{grant_id}/recording", responses={
    **STREAM_RESPONSES, 307: {"description": "Another Archiver of the site holds the range"}},
    response_model=None)
async def grant_recording(request: Request, grant_id: GrantIdPath, viewer: ViewerDep,
                          grants: GrantsDep, routing: RoutingDep, settings: SettingsDep,
                          from_ms: TimeQuery, to_ms: TimeQuery,
                          nonce: NonceQuery) -> StreamingResponse | JSONResponse:
    """A normal fusion stream of [from, to] inside the granted range: the segments whose keys
    the grant carries, the signed manifests and edges, the signed END; no key material. A
    range another Archiver of the site holds is a 307 to it (grants are the site's)."""
    row = await run_in_threadpool(grants.usable, viewer, grant_id)
    if to_ms >= from_ms and (redirect := await redirect_if_elsewhere(
            request, routing, row.camera, from_ms, to_ms)) is not None:
        return redirect
    stream = await run_in_threadpool(grants.recording, viewer, grant_id, from_ms, to_ms,
                                     bytes.fromhex(nonce))
    return ViewerStream(stream, settings.stream_send_timeout_s)


@router.get("/grants/{grant_id}/placements")
async def grant_placements(grant_id: GrantIdPath, viewer: ViewerDep, grants: GrantsDep,
                           routing: RoutingDep) -> Placements:
    """Which Archiver of the site recorded the grant's range when, for its grantee once an
    admin approved it: a range across a change of Archiver is granted one grant per part, and
    the grantee plays each at the Archiver that recorded it (a grantee needs no camera, so the
    camera's own placements are not its to ask)."""
    row = await run_in_threadpool(grants.usable, viewer, grant_id)
    found = await run_in_threadpool(routing.placements, row.camera, row.from_ms, row.to_ms)
    return Placements(camera=row.camera, archiver=routing.name,
                      placements=[PlacementView(**h.to_json()) for h in found])  # type: ignore[arg-type]


# --- admin ------------------------------------------------------------------------------------
@router.get("/admin/grants")
def list_grants(actor: AdminDep, grants: GrantsDep,
                state: Annotated[GrantState | None, Query()] = None) -> list[GrantInfo]:
    return [_info(r) for r in grants.list(state)]


@router.post("/admin/grants/{grant_id}/{decision}")
def decide(grant_id: GrantIdPath, decision: Literal["approve", "reject", "revoke"],
           body: Decision, principal: AdminPrincipalDep, grants: GrantsDep) -> GrantInfo:
    return _info(grants.decide(principal, grant_id, decision, body.note))
