"""The Archiver's signed statement that a requested range expired (HTTP 410).

Without a signature, "expired" is only the Archiver's word: a hostile or compromised
Archiver (or anyone on the wire) could claim it for video it withholds. The statement names
the camera, the requested range and the viewer's request nonce (so it answers this request
and no other), every stretch retention removed that overlaps the range with the rule that
removed it and when, and is signed with the Archiver's signing key (the one viewers pin).

Pure: bytes in, bytes out. The signature is over ``LABEL || canonical JSON``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from keyservice.errors import IntegrityError, KeyServiceError
from keyservice.exitcodes import ExitCode
from keyservice.identity import Signer
from keyservice.keyscheme import signing_public_key
from keyservice.labels import LABEL_EXPIRY_STATEMENT

LABEL = LABEL_EXPIRY_STATEMENT
# Bounds on an untrusted statement (a 410 body from the network).
MAX_STATEMENT = 64 * 1024
MAX_STRETCHES = 1000


class ExpiryUnproven(KeyServiceError):
    """A 410 whose expiry statement is missing, malformed, not for this request, or not
    signed by the pinned Archiver: the range is withheld, not shown to have expired."""

    exit_code = ExitCode.EXPIRY_UNPROVEN


@dataclass(frozen=True)
class Expired:
    """One stretch retention removed: its time span, the rule ("retention" or "disk space"),
    when it was removed, and for "retention" the camera's retention period (days) in force
    when the Archiver answered."""

    from_ms: int
    to_ms: int
    reason: str
    removed_ms: int
    retention_days: int | None = None


@dataclass(frozen=True)
class ExpiryStatement:
    camera: str
    from_ms: int  # the requested range
    to_ms: int
    nonce: str  # the request's nonce (hex)
    made_ms: int  # the Archiver's clock when it answered
    expired: tuple[Expired, ...]

    def payload(self) -> bytes:
        """The canonical JSON the signature covers (after LABEL)."""
        return json.dumps({
            "camera": self.camera, "from_ms": self.from_ms, "to_ms": self.to_ms,
            "nonce": self.nonce, "made_ms": self.made_ms,
            "expired": [{"from_ms": e.from_ms, "to_ms": e.to_ms, "reason": e.reason,
                         "removed_ms": e.removed_ms, "retention_days": e.retention_days}
                        for e in self.expired],
        }, sort_keys=True, separators=(",", ":")).encode()


def sign_statement(signer: Signer, statement: ExpiryStatement) -> dict[str, str]:
    """The ``expiry`` member of the 410 body: the payload and its signature (base64)."""
    payload = statement.payload()
    return {"statement": base64.b64encode(payload).decode(),
            "signature": base64.b64encode(signer.sign(LABEL + payload)).decode()}


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("not a non-negative integer")
    return value


def verify_statement(signed: Any, archiver: x509.Certificate, *, camera: str, from_ms: int,
                     to_ms: int, nonce: bytes) -> ExpiryStatement:
    """The statement of a 410 body's ``expiry`` member, if the pinned Archiver signed it for
    exactly this request (camera, range, nonce) and it names a removed stretch overlapping
    the range. Raises ExpiryUnproven with the reason otherwise."""
    if not isinstance(signed, dict):
        raise ExpiryUnproven("The Archiver answered 'expired' without a signed statement.")
    try:
        payload = base64.b64decode(str(signed["statement"]), validate=True)
        signature = base64.b64decode(str(signed["signature"]), validate=True)
    except (KeyError, ValueError, binascii.Error):
        raise ExpiryUnproven("The Archiver's expiry statement is malformed.") from None
    if len(payload) > MAX_STATEMENT:
        raise ExpiryUnproven("The Archiver's expiry statement is too large.")
    try:
        key = signing_public_key(archiver)
        key.verify(signature, LABEL + payload, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, IntegrityError):
        raise ExpiryUnproven("The expiry statement is not signed by the pinned Archiver "
                             "certificate: the claim is unproven.") from None
    try:
        doc = json.loads(payload)
        stretches = doc["expired"]
        if not isinstance(stretches, list) or len(stretches) > MAX_STRETCHES:
            raise ValueError("bad list")
        statement = ExpiryStatement(
            camera=str(doc["camera"]), from_ms=_int(doc["from_ms"]), to_ms=_int(doc["to_ms"]),
            nonce=str(doc["nonce"]), made_ms=_int(doc["made_ms"]),
            expired=tuple(Expired(_int(e["from_ms"]), _int(e["to_ms"]), str(e["reason"]),
                                  _int(e["removed_ms"]),
                                  None if e.get("retention_days") is None
                                  else _int(e["retention_days"]))
                          for e in stretches))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ExpiryUnproven("The Archiver's signed expiry statement is malformed.") from None
    if (statement.camera != camera or (statement.from_ms, statement.to_ms) != (from_ms, to_ms)
            or not hmac.compare_digest(statement.nonce, nonce.hex())):
        raise ExpiryUnproven("The signed expiry statement answers another request (camera, "
                             "range or nonce): it was replayed.")
    if not any(e.from_ms <= to_ms and e.to_ms >= from_ms for e in statement.expired):
        raise ExpiryUnproven("The signed expiry statement names no removed video in the "
                             "requested range.")
    return statement
