"""The Archiver's answers that a stream's start does not read (issue 23, start-up): the
camera list, the site's registry, access grants. client.session returns them and re-exports
them; they are defined here so that ``play`` does not build their classes on its way to the
first byte.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keyservice.errors import ArchiverFailed

if TYPE_CHECKING:
    from cryptography import x509

__all__ = ["CameraView", "GrantBlob", "GrantInfo", "SiteArchiver"]


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class CameraView:
    """A camera this viewer may watch, with its recorded range (None when nothing recorded)."""

    name: str
    first_ms: int | None
    last_ms: int | None
    segments: int
    state: str  # the camera's feed: receiving, stalled, unreachable, auth_failed, waiting
    archiver: str | None = None  # the site's Archiver that records it now (None: before sites)


@dataclass(frozen=True)
class SiteArchiver:
    """An Archiver of the site as the registry lists it: name, URL, signing certificate."""

    name: str
    url: str
    fingerprint: str
    certificate: x509.Certificate = field(repr=False)


@dataclass(frozen=True)
class GrantInfo:
    """An access grant as the Archiver describes it (its state is the Archiver's; the keys
    inside are opaque to it)."""

    grant_id: str
    camera: str
    from_ms: int
    to_ms: int
    grantor: str   # certificate fingerprints (hex)
    grantee: str
    keys: int
    created_ms: int
    state: str     # pending, approved, rejected, revoked
    decided_ms: int | None = None
    decided_by: str | None = None
    note: str | None = None

    @classmethod
    def from_json(cls, body: Any) -> GrantInfo:
        """From the Archiver's JSON; ArchiverFailed if it is not a grant's description."""
        try:
            return cls(str(body["grant_id"]), str(body["camera"]), int(body["from_ms"]),
                       int(body["to_ms"]), str(body["grantor"]), str(body["grantee"]),
                       int(body["keys"]), int(body["created_ms"]), str(body["state"]),
                       _optional_int(body.get("decided_ms")), _optional_str(body.get("decided_by")),
                       _optional_str(body.get("note")))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ArchiverFailed("The Archiver's description of a grant is malformed.") from None

    def to_json(self) -> dict[str, Any]:
        """The same members the Archiver sent."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GrantBlob:
    """An approved grant fetched by its grantee: the description and the grant's bytes."""

    info: GrantInfo
    grant: bytes = field(repr=False)
