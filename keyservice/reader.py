"""Fusion streams, the viewer's side: the incremental reader (StreamReader) and its events.

The reader is the security boundary of the viewer. It releases a segment's plaintext only
after the manifest covering it verified (Archiver signature, chain link, exact segment bytes,
key commitment) and the segment's own tag checked, and never part of one; truncation is caught
by the signed END record. Every failure is FormatError, IntegrityError or NoMatchingIdentity
(plus whatever the caller's ``check_archiver`` or the token raise).

What the viewer asked for (StreamRequest) and whether the stream answers it (nonce, camera,
mode, range, freshness, the range's edges) is keyservice/request_policy.py; its public names
stay importable from here. The Archiver's side (ManifestChain, StreamWriter) is
keyservice/fusion_writer.py.

Pure: no I/O, no ``pkcs11``.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyservice.crypto import (
    ChainDeriver,
    KekRatchet,
    key_commitment,
    max_ratchet_index,
    open_epoch_opener,
    open_segment,
    split_key_id,
    unwrap_chain_record,
)
from keyservice.dercert import DerCertificate
from keyservice.errors import (
    FormatError,
    IntegrityError,
    NoMatchingIdentity,
    RangeIncomplete,
    RequestMismatch,
)
from keyservice.format import (
    LABEL_CHAIN_JOIN,
    LABEL_CHAIN_RECIPIENTS,
    LABEL_MANIFEST,
    RECORD_HEADER_LEN,
    ZERO_HASH,
    ChainRecipients,
    ChainRecord,
    DataStream,
    End,
    EpochOpener,
    Header,
    Manifest,
    ManifestEntry,
    Mode,
    RawRecord,
    Record,
    Segment,
    record_digest,
)
from keyservice.framing import BufferPool, RecordSplitter, Transcript
from keyservice.identity import Identity, fingerprint
from keyservice.records import FrozenRecord
from keyservice.request_policy import (
    DEFAULT_MAX_SKEW_MS,
    Edges,
    StreamRequest,
    check_entry_answers,
    check_header_answers,
    check_held_successor,
    holds_back,
    live_start,
    playback_range,
)

if TYPE_CHECKING:
    from cryptography import x509

__all__ = [  # StreamRequest and DEFAULT_MAX_SKEW_MS live in request_policy; importable here
    "DEFAULT_MAX_SKEW_MS", "Event", "SegmentMissing", "SegmentPlaintext", "SegmentSkipped",
    "StreamEnded", "StreamReader", "StreamRequest", "VerifiedKey",
]

# Memory a reader charges per buffered record on top of its bytes (Python object overhead),
# so that millions of tiny records cannot slip under the byte budget.
_RECORD_OVERHEAD = 256


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class SegmentPlaintext(FrozenRecord):
    """A verified, decrypted segment, released in stream order."""

    camera: str
    stream: DataStream
    seq: int
    capture_ms: int  # start of its video (signed)
    data: bytes = field(repr=False)
    last: bool = False  # the last segment of the recording
    duration_ms: int = 0  # length of its video (signed; 0: unknown)


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class _ListedSegment(FrozenRecord):
    """A segment a signed manifest lists, without its plaintext."""

    camera: str
    stream: DataStream
    seq: int
    capture_ms: int
    duration_ms: int = 0


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class SegmentSkipped(_ListedSegment):
    """Listed, and this viewer holds no key for it, and the Archiver's signed chain recipients
    show it was not authorized when the segment was recorded (withheld: not authorized for
    this viewer)."""


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class SegmentMissing(_ListedSegment):
    """Listed (so it was recorded) but it did not come, and no signed chain recipients explain
    it: the viewer was authorized, or nothing says it was not. The stream is authentic but
    incomplete."""


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class StreamEnded(FrozenRecord):
    reason: int


Event = SegmentPlaintext | SegmentSkipped | SegmentMissing | StreamEnded


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class VerifiedKey(FrozenRecord):
    """A minute key the reader used, after it matched the Archiver's signed key commitment
    for its camera, data stream and key id (what a viewer may hand on in an access grant)."""

    camera: str
    stream: DataStream
    key_id: bytes
    key: bytes = field(repr=False)  # secret: never in logs or tracebacks


# eq/repr off: process state compared by identity and never printed; each generated
# method is compiled at every start (issue 23, start-up).
@dataclass(eq=False, repr=False)
class _Camera:
    # segment, its record bytes, their digest, their cost against max_pending_bytes
    pending: list[tuple[Segment, RawRecord, bytes, int]] = field(default_factory=list)
    last_seq: int | None = None
    last_hash: bytes = ZERO_HASH
    # The range's edges: the first manifest seen starts the chain (sequence 0) or is a bare
    # manifest from before the range; a bare manifest from after the range closes it.
    edges: Edges = field(default_factory=Edges)


class StreamReader:
    """Reads one fusion stream for one viewer, incrementally (bytes as they arrive).

    One token operation per epoch, done lazily when a segment first needs a key of that
    epoch; the minute keys of a chain are derived from its starting state (one chain record
    per chain); KEKs, chain states and minute keys stay in this object's memory only. Segments wait, per
    camera, for the manifest that covers them; ``max_pending_bytes`` bounds what an
    unverified stream can make the reader hold. After any error the reader stays failed.
    """

    def __init__(self, identity: Identity, check_archiver: Callable[[x509.Certificate], None],
                 max_pending_bytes: int = 256 * 2**20,
                 request: StreamRequest | None = None,
                 known_keys: Mapping[bytes, bytes] | None = None) -> None:
        """``request``: what the viewer asked for (see StreamRequest); None only for a saved
        stream opened offline, which answers no new request (its header says what it is).
        ``known_keys``: minute keys by key id given from outside the stream (a grant of past
        video, an evidence package); like derived keys, each is used only once it matches the
        key commitment of the signed manifest that covers its segment."""
        self._identity = identity
        self._request = request
        self._fingerprint = fingerprint(identity.certificate)
        self._check_archiver = check_archiver
        self._max_retained = max_pending_bytes
        self._buffers = BufferPool()
        self._splitter = RecordSplitter(self._buffers)
        self._transcript = Transcript()
        self.header: Header | None = None
        self.token_operations = 0
        self._archiver_key: ec.EllipticCurvePublicKey | None = None
        # Who signed the manifests and chain recipients: the serving Archiver, or for a
        # consolidated part (issue 22) the one that recorded it (header.signer_cert_der).
        self._content_key: ec.EllipticCurvePublicKey | None = None
        self._cameras: dict[str, _Camera] = {}
        self._openers: dict[bytes, EpochOpener] = {}
        self._ratchets: dict[bytes, KekRatchet] = {}
        self._known_keys = dict(known_keys or {})
        for key_id, key in self._known_keys.items():
            if len(key_id) != 16 or len(key) != 32:
                raise ValueError("known_keys maps 16-byte key ids to 32-byte minute keys.")
        self._chain_records: dict[bytes, ChainRecord] = {}  # chain id -> record
        self._chains: dict[bytes, ChainDeriver] = {}  # chain id -> its opened state
        # chain id -> (the parts' common fields, part -> its verified signed recipients)
        self._recipients: dict[bytes, tuple[tuple[str, DataStream, int, int],
                                            dict[int, ChainRecipients]]] = {}
        self._streams_seen: set[tuple[str, DataStream]] = set()  # with a segment in the range
        # per camera data stream, its first segment while it starts before the range
        self._held: dict[tuple[str, DataStream], SegmentPlaintext | SegmentSkipped
                         | SegmentMissing] = {}
        self._keys: dict[bytes, tuple[AESGCM, bytes, bytes]] = {}  # id -> (aead, commitment, key)
        self._verified: dict[bytes, VerifiedKey] = {}
        self._retained = 0
        self._ended = False
        self._failure: BaseException | None = None

    @property
    def verified_keys(self) -> dict[bytes, VerifiedKey]:
        """The minute keys that decrypted released segments, by key id, each checked against
        the signed key commitment. Complete for the stream's range once ``ended``."""
        return dict(self._verified)

    @property
    def ended(self) -> bool:
        """True once the signed END record verified."""
        return self._ended

    def feed(self, data: bytes) -> list[Event]:
        """Events completed by ``data``, in stream order. On an error nothing of this call
        is returned and the reader stays failed."""
        self._check_usable()
        events: list[Event] = []
        try:
            for record, raw in self._splitter.iter_feed(data):
                self._on_record(record, raw, events)
        except BaseException as exc:
            self._failure = exc
            raise
        return events

    def finish(self) -> None:
        """Call at the end of the bytes: FormatError if they stop inside a record,
        IntegrityError if the signed END record was not seen (truncation)."""
        self._check_usable()
        if not self._splitter.finished_cleanly:
            self._failure = FormatError("The stream stops in the middle of a record.")
            raise self._failure
        if not self._ended:
            self._failure = IntegrityError()
            raise self._failure

    def _check_usable(self) -> None:
        failure = self._failure
        if failure is None:
            return
        if isinstance(failure, IntegrityError):
            raise IntegrityError()
        if isinstance(failure, FormatError | NoMatchingIdentity | RequestMismatch
                      | RangeIncomplete):
            raise type(failure)(failure.message, failure.advice)
        raise FormatError("This stream reader already failed; start a new one.")

    # --- records ----------------------------------------------------------------------
    def _on_record(self, record: Record, raw: RawRecord, events: list[Event]) -> None:
        if self.header is not None and isinstance(record, End):
            self._on_end(record, events)
            return  # the END record is not part of its own transcript
        # The one SHA-256 pass over the record's bytes: for a segment it is the digest its
        # manifest entry must carry, for a manifest the next link's prev_hash, and for every
        # record its entry in the transcript that END signs.
        digest = record_digest(raw)
        if self.header is None:
            if not isinstance(record, Header):
                raise FormatError("A fusion stream must start with its header record.")
            self._on_header(record)
        elif isinstance(record, Segment):
            self._on_segment(record, raw, digest)
        elif isinstance(record, Manifest):
            self._on_manifest(record, raw, digest, events)
        elif isinstance(record, ChainRecord):
            self._on_chain_record(record, len(raw))
        elif isinstance(record, EpochOpener):
            self._on_opener(record, len(raw))
        elif isinstance(record, ChainRecipients):
            self._on_chain_recipients(record, raw)
        else:
            raise FormatError("A fusion stream holds exactly one header record.")
        self._transcript.add(digest)

    def _on_header(self, header: Header) -> None:
        if not hmac.compare_digest(header.viewer_fingerprint, self._fingerprint):
            raise NoMatchingIdentity(
                f"This stream is addressed to viewer certificate "
                f"{header.viewer_fingerprint.hex()[:16]}..., not to yours "
                f"({self._fingerprint.hex()[:16]}...); open it with the identity it was made for.")
        key = self._signing_key(header.archiver_cert_der)
        if self._request is not None:
            check_header_answers(header, self._request)
        self._archiver_key = self._content_key = key
        if header.signer_cert_der:
            # Another Archiver's recording served as it signed it: its certificate passes the
            # same check (a pin, the site CA) and verifies everything but END, which the
            # serving Archiver signs over this request.
            self._content_key = self._signing_key(header.signer_cert_der)
        self._cameras = {camera: _Camera() for camera in header.cameras}
        self.header = header

    def _signing_key(self, der: bytes) -> ec.EllipticCurvePublicKey:
        # Its DER bytes and the key of exactly those bytes (keyservice.dercert): the pin is a
        # hash of the bytes, the signatures verify with that key; a check that asks for more
        # (the site CA, first use) gets the certificate parsed in full.
        try:
            cert = DerCertificate(der)
        except (ValueError, UnsupportedAlgorithm):
            raise FormatError("The header's Archiver certificate is not valid DER.") from None
        self._check_archiver(cert)  # type: ignore[arg-type]  # the pin: raises if not ours
        try:
            key = cert.public_key()
        except (ValueError, UnsupportedAlgorithm):
            raise IntegrityError() from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise IntegrityError()
        return key

    def _camera(self, name: str) -> _Camera:
        camera = self._cameras.get(name)
        if camera is None:  # not announced in the header: spliced in from elsewhere
            raise IntegrityError()
        return camera

    def _charge(self, cost: int) -> None:
        self._retained += cost
        if self._retained > self._max_retained:
            raise FormatError(
                f"The stream makes the reader hold more than {self._max_retained} bytes of "
                "unverified segments and key material; the Archiver must issue manifests more "
                "often (or raise max_pending_bytes).")

    def _on_opener(self, opener: EpochOpener, size: int) -> None:
        if not hmac.compare_digest(opener.viewer_fingerprint, self._fingerprint):
            raise NoMatchingIdentity(
                "The stream carries an epoch opener for another viewer certificate; open it "
                "with the identity it was made for.")
        known = self._openers.get(opener.epoch_id)
        if known is not None:
            if known != opener:
                raise IntegrityError()
            return
        self._charge(size + _RECORD_OVERHEAD)
        self._openers[opener.epoch_id] = opener

    def _on_chain_record(self, record: ChainRecord, size: int) -> None:
        opener = self._openers.get(record.epoch_id)
        if opener is None:  # openers precede their chain records; this one is not ours
            raise IntegrityError()
        self._camera(record.camera)
        if record.ratchet_index > max_ratchet_index(opener.period_s):
            raise FormatError("A chain record's ratchet index lies beyond its epoch's day.")
        known = self._chain_records.get(record.chain_id)
        if known is not None:
            if known != record:
                raise IntegrityError()
            return
        if record.first_step and not self._join_signed(record):
            # A join record (a state from a later step) counts only under the Archiver's
            # signed join statement, sent before it: without one, nothing shows this viewer
            # was given the chain from that step only, so withheld and earlier minutes could
            # not be told apart.
            raise IntegrityError()
        self._charge(size + _RECORD_OVERHEAD)
        self._chain_records[record.chain_id] = record

    def _join_signed(self, record: ChainRecord) -> bool:
        found = self._recipients.get(record.chain_id)
        if found is None:
            return False
        (camera, stream, start_period, _), by_part = found
        return (camera == record.camera and stream == record.stream
                and start_period == record.start_period
                and any(p.join_step == record.first_step and self._fingerprint in p.viewers
                        for p in by_part.values() if p.is_join))

    def _on_chain_recipients(self, part: ChainRecipients, raw: RawRecord) -> None:
        self._camera(part.camera)
        assert self._content_key is not None
        unsigned = raw[RECORD_HEADER_LEN:len(raw) - 2 - len(part.signature)]
        label = LABEL_CHAIN_JOIN if part.is_join else LABEL_CHAIN_RECIPIENTS
        _verify(self._content_key, label + unsigned, part.signature)
        common = (part.camera, part.stream, part.start_period, part.parts)
        known = self._recipients.get(part.chain_id)
        if known is None:
            known = self._recipients[part.chain_id] = (common, {})
        elif known[0] != common:  # parts of one chain that disagree
            raise IntegrityError()
        same = known[1].get(part.part)
        if same is not None:
            if same != part:
                raise IntegrityError()
            return
        self._charge(len(raw) + _RECORD_OVERHEAD)
        known[1][part.part] = part

    def _withheld_legitimately(self, camera: str, entry: ManifestEntry) -> bool:
        """True only if every part of the Archiver's signed recipients statement of this
        segment's chain (made when the chain started) came and none lists this viewer, and no
        signed join statement that came gives it the chain at or before this segment's step
        (a join from a later step: the segment was recorded before this viewer's join)."""
        chain_id, step = split_key_id(entry.key_id)
        found = self._recipients.get(chain_id)
        if found is None:
            return False
        (rec_camera, rec_stream, _, parts), by_part = found
        # Every start part came (counted over what came: a signed `parts` does not set the
        # work), whatever join statements came besides.
        if (rec_camera != camera or rec_stream != entry.stream
                or sum(1 for i in by_part if i < parts) != parts):
            return False
        return not any(self._fingerprint in p.viewers and p.join_step <= step
                       for p in by_part.values())

    def _holds_key(self, key_id: bytes) -> bool:
        """Whether this reader has a way to a key id's minute key (given, or its chain's
        record, from the record's first step on); whether that key is right is for the
        manifest's commitment to say."""
        if key_id in self._known_keys:
            return True
        chain_id, step = split_key_id(key_id)
        record = self._chain_records.get(chain_id)
        return record is not None and step >= record.first_step

    def _on_segment(self, segment: Segment, raw: RawRecord, digest: bytes) -> None:
        camera = self._camera(segment.camera)
        cost = len(raw) + _RECORD_OVERHEAD
        self._charge(cost)
        # Held (its ciphertext views the record bytes, no copy) until a manifest covers it.
        camera.pending.append((segment, raw, digest, cost))

    def _on_manifest(self, manifest: Manifest, raw: RawRecord, digest: bytes,
                     events: list[Event]) -> None:
        camera = self._camera(manifest.camera)
        assert self._content_key is not None
        # The signature covers the body up to the signature field, exactly as received (the
        # encoding is canonical, so this equals manifest.signed_bytes() without re-encoding).
        unsigned = raw[RECORD_HEADER_LEN:len(raw) - 2 - len(manifest.signature)]
        _verify(self._content_key, LABEL_MANIFEST + unsigned, manifest.signature)
        # The chain: each manifest names its predecessor, so a dropped, replayed or reordered
        # manifest breaks it. A chain may be joined midway (playback from a later time), but
        # sequence 0 and the zero hash only ever come together.
        first = camera.last_seq is None
        if first:
            if (manifest.manifest_seq == 0) != (manifest.prev_hash == ZERO_HASH):
                raise IntegrityError()
        elif (manifest.manifest_seq != camera.last_seq + 1
              or not hmac.compare_digest(manifest.prev_hash, camera.last_hash)):
            raise IntegrityError()
        live_from = self._live_start()
        if live_from is not None and first:
            # Live's opening edge: the chain's start, or the last manifest the Archiver issued
            # before the live start (signed issued_ms), bare: nothing archived after the start
            # was left out before the first segment delivered. (Issue time, not capture time:
            # a continuous stream uploaded late is archived after the start with capture
            # times before it, and belongs to the live stream.)
            camera.edges.opened = manifest.manifest_seq == 0
            if not camera.pending and manifest.issued_ms < live_from:
                camera.edges.opened = True
                camera.last_seq, camera.last_hash = manifest.manifest_seq, digest
                return
        span = self._playback_range()
        if span is not None:
            if camera.edges.is_edge(manifest, first, bool(camera.pending), span):
                # A bare manifest just outside the range, linked to the chain: proof that
                # nothing between it and the range's first or last manifest was left out.
                camera.last_seq, camera.last_hash = manifest.manifest_seq, digest
                return
            if camera.edges.closed:
                raise RequestMismatch(
                    f"Camera {manifest.camera}'s manifests go on after the one that closed the "
                    "requested range.")
            if first:
                camera.edges.opened = manifest.manifest_seq == 0
        if self._request is not None:
            for entry in manifest.entries:  # signed capture times, checked against the request
                stream_key = (manifest.camera, entry.stream)
                check_entry_answers(manifest.camera, entry, self._request,
                                     stream_key not in self._streams_seen)
                self._streams_seen.add(stream_key)
        # The entries must be exactly the pending segments, in order; only a segment for
        # which this viewer holds no key may be absent (the Archiver does not send those).
        plan: list[tuple[ManifestEntry, Segment | None]] = []
        pending = camera.pending
        j = 0
        for entry in manifest.entries:
            if j < len(pending) and _matches(pending[j][0], pending[j][2], entry):
                plan.append((entry, pending[j][0]))
                j += 1
            elif not self._holds_key(entry.key_id):
                plan.append((entry, None))
            else:
                raise IntegrityError()
        if j != len(pending):
            raise IntegrityError()
        commitments = {c.key_id: c.commitment for c in manifest.commitments}
        out: list[Event] = []
        # Decrypt everything first, release after: a failing segment releases nothing.
        for entry, segment in plan:
            if segment is None or not self._holds_key(entry.key_id):
                kind = (SegmentSkipped if self._withheld_legitimately(manifest.camera, entry)
                        else SegmentMissing)
                out.append(kind(manifest.camera, entry.stream, entry.seq, entry.capture_ms,
                                entry.duration_ms))
                continue
            aead = self._key(entry.key_id, manifest.camera, entry.stream,
                             commitments[entry.key_id])
            data = open_segment(aead, segment)
            out.append(SegmentPlaintext(segment.camera, segment.stream, segment.seq,
                                        segment.capture_ms, data, segment.last,
                                        segment.duration_ms))
        camera.last_seq = manifest.manifest_seq
        camera.last_hash = digest
        self._retained -= sum(cost for *_, cost in pending)
        camera.pending = []
        # Nothing reads these segments' bytes any more (the plaintexts are new bytes): their
        # assembly buffers may take the next segments.
        for _, segment_bytes, _, _ in pending:
            self._buffers.give_back(segment_bytes)
        events.extend(self._hold_back_before_range(manifest.camera, out))

    def _hold_back_before_range(self, camera: str, out: list[Event]) -> list[Event]:
        """Playback: a data stream's first segment that may overlap the range's start waits
        for its successor, which must start after the range's start (request_policy)."""
        request = self._request
        if request is None or request.mode != Mode.PLAYBACK:
            return out
        released: list[Event] = []
        for event in out:
            assert not isinstance(event, StreamEnded)
            key = (camera, event.stream)
            if holds_back(request, event.capture_ms, event.duration_ms):
                self._held[key] = event  # only ever the stream's first (check_entry_answers)
                continue
            held = self._held.pop(key, None)
            if held is not None:
                check_held_successor(camera, held.seq, held.capture_ms, event.capture_ms,
                                     request)
                released.append(held)
            released.append(event)
        return released

    def _playback_range(self) -> tuple[int, int] | None:
        return playback_range(self._request, self.header)

    def _live_start(self) -> int | None:
        return live_start(self._request, self.header)

    def _check_edges(self, end: End) -> None:
        """Playback: the stream must show, from signed data, that it covers the whole range
        of each camera: from the chain's start or a manifest before the range, to a manifest
        after the range or the chain's head as the END states it."""
        # Judged for every playback request, and for a stream read without one (a saved
        # stream) when its END states chain heads, as every Archiver-made playback END does.
        # Live: the same, from the live start to the chain head END states.
        live = self._live_start() is not None
        if live:
            if self._request is None and not end.heads:
                return
        elif self._playback_range() is None or (self._request is None and not end.heads):
            return
        heads = dict(end.heads)
        for name, camera in self._cameras.items():
            camera.edges.check_covered(name, camera.last_seq, heads.get(name), live)

    def _key(self, key_id: bytes, camera: str, stream: DataStream, commitment: bytes) -> AESGCM:
        """THE key lookup: a minute key given from outside (``known_keys``) or derived from its
        chain's record, cached, and only ever returned after it matched ``commitment``."""
        known = self._keys.get(key_id)
        if known is None:
            key = self._known_keys.get(key_id)
            if key is None:
                chain_id, step = split_key_id(key_id)
                record = self._chain_records[chain_id]
                if record.camera != camera or record.stream != stream:
                    raise IntegrityError()
                key = self._chain(record).key(step)
            known = (AESGCM(key), key_commitment(key, camera, stream, key_id), key)
            self._keys[key_id] = known
        # The manifest commits to the key: a segment that also opens under another key
        # (AES-GCM is not key-committing), or a wrong key given from outside, is refused.
        if not hmac.compare_digest(known[1], commitment):
            raise IntegrityError()
        if key_id not in self._verified:
            self._verified[key_id] = VerifiedKey(camera, stream, key_id, known[2])
        return known[0]

    def _chain(self, record: ChainRecord) -> ChainDeriver:
        chain = self._chains.get(record.chain_id)
        if chain is None:
            opener = self._openers[record.epoch_id]
            ratchet = self._ratchet(record.epoch_id)
            seed = unwrap_chain_record(ratchet.kek_at(record.ratchet_index), record,
                                       self._fingerprint)
            chain = ChainDeriver(record, seed, max_ratchet_index(opener.period_s))
            self._chains[record.chain_id] = chain
        return chain

    def _ratchet(self, epoch_id: bytes) -> KekRatchet:
        ratchet = self._ratchets.get(epoch_id)
        if ratchet is None:
            opener = self._openers[epoch_id]
            self.token_operations += 1
            kek0 = open_epoch_opener(self._identity, opener)
            ratchet = KekRatchet(epoch_id, kek0, max_ratchet_index(opener.period_s))
            self._ratchets[epoch_id] = ratchet
        return ratchet

    def _on_end(self, end: End, events: list[Event]) -> None:
        assert self.header is not None and self._archiver_key is not None
        if any(camera.pending for camera in self._cameras.values()):
            raise IntegrityError()  # segments nobody vouched for
        if not hmac.compare_digest(end.request_id, self.header.request_id):
            raise IntegrityError()
        # Signed over the digests of every record before END: order, presence and content
        # of the whole stream, including the header that names this request.
        if not hmac.compare_digest(end.transcript_hash, self._transcript.digest()):
            raise IntegrityError()
        _verify(self._archiver_key, end.signed_bytes(), end.signature)
        self._check_edges(end)
        self._ended = True
        # A first segment before the range without a successor: nothing shows it does not
        # overlap the range (one segment at most per data stream), so it is released.
        events.extend(self._held.values())
        self._held.clear()
        events.append(StreamEnded(int(end.reason)))


def _matches(segment: Segment, digest: bytes, entry: ManifestEntry) -> bool:
    return (digest == entry.digest and segment.seq == entry.seq
            and segment.stream == entry.stream and segment.capture_ms == entry.capture_ms
            and segment.duration_ms == entry.duration_ms and segment.key_id == entry.key_id
            and segment.tag == entry.tag)


_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def _verify(key: ec.EllipticCurvePublicKey, data: bytes, signature: bytes) -> None:
    try:
        key.verify(signature, data, _ECDSA_SHA256)
    except (InvalidSignature, ValueError):
        raise IntegrityError() from None

