"""Access grants: a viewer grants a recorded range it holds to another enrolled certificate;
an admin approves (or rejects) it; only then may the grantee fetch it and play that range,
and nothing outside it. Two people decide: the grantor who wraps the keys and the admin who
lets the Archiver serve them. Every step is audited.

The Archiver checks the grant's public part (camera, range, grantee, key ids) against its
index and the grantor's key stream, stores the grant as it came, and never sees a key.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

from cryptography import x509
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from archiver.archive import GrantedKeys
from archiver.deps import (
    AdminDep,
    AdminPrincipal,
    AdminPrincipalDep,
    ApiError,
    Services,
    ServicesDep,
    ViewerDep,
)
from archiver.grants import TRANSITIONS, AccessGrantRow, GrantState, GrantStore
from archiver.routers.viewer import MAX_MS, MEDIA_TYPE, NonceQuery, ViewerStream
from keyservice import certs
from keyservice.crypto import split_key_id
from keyservice.errors import FormatError
from keyservice.grants import MAX_GRANT_KEYS, AccessGrant, decode_grant
from keyservice.keyscheme import KeyScheme
from keyservice.wire import ErrorCode

router = APIRouter(prefix="/v1", tags=["grants"])
GrantIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]
# base64 of the largest grant (MAX_GRANT_KEYS entries of 77 bytes, plus its header)
MAX_GRANT_B64 = (MAX_GRANT_KEYS * 77 + 2048) * 4 // 3 + 4


_PAST = {"approve": "approved", "reject": "rejected", "revoke": "revoked"}


def get_grants(request: Request) -> GrantStore:
    return request.app.state.grants


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


def _check_keys(services: ServicesDep, grant: AccessGrant, grantor: str) -> None:
    """Every key id must be the key of a segment of this camera in the granted range, and the
    grantor must hold it in its own key stream: nobody grants what it could not play."""
    db = services.archive.db
    in_range: set[bytes] = set()
    after = -1
    while rows := db.manifests_from(grant.camera, grant.from_ms, grant.to_ms, after):
        for row in rows:
            in_range.update(s.key_id for s in db.segments_of(grant.camera, row.manifest_seq))
        after = rows[-1].manifest_seq
    outside = grant.key_ids - in_range
    if outside:
        raise ApiError(422, ErrorCode.GRANT_OUTSIDE_RANGE,
                       f"The grant carries {len(outside)} key(s) of no segment recorded on camera "
                       f"'{grant.camera}' in its range; grant exactly the keys of that range.")
    # Chain records are indexed by chain id: the first bytes of each minute key's id.
    if any(db.key_record(grantor, split_key_id(key_id)[0]) is None for key_id in grant.key_ids):
        raise ApiError(403, ErrorCode.GRANT_NOT_HELD, "The grant carries keys this viewer never held; "
                       "a viewer can only grant recordings it may play itself.")


@router.post("/grants", status_code=201)
def create_grant(body: GrantCreate, viewer: ViewerDep, services: ServicesDep,
                 request: Request) -> GrantInfo:
    store = get_grants(request)
    archive = services.archive
    try:
        data = base64.b64decode(body.grant, validate=True)
        grant = decode_grant(data)
    except (binascii.Error, ValueError, FormatError) as exc:
        raise ApiError(422, ErrorCode.BAD_GRANT, f"The grant is malformed: {exc}") from None
    if archive.db.camera(grant.camera) is None or not viewer.authorized_on(grant.camera):
        raise ApiError(403, ErrorCode.NOT_AUTHORIZED, f"This viewer may not watch a camera named "
                       f"'{grant.camera}' (or there is none), so it cannot grant it.",
                       fingerprint=viewer.fingerprint)
    grantee_fp = grant.grantee_fingerprint.hex()
    if grantee_fp == viewer.fingerprint:
        raise ApiError(422, ErrorCode.GRANT_TO_SELF, "A viewer cannot grant a range to itself.")
    grantee = archive.db.viewer(grantee_fp)
    if grantee is None or grantee.revoked_ms is not None:
        raise ApiError(404, ErrorCode.UNKNOWN_GRANTEE, "The grantee's certificate is not an enrolled, "
                       "active viewer of this Archiver; ask an admin to run 'fusion-archiver "
                       "clients add' for it (it needs no camera).")
    if KeyScheme(grantee.oaep_hash) is not grant.kind:  # enum members are singletons
        raise ApiError(422, ErrorCode.BAD_GRANT, f"The grant is sealed for {grant.kind.label}, but the "
                       f"grantee's token was enrolled for {KeyScheme(grantee.oaep_hash).label}.")
    _check_keys(services, grant, viewer.fingerprint)
    if store.get(grant.grant_id.hex()) is not None:
        raise ApiError(409, ErrorCode.GRANT_EXISTS, "A grant with this id exists already.")
    now = archive.clock()
    row = AccessGrantRow(grant.grant_id.hex(), grant.camera, grant.from_ms, grant.to_ms,
                         viewer.fingerprint, grantee_fp, len(grant.entries), now,
                         GrantState.PENDING, None, None, body.note)
    # Audited before it exists: what cannot be audited is refused.
    services.audit.record(viewer.fingerprint, "grant.create", now, grant_id=row.grant_id,
                          camera=row.camera, from_ms=row.from_ms, to_ms=row.to_ms,
                          grantee=grantee_fp, keys=row.key_count, note=body.note)
    if not store.add(row, data):
        raise ApiError(409, ErrorCode.GRANT_EXISTS, "A grant with this id exists already.")
    return _info(row)


@router.get("/grants")
def my_grants(viewer: ViewerDep, request: Request) -> list[GrantInfo]:
    """The grants this viewer made or received, in every state."""
    return [_info(r) for r in get_grants(request).select(party=viewer.fingerprint)]


def _usable(store: GrantStore, grant_id: str, viewer: ViewerDep) -> AccessGrantRow:
    """The grant, if it is this viewer's and approved; otherwise a refusal that says why."""
    row = store.get(grant_id)
    if row is None or row.grantee != viewer.fingerprint:
        # One answer for "no such grant" and "not yours".
        raise ApiError(404, ErrorCode.UNKNOWN_GRANT, f"There is no grant {grant_id} for this viewer.",
                       fingerprint=viewer.fingerprint)
    if row.state == GrantState.PENDING:
        raise ApiError(403, ErrorCode.GRANT_PENDING, f"Grant {grant_id} waits for an admin's approval "
                       "('fusion-archiver grants approve').", fingerprint=viewer.fingerprint)
    if row.state == GrantState.REJECTED:
        raise ApiError(403, ErrorCode.GRANT_REJECTED, f"Grant {grant_id} was rejected by an admin.",
                       fingerprint=viewer.fingerprint)
    if row.state == GrantState.REVOKED:
        raise ApiError(403, ErrorCode.GRANT_REVOKED, f"Grant {grant_id} was revoked.",
                       fingerprint=viewer.fingerprint)
    return row


