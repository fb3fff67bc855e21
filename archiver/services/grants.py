"""Access grants, the rules: a viewer grants a recorded range it holds to another enrolled
certificate; an admin approves (or rejects) it; only then may the grantee fetch it and play that
range, and nothing outside it. Two people decide: the grantor who wraps the keys and the admin
who lets the Archiver serve them. Every step is audited, before it takes effect.

The Archiver checks the grant's public part (camera, range, grantee, key ids) against its index
and the grantor's chain records, stores the grant as it came, and never sees a key.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from cryptography import x509

from archiver.admins import AdminPrincipal, AdminStore
from archiver.archive import Archive, GrantedKeys
from archiver.audit import AuditLog
from archiver.directory import ViewerRow
from archiver.grants import TRANSITIONS, AccessGrantRow, GrantState
from archiver.services.refused import Refused
from keyservice import certs
from keyservice.crypto import split_key_id
from keyservice.errors import FormatError
from keyservice.format import ChainRecord, decode_record
from keyservice.grants import AccessGrant, decode_grant
from keyservice.keyscheme import KeyScheme
from keyservice.wire import ErrorCode

Decision = Literal["approve", "reject", "revoke"]
_PAST = {"approve": "approved", "reject": "rejected", "revoke": "revoked"}


@dataclass(frozen=True)
class FetchedGrant:
    """An approved grant as its grantee fetches it: the row and the grant's bytes."""

    row: AccessGrantRow
    blob: bytes


