"""Evidence packages of a range across a change of Archiver (format ``fusion-evidence/2``,
issue 22): one ``fusion-evidence/1`` package per part, each the stream of the Archiver that
recorded that part, verified against its own signer, under one index and one SHA256SUMS.

What ties the parts together is signed: each part's stream was requested with a nonce derived
from the package (``part_nonce``: a random package id, the camera, the whole range, the part's
number and the number of parts), and each Archiver signs the nonce it answered in its stream's
header. So a part cut out (the count), parts swapped (the number) or a part taken from
another export (the package id) no longer matches what its Archiver signed.

``verify_evidence`` verifies a package of either format (a one-part package as before).

Pure: bytes in, bytes out. No I/O, no ``pkcs11``.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import re
import struct
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509

from keyservice.errors import KeyServiceError
from keyservice.evidence.build import sha256sums
from keyservice.evidence.layout import (
    FORMAT_PARTS,
    INDEX,
    STREAM_HEADER,
    SUMS,
    iso_time,
    part_dir,
)
from keyservice.evidence.verify import Report, check_sums, verify_package
from keyservice.format import Header, decode_record, validate_name
from keyservice.labels import LABEL_EVIDENCE_PART

__all__ = ["MAX_PARTS", "PackagePart", "PartReport", "PartSwitch", "PartsReport",
           "build_parts_package", "part_nonce", "verify_evidence", "verify_parts"]

MAX_PARTS = 64  # a range recorded by more Archivers than this is exported in pieces
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")


def part_nonce(package_id: bytes, camera: str, from_ms: int, to_ms: int, index: int,
               count: int) -> bytes:
    """The request nonce of part ``index`` (1-based) of ``count`` of the package: 16 bytes of
    SHA-256 over the label, the random package id, the camera, the whole range and the part's
    place. Unpredictable (the package id is random), and what the part's Archiver signs."""
    if len(package_id) != 16 or not 1 <= index <= count <= MAX_PARTS:
        raise ValueError("A package id is 16 bytes and a part's number lies in 1..count.")
    name = validate_name(camera).encode()
    return hashlib.sha256(LABEL_EVIDENCE_PART + package_id + bytes([len(name)]) + name
                          + struct.pack(">QQII", from_ms, to_ms, index, count)).digest()[:16]


@dataclass(frozen=True)
class PackagePart:
    """One part as exported: the Archiver's name in the site and its one-part package."""

    archiver: str
    files: Mapping[str, bytes]


def build_parts_package(*, camera: str, from_ms: int, to_ms: int, package_id: bytes,
                        parts: Sequence[PackagePart], exported_ms: int) -> dict[str, bytes]:
    """The files of a ``fusion-evidence/2`` package: each part's files under its directory,
    the index (the parts in order, with their Archivers) and SHA256SUMS over everything."""
    validate_name(camera)
    if not 2 <= len(parts) <= MAX_PARTS:
        raise ValueError(f"A package of parts holds 2..{MAX_PARTS} parts.")
    files: dict[str, bytes] = {}
    listed = []
    for i, part in enumerate(parts, 1):
        prefix = part_dir(i)
        index = json.loads(part.files[INDEX])
        files.update({prefix + name: data for name, data in part.files.items()})
        listed.append({"dir": prefix, "archiver": part.archiver,
                       "archiver_sha256": index["archiver_sha256"],
                       "from_ms": index["from_ms"], "to_ms": index["to_ms"]})
    files[INDEX] = (json.dumps({
        "format": FORMAT_PARTS,
        "camera": camera,
        "from_ms": from_ms, "to_ms": to_ms, "from": iso_time(from_ms), "to": iso_time(to_ms),
        "exported_ms": exported_ms, "exported": iso_time(exported_ms),
        "package_id": package_id.hex(),
        "parts": listed,
    }, indent=1) + "\n").encode()
    files[SUMS] = sha256sums(files)
    return files


@dataclass(frozen=True)
class PartReport:
    """One part's verification (a one-part package's Report) and the Archiver it names."""

    number: int
    archiver: str
    report: Report


@dataclass(frozen=True)
class PartSwitch:
    """Where the package goes from one part's Archiver to the next, at the signed edges: the
    end of the old one's last segment and the start of the new one's first (None: no video)."""

    from_archiver: str
    to_archiver: str
    last_end_ms: int | None
    first_start_ms: int | None


@dataclass
class PartsReport(Report):
    """A package of parts: the aggregate verdict (``failures``, ``missing``, ``not_checked``,
    ``signer_established``, ``video`` as for one part) and each part's own report."""

    parts: list[PartReport] = field(default_factory=list)
    switches: list[PartSwitch] = field(default_factory=list)


