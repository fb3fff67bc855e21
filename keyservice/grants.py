"""Access grants: a viewer hands the minute keys of a recorded range to another certificate.

A grant is one self-contained blob (specified in docs/spec/fusion-stream-v1.md, "Access
grants"): a random grant KEK wrapped to the grantee's ``Recipient`` exactly like an epoch
opener (``keyservice.keyscheme``, under the grant's own wrap context), then each minute key wrapped
under that KEK with AES-256-GCM, its associated data binding the grant id, the grantee, the
camera, the range, the data stream and the key id. The public part (who, which camera, which
range, which key ids) is in the clear so that the Archiver can check and enforce it; the keys
are opaque to it.

A grant needs no signature: whoever holds the grantee's public certificate can make one, but
the keys it carries are used only if they match the Archiver's signed key commitments, so a
forged grant can only fail to play, never show other video.

Pure: no I/O, no ``pkcs11``.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyservice.crypto.segments import Rng
from keyservice.errors import FormatError, IntegrityError, NoMatchingIdentity
from keyservice.format import ID_LEN, KEY_LEN, NONCE_LEN, DataStream, validate_name
from keyservice.identity import fingerprint
from keyservice.keyscheme import Identity, KeyScheme, Recipient, WrappedKey
from keyservice.labels import LABEL_GRANT_KEY, grant_kek_context

GRANT_MAGIC = b"FUSNGRNT"
GRANT_VERSION = 1
# A grant's KEK is wrapped under a context of its own (keyservice.labels.grant_kek_context):
# it can never be opened as an epoch opener or a login challenge, nor either of those as a grant.
# One grant carries at most this many minute keys (about 5.7 days of one data stream at 60 s
# key periods); the encoding stays below 1 MiB in base64. Larger ranges: several grants.
MAX_GRANT_KEYS = 8192
MAX_SEALED_LEN = 1024
FP_LEN = 32
ENTRY_LEN = 1 + ID_LEN + NONCE_LEN + KEY_LEN + 16  # stream, key id, nonce, key + GCM tag

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_VERSION = _U16.pack(GRANT_VERSION)


@dataclass(frozen=True)
class GrantKey:
    """One minute key of a granted range: the key of ``key_id`` on a camera's data stream."""

    stream: DataStream
    key_id: bytes
    key: bytes = field(repr=False)  # secret: never in logs or tracebacks

    def __post_init__(self) -> None:
        object.__setattr__(self, "stream", DataStream(self.stream))
        if len(self.key_id) != ID_LEN or len(self.key) != KEY_LEN:
            raise ValueError("A granted minute key has a 16-byte id and a 32-byte key.")


@dataclass(frozen=True)
class GrantEntry:
    """A wrapped minute key as it travels (opaque without the grant KEK)."""

    stream: DataStream
    key_id: bytes
    nonce: bytes
    wrapped: bytes


@dataclass(frozen=True)
class AccessGrant:
    """The decoded grant: its public part and the wrapped keys."""

    grant_id: bytes
    grantee_fingerprint: bytes
    kind: KeyScheme  # how the grant KEK is wrapped: the grantee's key scheme
    camera: str
    from_ms: int
    to_ms: int
    created_ms: int
    sealed_kek: bytes
    entries: tuple[GrantEntry, ...]

    @property
    def key_ids(self) -> frozenset[bytes]:
        return frozenset(e.key_id for e in self.entries)


@dataclass(frozen=True)
class OpenedGrant:
    """A grant opened by its grantee: the minute keys by key id (each still to be checked
    against the Archiver's signed key commitment before use, as StreamReader does)."""

    grant_id: bytes
    camera: str
    from_ms: int
    to_ms: int
    keys: dict[bytes, bytes] = field(repr=False)


def _str8(name: str) -> bytes:
    raw = name.encode("ascii")
    return bytes((len(raw),)) + raw


def grant_key_ad(grant_id: bytes, grantee_fingerprint: bytes, camera: str, from_ms: int,
                 to_ms: int, created_ms: int, stream: DataStream, key_id: bytes) -> bytes:
    """Binds a wrapped key to its grant, grantee, camera, range, data stream and key id: it
    cannot be moved to another grant or grantee, nor relabelled for another camera or key, and
    the public part the grantee is shown cannot be altered."""
    return b"".join((LABEL_GRANT_KEY, _VERSION, grant_id, grantee_fingerprint, _str8(camera),
                     _U64.pack(from_ms), _U64.pack(to_ms), _U64.pack(created_ms),
                     bytes((stream,)), key_id))


def _check_range(camera: str, from_ms: int, to_ms: int) -> None:
    validate_name(camera)
    if not (0 <= from_ms <= to_ms < 2**63):
        raise FormatError("A grant's range must be 0 <= from <= to < 2^63 ms.")


