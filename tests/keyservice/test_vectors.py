"""Every test vector through the reader: in one piece, byte by byte, in random chunks and record
by record (which also checks *where* it fails), plus the generator's reproducibility."""

from __future__ import annotations

import hashlib
import json
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from keyservice.errors import (
    FormatError,
    IntegrityError,
    KeyServiceError,
    NoMatchingIdentity,
    RangeIncomplete,
    RequestMismatch,
)
from keyservice.format import Mode
from keyservice.identity import SoftwareEcIdentity, SoftwareIdentity, fingerprint
from keyservice.reader import (
    SegmentMissing,
    SegmentPlaintext,
    SegmentSkipped,
    StreamEnded,
    StreamReader,
    StreamRequest,
)
from tests.vectors import generate

VECTOR_DIR = Path(__file__).resolve().parents[1] / "vectors" / "v2"
FILES = sorted(VECTOR_DIR.glob("*.json"))
EXPECT = {"format failure": FormatError, "integrity failure": IntegrityError,
          "no matching identity": NoMatchingIdentity, "request mismatch": RequestMismatch,
          "range incomplete": RangeIncomplete}
ISSUE_3_COVERAGE = {  # what issue 3 asks the vectors to cover, by vector name
    "good multi-minute multi-stream stream": "good-multi-minute-multi-stream",
    "bit flip in the header": "flip-header-request-id",
    "bit flip in an epoch opener": "flip-epoch-opener",
    "bit flip in a chain record": "flip-chain-record",
    "bit flip in a segment": "flip-segment-ciphertext",
    "bit flip in a manifest": "flip-manifest",
    "bit flip in the end record": "flip-end-transcript",
    "reordered segments": "reordered-segments",
    "segment moved to another camera": "segment-moved-to-other-camera",
    "segment moved to another minute": "segment-moved-to-later-minute",
    "missing end": "truncated-missing-end",
    "missing last segment": "truncated-missing-last-segment",
    "missing manifest": "manifest-missing",
    "re-signed manifest": "manifest-resigned-by-other-key",
    "forged with only the viewer certificate": "forged-with-viewer-certificate",
    "chain record for another viewer": "chain-record-for-other-viewer",
    "unknown version": "unknown-version",
    "oversized length": "oversized-segment-length",
}
ISSUE_12_COVERAGE = {  # streams that do not answer the request
    "replayed stream (nonce mismatch)": "request-replayed-stream",
    "wrong camera": "request-wrong-camera",
    "wrong range": "request-wrong-range",
    "footage outside the range": "request-segment-outside-range",
    "stale live": "request-stale-live",
    "old segments offered as live": "request-live-old-segments",
    "chain record withheld: missing, not 'not authorized'": "withheld-chain-record-is-missing",
    "no signed chain recipients: missing": "skipped-without-chain-recipients-is-missing",
    "forged chain recipients": "chain-recipients-resigned-by-other-key",
    "nothing recorded, proven by the manifests around the range": "good-empty-range",
    "the edges of a range": "good-range-with-edges",
    "range start unproven": "range-start-unproven",
    "range end unproven": "range-end-unproven",
}
ISSUE_23_COVERAGE = {  # a viewer joining a running chain
    "a join record under its signed join statement": "good-join-midway",
    "a join record without its statement": "join-record-without-join-statement",
    "a forged join statement": "join-statement-resigned-by-other-key",
    "a join record moved to an earlier step": "join-record-relabelled-to-earlier-step",
}


@pytest.fixture(scope="module")
def identities() -> dict[str, SoftwareIdentity | SoftwareEcIdentity]:
    return {name: generate.load_identity(name) for name in ("viewer-a", "viewer-b", "viewer-c")}


def load(path: Path) -> dict[str, Any]:
    vector = json.loads(path.read_text())
    vector["stream"] = bytes.fromhex("".join(vector["stream_hex"]))
    assert len(vector["stream"]) == vector["stream_length"]
    return vector


def pin_for(name: str) -> Any:
    pinned = fingerprint(generate.load_cert(name))

    def check(cert: x509.Certificate) -> None:
        # The vectors' harness reports a pin mismatch as an integrity failure.
        if fingerprint(cert) != pinned:
            raise IntegrityError()
    return check


