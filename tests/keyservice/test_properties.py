"""Property tests: whatever is done to a valid stream, the reader fails only with FormatError,
IntegrityError or NoMatchingIdentity, and never releases plaintext that is not genuine."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyservice.errors import (
    FormatError,
    IntegrityError,
    NoMatchingIdentity,
    RangeIncomplete,
    RequestMismatch,
)
from keyservice.format import stream_prefix
from keyservice.framing import RecordSplitter
from keyservice.identity import SoftwareIdentity, fingerprint
from keyservice.reader import SegmentPlaintext, StreamReader
from tests.vectors import generate

ALLOWED = (FormatError, IntegrityError, NoMatchingIdentity, RequestMismatch, RangeIncomplete)
VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "v2"
SETTINGS = settings(max_examples=500, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _stream(name: str) -> bytes:
    import json

    return bytes.fromhex("".join(json.loads((VECTORS / f"{name}.json").read_text())["stream_hex"]))


GOOD = _stream("good-multi-minute-multi-stream")
LIVE = _stream("good-live-sha1-oaep-joined-midway")
BASES = {"viewer-a": GOOD, "viewer-b": LIVE}
RECORDS = {name: [raw for _, raw in RecordSplitter().feed(data)] for name, data in BASES.items()}
# (start, length) of each record; the prefix is left to the vectors and the fuzzer.
STARTS = {name: [(10 + sum(map(len, records[:i])), len(records[i])) for i in range(len(records))]
          for name, records in RECORDS.items()}
IDENTITIES = {name: generate.load_identity(name) for name in BASES}
PINNED = fingerprint(generate.load_cert("archiver"))


def pin(cert: x509.Certificate) -> None:
    if fingerprint(cert) != PINNED:
        raise IntegrityError()


def key(event: SegmentPlaintext) -> tuple[Any, ...]:
    return (event.camera, event.stream, event.seq, event.capture_ms, event.last,
            hashlib.sha256(event.data).digest())


def read(viewer: str, data: bytes, chunks: list[int], pooled: bool = False
         ) -> tuple[list[Any], Exception | None]:
    base = IDENTITIES[viewer]
    reader = StreamReader(SoftwareIdentity(base.certificate, base.private_key), pin)
    if pooled:  # reuse buffers for these small segments too, so mutations hit that path
        reader._buffers.min_size = 64
    events: list[Any] = []
    try:
        i = 0
        for size in chunks:
            events += reader.feed(data[i:i + size])
            i += size
        events += reader.feed(data[i:])
        reader.finish()
    except ALLOWED as error:
        return events, error
    return events, None


GENUINE = {viewer: {key(e) for e in read(viewer, data, [])[0] if isinstance(e, SegmentPlaintext)}
           for viewer, data in BASES.items()}


def check(viewer: str, mutated: bytes, chunks: list[int]) -> None:
    # Anything but ALLOWED propagates: a failure. Odd chunk lists reuse the reader's buffers.
    events, error = read(viewer, mutated, chunks, pooled=len(chunks) % 2 == 1)
    if error is None:
        assert mutated == BASES[viewer], "a modified stream was accepted"
    for event in events:
        if isinstance(event, SegmentPlaintext):
            assert key(event) in GENUINE[viewer], "released plaintext that is not genuine"


viewers = st.sampled_from(sorted(BASES))
chunk_sizes = st.lists(st.integers(1, 3000), max_size=8)


@st.composite
def byte_mutations(draw: st.DrawFn) -> tuple[str, bytes]:
    viewer = draw(viewers)
    data = bytearray(BASES[viewer])
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "duplicate",
                                     "overwrite"]))
        # Aim at a record first (uniformly), then at a byte in it: every record type gets hit,
        # not just the prefix and the header.
        record = draw(st.integers(0, len(STARTS[viewer]) - 1))
        start, length = STARTS[viewer][record]
        pos = min(start + draw(st.integers(0, length - 1)), max(0, len(data) - 1))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=40))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 300))]
        elif kind == "duplicate":
            piece = data[pos:pos + draw(st.integers(1, 500))]
            at = draw(st.integers(0, len(data)))
            data[at:at] = piece
        else:
            blob = draw(st.binary(min_size=1, max_size=8))
            data[pos:pos + len(blob)] = blob
    return viewer, bytes(data)


@st.composite
def record_mutations(draw: st.DrawFn) -> tuple[str, bytes]:
    """Well-framed streams made of genuine records in the wrong order, number or place."""
    viewer = draw(viewers)
    records = list(RECORDS[viewer])
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["drop", "swap", "duplicate", "move", "foreign"]))
        i = draw(st.integers(0, len(records) - 1))
        j = draw(st.integers(0, len(records) - 1))
        if kind == "drop" and len(records) > 1:
            del records[i]
        elif kind == "swap":
            records[i], records[j] = records[j], records[i]
        elif kind == "duplicate":
            records.insert(j, records[i])
        elif kind == "move":
            records.insert(j, records.pop(i))
        else:  # a genuine record from the other viewer's stream
            other = RECORDS["viewer-b" if viewer == "viewer-a" else "viewer-a"]
            records.insert(j, other[draw(st.integers(0, len(other) - 1))])
    return viewer, stream_prefix() + b"".join(records)


@SETTINGS
@given(byte_mutations(), chunk_sizes)
def test_byte_mutations_fail_cleanly(mutation: tuple[str, bytes], chunks: list[int]) -> None:
    check(*mutation, chunks)


@SETTINGS
@given(record_mutations(), chunk_sizes)
def test_record_mutations_fail_cleanly(mutation: tuple[str, bytes], chunks: list[int]) -> None:
    check(*mutation, chunks)


@settings(max_examples=40, deadline=None)
@given(viewers, chunk_sizes)
def test_chunking_never_changes_the_result(viewer: str, chunks: list[int]) -> None:
    events, error = read(viewer, BASES[viewer], chunks)
    assert error is None
    assert events == read(viewer, BASES[viewer], [])[0]


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=600), chunk_sizes)
def test_arbitrary_bytes_after_a_valid_prefix_fail_cleanly(tail: bytes, chunks: list[int]
                                                           ) -> None:
    check("viewer-a", GOOD[:600] + tail, chunks)


def _large_stream() -> tuple[bytes, list[bytes]]:
    """Segments big enough (256 KiB and more) for the reader's reused buffers, several per
    manifest, on two cameras."""
    from keyservice.format import DataStream
    from tests.keyservice.rig import CAM, CAM2, Rig, T

    rig = Rig(cameras=(CAM, CAM2))
    rng = random.Random(3)
    rig.rotate(CAM, DataStream.VIDEO, T)
    rig.rotate(CAM2, DataStream.VIDEO, T)
    for group in range(3):
        for i in range(2):
            rig.segment(CAM, DataStream.VIDEO, T + 10 * group + i,
                        rng.randbytes(rng.choice((270_000, 330_000))))
        rig.segment(CAM2, DataStream.VIDEO, T + 10 * group, rng.randbytes(300_000))
        rig.manifest(CAM, T + 10 * group + 5)
        rig.manifest(CAM2, T + 10 * group + 6)
    return rig.end(), list(rig.plaintexts)


LARGE, LARGE_PLAINTEXTS = _large_stream()
LARGE_IDENTITY = generate.load_identity("viewer-a")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 700_000), max_size=10), st.one_of(st.none(), st.integers(0, len(LARGE) - 1)))
def test_reused_buffers_never_mix_segments(chunks: list[int], flip: int | None) -> None:
    data = bytearray(LARGE)
    if flip is not None:
        data[flip] ^= 0x10
    reader = StreamReader(SoftwareIdentity(LARGE_IDENTITY.certificate,
                                           LARGE_IDENTITY.private_key), pin)
    events: list[Any] = []
    try:
        i = 0
        for size in chunks:
            events += reader.feed(bytes(data[i:i + size]))
            i += size
        events += reader.feed(bytes(data[i:]))
        reader.finish()
    except ALLOWED:
        assert flip is not None
    else:
        assert flip is None, "a modified stream was accepted"
    released = [e.data for e in events if isinstance(e, SegmentPlaintext)]
    assert all(p in LARGE_PLAINTEXTS for p in released)
    if flip is None:
        assert sorted(released) == sorted(LARGE_PLAINTEXTS)
