"""The audit log over HTTP, for admins: the site's (every Archiver's entries, each named by its
Archiver) in a site, this Archiver's own file standalone. archiver/audit.py reads it."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from archiver.deps import AdminDep, ServicesDep
from keyservice.names import CAMERA_NAME_PATTERN

router = APIRouter(prefix="/v1/admin", tags=["admin"])


class AuditEntryInfo(BaseModel):
    archiver: str = Field(description="The Archiver that wrote it")
    seq: int = Field(description="Its line in that Archiver's audit.jsonl")
    ts_ms: int
    actor: str
    action: str
    entry: dict[str, Any] = Field(description="The line as written (hash-chained: 'prev')")


class AuditLogInfo(BaseModel):
    site: bool = Field(description="True: the site's log (the directory); false: this "
                       "Archiver's file")
    entries: list[AuditEntryInfo]


@router.get("/audit")
async def audit_log(
    services: ServicesDep, _actor: AdminDep,
    since_ms: Annotated[int, Query(ge=0)] = 0,
    # An Archiver name follows the camera-name rule (archiver/settings.py).
    archiver: Annotated[str | None, Query(pattern=CAMERA_NAME_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> AuditLogInfo:
    reader = services.audit_log
    # A file or a directory query: off the event loop.
    entries = await asyncio.to_thread(reader.entries, since_ms, archiver, limit)
    return AuditLogInfo(site=reader.site, entries=[
        AuditEntryInfo(archiver=e.archiver, seq=e.seq, ts_ms=e.ts_ms, actor=e.actor,
                       action=e.action, entry=e.entry) for e in entries])