@router.get("/grants/{grant_id}")
def fetch_grant(grant_id: GrantIdPath, viewer: ViewerDep, services: ServicesDep,
                request: Request) -> GrantBlob:
    store = get_grants(request)
    row = _usable(store, grant_id, viewer)
    blob = store.blob(grant_id)
    assert blob is not None
    services.audit.record(viewer.fingerprint, "grant.fetch", services.archive.clock(),
                          grant_id=grant_id)
    return GrantBlob(**_info(row).model_dump(), grant=base64.b64encode(blob).decode())


@router.get("/grants/{grant_id}/recording",
            responses={200: {"content": {MEDIA_TYPE: {}}, "description": "A fusion stream"}})
async def grant_recording(grant_id: GrantIdPath, viewer: ViewerDep, services: ServicesDep,
                          request: Request, from_ms: Annotated[int, Query(ge=0, le=MAX_MS)],
                          to_ms: Annotated[int, Query(ge=0, le=MAX_MS)],
                          nonce: NonceQuery) -> StreamingResponse:
    """A normal fusion stream of [from, to] inside the granted range: the segments whose keys
    the grant carries, the signed manifests and edges, the signed END; no key material."""
    store = get_grants(request)
    row = await run_in_threadpool(_usable, store, grant_id, viewer)
    if to_ms < from_ms:
        raise ApiError(422, ErrorCode.BAD_RANGE, "The end of the range is before its start.")
    if from_ms < row.from_ms or to_ms > row.to_ms:
        raise ApiError(403, ErrorCode.OUTSIDE_GRANT, f"Grant {grant_id} covers camera '{row.camera}' "
                       f"from {row.from_ms} to {row.to_ms} ms only; the request goes outside "
                       "it.", fingerprint=viewer.fingerprint)
    archive = services.archive
    blob = await run_in_threadpool(store.blob, grant_id)
    assert blob is not None
    key_ids = decode_grant(blob).key_ids
    if not await run_in_threadpool(archive.has_recording, row.camera, from_ms, to_ms):
        raise ApiError(404, ErrorCode.NO_RECORDING,
                       f"Camera '{row.camera}' has no recording in the requested range.")
    services.audit.record(viewer.fingerprint, "stream.grant_playback", archive.clock(),
                          grant_id=grant_id, camera=row.camera, from_ms=from_ms, to_ms=to_ms)

    def still_valid() -> bool:
        now = store.get(grant_id)
        grantee = archive.db.viewer(viewer.fingerprint)
        return (now is not None and now.state == GrantState.APPROVED and grantee is not None
                and grantee.revoked_ms is None)

    return ViewerStream(archive.playback(viewer, row.camera, from_ms, to_ms,
                                          bytes.fromhex(nonce), GrantedKeys(key_ids, still_valid)),
                         services.settings.stream_send_timeout_s)


