"""Writes fusion streams, the Archiver's side: its manifest chains (ManifestChain), the signed
chain-recipients statement (issue_chain_recipients) and the fusion-stream writer (StreamWriter).
(This module was keyservice/stream.py; "stream" alone names too many things, see the glossary
in docs/architecture.md.)

The viewer's side, which checks all of it, is keyservice/reader.py.

Pure: no I/O, no ``pkcs11``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace

from keyservice.crypto import KeyChain, PeriodKey
from keyservice.format import (
    MAX_RECIPIENTS_PER_PART,
    RECORD_HEADER_LEN,
    ZERO_HASH,
    ChainRecipients,
    End,
    Header,
    KeyCommitment,
    Manifest,
    ManifestEntry,
    Record,
    RecordType,
    Segment,
    encode_record,
    max_body,
    record_digest,
    segment_digest,
    stream_prefix,
    validate_name,
)
from keyservice.framing import Transcript
from keyservice.identity import Signer


class ManifestChain:
    """One camera's chain of signed manifests. Its whole state is ``(next_seq, prev_hash)``:
    persist both with each manifest and pass them back after a restart."""

    def __init__(self, camera: str, next_seq: int = 0, prev_hash: bytes = ZERO_HASH) -> None:
        self.camera = validate_name(camera)
        if not 0 <= next_seq < 2**64 or len(prev_hash) != len(ZERO_HASH):
            raise ValueError("A manifest chain resumes from a u64 sequence and a 32-byte hash.")
        # Readers accept a chain start only as (0, zero hash): keep the two consistent.
        if (next_seq == 0) != (prev_hash == ZERO_HASH):
            raise ValueError("A manifest chain starts at sequence 0 with the zero hash, and "
                             "only there.")
        self.next_seq = next_seq
        self.prev_hash = prev_hash

    def issue(self, segments: Sequence[Segment], keys: Sequence[PeriodKey], signer: Signer,
              issued_ms: int, flags: int = 0) -> tuple[Manifest, bytes]:
        """Sign a manifest for ``segments`` (in stream order) and advance the chain.

        ``keys`` must include the minute key of every segment; the manifest commits to each.
        Returns the record and its encoded bytes (archive these; the next link hashes them).
        """
        by_id = {key.key_id: key for key in keys}
        entries: list[ManifestEntry] = []
        commitments: dict[bytes, KeyCommitment] = {}
        for segment in segments:
            key = by_id.get(segment.key_id)
            if segment.camera != self.camera:
                raise ValueError(f"Segment of camera {segment.camera!r} offered to the manifest "
                                 f"chain of {self.camera!r}.")
            if key is None or key.camera != segment.camera or key.stream != segment.stream:
                raise ValueError("Every segment needs its own minute key in `keys`.")
            entries.append(ManifestEntry(segment.stream, segment.seq, segment.capture_ms,
                                         segment.key_id, segment.tag, segment_digest(segment),
                                         segment.duration_ms))
            if segment.key_id not in commitments:
                commitments[segment.key_id] = KeyCommitment(key.key_id, key.commitment)
        unsigned = Manifest(self.camera, self.next_seq, self.prev_hash, issued_ms, flags,
                            tuple(entries), tuple(commitments.values()))
        manifest = replace(unsigned, signature=signer.sign(unsigned.signed_bytes()))
        encoded = encode_record(manifest)
        self.next_seq += 1
        self.prev_hash = hashlib.sha256(encoded).digest()
        return manifest, encoded


def issue_chain_recipients(chain: KeyChain, viewers: Sequence[bytes], signer: Signer
                           ) -> list[bytes]:
    """The signed statement of which viewers ``chain``'s starting state was wrapped for (their
    certificate fingerprints), made when the chain starts, in as many parts as needed (at
    most MAX_RECIPIENTS_PER_PART viewers each; an empty list still makes one part). Archive
    every part before the chain's first segment. Returns their encoded bytes."""
    ordered = sorted(set(viewers))
    chunks = [ordered[i:i + MAX_RECIPIENTS_PER_PART]
              for i in range(0, len(ordered), MAX_RECIPIENTS_PER_PART)] or [[]]
    parts = []
    for part, chunk in enumerate(chunks):
        unsigned = ChainRecipients(chain.camera, chain.stream, chain.chain_id,
                                   chain.start_period, part, len(chunks), tuple(chunk))
        parts.append(encode_record(unsigned.with_signature(
            signer.sign(unsigned.signed_bytes()))))
    return parts


