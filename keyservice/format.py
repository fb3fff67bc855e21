"""The records of a fusion stream, version 2: dataclasses, exact encoding and strict decoding.

The byte layout is specified in ``docs/spec/fusion-stream-v2.md``; this module is its single
implementation of the record codec (cutting a byte stream into records, buffers and the
transcript hash are ``keyservice.framing``). Every model validates itself on construction,
so a decoded record is always well-formed and an encoder can never emit a malformed one.
Decoding is strict: every length is checked against its bound *before* anything is buffered or
sliced, trailing bytes are an error, and every failure is a
:class:`~keyservice.errors.FormatError` (never ``struct.error``, ``IndexError`` or
``UnicodeDecodeError``): a malformed stream produces one clean error.

Pure: no I/O, no cryptography beyond SHA-256 of record bytes.
"""

from __future__ import annotations

import copy
import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

from keyservice.errors import FormatError
from keyservice.keyscheme import KeyScheme
from keyservice.labels import LABEL_CHAIN_JOIN as LABEL_CHAIN_JOIN
from keyservice.labels import LABEL_CHAIN_RECIPIENTS as LABEL_CHAIN_RECIPIENTS
from keyservice.labels import LABEL_END as LABEL_END
from keyservice.labels import LABEL_MANIFEST as LABEL_MANIFEST
from keyservice.labels import LABEL_TRANSCRIPT as LABEL_TRANSCRIPT
from keyservice.names import camera_name_in_record as validate_name
from keyservice.records import FrozenRecord

MAGIC = b"FUSNSTRM"
VERSION = 2
PREFIX_LEN = len(MAGIC) + 2
RECORD_HEADER_LEN = 5  # type u8 + length u32
# Bounds on a record body: a reader refuses a length above them before buffering the body,
# so a hostile stream cannot make it allocate more than one bounded record at a time.
MAX_SEGMENT_BODY = 64 * 2**20
MAX_SMALL_BODY = 64 * 2**10
ZERO_HASH = bytes(32)

TAG_LEN = 16  # AES-GCM tag, the last bytes of a segment's ciphertext
ID_LEN = 16  # request ids, epoch ids, key ids
# Format v2: a minute key's id is its chain's id followed by its step in the chain (u32 BE), so
# a reader finds the chain of any key id without a table (see keyservice.crypto.KeyChain).
CHAIN_ID_LEN = 12
STEP_LEN = ID_LEN - CHAIN_ID_LEN
HASH_LEN = 32  # SHA-256 fingerprints, hashes, HMACs
NONCE_LEN = 12
KEY_LEN = 32
WRAPPED_KEY_LEN = KEY_LEN + TAG_LEN
MAX_CAMERAS = 255
MAX_OPENER_CIPHERTEXT = 1024  # RSA up to 8192 bits
MAX_SIGNATURE = 1024
MAX_PERIOD_S = 86400  # a key period never exceeds the epoch's day

SEGMENT_LAST = 0x01  # SEGMENT flags bit 0: the last segment of the recording
MANIFEST_LAST = 0x01  # MANIFEST flags bit 0: the last manifest of the recording

# Viewers one chain-recipients part can list: 32 bytes each within a 64 KiB record. More
# viewers are listed in several parts (part i of n), each signed on its own.
MAX_RECIPIENTS_PER_PART = 2000
MAX_RECIPIENT_PARTS = 0xFFFF

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
RECORD_HEADER = struct.Struct(">BI")
_SEGMENT_FIXED = struct.Struct(">BQQI16sB")  # stream, seq, capture_ms, duration_ms, key_id, flags
_ENTRY = struct.Struct(">BQQI16s16s32s")  # stream, seq, capture_ms, duration_ms, key_id, tag, digest
_MANIFEST_FIXED = struct.Struct(">Q32sQBH")  # manifest_seq, prev_hash, issued_ms, flags, count
_COMMITMENT = struct.Struct(">16s32s")  # key_id, commitment
_PREFIX = MAGIC + _U16.pack(VERSION)


class RecordType(IntEnum):
    HEADER = 1
    EPOCH_OPENER = 2
    CHAIN_RECORD = 3
    SEGMENT = 4
    MANIFEST = 5
    END = 6
    CHAIN_RECIPIENTS = 7


class DataStream(IntEnum):
    VIDEO = 0  # video or muxed MPEG-TS
    AUDIO = 1
    METADATA = 2


class Mode(IntEnum):
    PLAYBACK = 1
    LIVE = 2


class EndReason(IntEnum):
    RANGE_COMPLETE = 1
    LIVE_ENDED = 2


def stream_prefix() -> bytes:
    """The first ten bytes of every version-2 fusion stream: magic and version."""
    return _PREFIX