# --- admin ------------------------------------------------------------------------------------
def _is_grantor(principal: AdminPrincipal, grantor: str, services: Services) -> bool:
    """The approving admin is the grantor: the same certificate, or another certificate of the
    same key (one token, two certificates)."""
    if principal.fingerprint is None:
        return False  # the bootstrap token names nobody (docs/security.md says so)
    if principal.fingerprint == grantor:
        return True
    viewer = services.archive.db.viewer(grantor)
    admin = services.admins.store.get(principal.fingerprint) if services.admins else None
    if viewer is None or admin is None:
        return False
    return certs.same_public_key(x509.load_der_x509_certificate(viewer.certificate).public_key(),
                                 x509.load_der_x509_certificate(admin.certificate).public_key())


@router.get("/admin/grants")
def list_grants(actor: AdminDep, request: Request,
                state: Annotated[GrantState | None, Query()] = None) -> list[GrantInfo]:
    return [_info(r) for r in get_grants(request).select(state=state)]


@router.post("/admin/grants/{grant_id}/{decision}")
def decide(grant_id: GrantIdPath, decision: Literal["approve", "reject", "revoke"],
           body: Decision, principal: AdminPrincipalDep, services: ServicesDep,
           request: Request) -> GrantInfo:
    store = get_grants(request)
    actor = principal.actor
    before = store.get(grant_id)
    if before is None:
        raise ApiError(404, ErrorCode.UNKNOWN_GRANT, f"There is no grant {grant_id}.")
    if decision == "approve" and _is_grantor(principal, before.grantor, services):
        # Two people decide: the grantor's own admin identity (the same certificate) cannot be
        # the second one. Rejecting or revoking one's own grant stays allowed.
        raise ApiError(403, ErrorCode.OWN_GRANT, f"Grant {grant_id} was made by this admin's own "
                       "certificate; another admin must approve it.", grant_id=grant_id,
                       fingerprint=before.grantor)
    if before.state not in TRANSITIONS[decision]:
        raise ApiError(409, ErrorCode.GRANT_STATE, f"Grant {grant_id} is {before.state}; it cannot be "
                       f"{_PAST[decision]} now.")
    now = services.archive.clock()
    # The admin's fingerprint beside the grantor's: the two people of the rule, told apart
    # (None: the shared bootstrap token, which names nobody).
    services.audit.record(actor, f"grant.{decision}", now, grant_id=grant_id,
                          camera=before.camera, from_ms=before.from_ms, to_ms=before.to_ms,
                          grantor=before.grantor, grantee=before.grantee, note=body.note,
                          admin_fingerprint=principal.fingerprint)
    after = store.decide(grant_id, decision, actor, now, body.note)
    assert after is not None
    if after.state == before.state:  # decided concurrently by someone else
        raise ApiError(409, ErrorCode.GRANT_STATE, f"Grant {grant_id} was decided meanwhile.")
    return _info(after)