def verify_evidence(files: Mapping[str, bytes], *,
                    open_keys: Callable[[bytes], bytes] | None = None,
                    expect_archiver: Collection[bytes] = (),
                    site_cas: Sequence[x509.Certificate] = ()) -> Report:
    """Verify a package of either format. A one-part package: ``verify_package``. A package of
    parts: see ``verify_parts``. ``expect_archiver``: the certificates' SHA-256 the verifier
    knows (each part's signer must be one of them)."""
    try:
        index = json.loads(files.get(INDEX, b""))
    except (ValueError, UnicodeDecodeError):
        index = None
    if isinstance(index, dict) and index.get("format") == FORMAT_PARTS:
        return verify_parts(files, open_keys=open_keys, expect_archiver=expect_archiver,
                            site_cas=site_cas)
    return verify_package(files, open_keys=open_keys,
                          expect_archiver=frozenset(expect_archiver) or None, site_cas=site_cas)


class _Fatal(Exception):
    pass


def verify_parts(files: Mapping[str, bytes], *,
                 open_keys: Callable[[bytes], bytes] | None = None,
                 expect_archiver: Collection[bytes] = (),
                 site_cas: Sequence[x509.Certificate] = ()) -> PartsReport:
    """A ``fusion-evidence/2`` package: SHA256SUMS over every file; each part verified as a
    one-part package against its own certificate (and its signer established on its own);
    each part's signed request nonce is its place in this package (``part_nonce``); the parts'
    signed ranges follow one another and cover the package's range; consecutive parts come
    from different Archiver certificates; the same exporting viewer throughout."""
    report = PartsReport()
    try:
        _verify_parts(files, report, open_keys, frozenset(expect_archiver), tuple(site_cas))
    except _Fatal as exc:
        report.failures.append(str(exc))
    if not report.ok:
        report.video = None
    return report


def _parts_index(files: Mapping[str, bytes]) -> dict[str, object]:
    index = json.loads(files[INDEX])
    parts = index.get("parts")
    ints = ("from_ms", "to_ms", "exported_ms")
    if (not all(isinstance(index.get(k), int) and not isinstance(index.get(k), bool)
                for k in ints)
            or not isinstance(index.get("camera"), str)
            or not isinstance(index.get("package_id"), str)
            or not _HEX32.fullmatch(index["package_id"])
            or not isinstance(parts, list) or not 1 <= len(parts) <= MAX_PARTS):
        raise _Fatal(f"{INDEX} lacks or garbles a required field.")
    try:
        validate_name(index["camera"])
    except KeyServiceError:
        raise _Fatal(f"{INDEX} names no valid camera.") from None
    for i, part in enumerate(parts, 1):
        if (not isinstance(part, dict) or part.get("dir") != part_dir(i)
                or not isinstance(part.get("archiver"), str)
                or not isinstance(part.get("archiver_sha256"), str)
                or not _HEX64.fullmatch(part["archiver_sha256"])
                or not all(isinstance(part.get(k), int) and not isinstance(part.get(k), bool)
                           for k in ("from_ms", "to_ms"))):
            raise _Fatal(f"{INDEX} lists part {i} wrongly (its directory must be "
                         f"{part_dir(i)}, with its Archiver, certificate and range).")
    return index


