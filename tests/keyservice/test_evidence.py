"""Evidence packages, pure: built from a real verified stream (software test keys, the real
crypto core) and verified from their files alone; every kind of tampering is caught with its
reason, also when SHA256SUMS was recomputed to match."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from keyservice.certs import build_viewer_certificate
from keyservice.evidence.build import build_package, collect, sha256sums
from keyservice.evidence.layout import (
    INDEX,
    KEYS,
    RECIPIENT,
    SEALED_KEYS,
    STREAM_DIGESTS,
    STREAM_END,
    SUMS,
    VIDEO,
    EvidenceError,
)
from keyservice.evidence.verify import open_sealed_keys, parse_keys, verify_package
from keyservice.framing import RecordSplitter
from keyservice.identity import (
    Recipient,
    SoftwareEcIdentity,
    SoftwareIdentity,
    SoftwareSigner,
    fingerprint,
)
from keyservice.keyscheme import KeyScheme
from keyservice.reader import SegmentPlaintext, StreamReader
from tests.client.streams import T0, Seg, build_stream, software_signer, software_viewer

RANGE = (T0, T0 + 3_600_000)


def _keys(reader: StreamReader) -> dict[bytes, bytes]:
    """Key id -> minute key of the keys the reader verified (what an export packages)."""
    return {key_id: k.key for key_id, k in reader.verified_keys.items()}


def _export(viewer: SoftwareIdentity, signer: SoftwareSigner, plan: list[Seg],
            recipient: Recipient | None = None) -> tuple[dict[str, bytes], bytes, StreamReader]:
    data, _ = build_stream(viewer, signer, plan)
    reader = StreamReader(viewer, lambda cert: None)
    events = reader.feed(data)
    reader.finish()
    video = b"".join(e.data for e in events if isinstance(e, SegmentPlaintext))
    keys = _keys(reader)
    collected = collect(((r, bytes(raw)) for r, raw in RecordSplitter().feed(data)), "cam1",
                        keys)
    files = build_package(camera="cam1", from_ms=RANGE[0], to_ms=RANGE[1],
                          archiver_cert=signer.certificate, collected=collected, keys=keys,
                          video=video, exported_ms=T0 + 7_200_000, recipient=recipient)
    return files, video, reader


@pytest.fixture(scope="module")
def parties() -> tuple[SoftwareIdentity, SoftwareSigner]:
    return software_viewer("alice"), software_signer()


@pytest.fixture(scope="module")
def package(parties: tuple[SoftwareIdentity, SoftwareSigner]
            ) -> tuple[dict[str, bytes], bytes]:
    plan = [Seg(T0 + 2000 * i, os.urandom(1500) + b"segment %d" % i) for i in range(6)]
    files, video, _ = _export(*parties, plan)
    return files, video


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes((data[at] ^ 0x01,)) + data[at + 1:]


def _resum(files: dict[str, bytes]) -> dict[str, bytes]:
    """As an attacker who also fixes SHA256SUMS."""
    out = {k: v for k, v in files.items() if k != SUMS}
    out[SUMS] = sha256sums(out)
    return out


def test_package_verifies_and_holds_exactly_its_keys(
        package: tuple[dict[str, bytes], bytes],
        parties: tuple[SoftwareIdentity, SoftwareSigner]) -> None:
    files, video = package
    report = verify_package(files, expect_archiver=fingerprint(parties[1].certificate))
    assert report.ok, report.failures
    assert report.video == video == files[VIDEO]
    assert (report.camera, report.from_ms, report.to_ms) == ("cam1", *RANGE)
    assert report.archiver_sha256 == fingerprint(parties[1].certificate).hex()
    assert report.segments == 6 and report.manifests == 6 and report.keys == 6
    assert any("signature" in v for v in report.verified)
    assert any("key commitment" in v for v in report.verified)
    assert len(parse_keys(files[KEYS])) == 6


def test_the_wrong_archiver_is_refused(package: tuple[dict[str, bytes], bytes]) -> None:
    files, _ = package
    other = fingerprint(software_signer("other").certificate)
    report = verify_package(files, expect_archiver=other)
    assert not report.ok
    assert any("not the expected Archiver" in f for f in report.failures)


def _segment(files: dict[str, bytes]) -> str:
    return sorted(n for n in files if n.startswith("segments/"))[2]


def _manifest(files: dict[str, bytes], ext: str) -> str:
    return sorted(n for n in files if n.startswith("manifests/") and n.endswith(ext))[2]


def _key_digit(keys_txt: bytes) -> int:
    """A hex digit of the first key (after "ID STREAM ") that stays a hex digit when its low
    bit flips ("0" <-> "1", "b" <-> "c", ...): the check reached is the commitment, not the
    parser."""
    start = keys_txt.index(b" ", 33) + 1
    return next(i for i in range(start, start + 64) if keys_txt[i] in b"0123456789bcde")


# file chooser, byte position chooser, the reason when SHA256SUMS was recomputed
TAMPERING: dict[str, tuple[Callable[[dict[str, bytes]], str], Callable[[bytes], int], str]] = {
    "segment ciphertext": (_segment, lambda b: len(b) // 2, "is not the digest the Archiver "
                           "signed"),
    "segment capture time": (_segment, lambda b: 5 + 1 + 4 + 1 + 8 + 7, "is not the digest"),
    "manifest record": (lambda f: _manifest(f, ".rec"), lambda b: 40,
                        "signature does not verify"),
    "manifest signature": (lambda f: _manifest(f, ".rec"), lambda b: len(b) - 3,
                           "signature does not verify"),
    "manifest .signed": (lambda f: _manifest(f, ".signed"), lambda b: 40,
                         "is not the signed part"),
    "manifest .sig": (lambda f: _manifest(f, ".sig"), lambda b: len(b) - 3,
                      "is not the signature in"),
    "key": (lambda f: KEYS, lambda b: _key_digit(b),
            "does not match the Archiver's signed key commitment"),
    "video": (lambda f: VIDEO, lambda b: len(b) // 3, "video.ts is not the decrypted segments"),
    "certificate": (lambda f: "archiver.pem", lambda b: 300, "archiver.pem"),
}


@pytest.mark.parametrize("what", sorted(TAMPERING))
def test_a_flipped_byte_is_detected_with_its_reason(
        package: tuple[dict[str, bytes], bytes], what: str) -> None:
    files, _ = package
    choose, position, reason = TAMPERING[what]
    name = choose(files)
    tampered = dict(files)
    data = files[name]
    tampered[name] = _flip(data, position(data))
    plain = verify_package(tampered)
    assert not plain.ok and plain.video is None
    assert any(f.startswith(f"{name}: its SHA-256 differs from the one in {SUMS}")
               for f in plain.failures), plain.failures
    # SHA256SUMS recomputed: the signed data still catches it.
    resummed = verify_package(_resum(tampered))
    assert not resummed.ok and resummed.video is None
    assert not any(SUMS in f for f in resummed.failures), resummed.failures
    assert any(reason in f for f in resummed.failures), resummed.failures


def test_a_dropped_manifest_breaks_the_chain(package: tuple[dict[str, bytes], bytes]) -> None:
    files, _ = package
    index = json.loads(files[INDEX])
    dropped = index["manifests"].pop(3)
    stem = dropped[:-len(".rec")]
    tampered = {k: v for k, v in files.items() if not k.startswith(stem)}
    tampered[INDEX] = json.dumps(index).encode()
    report = verify_package(_resum(tampered))
    assert any("manifest chain is broken" in f for f in report.failures), report.failures


def test_a_dropped_segment_is_a_gap_and_its_key_must_go(
        package: tuple[dict[str, bytes], bytes]) -> None:
    files, _ = package
    index = json.loads(files[INDEX])
    dropped = index["segments"].pop()  # the last one: the others keep their order
    tampered = {k: v for k, v in files.items() if k != dropped}
    tampered[INDEX] = json.dumps(index).encode()
    report = verify_package(_resum(tampered))
    assert any("1 recorded segment(s) in the range" in g for g in report.gaps), report.gaps
    # Its key is still in keys.txt: a package must not reveal a key it does not need.
    assert any("which none of its segments uses" in f for f in report.failures), report.failures


def test_an_extra_key_is_refused(package: tuple[dict[str, bytes], bytes]) -> None:
    files, _ = package
    tampered = dict(files)
    tampered[KEYS] = files[KEYS] + (os.urandom(16).hex() + " 0 " + os.urandom(32).hex()
                                    + "\n").encode()
    report = verify_package(_resum(tampered))
    assert any("which none of its segments uses" in f for f in report.failures)


def test_an_unexpected_file_is_refused(package: tuple[dict[str, bytes], bytes]) -> None:
    files, _ = package
    report = verify_package(_resum({**files, "notes.txt": b"trust me"}))
    assert any("notes.txt is in the package but not part of it" in f for f in report.failures)


def test_only_the_collected_segments_keys_go_in(
        parties: tuple[SoftwareIdentity, SoftwareSigner]) -> None:
    """A viewer that opened more keys than it exports (a sub-range) packages only those of the
    exported segments."""
    viewer, signer = parties
    plan = [Seg(T0 + 2000 * i, b"x%d" % i * 50) for i in range(4)]
    data, _ = build_stream(viewer, signer, plan)
    reader = StreamReader(viewer, lambda cert: None)
    events = reader.feed(data)
    reader.finish()
    keys = _keys(reader)
    assert len(keys) == 4
    records = [(r, bytes(raw)) for r, raw in RecordSplitter().feed(data)]
    collected = collect(records, "cam1", keys)
    first_two = type(collected)(collected.manifests[:2], collected.segments[:2],
                                collected.header, collected.end, collected.digests)
    video = b"".join(e.data for e in events[:2] if isinstance(e, SegmentPlaintext))
    files = build_package(camera="cam1", from_ms=RANGE[0], to_ms=RANGE[1],
                          archiver_cert=signer.certificate, collected=first_two, keys=keys,
                          video=video, exported_ms=T0)
    assert len(parse_keys(files[KEYS])) == 2
    report = verify_package(files)
    assert report.ok, report.failures


def test_keys_sealed_to_an_rsa_recipient(parties: tuple[SoftwareIdentity, SoftwareSigner]
                                         ) -> None:
    viewer, signer = parties
    court = software_viewer("court")
    plan = [Seg(T0 + 2000 * i, b"sealed %d" % i * 40) for i in range(3)]
    files, video, _ = _export(viewer, signer, plan, Recipient(court.certificate,
                                                              KeyScheme.RSA_OAEP_SHA256))
    assert KEYS not in files and {SEALED_KEYS, RECIPIENT} <= set(files)
    for key in _export_keys(viewer, signer, plan):
        assert key.hex().encode() not in files[SEALED_KEYS]
    without = verify_package(files)
    assert not without.failures and not without.ok and without.not_checked
    assert without.video is None
    opened = verify_package(files, open_keys=lambda sealed: open_sealed_keys(sealed, court))
    assert opened.ok, opened.failures
    assert opened.video == video
    other = software_viewer("other")
    wrong = verify_package(files, open_keys=lambda sealed: open_sealed_keys(sealed, other))
    assert any("sealed to certificate" in f for f in wrong.failures)


def _export_keys(viewer: SoftwareIdentity, signer: SoftwareSigner,
                 plan: list[Seg]) -> list[bytes]:
    _, _, reader = _export(viewer, signer, plan)
    return list(_keys(reader).values())


def test_keys_sealed_to_an_ec_recipient(parties: tuple[SoftwareIdentity, SoftwareSigner]
                                        ) -> None:
    viewer, signer = parties
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_viewer_certificate(key, "court-ec", oaep_hash=KeyScheme.ECDH_P256,
                                    now=dt.datetime.now(dt.UTC))
    court = SoftwareEcIdentity(cert, key)
    plan = [Seg(T0 + 2000 * i, b"ec %d" % i * 40) for i in range(2)]
    files, video, _ = _export(viewer, signer, plan, Recipient(cert, KeyScheme.ECDH_P256))
    report = verify_package(files, open_keys=lambda sealed: open_sealed_keys(sealed, court))
    assert report.ok, report.failures
    assert report.video == video
    tampered = dict(files)
    tampered[SEALED_KEYS] = files[SEALED_KEYS].replace(b'"nonce": "', b'"nonce": "00', 1)
    with pytest.raises(EvidenceError):
        open_sealed_keys(tampered[SEALED_KEYS], court)


def test_the_range_and_the_stream_are_the_archivers_signed_ones(
        package: tuple[dict[str, bytes], bytes]) -> None:
    files, _ = package
    report = verify_package(files)
    assert report.exported_signed and any("signed END record" in v for v in report.verified)
    index = json.loads(files[INDEX])
    index["to_ms"] -= 60_000  # a narrower range claimed than the Archiver served
    claimed = verify_package(_resum({**files, INDEX: json.dumps(index).encode()}))
    assert any("signed stream answers the range" in f for f in claimed.failures)
    digests = files[STREAM_DIGESTS].splitlines(keepends=True)
    del digests[3]  # a record of the stream left out of the transcript
    cut = verify_package(_resum({**files, STREAM_DIGESTS: b"".join(digests)}))
    assert any("not the transcript the Archiver's END record signs" in f
               for f in cut.failures), cut.failures
    end = verify_package(_resum({**files, STREAM_END: _flip(files[STREAM_END], 12)}))
    assert not end.ok and any("stream" in f or "END" in f for f in end.failures), end.failures


def test_verified_keys_are_exactly_those_of_released_segments(
        parties: tuple[SoftwareIdentity, SoftwareSigner]) -> None:
    viewer, signer = parties
    plan = [Seg(T0, b"a" * 100), Seg(T0 + 2000, b"b" * 100, authorized=False),
            Seg(T0 + 4000, b"c" * 100)]
    data, _ = build_stream(viewer, signer, plan)
    reader = StreamReader(viewer, lambda cert: None)
    events = reader.feed(data)
    reader.finish()
    released = [e for e in events if isinstance(e, SegmentPlaintext)]
    assert len(released) == 2
    keys = _keys(reader)
    records = [r for r, _ in RecordSplitter().feed(data)]
    released_ids = {r.key_id for r in records if type(r).__name__ == "Segment"}
    assert set(keys) == released_ids and len(keys) == 2
    keys.clear()  # a copy: the reader's own stays
    assert len(_keys(reader)) == 2


def test_random_damage_never_passes_and_never_crashes(
        package: tuple[dict[str, bytes], bytes]) -> None:
    """Any byte of any file flipped, SHA256SUMS recomputed or not: a report with a failure,
    never an exception and never the video."""
    files, _ = package
    rng = __import__("random").Random(14)
    names = sorted(n for n in files if n != SUMS)
    # The one unsigned statement: when the package was written (the exporter's clock).
    index = files[INDEX]
    start = index.index(b'"exported_ms"')
    unsigned = range(start, index.index(b"\n", index.index(b'"exported"', start)))
    for _ in range(300):
        name = rng.choice(names)
        data = files[name]
        at = rng.randrange(len(data))
        tampered = {**files, name: _flip(data, at)}
        resum = rng.random() < 0.7
        report = verify_package(_resum(tampered) if resum else tampered)
        if name == INDEX and resum and at in unsigned:
            continue
        assert report.failures and report.video is None, (name, at)
