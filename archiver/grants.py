"""Access grants on the Archiver: stored as opaque ciphertext, served only once an admin
approved them, until revoked.

Kept apart from db.py on purpose (its own table and connection on the same SQLite file) so
that it can be folded into the schema's migrations later without touching the index. Nothing
secret is stored: a grant's minute keys are wrapped under a KEK sealed to the grantee's
certificate (keyservice/grants.py); the Archiver reads only the public part.
"""

from __future__ import annotations

import enum
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from archiver.storage import IndexConnection


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


_SELECT = ("SELECT grant_id, camera, from_ms, to_ms, grantor, grantee, key_count, created_ms, "
           "state, decided_ms, decided_by, note FROM access_grants")


def _row(values: tuple) -> AccessGrantRow:
    return AccessGrantRow(*values[:8], GrantState(values[8]), *values[9:])


class GrantStore:
    def __init__(self, path: Path) -> None:
        self._index = IndexConnection(path, "grant")

    def close(self) -> None:
        self._index.close()

    def _execute(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        return self._index.execute(sql, args)

    def add(self, row: AccessGrantRow, blob: bytes) -> bool:
        """False if a grant with this id exists already."""
        try:
            self._execute("INSERT INTO access_grants (grant_id, camera, from_ms, to_ms, grantor, "
                          "grantee, key_count, created_ms, state, decided_ms, decided_by, note, "
                          "blob) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          (row.grant_id, row.camera, row.from_ms, row.to_ms, row.grantor,
                           row.grantee, row.key_count, row.created_ms, str(row.state),
                           row.decided_ms, row.decided_by, row.note, blob))
        except sqlite3.IntegrityError:
            return False
        return True

    def get(self, grant_id: str) -> AccessGrantRow | None:
        found = self._execute(_SELECT + " WHERE grant_id = ?", (grant_id,)).fetchone()
        return _row(found) if found else None

    def blob(self, grant_id: str) -> bytes | None:
        found = self._execute("SELECT blob FROM access_grants WHERE grant_id = ?",
                              (grant_id,)).fetchone()
        return bytes(found[0]) if found else None

    def select(self, state: GrantState | None = None,
             party: str | None = None) -> list[AccessGrantRow]:
        """All grants (newest first), or those in ``state``, or those ``party`` made or got."""
        sql, args = _SELECT + " WHERE 1=1", []
        if state is not None:
            sql += " AND state = ?"
            args.append(str(state))
        if party is not None:
            sql += " AND (grantor = ? OR grantee = ?)"
            args += [party, party]
        rows = self._execute(sql + " ORDER BY created_ms DESC, grant_id", tuple(args)).fetchall()
        return [_row(r) for r in rows]

    def decide(self, grant_id: str, decision: str, actor: str, now_ms: int,
               note: str | None) -> AccessGrantRow | None:
        """Apply an admin decision if the grant is in a state that allows it; returns the grant
        as it is afterwards (unchanged if the decision did not apply), None if unknown."""
        allowed = [str(s) for s in TRANSITIONS[decision]]
        allowed += allowed[-1:] * (2 - len(allowed))  # two placeholders, whatever the decision
        self._execute("UPDATE access_grants SET state = ?, decided_ms = ?, decided_by = ?, "
                      "note = COALESCE(?, note) WHERE grant_id = ? AND state IN (?, ?)",
                      (str(RESULT[decision]), now_ms, actor, note, grant_id, *allowed))
        return self.get(grant_id)