def make_grant(recipient: Recipient, camera: str, from_ms: int, to_ms: int,
               keys: Iterable[GrantKey], created_ms: int, rng: Rng = os.urandom) -> bytes:
    """Wrap ``keys`` (the minute keys of the range's segments) for ``recipient``. Returns the
    encoded grant; its id is ``decode_grant(...).grant_id``."""
    _check_range(camera, from_ms, to_ms)
    keys = list(keys)
    if not keys:
        raise ValueError("A grant carries at least one minute key.")
    if len(keys) > MAX_GRANT_KEYS:
        raise ValueError(f"A grant carries at most {MAX_GRANT_KEYS} minute keys; split the "
                         "range into several grants.")
    if len({k.key_id for k in keys}) != len(keys):
        raise ValueError("A grant names each key id once.")
    grant_id = rng(ID_LEN)
    kek = rng(KEY_LEN)
    grantee = recipient.fingerprint
    sealed = recipient.wrap(kek, grant_kek_context(grant_id), rng)
    aead = AESGCM(kek)
    entries = []
    for k in keys:
        nonce = rng(NONCE_LEN)  # random: at most MAX_GRANT_KEYS wraps under one fresh KEK
        ad = grant_key_ad(grant_id, grantee, camera, from_ms, to_ms, created_ms, k.stream,
                          k.key_id)
        entries.append(GrantEntry(k.stream, k.key_id, nonce, aead.encrypt(nonce, k.key, ad)))
    return encode_grant(AccessGrant(grant_id, grantee, sealed.scheme, camera, from_ms,
                                    to_ms, created_ms, sealed.body, tuple(entries)))


def encode_grant(grant: AccessGrant) -> bytes:
    parts = [GRANT_MAGIC, _VERSION, grant.grant_id, grant.grantee_fingerprint,
             bytes((int(grant.kind),)), _str8(grant.camera), _U64.pack(grant.from_ms),
             _U64.pack(grant.to_ms), _U64.pack(grant.created_ms),
             _U16.pack(len(grant.sealed_kek)), grant.sealed_kek, _U32.pack(len(grant.entries))]
    for e in grant.entries:
        parts += [bytes((e.stream,)), e.key_id, e.nonce, e.wrapped]
    return b"".join(parts)


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise FormatError("The grant ends in the middle of a field.")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u(self, s: struct.Struct) -> int:
        return s.unpack(self.take(s.size))[0]


def decode_grant(data: bytes) -> AccessGrant:
    """Parse a grant exactly (no bytes missing or left over); FormatError if malformed. Checks
    the form only: opening (``open_grant``) authenticates the keys."""
    c = _Cursor(bytes(data))
    if c.take(len(GRANT_MAGIC)) != GRANT_MAGIC:
        raise FormatError("This is not a fusion access grant (bad magic).")
    if c.u(_U16) != GRANT_VERSION:
        raise FormatError("Unknown access grant version.")
    grant_id = c.take(ID_LEN)
    grantee = c.take(FP_LEN)
    try:
        kind = KeyScheme(c.take(1)[0])
    except ValueError:
        raise FormatError("Unknown key-sealing kind in the grant.") from None
    name_len = c.take(1)[0]
    try:
        camera = c.take(name_len).decode("ascii")
    except UnicodeDecodeError:
        raise FormatError("The grant's camera name is not ASCII.") from None
    from_ms, to_ms, created_ms = c.u(_U64), c.u(_U64), c.u(_U64)
    _check_range(camera, from_ms, to_ms)
    sealed_len = c.u(_U16)
    if not 1 <= sealed_len <= MAX_SEALED_LEN:
        raise FormatError("The grant's sealed key is empty or too long.")
    sealed = c.take(sealed_len)
    count = c.u(_U32)
    if not 1 <= count <= MAX_GRANT_KEYS:
        raise FormatError(f"A grant carries 1 to {MAX_GRANT_KEYS} keys.")
    if len(c.data) - c.pos != count * ENTRY_LEN:
        raise FormatError("The grant's key entries do not match their count.")
    entries = []
    for _ in range(count):
        try:
            stream = DataStream(c.take(1)[0])
        except ValueError:
            raise FormatError("Unknown data stream in the grant.") from None
        entries.append(GrantEntry(stream, c.take(ID_LEN), c.take(NONCE_LEN),
                                  c.take(KEY_LEN + 16)))
    if len({e.key_id for e in entries}) != len(entries):
        raise FormatError("The grant names a key id twice.")
    return AccessGrant(grant_id, grantee, kind, camera, from_ms, to_ms, created_ms, sealed,
                       tuple(entries))


def open_grant(identity: Identity, data: bytes) -> OpenedGrant:
    """The grantee's side: one unwrap on the token (RSA-OAEP decryption or ECDH) opens the
    grant KEK, then every key unwraps or the whole grant is refused (IntegrityError)."""
    grant = decode_grant(data)
    if not hmac.compare_digest(grant.grantee_fingerprint, fingerprint(identity.certificate)):
        raise NoMatchingIdentity(
            f"This grant is for certificate {grant.grantee_fingerprint.hex()[:16]}..., not for "
            "yours; open it with the token of the certificate it was granted to.")
    kek = identity.unwrap(WrappedKey(grant.kind, grant.sealed_kek),
                          grant_kek_context(grant.grant_id))
    aead = AESGCM(kek)
    keys: dict[bytes, bytes] = {}
    for e in grant.entries:
        ad = grant_key_ad(grant.grant_id, grant.grantee_fingerprint, grant.camera,
                          grant.from_ms, grant.to_ms, grant.created_ms, e.stream, e.key_id)
        try:
            keys[e.key_id] = aead.decrypt(e.nonce, e.wrapped, ad)
        except InvalidTag:
            raise IntegrityError() from None
    return OpenedGrant(grant.grant_id, grant.camera, grant.from_ms, grant.to_ms, keys)