def issue_chain_join(chain: KeyChain, index: int, parts: int, join_step: int,
                     viewers: Sequence[bytes], signer: Signer) -> bytes:
    """The signed join statement (issue 23): ``viewers`` (fingerprints) were given ``chain``'s
    state from ``join_step`` on, and nothing before. It is the chain's statement number
    ``index`` (>= ``parts``, the start statement's part count: one more than the statement
    before it). Archive it before the next segment of the chain. Returns its encoded bytes."""
    unsigned = ChainRecipients(chain.camera, chain.stream, chain.chain_id, chain.start_period,
                               index, parts, tuple(sorted(set(viewers))), join_step=join_step)
    return encode_record(unsigned.with_signature(signer.sign(unsigned.signed_bytes())))


class StreamWriter:
    """Writes one fusion stream (one response to one viewer) and keeps its transcript hash.

    Records from the archive are passed through as bytes, never re-encrypted. ``add`` checks
    only their framing; the viewer's reader checks everything.
    """

    def __init__(self, header: Header) -> None:
        self.header = header
        self._transcript = Transcript()
        self._state = "new"

    def start(self) -> bytes:
        if self._state != "new":
            raise ValueError("StreamWriter.start() may be called once, first.")
        record = encode_record(self.header)
        self._transcript.add(record_digest(record))
        self._state = "open"
        return stream_prefix() + record

    def add(self, record: Record | bytes, digest: bytes | None = None) -> bytes:
        """The bytes to send for ``record`` (an archived record's bytes, or a record).

        ``digest`` may be given to save hashing the record again: it must be SHA-256 of the
        record's bytes, as archived alongside them (for a segment, the digest its manifest
        entry carries; for a manifest, the chain hash). It is not checked here; a wrong one
        only makes the viewer refuse the stream, because the reader hashes what it receives.
        """
        if self._state != "open":
            raise ValueError("StreamWriter.add() needs start() first and nothing after end().")
        if isinstance(record, bytes | bytearray | memoryview):
            data = bytes(record)
            _check_framing(data)
        else:
            if isinstance(record, Header | End):
                raise ValueError("Header and end records are written by start() and end().")
            data = encode_record(record)
        if digest is None:
            digest = record_digest(data)
        elif not isinstance(digest, bytes) or len(digest) != len(ZERO_HASH):
            raise ValueError("A record digest is the 32-byte SHA-256 of the record's bytes.")
        self._transcript.add(digest)
        return data

    def end(self, signer: Signer, reason: int,
            heads: Sequence[tuple[str, int]] = ()) -> bytes:
        """``heads``: per camera, the next manifest sequence number of its chain (the
        Archiver's own state, not its index), so a reader can tell that a stream whose last
        manifest is ``head - 1`` reached the present."""
        if self._state != "open":
            raise ValueError("StreamWriter.end() needs start() first and may be called once.")
        unsigned = End(self.header.request_id, reason, self._transcript.digest(),
                       heads=tuple(heads))
        data = encode_record(replace(unsigned, signature=signer.sign(unsigned.signed_bytes())))
        self._state = "ended"
        return data


def _check_framing(data: bytes) -> None:
    """One whole record of a type that may be passed through (not HEADER, not END)."""
    if len(data) < RECORD_HEADER_LEN:
        raise ValueError("Not an encoded record: shorter than its type and length.")
    kind, length = data[0], int.from_bytes(data[1:RECORD_HEADER_LEN], "big")
    if kind not in (RecordType.EPOCH_OPENER, RecordType.CHAIN_RECORD, RecordType.SEGMENT,
                    RecordType.MANIFEST, RecordType.CHAIN_RECIPIENTS):
        raise ValueError(f"Record type {kind} cannot be passed through a stream writer.")
    if length != len(data) - RECORD_HEADER_LEN or length > max_body(kind):
        raise ValueError("Not exactly one encoded record: its length field disagrees.")