def max_body(record_type: int) -> int:
    return MAX_SEGMENT_BODY if record_type == RecordType.SEGMENT else MAX_SMALL_BODY


# --- field checks (shared by the constructors, so decoding and encoding agree) -------------
def _bytes(what: str, value: object, length: int) -> None:
    if not isinstance(value, bytes) or len(value) != length:
        raise FormatError(f"The {what} must be exactly {length} bytes.")


def _var_bytes(what: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, bytes) or not low <= len(value) <= high:
        raise FormatError(f"The {what} must be {low} to {high} bytes long.")


def _uint(what: str, value: object, bits: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise FormatError(f"The {what} must be an unsigned {bits}-bit integer.")


def _flags(what: str, value: object, allowed: int) -> None:
    _uint(what, value, 8)
    assert isinstance(value, int)
    # Reserved bits must be zero so that a future meaning cannot be silently ignored.
    if value & ~allowed:
        raise FormatError(f"The {what} use reserved bits ({value:#04x}).")


def _enum(cls: type[IntEnum], what: str, value: object) -> IntEnum:
    try:
        return cls(value)
    except (ValueError, TypeError):
        raise FormatError(f"Unknown {what} {value!r}.") from None


def _str8(name: str) -> bytes:
    raw = name.encode("ascii")
    return bytes((len(raw),)) + raw


_STREAMS = {int(s): s for s in DataStream}
_TYPES = {int(t): t for t in RecordType}


# --- records ------------------------------------------------------------------------------
@dataclass(slots=True, eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class Header(FrozenRecord):
    """First record: who made the stream, for whom, and what it carries."""

    archiver_cert_der: bytes
    viewer_fingerprint: bytes
    request_id: bytes
    created_ms: int
    mode: int
    range_from_ms: int
    range_to_ms: int
    cameras: tuple[str, ...]
    # The viewer's fresh random nonce for this request (encoded after request_id): with
    # mode, range and cameras it binds the stream to one request, so a relay cannot answer
    # a new request with a stream saved earlier. Covered by the signed END transcript.
    request_nonce: bytes = bytes(ID_LEN)
    # A consolidated part (issue 22): the certificate of the Archiver that recorded and signed
    # its manifests and chain recipients, when another Archiver serves it (that one's
    # certificate is archiver_cert_der and signs END). Empty (not encoded): the same Archiver.
    signer_cert_der: bytes = b""

    record_type: ClassVar[RecordType] = RecordType.HEADER

    def __post_init__(self) -> None:
        _var_bytes("Archiver certificate", self.archiver_cert_der, 1, 0xFFFF)
        if self.signer_cert_der:
            _var_bytes("signer certificate", self.signer_cert_der, 1, 0xFFFF)
        _bytes("viewer fingerprint", self.viewer_fingerprint, HASH_LEN)
        _bytes("request id", self.request_id, ID_LEN)
        _bytes("request nonce", self.request_nonce, ID_LEN)
        _uint("creation time", self.created_ms, 64)
        object.__setattr__(self, "mode", _enum(Mode, "stream mode", self.mode))
        _uint("range start", self.range_from_ms, 64)
        _uint("range end", self.range_to_ms, 64)
        if isinstance(self.cameras, str):
            raise FormatError("The header's cameras must be a sequence of names.")
        cameras = tuple(validate_name(c) for c in self.cameras)
        if not 1 <= len(cameras) <= MAX_CAMERAS or len(set(cameras)) != len(cameras):
            raise FormatError(f"A header names 1 to {MAX_CAMERAS} distinct cameras.")
        object.__setattr__(self, "cameras", cameras)

    def _body(self) -> bytes:
        return b"".join((
            _U16.pack(len(self.archiver_cert_der)), self.archiver_cert_der,
            self.viewer_fingerprint, self.request_id, self.request_nonce,
            _U64.pack(self.created_ms),
            bytes((self.mode,)), _U64.pack(self.range_from_ms), _U64.pack(self.range_to_ms),
            bytes((len(self.cameras),)), *(_str8(c) for c in self.cameras),
            *((_U16.pack(len(self.signer_cert_der)), self.signer_cert_der)
              if self.signer_cert_der else ())))


# frozen=True kept: one per viewer, made by the thousand when a chain starts, where the
# base's write-once check would cost each about 4 us more; eq, hash, repr: FrozenRecord's.
@dataclass(frozen=True, slots=True, eq=False, repr=False)
class EpochOpener(FrozenRecord):
    """KEK0 of one epoch, wrapped to one viewer certificate under its key scheme (the scheme
    byte sits where format v2 first put an "OAEP hash" byte; same values)."""

    epoch_id: bytes
    viewer_fingerprint: bytes
    key_scheme: int
    period_s: int
    start_period: int
    ciphertext: bytes

    record_type: ClassVar[RecordType] = RecordType.EPOCH_OPENER

    def __post_init__(self) -> None:
        _bytes("epoch id", self.epoch_id, ID_LEN)
        _bytes("viewer fingerprint", self.viewer_fingerprint, HASH_LEN)
        object.__setattr__(self, "key_scheme", _enum(KeyScheme, "key scheme", self.key_scheme))
        _uint("key period", self.period_s, 32)
        if not 1 <= self.period_s <= MAX_PERIOD_S:
            raise FormatError(f"The key period must be 1 to {MAX_PERIOD_S} seconds.")
        _uint("start period", self.start_period, 64)
        _var_bytes("epoch opener ciphertext", self.ciphertext, 1, MAX_OPENER_CIPHERTEXT)

    def _body(self) -> bytes:
        return b"".join((
            self.epoch_id, self.viewer_fingerprint, bytes((self.key_scheme,)),
            _U32.pack(self.period_s), _U64.pack(self.start_period),
            _U16.pack(len(self.ciphertext)), self.ciphertext))


# frozen=True kept: one per viewer, made by the thousand when a chain starts, where the
# base's write-once check would cost each about 4 us more; eq, hash, repr: FrozenRecord's.
@dataclass(frozen=True, slots=True, eq=False, repr=False)
class ChainRecord(FrozenRecord):
    """The starting state of one key chain, wrapped for one viewer under the KEK of ratchet
    step ``ratchet_index`` of its epoch (the step of the chain's first key period). The viewer
    derives every minute key of the chain from it; one record per viewer per chain.

    A *join record* (``first_step`` > 0, issue 23) wraps the chain's state S_first_step
    instead of S_0, for a viewer authorized while the chain ran: it derives the minute keys of
    that step and later only. It is valid only under the Archiver's signed join statement
    (a ChainRecipients join part naming the viewer and the step)."""

    epoch_id: bytes
    ratchet_index: int
    camera: str
    stream: DataStream
    chain_id: bytes
    start_period: int  # the key period (unix time // period) of the chain's step 0
    nonce: bytes
    wrapped: bytes
    first_step: int = 0  # the step of the wrapped state: 0, or a join's step (encoded if > 0)

    record_type: ClassVar[RecordType] = RecordType.CHAIN_RECORD

    def __post_init__(self) -> None:
        _bytes("epoch id", self.epoch_id, ID_LEN)
        _uint("ratchet index", self.ratchet_index, 32)
        validate_name(self.camera)
        object.__setattr__(self, "stream", _enum(DataStream, "data stream", self.stream))
        _bytes("chain id", self.chain_id, CHAIN_ID_LEN)
        _uint("chain start period", self.start_period, 64)
        _bytes("chain record nonce", self.nonce, NONCE_LEN)
        _bytes("wrapped chain state", self.wrapped, WRAPPED_KEY_LEN)
        _uint("chain record first step", self.first_step, 32)

    def _body(self) -> bytes:
        # A start record's bytes are those of format 2 before joins existed; a join record
        # appends its first step (never 0: one encoding per record).
        return b"".join((
            self.epoch_id, _U32.pack(self.ratchet_index), _str8(self.camera),
            bytes((self.stream,)), self.chain_id, _U64.pack(self.start_period), self.nonce,
            self.wrapped, _U32.pack(self.first_step) if self.first_step else b""))


@dataclass(slots=True, eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class Segment(FrozenRecord):
    """One encrypted segment of one camera data stream (ciphertext ends with the GCM tag).

    ``ciphertext`` is ``bytes`` or a read-only ``memoryview``: a decoded segment views the
    bytes of its record instead of copying up to 64 MiB (immutable either way).
    """

    camera: str
    stream: DataStream
    seq: int
    capture_ms: int  # the start of the video the segment holds
    key_id: bytes
    flags: int
    ciphertext: bytes | memoryview
    duration_ms: int = 0  # how long that video lasts (0: unknown, e.g. not timed video)

    record_type: ClassVar[RecordType] = RecordType.SEGMENT

    def __post_init__(self) -> None:
        validate_name(self.camera)
        if type(self.stream) is not DataStream:
            object.__setattr__(self, "stream", _enum(DataStream, "data stream", self.stream))
        _uint("segment sequence number", self.seq, 64)
        _uint("capture time", self.capture_ms, 64)
        _uint("duration", self.duration_ms, 32)
        _bytes("key id", self.key_id, ID_LEN)
        _flags("segment flags", self.flags, SEGMENT_LAST)
        self._check_ciphertext()

    @classmethod
    def _unchecked(cls, camera: str, stream: DataStream, seq: int, capture_ms: int,
                   key_id: bytes, flags: int, ciphertext: bytes | memoryview,
                   duration_ms: int = 0) -> Segment:
        """Construct without the field checks, for callers that have just made the same
        checks themselves (sealing, decoding): they cost as much as AES on 64 KiB segments."""
        self = object.__new__(cls)
        setattr_ = object.__setattr__
        setattr_(self, "camera", camera)
        setattr_(self, "stream", stream)
        setattr_(self, "seq", seq)
        setattr_(self, "capture_ms", capture_ms)
        setattr_(self, "key_id", key_id)
        setattr_(self, "flags", flags)
        setattr_(self, "ciphertext", ciphertext)
        setattr_(self, "duration_ms", duration_ms)
        return self

    def _check_ciphertext(self) -> None:
        ciphertext = self.ciphertext
        # A writable buffer could change under a frozen, already validated record: refuse it.
        if isinstance(ciphertext, memoryview) and not (
                ciphertext.readonly and ciphertext.format == "B" and ciphertext.ndim == 1
                and ciphertext.contiguous):
            raise FormatError("A segment's ciphertext must be bytes or a read-only byte view.")
        if not isinstance(ciphertext, bytes | memoryview) or len(ciphertext) < TAG_LEN:
            raise FormatError("A segment's ciphertext must hold at least the 16-byte tag.")
        if len(self.ciphertext) > MAX_SEGMENT_BODY - _segment_head_len(self.camera):
            raise FormatError(f"A segment record body is limited to {MAX_SEGMENT_BODY} bytes.")

    @property
    def tag(self) -> bytes:
        return bytes(self.ciphertext[-TAG_LEN:])

    @property
    def last(self) -> bool:
        return bool(self.flags & SEGMENT_LAST)

    def _head(self) -> bytes:
        return _str8(self.camera) + _SEGMENT_FIXED.pack(self.stream, self.seq, self.capture_ms,
                                                        self.duration_ms, self.key_id, self.flags)

    def _body(self) -> bytes:
        return b"".join((self._head(), self.ciphertext))


def _segment_head_len(camera: str) -> int:
    return 1 + len(camera) + _SEGMENT_FIXED.size


@dataclass(slots=True, eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class ManifestEntry(FrozenRecord):
    """One segment as a manifest vouches for it.

    ``digest`` is SHA-256 of the segment's complete record bytes. The GCM tag alone is not
    enough: every viewer of a camera knows its minute keys, and whoever knows a GCM key can
    find a second ciphertext with the same tag. The digest makes a signed manifest bind the
    exact bytes, so one viewer cannot forge segments for another.
    """

    stream: DataStream
    seq: int
    capture_ms: int
    key_id: bytes
    tag: bytes
    digest: bytes
    duration_ms: int = 0

    SIZE: ClassVar[int] = _ENTRY.size

    def __post_init__(self) -> None:
        object.__setattr__(self, "stream", _enum(DataStream, "data stream", self.stream))
        _uint("segment sequence number", self.seq, 64)
        _uint("capture time", self.capture_ms, 64)
        _uint("duration", self.duration_ms, 32)
        _bytes("key id", self.key_id, ID_LEN)
        _bytes("segment tag", self.tag, TAG_LEN)
        _bytes("segment digest", self.digest, HASH_LEN)

    @classmethod
    def _unchecked(cls, stream: DataStream, seq: int, capture_ms: int, key_id: bytes, tag: bytes,
                   digest: bytes, duration_ms: int = 0) -> ManifestEntry:
        """Construct without the field checks, for the decoder, whose fixed-size unpacking
        already guarantees them (a manifest may carry hundreds of entries)."""
        self = object.__new__(cls)
        setattr_ = object.__setattr__
        setattr_(self, "stream", stream)
        setattr_(self, "seq", seq)
        setattr_(self, "capture_ms", capture_ms)
        setattr_(self, "key_id", key_id)
        setattr_(self, "tag", tag)
        setattr_(self, "digest", digest)
        setattr_(self, "duration_ms", duration_ms)
        return self

    def _encode(self) -> bytes:
        return _ENTRY.pack(self.stream, self.seq, self.capture_ms, self.duration_ms, self.key_id,
                           self.tag, self.digest)


@dataclass(slots=True, eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class KeyCommitment(FrozenRecord):
    """HMAC-SHA256 under a minute key: binds the manifest to the key (GCM is not committing)."""

    key_id: bytes
    commitment: bytes

    SIZE: ClassVar[int] = ID_LEN + HASH_LEN

    def __post_init__(self) -> None:
        _bytes("key id", self.key_id, ID_LEN)
        _bytes("key commitment", self.commitment, HASH_LEN)


@dataclass(slots=True, eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class Manifest(FrozenRecord):
    """A signed link of a camera's manifest chain, vouching for the segments since the last."""

    camera: str
    manifest_seq: int
    prev_hash: bytes
    issued_ms: int
    flags: int
    entries: tuple[ManifestEntry, ...]
    commitments: tuple[KeyCommitment, ...]
    signature: bytes = b""

    record_type: ClassVar[RecordType] = RecordType.MANIFEST

    def __post_init__(self) -> None:
        validate_name(self.camera)
        _uint("manifest sequence number", self.manifest_seq, 64)
        _bytes("previous manifest hash", self.prev_hash, HASH_LEN)
        _uint("manifest time", self.issued_ms, 64)
        _flags("manifest flags", self.flags, MANIFEST_LAST)
        entries = tuple(self.entries)
        commitments = tuple(self.commitments)
        if not all(isinstance(e, ManifestEntry) for e in entries) or not all(
                isinstance(c, KeyCommitment) for c in commitments):
            raise FormatError("Manifest entries and commitments must be their record types.")
        if len(entries) > 0xFFFF or len(commitments) > 0xFFFF:
            raise FormatError("A manifest holds at most 65535 entries and commitments.")
        if len({(e.stream, e.seq) for e in entries}) != len(entries):
            raise FormatError("A manifest names each segment only once.")
        # Exactly one commitment per key in use: a missing one would leave a key unbound,
        # an extra one would be unverifiable.
        committed = [c.key_id for c in commitments]
        if len(set(committed)) != len(committed) or set(committed) != {e.key_id for e in entries}:
            raise FormatError("A manifest must commit to exactly the keys its entries use.")
        _var_bytes("manifest signature", self.signature, 0, MAX_SIGNATURE)
        object.__setattr__(self, "entries", entries)
        object.__setattr__(self, "commitments", commitments)

    def _unsigned(self) -> bytes:
        return b"".join((
            _str8(self.camera), _U64.pack(self.manifest_seq), self.prev_hash,
            _U64.pack(self.issued_ms), bytes((self.flags,)),
            _U16.pack(len(self.entries)), *(e._encode() for e in self.entries),
            _U16.pack(len(self.commitments)),
            *(c.key_id + c.commitment for c in self.commitments)))

    def signed_bytes(self) -> bytes:
        """What the Archiver signs: a domain label, then the body without the signature field."""
        return LABEL_MANIFEST + self._unsigned()

    def _body(self) -> bytes:
        return self._unsigned() + _U16.pack(len(self.signature)) + self.signature


@dataclass(slots=True, eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class End(FrozenRecord):
    """Last record: signs the hash of everything before it, so truncation is detected."""

    request_id: bytes
    reason: int
    transcript_hash: bytes
    signature: bytes = b""
    # Per camera, the sequence number of the next manifest its chain will issue, from the
    # Archiver's memory when END was made (encoded after transcript_hash): a range that
    # reaches the present shows through it that no manifest after the last one sent exists.
    heads: tuple[tuple[str, int], ...] = ()

    record_type: ClassVar[RecordType] = RecordType.END

    def __post_init__(self) -> None:
        _bytes("request id", self.request_id, ID_LEN)
        object.__setattr__(self, "reason", _enum(EndReason, "end reason", self.reason))
        _bytes("transcript hash", self.transcript_hash, HASH_LEN)
        _var_bytes("end signature", self.signature, 0, MAX_SIGNATURE)
        heads = tuple((validate_name(camera), seq) for camera, seq in self.heads)
        for _, seq in heads:
            _uint("chain head", seq, 64)
        if len(heads) > MAX_CAMERAS or len({c for c, _ in heads}) != len(heads):
            raise FormatError(f"An end record names at most {MAX_CAMERAS} distinct chain heads.")
        object.__setattr__(self, "heads", heads)

    def _unsigned(self) -> bytes:
        return b"".join((self.request_id, bytes((self.reason,)), self.transcript_hash,
                         bytes((len(self.heads),)),
                         *(_str8(camera) + _U64.pack(seq) for camera, seq in self.heads)))

    def signed_bytes(self) -> bytes:
        return LABEL_END + self._unsigned()

    def _body(self) -> bytes:
        return self._unsigned() + _U16.pack(len(self.signature)) + self.signature


@dataclass(slots=True, eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class ChainRecipients(FrozenRecord):
    """The Archiver's signed statement, made when a key chain starts, of exactly the viewers
    it wrapped that chain's starting state for (part ``part`` of ``parts``: a chain with more
    than MAX_RECIPIENTS_PER_PART viewers is listed in several records). Shared by all viewers
    and archived with the segments: a viewer that gets no chain record for a segment can tell
    "not authorized then" (every part came and none lists it) from "withheld or lost"."""

    camera: str
    stream: DataStream
    chain_id: bytes
    start_period: int
    part: int
    parts: int
    viewers: tuple[bytes, ...]  # certificate fingerprints, sorted, distinct
    signature: bytes = b""
    # A *join part* (issue 23): ``part`` >= ``parts`` (its index among the chain's statements,
    # after the start statement's parts) and ``join_step`` > 0: the viewers listed were given
    # the chain's state from that step on (a join record each), and not before it.
    join_step: int = 0

    record_type: ClassVar[RecordType] = RecordType.CHAIN_RECIPIENTS

    def __post_init__(self) -> None:
        validate_name(self.camera)
        object.__setattr__(self, "stream", _enum(DataStream, "data stream", self.stream))
        _bytes("chain id", self.chain_id, CHAIN_ID_LEN)
        _uint("chain start period", self.start_period, 64)
        _uint("recipients part", self.part, 16)
        _uint("recipients parts", self.parts, 16)
        _uint("join step", self.join_step, 32)
        if self.parts < 1 or (self.part < self.parts) != (self.join_step == 0):
            raise FormatError("A chain-recipients record is part i of n with i < n, or a join "
                              "statement (i >= n) with a join step above 0.")
        if isinstance(self.viewers, bytes | str):
            raise FormatError("A chain-recipients record lists viewer fingerprints as a "
                              "sequence.")
        viewers = tuple(self.viewers)
        for viewer in viewers:
            _bytes("viewer fingerprint", viewer, HASH_LEN)
        # Canonical: one encoding per statement, and membership is unambiguous.
        if list(viewers) != sorted(set(viewers)) or len(viewers) > MAX_RECIPIENTS_PER_PART:
            raise FormatError(f"A chain-recipients record lists at most "
                              f"{MAX_RECIPIENTS_PER_PART} distinct viewer fingerprints in "
                              "ascending order.")
        _var_bytes("chain-recipients signature", self.signature, 0, MAX_SIGNATURE)
        object.__setattr__(self, "viewers", viewers)

    @property
    def is_join(self) -> bool:
        return self.join_step > 0

    def with_signature(self, signature: bytes) -> ChainRecipients:
        """This statement signed: only the signature is checked, the other fields were when
        this one was made (a chain start at 10 000 viewers re-checked 10 000 fingerprints
        per camera for it)."""
        _var_bytes("chain-recipients signature", signature, 0, MAX_SIGNATURE)
        signed = copy.copy(self)
        object.__setattr__(signed, "signature", signature)
        return signed

    def _unsigned(self) -> bytes:
        return b"".join((_str8(self.camera), bytes((self.stream,)), self.chain_id,
                         _U64.pack(self.start_period), _U16.pack(self.part),
                         _U16.pack(self.parts), _U16.pack(len(self.viewers)), *self.viewers,
                         _U32.pack(self.join_step) if self.join_step else b""))

    def signed_bytes(self) -> bytes:
        # Its own label: a join statement is never read as a start statement, nor the reverse.
        label = LABEL_CHAIN_JOIN if self.join_step else LABEL_CHAIN_RECIPIENTS
        return label + self._unsigned()

    def _body(self) -> bytes:
        return self._unsigned() + _U16.pack(len(self.signature)) + self.signature


Record = Header | EpochOpener | ChainRecord | Segment | Manifest | End | ChainRecipients

_RECORD_CLASSES = (Header, EpochOpener, ChainRecord, Segment, Manifest, End, ChainRecipients)

RawRecord = bytes | memoryview
"""A record's exact encoded bytes: ``bytes``, or a read-only view of bytes nobody changes
(immutable ``bytes``, or a :class:`BufferPool` buffer until it is given back)."""


# --- encoding -----------------------------------------------------------------------------
def encode_record(record: Record) -> bytes:
    """type u8 + length u32 + body. A segment's ciphertext is copied exactly once."""
    return b"".join(encode_record_parts(record))


def encode_record_parts(record: Record) -> tuple[bytes | memoryview, ...]:
    """The record's bytes in pieces, without copying a segment's ciphertext: for
    ``os.writev``/``writelines``. ``b"".join(parts) == encode_record(record)``."""
    if not isinstance(record, _RECORD_CLASSES):
        raise TypeError(f"Not a fusion stream record: {type(record).__name__}")
    if isinstance(record, Segment):
        head = record._head()
        length = len(head) + len(record.ciphertext)
        return RECORD_HEADER.pack(record.record_type, length) + head, record.ciphertext
    body = record._body()
    if len(body) > MAX_SMALL_BODY:
        raise FormatError(f"A {record.record_type.name} record is limited to {MAX_SMALL_BODY} "
                          f"bytes ({len(body)} needed); issue manifests for fewer segments.")
    return (RECORD_HEADER.pack(record.record_type, len(body)) + body,)


def segment_digest(segment: Segment) -> bytes:
    """SHA-256 of the segment's record bytes, without building them (no copy)."""
    head = segment._head()
    digest = hashlib.sha256(RECORD_HEADER.pack(RecordType.SEGMENT,
                                                len(head) + len(segment.ciphertext)))
    digest.update(head)
    digest.update(segment.ciphertext)
    return digest.digest()


def chain_statement_number(raw: bytes) -> int:
    """The number (``part``) of an encoded chain-recipients record, read at its fixed place
    without decoding the viewer list. The Archiver indexes every statement it has just signed
    by this number before a chain's first segment: a start part lists up to
    MAX_RECIPIENTS_PER_PART fingerprints, and decoding and re-checking them all (five parts a
    camera at 10 000 viewers) sat on the ingest path. Readers still decode the whole record."""
    at = RECORD_HEADER_LEN + 1 + (raw[RECORD_HEADER_LEN] if len(raw) > RECORD_HEADER_LEN else 0)
    at += 1 + CHAIN_ID_LEN + 8  # stream, chain id, start period
    if len(raw) < at + 2 or raw[0] != RecordType.CHAIN_RECIPIENTS:
        raise FormatError("Not a chain-recipients record.")
    return int(_U16.unpack_from(raw, at)[0])


def record_digest(raw: RawRecord) -> bytes:
    """SHA-256 of one record's complete encoded bytes: a segment's manifest digest, a
    manifest's chain hash, and each record's entry in the END transcript."""
    return hashlib.sha256(raw).digest()


# --- decoding -----------------------------------------------------------------------------
class _Cursor:
    """Reads fields from one record body; every read is bounds-checked."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: memoryview, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise FormatError(f"The {self._what} record is too short.")
        out = bytes(self._data[self._pos:end])
        self._pos = end
        return out

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        end = self._pos + layout.size
        if end > len(self._data):
            raise FormatError(f"The {self._what} record is too short.")
        values = layout.unpack_from(self._data, self._pos)
        self._pos = end
        return values

    def u8(self) -> int:
        if self._pos >= len(self._data):
            raise FormatError(f"The {self._what} record is too short.")
        value = self._data[self._pos]
        self._pos += 1
        return value

    def u16(self) -> int:
        return int(_U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack(self.take(8))[0])

    def str8(self) -> str:
        raw = self.take(self.u8())
        try:
            name = raw.decode("ascii")
        except UnicodeDecodeError:
            raise FormatError(f"A camera name in the {self._what} record is not ASCII.") from None
        return validate_name(name)

    def rest(self) -> memoryview:
        """The remaining bytes as a view, without copying (the data is immutable bytes)."""
        out = self._data[self._pos:]
        self._pos = len(self._data)
        return out

    def at_end(self) -> bool:
        return self._pos == len(self._data)

    def left(self) -> int:
        return len(self._data) - self._pos

    def done(self) -> None:
        if self._pos != len(self._data):
            raise FormatError(f"The {self._what} record has {len(self._data) - self._pos} "
                              "unexpected trailing bytes.")


def _stream(value: int) -> DataStream:
    return DataStream(_enum(DataStream, "data stream", value))


def _decode_header(c: _Cursor) -> Header:
    cert = c.take(c.u16())
    viewer, request_id, nonce = c.take(HASH_LEN), c.take(ID_LEN), c.take(ID_LEN)
    fields = (c.u64(), c.u8(), c.u64(), c.u64())
    cameras = tuple(c.str8() for _ in range(c.u8()))
    signer = b""
    if not c.at_end():  # a consolidated part's signer; canonical: never present and empty
        if c.left() < 2:
            c.done()  # not even its length: trailing bytes
        signer = c.take(c.u16())
        if not signer:
            raise FormatError("A header's signer certificate, when present, is not empty.")
    return Header(cert, viewer, request_id, *fields, cameras, request_nonce=nonce,
                  signer_cert_der=signer)


def _decode_opener(c: _Cursor) -> EpochOpener:
    return EpochOpener(c.take(ID_LEN), c.take(HASH_LEN), c.u8(), c.u32(), c.u64(),
                       c.take(c.u16()))


def _decode_chain_record(c: _Cursor) -> ChainRecord:
    fields = (c.take(ID_LEN), c.u32(), c.str8(), _stream(c.u8()), c.take(CHAIN_ID_LEN),
              c.u64(), c.take(NONCE_LEN), c.take(WRAPPED_KEY_LEN))
    if c.at_end():
        return ChainRecord(*fields)
    if c.left() < 4:  # only a join's u32 first step may follow the wrapped state
        c.done()
    first_step = c.u32()
    if first_step == 0:  # canonical: a start record carries no first step
        raise FormatError("A join chain record's first step must be above 0.")
    return ChainRecord(*fields, first_step=first_step)


def _decode_segment(c: _Cursor) -> Segment:
    # The hot path of a viewer: one unpack for the fixed fields, the same checks as
    # Segment.__post_init__, and the ciphertext as a view of the record (no copy).
    camera = c.str8()
    stream, seq, capture_ms, duration_ms, key_id, flags = c.unpack(_SEGMENT_FIXED)
    data_stream = _STREAMS.get(stream)
    if data_stream is None:
        raise FormatError(f"Unknown data stream {stream}.")
    if flags & ~SEGMENT_LAST:
        raise FormatError(f"The segment flags use reserved bits ({flags:#04x}).")
    ciphertext = c.rest()  # read-only: a view of immutable bytes
    if len(ciphertext) < TAG_LEN:
        raise FormatError("A segment's ciphertext must hold at least the 16-byte tag.")
    return Segment._unchecked(camera, data_stream, seq, capture_ms, key_id, flags, ciphertext,
                              duration_ms)


def _decode_manifest(c: _Cursor) -> Manifest:
    camera = c.str8()
    seq, prev, issued, flags, count = c.unpack(_MANIFEST_FIXED)
    entries = tuple(_decode_entry(*c.unpack(_ENTRY)) for _ in range(count))
    commitments = tuple(KeyCommitment(*c.unpack(_COMMITMENT)) for _ in range(c.u16()))
    return Manifest(camera, seq, prev, issued, flags, entries, commitments, c.take(c.u16()))


def _decode_entry(stream: int, seq: int, capture_ms: int, duration_ms: int, key_id: bytes,
                  tag: bytes, digest: bytes) -> ManifestEntry:
    # The fixed layout gives every field its exact size and range; only the stream is open.
    data_stream = _STREAMS.get(stream)
    if data_stream is None:
        raise FormatError(f"Unknown data stream {stream}.")
    return ManifestEntry._unchecked(data_stream, seq, capture_ms, key_id, tag, digest, duration_ms)


def _decode_chain_recipients(c: _Cursor) -> ChainRecipients:
    camera, stream, chain_id, start = c.str8(), _stream(c.u8()), c.take(CHAIN_ID_LEN), c.u64()
    part, parts = c.u16(), c.u16()
    viewers = tuple(c.take(HASH_LEN) for _ in range(c.u16()))
    join_step = c.u32() if part >= parts else 0  # a join statement (issue 23)
    return ChainRecipients(camera, stream, chain_id, start, part, parts, viewers,
                           c.take(c.u16()), join_step)


def _decode_end(c: _Cursor) -> End:
    request_id, reason, transcript = c.take(ID_LEN), c.u8(), c.take(HASH_LEN)
    heads = tuple((c.str8(), c.u64()) for _ in range(c.u8()))
    return End(request_id, reason, transcript, c.take(c.u16()), heads)


_DECODERS = {
    RecordType.HEADER: _decode_header,
    RecordType.EPOCH_OPENER: _decode_opener,
    RecordType.CHAIN_RECORD: _decode_chain_record,
    RecordType.SEGMENT: _decode_segment,
    RecordType.MANIFEST: _decode_manifest,
    RecordType.END: _decode_end,
    RecordType.CHAIN_RECIPIENTS: _decode_chain_recipients,
}


def check_record_header(record_type: int, length: int) -> RecordType:
    kind = _TYPES.get(record_type)
    if kind is None:
        raise FormatError(f"Unknown record type {record_type}; the stream is corrupt or "
                          "newer than this reader.")
    if length > max_body(kind):
        raise FormatError(f"A {kind.name} record claims {length} bytes, more than the "
                          f"limit of {max_body(kind)}.")
    return kind


def decode_body(kind: RecordType, body: memoryview) -> Record:
    cursor = _Cursor(body, kind.name)
    record = _DECODERS[kind](cursor)
    cursor.done()
    return record


def decode_record(data: bytes) -> Record:
    """Decode exactly one complete record (type, length, body); FormatError otherwise.
    A decoded segment's ciphertext is a view of ``data`` (copied first unless it is bytes)."""
    view = memoryview(data if isinstance(data, bytes) else bytes(data))
    if len(view) < RECORD_HEADER_LEN:
        raise FormatError("A record is shorter than its 5-byte type and length.")
    record_type, length = RECORD_HEADER.unpack_from(view)
    kind = check_record_header(record_type, length)
    if len(view) != RECORD_HEADER_LEN + length:
        raise FormatError(f"A {kind.name} record's length field says {length} bytes but "
                          f"{len(view) - RECORD_HEADER_LEN} follow.")
    return decode_body(kind, view[RECORD_HEADER_LEN:])