def request_of(vector: dict[str, Any]) -> StreamRequest:
    """The request the vector's reader answers (live: a fixed viewer clock)."""
    asked = vector["request"]
    live = asked["mode"] == "live"
    clock_ms = asked.get("clock_ms")
    return StreamRequest(bytes.fromhex(asked["nonce"]), tuple(asked["cameras"]),
                         Mode.LIVE if live else Mode.PLAYBACK, asked["from_ms"], asked["to_ms"],
                         (lambda: clock_ms) if live else None,
                         asked.get("max_skew_ms", 30_000))


def run(vector: dict[str, Any], identities: dict[str, Any],
        pieces: list[bytes]) -> tuple[list[object], KeyServiceError | None, int | str, int]:
    """Feed ``pieces``; return (events released, error, index of the failing piece or
    'finish', token operations)."""
    base = identities[vector["viewer"]]
    identity = type(base)(base.certificate, base.private_key)  # type: ignore[arg-type]
    reader = StreamReader(identity, pin_for(vector["archiver_pin"]), request=request_of(vector))
    events: list[object] = []
    for i, piece in enumerate(pieces):
        try:
            events += reader.feed(piece)
        except KeyServiceError as error:
            return events, error, i, identity.operations
    try:
        reader.finish()
    except KeyServiceError as error:
        return events, error, "finish", identity.operations
    assert reader.token_operations == identity.operations
    return events, None, "finish", identity.operations


