"""Access grants on the Archiver: stored as opaque ciphertext, served only once an admin
approved them, until revoked. Their states and the admin decisions allowed in each; the table
(``access_grants``) is the site directory's (archiver/directory/store.py reads and writes it),
and the rules are archiver/services/grants.py. Nothing secret is stored: a grant's minute keys
are wrapped under a KEK sealed to the grantee's certificate (keyservice/grants.py); the
Archiver reads only the public part.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class GrantState(enum.StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    REVOKED = "revoked"


# Which decisions an admin may take in which state: approval and rejection are final for a
# pending grant; revocation ends a pending or approved one.
TRANSITIONS: dict[str, tuple[GrantState, ...]] = {
    "approve": (GrantState.PENDING,),
    "reject": (GrantState.PENDING,),
    "revoke": (GrantState.PENDING, GrantState.APPROVED),
}
RESULT = {"approve": GrantState.APPROVED, "reject": GrantState.REJECTED,
          "revoke": GrantState.REVOKED}


@dataclass(frozen=True)
class AccessGrantRow:
    grant_id: str
    camera: str
    from_ms: int
    to_ms: int
    grantor: str
    grantee: str
    key_count: int
    created_ms: int
    state: GrantState
    decided_ms: int | None
    decided_by: str | None
    note: str | None