def _verify_parts(files: Mapping[str, bytes], report: PartsReport,
                  open_keys: Callable[[bytes], bytes] | None, expected: frozenset[bytes],
                  site_cas: tuple[x509.Certificate, ...]) -> None:
    check_sums(files, report)
    index = _parts_index(files)
    camera, from_ms, to_ms = index["camera"], index["from_ms"], index["to_ms"]
    assert isinstance(camera, str) and isinstance(from_ms, int) and isinstance(to_ms, int)
    report.camera, report.from_ms, report.to_ms = camera, from_ms, to_ms
    exported_ms = index["exported_ms"]
    assert isinstance(exported_ms, int)
    report.exported_ms = exported_ms
    listed = index["parts"]
    assert isinstance(listed, list)
    stray = sorted(name for name in files if name not in (INDEX, SUMS)
                   and not any(name.startswith(p["dir"]) for p in listed))
    for name in stray:
        report.failures.append(f"{name} is in the package but in no part of it.")
    package_id = bytes.fromhex(str(index["package_id"]))
    count = len(listed)
    headers: list[Header | None] = []
    for number, entry in enumerate(listed, 1):
        prefix = entry["dir"]
        sub = {name[len(prefix):]: data for name, data in files.items()
               if name.startswith(prefix)}
        # Each part's signer is established on its own: the fingerprints the verifier pins are
        # the site's Archivers, any of which may have recorded a part.
        part = verify_package(sub, open_keys=open_keys, expect_archiver=expected or None,
                              site_cas=site_cas)
        report.parts.append(PartReport(number, entry["archiver"], part))
        where = f"part {number} ({entry['archiver']})"
        report.failures.extend(f"{where}: {f}" for f in part.failures)
        report.not_checked.extend(f"{where}: {n}" for n in part.not_checked)
        report.missing.extend(f"{where}: {m}" for m in part.missing)
        if part.archiver_sha256 is not None and part.archiver_sha256 != entry["archiver_sha256"]:
            report.failures.append(f"{where}: its certificate (sha256 {part.archiver_sha256}) "
                                   f"is not the one {INDEX} names for it.")
        if (part.camera, part.from_ms, part.to_ms) != (camera, entry["from_ms"],
                                                        entry["to_ms"]):
            report.failures.append(f"{where}: its own index names another camera or range "
                                   f"than {INDEX} lists for it.")
        header = None
        try:
            decoded = decode_record(sub.get(STREAM_HEADER, b""))
            header = decoded if isinstance(decoded, Header) else None
        except KeyServiceError:
            pass  # reported by the part's own verification
        headers.append(header)
        if header is not None and not hmac.compare_digest(
                header.request_nonce, part_nonce(package_id, camera, from_ms, to_ms, number,
                                                 count)):
            report.failures.append(
                f"{where}: its Archiver's signed stream was not requested as part {number} of "
                f"{count} of this package (its signed request nonce is another): a part was "
                "cut, swapped, or taken from another export.")
    _check_coverage(headers, from_ms, to_ms, report)
    viewers = {h.viewer_fingerprint for h in headers if h is not None}
    if len(viewers) > 1:
        report.failures.append("The parts were served to different viewers: one export "
                               "requests every part with one token.")
    elif viewers:
        report.exported_by = viewers.pop().hex()
        report.exported_signed = all(p.report.exported_signed for p in report.parts)
    parts = [p.report for p in report.parts]
    report.manifests = sum(p.manifests for p in parts)
    report.segments = sum(p.segments for p in parts)
    report.keys = sum(p.keys for p in parts)
    firsts = [p.first_ms for p in parts if p.first_ms is not None]
    lasts = [p.last_ms for p in parts if p.last_ms is not None]
    report.first_ms = min(firsts) if firsts else None
    report.last_ms = max(lasts) if lasts else None
    for (a, pa), (b, pb) in itertools.pairwise(zip(listed, report.parts, strict=True)):
        report.switches.append(PartSwitch(a["archiver"], b["archiver"], pa.report.last_ms,
                                          pb.report.first_ms))
        if pa.report.last_ms is not None and pb.report.first_ms is not None \
                and pb.report.first_ms < pa.report.last_ms:
            report.notes.append(f"{a['archiver']}'s last segment ends after "
                                f"{b['archiver']}'s first starts: both recorded the camera "
                                f"between {iso_time(pb.report.first_ms)} and "
                                f"{iso_time(pa.report.last_ms)}")
    if all(p.signer_established is not None for p in parts):
        report.signer_established = "; ".join(
            f"part {p.number} ({p.archiver}): {p.report.signer_established}"
            for p in report.parts)
    if not report.failures:
        report.verified.append(
            f"{count} parts, each verified against its own Archiver's certificate; each "
            "part's signed stream was requested as its place in this package (signed request "
            "nonces); their signed ranges follow one another and cover "
            f"{iso_time(from_ms)} .. {iso_time(to_ms)}")
    if report.ok and all(p.video is not None for p in parts):
        report.video = b"".join(p.video or b"" for p in parts)


def _check_coverage(headers: list[Header | None], from_ms: int, to_ms: int, report: PartsReport) -> None:
    """The parts' signed ranges, in order, start at the package's start, each starts no later
    than just after the one before ends (the old Archiver's part reaches into the next: it
    recorded until it noticed the move), and the last ends at the package's end. Consecutive
    parts come from different Archiver certificates (a part is a change of Archiver)."""
    ranges = [(h.range_from_ms, h.range_to_ms) for h in headers if h is not None]
    if len(ranges) != len(headers):
        return  # a part without a readable signed header failed already
    if ranges[0][0] != from_ms or ranges[-1][1] != to_ms:
        report.failures.append(
            f"The parts' signed ranges run {iso_time(ranges[0][0])} .. {iso_time(ranges[-1][1])}, "
            f"not the package's {iso_time(from_ms)} .. {iso_time(to_ms)}: a part is missing or "
            "out of place.")
    for number, ((prev_from, prev_to), (start, _)) in enumerate(
            itertools.pairwise(ranges), 2):
        if not prev_from < start <= prev_to + 1:
            report.failures.append(
                f"Part {number}'s signed range starts {iso_time(start)}, not within or just "
                f"after part {number - 1}'s (which ends {iso_time(prev_to)}): the parts do not "
                "follow one another.")
    certs = [h.archiver_cert_der for h in headers if h is not None]
    for number, (a, b) in enumerate(itertools.pairwise(certs), 2):
        if a == b:
            report.failures.append(
                f"Parts {number - 1} and {number} are signed by the same Archiver certificate "
                f"(sha256 {hashlib.sha256(a).hexdigest()}): a package's "
                "parts change Archiver from one to the next.")