def as_json(events: list[object]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for event in events:
        if isinstance(event, SegmentPlaintext):
            out.append({"event": "segment", "camera": event.camera,
                        "stream": event.stream.name.lower(), "seq": event.seq,
                        "capture_ms": event.capture_ms, "last": event.last,
                        "sha256": hashlib.sha256(event.data).hexdigest()})
        elif isinstance(event, SegmentSkipped | SegmentMissing):
            kind = "skipped" if isinstance(event, SegmentSkipped) else "missing"
            out.append({"event": kind, "camera": event.camera,
                        "stream": event.stream.name.lower(), "seq": event.seq,
                        "capture_ms": event.capture_ms})
        else:
            assert isinstance(event, StreamEnded)
            out.append({"event": "end", "reason": event.reason})
    return out


def by_records(stream: bytes) -> list[bytes]:
    """The prefix, then one piece per record as its length field says (framing done here,
    independently of the reader; the rest of the bytes if a length runs past the end)."""
    pieces, pos = [stream[:10]], 10
    while pos < len(stream):
        length = struct.unpack(">I", stream[pos + 1:pos + 5])[0] if pos + 5 <= len(stream) else 0
        end = min(len(stream), pos + 5 + length)
        pieces.append(stream[pos:end])
        pos = end
    return pieces


def chunkings(stream: bytes, seed: int) -> dict[str, list[bytes]]:
    rng = random.Random(seed)
    chunks, i = [], 0
    while i < len(stream):
        n = rng.choice((1, 2, 3, 7, 64, 500, 4096))
        chunks.append(stream[i:i + n])
        i += n
    return {"one piece": [stream], "byte by byte": [stream[i:i + 1] for i in range(len(stream))],
            "random chunks": chunks}


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_vector(path: Path, identities: dict[str, Any]) -> None:
    vector = load(path)
    stream = vector["stream"]
    expect = vector["expect"]
    released_everywhere = []
    for how, pieces in chunkings(stream, seed=len(stream)).items():
        events, error, _, operations = run(vector, identities, pieces)
        if expect == "success":
            assert error is None, f"{how}: {error!r}"
            assert as_json(events) == vector["events"], how
            data = b"".join(e.data for e in events if isinstance(e, SegmentPlaintext))
            assert hashlib.sha256(data).hexdigest() == vector["plaintext_sha256"], how
            assert operations == vector["token_operations"], how
        else:
            assert type(error) is EXPECT[expect], f"{how}: {error!r}"
        released_everywhere.append(as_json(events))
    # However the bytes are cut, what is released is a prefix of one and the same sequence
    # (a failing call returns nothing, so larger pieces may release less before a failure).
    longest = max(released_everywhere, key=len)
    assert all(r == longest[:len(r)] for r in released_everywhere)
    if expect != "success":
        _, error, where, _ = run(vector, identities, by_records(stream))
        assert type(error) is EXPECT[expect]
        expected_where = vector["fails_at"]
        if expected_where == "prefix":
            assert where == 0
        elif expected_where == "finish":
            assert where == "finish"
        else:  # record n is piece n + 1 (piece 0 is the prefix)
            assert where == expected_where + 1


def test_vectors_cover_what_issue_3_lists() -> None:
    names = {p.stem for p in FILES}
    assert set(ISSUE_3_COVERAGE.values()) <= names
    assert set(ISSUE_12_COVERAGE.values()) <= names
    assert set(ISSUE_23_COVERAGE.values()) <= names
    expects = {load(p)["expect"] for p in FILES}
    assert expects == {"success", *EXPECT}


def test_tampered_vectors_release_no_forged_plaintext(identities: dict[str, Any]
                                                      ) -> None:
    good = load(VECTOR_DIR / "good-multi-minute-multi-stream.json")
    genuine = [json.dumps(e, sort_keys=True) for e in good["events"]]
    for path in FILES:
        vector = load(path)
        if vector["expect"] == "success" or vector["viewer"] != "viewer-a":
            continue
        events, _, _, _ = run(vector, identities, [vector["stream"]])
        for event in as_json(events):
            assert json.dumps(event, sort_keys=True) in genuine, path.stem


def test_generator_reproduces_the_files_byte_for_byte() -> None:
    rendered = generate.render()
    assert sorted(rendered) == [p.name for p in FILES]
    for name, text in rendered.items():
        assert (VECTOR_DIR / name).read_text() == text, name


@pytest.mark.parametrize("path", [p for p in FILES if load(p)["expect"] == "success"],
                         ids=lambda p: p.stem)
def test_end_transcript_follows_the_spec_rule(path: Path) -> None:
    # Recomputed from the spec alone (label, prefix, SHA-256 of each record before END),
    # independently of the keyservice code, so writer and spec cannot drift apart together.
    vector = load(path)
    prefix, *records = [bytes.fromhex(piece) for piece in vector["stream_hex"]]
    digests = [hashlib.sha256(record).digest() for record in records[:-1]]
    expected = hashlib.sha256(b"FSE1 transcript\x00" + prefix + b"".join(digests)).digest()
    end = records[-1]
    assert end[0] == 6  # END
    assert end[5 + 16 + 1:5 + 16 + 1 + 32] == expected  # after request_id and reason
    if "intermediates" in vector:
        steps = vector["intermediates"]["transcript"]
        assert steps == {"record_sha256": [d.hex() for d in digests],
                         "transcript_hash": expected.hex()}


CHAIN_VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "chains" / "derivation.json"


def test_chain_derivation_vectors() -> None:
    """keyservice's chain code (the Archiver's KeyChain and the viewer's ChainDeriver) against
    the derivation vectors, which generate.py computes with its own HKDF (RFC 5869 written
    out with hmac), so two implementations of the spec agree."""
    from keyservice.crypto import ChainDeriver, KeyChain, key_commitment
    from keyservice.format import ChainRecord, DataStream

    cases = json.loads(CHAIN_VECTORS.read_text())["cases"]
    assert len(cases) == 2
    for case in cases:
        chain_id, seed = bytes.fromhex(case["chain_id_hex"]), bytes.fromhex(case["seed_hex"])
        camera, stream = case["camera"], DataStream(case["stream"])
        record = ChainRecord(bytes(16), 0, camera, stream, chain_id, 0, bytes(12), bytes(48))
        deriver = ChainDeriver(record, seed, max_step=1441)
        archiver_side = KeyChain(camera, stream, chain_id, seed, 60, 0)
        for row in case["steps"]:
            key = deriver.key(row["step"])
            assert key.hex() == row["minute_key_hex"]
            minute = archiver_side.key_at(row["step"] * 60_000 + 5)
            assert minute.key == key and minute.key_id.hex() == row["key_id_hex"]
            assert key_commitment(key, camera, stream, minute.key_id).hex() == row["commitment_hex"]
            # Every step differs, and the viewer only holds states from the record's on.
            assert deriver._states[row["step"]].hex() == row["state_hex"]
        keys = [row["minute_key_hex"] for row in case["steps"]]
        assert len(set(keys)) == len(keys)