@dataclass
class GrantService:
    archive: Archive
    audit: AuditLog
    admins: AdminStore | None = None  # to tell a grantor's own admin identity

    # --- viewers -------------------------------------------------------------------------
    def create(self, viewer: ViewerRow, grant_b64: str, note: str | None = None
               ) -> AccessGrantRow:
        """Store a grant ``viewer`` made (base64 of the encoded grant), pending an admin."""
        archive = self.archive
        try:
            data = base64.b64decode(grant_b64, validate=True)
            grant = decode_grant(data)
        except (binascii.Error, ValueError, FormatError) as exc:
            raise Refused(ErrorCode.BAD_GRANT, f"The grant is malformed: {exc}") from None
        if archive.directory.camera(grant.camera) is None or not viewer.authorized_on(grant.camera):
            raise Refused(ErrorCode.NOT_AUTHORIZED, f"This viewer may not watch a camera named "
                          f"'{grant.camera}' (or there is none), so it cannot grant it.",
                          fingerprint=viewer.fingerprint)
        grantee_fp = grant.grantee_fingerprint.hex()
        if grantee_fp == viewer.fingerprint:
            raise Refused(ErrorCode.GRANT_TO_SELF, "A viewer cannot grant a range to itself.")
        grantee = archive.directory.viewer(grantee_fp)
        if grantee is None or grantee.revoked_ms is not None:
            raise Refused(ErrorCode.UNKNOWN_GRANTEE, "The grantee's certificate is not an "
                          "enrolled, active viewer of this Archiver; ask an admin to run "
                          "'fusion-archiver viewers add CERTIFICATE --cameras none' for it (it needs no "
                          "camera).")
        if KeyScheme(grantee.oaep_hash) is not grant.kind:  # enum members are singletons
            raise Refused(ErrorCode.BAD_GRANT, f"The grant is sealed for {grant.kind.label}, but the "
                          f"grantee's token was enrolled for {KeyScheme(grantee.oaep_hash).label}.")
        self._check_keys(grant, viewer.fingerprint)
        if archive.directory.access_grant(grant.grant_id.hex()) is not None:
            raise Refused(ErrorCode.GRANT_EXISTS, "A grant with this id exists already.")
        now = archive.clock()
        row = AccessGrantRow(grant.grant_id.hex(), grant.camera, grant.from_ms, grant.to_ms,
                             viewer.fingerprint, grantee_fp, len(grant.entries), now,
                             GrantState.PENDING, None, None, note)
        # Audited before it exists: what cannot be audited is refused.
        self.audit.record(viewer.fingerprint, "grant.create", now, grant_id=row.grant_id,
                          camera=row.camera, from_ms=row.from_ms, to_ms=row.to_ms,
                          grantee=grantee_fp, keys=row.key_count, note=note)
        if not archive.directory.add_access_grant(row, data):
            raise Refused(ErrorCode.GRANT_EXISTS, "A grant with this id exists already.")
        return row

    def _check_keys(self, grant: AccessGrant, grantor: str) -> None:
        """Every key id must be the key of a segment of this camera in the granted range, and
        the grantor must hold it in its own chain records: nobody grants what it could not
        play."""
        db = self.archive.db
        in_range: set[bytes] = set()
        after = -1
        while rows := db.manifests_from(grant.camera, grant.from_ms, grant.to_ms, after):
            for row in rows:
                in_range.update(s.key_id for s in db.segments_of(grant.camera, row.manifest_seq))
            after = rows[-1].manifest_seq
        outside = grant.key_ids - in_range
        if outside:
            raise Refused(ErrorCode.GRANT_OUTSIDE_RANGE,
                          f"The grant carries {len(outside)} key(s) of no segment recorded on "
                          f"camera '{grant.camera}' in its range; grant exactly the keys of that "
                          "range.")
        # Chain records are indexed by chain id: the first bytes of each minute key's id. A
        # viewer that joined a running chain holds its keys from the join's step on only.
        first_steps: dict[bytes, int | None] = {}
        for key_id in grant.key_ids:
            chain_id, step = split_key_id(key_id)
            if chain_id not in first_steps:
                found = db.chain_record(grantor, chain_id)
                record = None if found is None else _chain_record(found[1])
                first_steps[chain_id] = None if record is None else record.first_step
            first = first_steps[chain_id]
            if first is None or step < first:
                raise Refused(ErrorCode.GRANT_NOT_HELD, "The grant carries keys this viewer "
                              "never held; a viewer can only grant recordings it may play "
                              "itself.")

    def of_viewer(self, viewer: ViewerRow) -> list[AccessGrantRow]:
        """The grants this viewer made or received, in every state."""
        return self.archive.directory.access_grants(party=viewer.fingerprint)

    def usable(self, viewer: ViewerRow, grant_id: str) -> AccessGrantRow:
        """The grant, if it is this viewer's and approved; otherwise a refusal that says why."""
        row = self.archive.directory.access_grant(grant_id)
        if row is None or row.grantee != viewer.fingerprint:
            # One answer for "no such grant" and "not yours".
            raise Refused(ErrorCode.UNKNOWN_GRANT, f"There is no grant {grant_id} for this "
                          "viewer.", fingerprint=viewer.fingerprint)
        if row.state == GrantState.PENDING:
            raise Refused(ErrorCode.GRANT_PENDING, f"Grant {grant_id} waits for an admin's "
                          "approval ('fusion-archiver grants approve').",
                          fingerprint=viewer.fingerprint)
        if row.state == GrantState.REJECTED:
            raise Refused(ErrorCode.GRANT_REJECTED, f"Grant {grant_id} was rejected by an admin.",
                          fingerprint=viewer.fingerprint)
        if row.state == GrantState.REVOKED:
            raise Refused(ErrorCode.GRANT_REVOKED, f"Grant {grant_id} was revoked.",
                          fingerprint=viewer.fingerprint)
        return row

    def fetch(self, viewer: ViewerRow, grant_id: str) -> FetchedGrant:
        """An approved grant for its grantee, audited."""
        row = self.usable(viewer, grant_id)
        blob = self.archive.directory.access_grant_blob(grant_id)
        assert blob is not None
        self.audit.record(viewer.fingerprint, "grant.fetch", self.archive.clock(),
                          grant_id=grant_id)
        return FetchedGrant(row, blob)

    def recording(self, viewer: ViewerRow, grant_id: str, from_ms: int, to_ms: int,
                  nonce: bytes) -> Iterator[bytes]:
        """A normal fusion stream of [from, to] inside the granted range: the segments whose
        keys the grant carries, the signed manifests and edges, the signed END; no key
        material. It stops at the next manifest once the grant or its grantee is revoked."""
        row = self.usable(viewer, grant_id)
        if to_ms < from_ms:
            raise Refused(ErrorCode.BAD_RANGE, "The end of the range is before its start.")
        if from_ms < row.from_ms or to_ms > row.to_ms:
            raise Refused(ErrorCode.OUTSIDE_GRANT, f"Grant {grant_id} covers camera "
                          f"'{row.camera}' from {row.from_ms} to {row.to_ms} ms only; the "
                          "request goes outside it.", fingerprint=viewer.fingerprint)
        archive = self.archive
        blob = archive.directory.access_grant_blob(grant_id)
        assert blob is not None
        key_ids = decode_grant(blob).key_ids
        if not archive.has_recording(row.camera, from_ms, to_ms):
            raise Refused(ErrorCode.NO_RECORDING,
                          f"Camera '{row.camera}' has no recording in the requested range.")
        self.audit.record(viewer.fingerprint, "stream.grant_playback", archive.clock(),
                          grant_id=grant_id, camera=row.camera, from_ms=from_ms, to_ms=to_ms)

        def still_valid() -> bool:
            now = archive.directory.access_grant(grant_id)
            grantee = archive.directory.viewer(viewer.fingerprint)
            return (now is not None and now.state == GrantState.APPROVED and grantee is not None
                    and grantee.revoked_ms is None)

        return archive.playback(viewer, row.camera, from_ms, to_ms, nonce,
                                GrantedKeys(key_ids, still_valid))

    # --- admins --------------------------------------------------------------------------
    def list(self, state: GrantState | None = None) -> list[AccessGrantRow]:
        return self.archive.directory.access_grants(state=state)

    def _is_grantor(self, principal: AdminPrincipal, grantor: str) -> bool:
        """The approving admin is the grantor: the same certificate, or another certificate of
        the same key (one token, two certificates)."""
        if principal.fingerprint is None:
            return False  # the bootstrap token names nobody (docs/security.md says so)
        if principal.fingerprint == grantor:
            return True
        viewer = self.archive.directory.viewer(grantor)
        admin = self.admins.get(principal.fingerprint) if self.admins is not None else None
        if viewer is None or admin is None:
            return False
        return certs.same_public_key(
            x509.load_der_x509_certificate(viewer.certificate).public_key(),
            x509.load_der_x509_certificate(admin.certificate).public_key())

    def decide(self, principal: AdminPrincipal, grant_id: str, decision: Decision,
               note: str | None = None) -> AccessGrantRow:
        """An admin's decision on a grant: approve or reject a pending one, revoke a pending or
        approved one. The grantor's own admin identity cannot approve."""
        directory = self.archive.directory
        before = directory.access_grant(grant_id)
        if before is None:
            raise Refused(ErrorCode.UNKNOWN_GRANT, f"There is no grant {grant_id}.")
        if decision == "approve" and self._is_grantor(principal, before.grantor):
            # Two people decide: the grantor's own admin identity (the same certificate) cannot
            # be the second one. Rejecting or revoking one's own grant stays allowed.
            raise Refused(ErrorCode.OWN_GRANT, f"Grant {grant_id} was made by this admin's own "
                          "certificate; another admin must approve it.", grant_id=grant_id,
                          fingerprint=before.grantor)
        if before.state not in TRANSITIONS[decision]:
            raise Refused(ErrorCode.GRANT_STATE, f"Grant {grant_id} is {before.state}; it cannot "
                          f"be {_PAST[decision]} now.")
        now = self.archive.clock()
        # The admin's fingerprint beside the grantor's: the two people of the rule, told apart
        # (None: the shared bootstrap token, which names nobody).
        self.audit.record(principal.actor, f"grant.{decision}", now, grant_id=grant_id,
                          camera=before.camera, from_ms=before.from_ms, to_ms=before.to_ms,
                          grantor=before.grantor, grantee=before.grantee, note=note,
                          admin_fingerprint=principal.fingerprint)
        after = directory.decide_access_grant(grant_id, decision, principal.actor, now, note)
        assert after is not None
        if after.state == before.state:  # decided concurrently by someone else
            raise Refused(ErrorCode.GRANT_STATE, f"Grant {grant_id} was decided meanwhile.")
        return after


def _chain_record(raw: bytes) -> ChainRecord | None:
    try:
        record = decode_record(raw)
    except FormatError:  # a damaged index row holds nothing
        return None
    return record if isinstance(record, ChainRecord) else None
