"""Evidence packages, verifying one from its files alone (verify_package -> Report), and
opening keys sealed to the recipient's token (open_sealed_keys).

Pure: bytes in, bytes out. No I/O (the client reads the zip), no ``pkcs11``.
Verification failures here are *not* opaque (unlike a viewer's IntegrityError): the verifier
is offline, owns the package, and needs the reason for its report.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding

from keyservice.crypto.segments import key_commitment, open_segment
from keyservice.errors import IntegrityError, KeyServiceError
from keyservice.evidence.layout import (
    CERT,
    FORMAT,
    INDEX,
    KEYS,
    LABEL_EVIDENCE_KEYS_AD,
    RECIPIENT,
    SEALED_KEYS,
    STREAM_DIGESTS,
    STREAM_END,
    STREAM_END_SIG,
    STREAM_END_SIGNED,
    STREAM_FILES,
    STREAM_HEADER,
    SUMS,
    VIDEO,
    EvidenceError,
    iso_time,
    manifest_name,
)
from keyservice.format import (
    ID_LEN,
    KEY_LEN,
    RECORD_HEADER_LEN,
    DataStream,
    End,
    Header,
    Manifest,
    ManifestEntry,
    Mode,
    Segment,
    decode_record,
    record_digest,
    validate_name,
)
from keyservice.framing import Transcript
from keyservice.identity import fingerprint
from keyservice.keyscheme import Identity, KeyScheme, WrappedKey, signing_public_key
from keyservice.labels import evidence_key_context

# The names layout.manifest_name / segment_name make, as a verifier parses them.
_MANIFEST_NAME = re.compile(r"manifests/m(\d{20})\.(rec|signed|sig)")
_SEGMENT_NAME = re.compile(r"segments/s(\d{8})\.seg")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# A jump between one segment's signed end and the next one's start above this is a gap
# (as the player reports it).
GAP_MS = 1_000


def open_sealed_keys(sealed_json: bytes, identity: Identity) -> bytes:
    """keys.txt from ``keys.sealed``: one unwrap on the recipient's token."""
    try:
        doc = json.loads(sealed_json)
        recipient_fp = bytes.fromhex(doc["recipient_sha256"])
        scheme = KeyScheme.from_label(doc["oaep_hash"])
        sealed = base64.b64decode(doc["sealed_key"], validate=True)
        nonce = bytes.fromhex(doc["nonce"])
        ciphertext = base64.b64decode(doc["ciphertext"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError, KeyServiceError):
        raise EvidenceError(f"{SEALED_KEYS} is malformed.") from None
    mine = fingerprint(identity.certificate)
    if not hmac.compare_digest(recipient_fp, mine):
        raise EvidenceError(f"The keys are sealed to certificate sha256 {recipient_fp.hex()}, "
                            f"not to this token's (sha256 {mine.hex()}).")
    try:
        package_key = identity.unwrap(WrappedKey(scheme, sealed), evidence_key_context(mine))
        return AESGCM(package_key).decrypt(nonce, ciphertext, LABEL_EVIDENCE_KEYS_AD + mine)
    except (IntegrityError, InvalidTag, ValueError):
        raise EvidenceError(f"{SEALED_KEYS} does not open with this token: it was altered, or "
                            "sealed to another key.") from None


@dataclass
class Report:
    """What :func:`verify_package` found. ``ok`` only if every check ran and passed."""

    camera: str | None = None
    from_ms: int | None = None
    to_ms: int | None = None
    exported_ms: int | None = None
    exported_by: str | None = None
    exported_signed: bool = False  # exported_ms/exported_by from the Archiver's signed stream
    archiver_subject: str | None = None
    archiver_sha256: str | None = None
    manifests: int = 0
    segments: int = 0
    keys: int = 0
    first_ms: int | None = None
    last_ms: int | None = None
    verified: list[str] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)
    # Signed parts the package lacks: recorded video of the range that the signed data names
    # (a manifest's entries, the chain before the first or after the last manifest, the END's
    # chain head) but that is not in the package. Non-empty: the package is partial.
    missing: list[str] = field(default_factory=list)
    # How the signer was established: against a pinned fingerprint or a site CA given by the
    # verifier. None: the package is consistent, but any Archiver key could have made it.
    signer_established: str | None = None
    video: bytes | None = field(default=None, repr=False)  # the verified video

    @property
    def ok(self) -> bool:
        """Every check ran and passed (the video is authentic to ``archiver.pem``); whether it
        is complete and whose key that is are ``missing`` and ``signer_established``."""
        return not self.failures and not self.not_checked


class _Fatal(Exception):
    """Stops verification: what follows depends on what just failed."""


@dataclass
class _Seg:
    name: str
    raw: bytes
    segment: Segment
    entry: ManifestEntry | None = None
    manifest: Manifest | None = None


def verify_package(files: Mapping[str, bytes], *,
                   open_keys: Callable[[bytes], bytes] | None = None,
                   expect_archiver: bytes | Collection[bytes] | None = None,
                   site_cas: Sequence[x509.Certificate] = ()) -> Report:
    """Check a package from its files alone. ``open_keys``: for sealed keys, turns
    ``keys.sealed`` into keys.txt (the recipient's token); without it sealed keys are not
    checked and the report says so. ``expect_archiver``: the Archiver certificate's SHA-256
    the verifier knows out of band (or several: the certificate must be one of them);
    ``site_cas``: CA certificates the verifier trusts to have issued the Archiver's signing
    certificate. Without either, the signer is not
    established (``Report.signer_established`` stays None)."""
    report = Report()
    expected = None if expect_archiver is None else (
        frozenset((expect_archiver,)) if isinstance(expect_archiver, bytes)
        else frozenset(expect_archiver))
    try:
        _verify(files, report, open_keys, expected, tuple(site_cas))
    except _Fatal as exc:
        report.failures.append(str(exc))
    if not report.ok:
        report.video = None  # only video that passed every check is handed out
    return report


def _verify(files: Mapping[str, bytes], report: Report,
            open_keys: Callable[[bytes], bytes] | None,
            expect_archiver: frozenset[bytes] | None, site_cas: tuple[x509.Certificate, ...]) -> None:
    check_sums(files, report)
    index = _index(files)
    camera = index["camera"]
    from_ms, to_ms = index["from_ms"], index["to_ms"]
    report.camera, report.from_ms, report.to_ms = camera, from_ms, to_ms
    report.exported_ms, report.exported_by = index["exported_ms"], index["exported_by_sha256"]
    _check_inventory(files, index, report)
    cert = _certificate(files, index, report, expect_archiver)
    _establish_signer(cert, files, report, expect_archiver, site_cas)
    manifests = _check_manifests(files, index, cert, camera, report)
    segments = _check_segments(files, index, manifests, camera, from_ms, to_ms, report)
    heads = _check_stream(files, cert, camera, from_ms, to_ms, manifests, segments, report)
    keys = _keys(files, index, report, open_keys)
    if keys is None:
        report.not_checked.append(
            "the minute keys (sealed to the recipient's certificate): their signed key "
            "commitments, the decryption of the segments and the video were NOT verified; "
            "verify with the recipient's token to check them")
    else:
        plaintext = _check_keys_and_decrypt(keys, segments, camera, report)
        if plaintext is not None:
            _check_video(files[VIDEO], plaintext, report)
    _gaps(manifests, segments, from_ms, to_ms, heads, report)


def check_sums(files: Mapping[str, bytes], report: Report) -> None:
    sums = files.get(SUMS)
    if sums is None:
        report.failures.append(f"{SUMS} is missing.")
        return
    listed: dict[str, str] = {}
    for line in sums.decode("ascii", "replace").splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or not _HEX64.fullmatch(digest) or name in listed:
            report.failures.append(f"{SUMS}: malformed line {line[:80]!r}.")
            return
        listed[name] = digest
    bad = [name for name, digest in sorted(listed.items())
           if name in files and hashlib.sha256(files[name]).hexdigest() != digest]
    absent = sorted(set(listed) - set(files))
    unlisted = sorted(set(files) - set(listed) - {SUMS})
    for name in bad:
        report.failures.append(f"{name}: its SHA-256 differs from the one in {SUMS} (the file "
                               "was changed after the export).")
    for name in absent:
        report.failures.append(f"{name} is listed in {SUMS} but not in the package.")
    for name in unlisted:
        report.failures.append(f"{name} is in the package but not listed in {SUMS}.")
    if not (bad or absent or unlisted):
        report.verified.append(f"{SUMS}: all {len(listed)} files match their SHA-256 "
                               "(unchanged since the export)")


def _index(files: Mapping[str, bytes]) -> dict[str, object]:
    raw = files.get(INDEX)
    if raw is None:
        raise _Fatal(f"{INDEX} is missing: this is not an evidence package.")
    try:
        index = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _Fatal(f"{INDEX} is not valid JSON.") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise _Fatal(f"{INDEX} does not describe a {FORMAT} package.")
    ints = ("from_ms", "to_ms", "exported_ms")
    if (not all(isinstance(index.get(k), int) and not isinstance(index.get(k), bool)
                for k in ints)
            or not isinstance(index.get("camera"), str)
            or not isinstance(index.get("exported_by_sha256"), str)
            or not isinstance(index.get("manifests"), list)
            or not isinstance(index.get("segments"), list)
            or not isinstance(index.get("keys"), dict)
            or index.get("video") != VIDEO):
        raise _Fatal(f"{INDEX} lacks or garbles a required field.")
    try:
        validate_name(index["camera"])
    except KeyServiceError:
        raise _Fatal(f"{INDEX} names no valid camera.") from None
    return index


def _check_inventory(files: Mapping[str, bytes], index: Mapping[str, object],
                     report: Report) -> None:
    """Every file is one the index names (or a manifest's .signed/.sig), and vice versa."""
    manifests = index["manifests"]
    segments = index["segments"]
    assert isinstance(manifests, list) and isinstance(segments, list)
    if not all(isinstance(n, str) and _MANIFEST_NAME.fullmatch(n) and n.endswith(".rec")
               for n in manifests) or not all(
            isinstance(n, str) and _SEGMENT_NAME.fullmatch(n) for n in segments):
        raise _Fatal(f"{INDEX} lists a manifest or segment under a name this format does "
                     "not use.")
    keys = index["keys"]
    assert isinstance(keys, dict)
    key_files = [KEYS] if keys.get("file") == KEYS else [SEALED_KEYS, RECIPIENT]
    if keys.get("file") not in (KEYS, SEALED_KEYS):
        raise _Fatal(f"{INDEX} names no key file.")
    expected = {INDEX, SUMS, CERT, VIDEO, *STREAM_FILES, *segments, *key_files}
    for name in manifests:
        stem = name[:-len(".rec")]
        expected.update((name, stem + ".signed", stem + ".sig"))
    for name in sorted(expected - set(files)):
        report.failures.append(f"{name} is missing from the package.")
    for name in sorted(set(files) - expected):
        report.failures.append(f"{name} is in the package but not part of it (not in "
                               f"{INDEX}).")
    if expected - set(files):
        raise _Fatal("The package is incomplete; nothing further can be verified.")


def _load_certificate(data: bytes, name: str) -> tuple[x509.Certificate, str, bytes]:
    """The certificate, its subject and fingerprint. Parsed in full here: `cryptography`
    parses fields lazily, so a damaged one would otherwise fail later, anywhere."""
    try:
        cert = x509.load_pem_x509_certificate(data)
        cert.public_key()
        return cert, cert.subject.rfc4514_string(), fingerprint(cert)
    except (ValueError, UnsupportedAlgorithm):
        raise _Fatal(f"{name} is not a readable certificate (damaged or not PEM).") from None


def _certificate(files: Mapping[str, bytes], index: Mapping[str, object], report: Report,
                 expect_archiver: frozenset[bytes] | None) -> x509.Certificate:
    cert, subject, fp = _load_certificate(files[CERT], CERT)
    try:
        signing_public_key(cert, p256_only=True)
    except IntegrityError:
        raise _Fatal(f"{CERT} does not hold an EC P-256 key (an Archiver's signing key).") from None
    report.archiver_subject = subject
    report.archiver_sha256 = fp.hex()
    if index.get("archiver_sha256") != fp.hex():
        report.failures.append(f"{CERT} is not the certificate the export recorded (sha256 "
                               f"{fp.hex()}, {INDEX} says {index.get('archiver_sha256')}).")
    return cert


def _establish_signer(cert: x509.Certificate, files: Mapping[str, bytes], report: Report,
                      expect_archiver: frozenset[bytes] | None,
                      site_cas: tuple[x509.Certificate, ...]) -> None:
    """Whose key signed: every Archiver makes its own key, so a package that verifies against
    its own archiver.pem only shows it is consistent. The signer is established only against
    a trust anchor the verifier brings: a pinned fingerprint, or a site CA that issued the
    Archiver's signing certificate (valid when the signed stream was served)."""
    fp = fingerprint(cert)
    if expect_archiver is not None:
        if any(hmac.compare_digest(fp, e) for e in expect_archiver):
            report.signer_established = "its fingerprint is the pinned one (--expect-archiver)"
            report.verified.append("the Archiver certificate is the expected one (sha256 "
                                   f"{fp.hex()})")
        else:
            report.failures.append(f"{CERT} (sha256 {fp.hex()}) is not the expected Archiver "
                                   "certificate (sha256 "
                                   + " or ".join(sorted(e.hex() for e in expect_archiver))
                                   + ").")
    if not site_cas:
        return
    served_ms = None
    try:
        header = decode_record(files[STREAM_HEADER])
        if isinstance(header, Header):
            served_ms = header.created_ms
    except KeyServiceError:
        pass  # reported by the stream check
    for ca in site_cas:
        if ca.subject != cert.issuer:
            continue
        try:
            constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
            cert.verify_directly_issued_by(ca)
        except (x509.ExtensionNotFound, InvalidSignature, ValueError, TypeError,
                UnsupportedAlgorithm):
            continue
        if not constraints.ca:
            continue
        when = served_ms / 1000 if served_ms is not None else None
        if when is not None and not (cert.not_valid_before_utc.timestamp() <= when
                                     <= cert.not_valid_after_utc.timestamp()):
            report.failures.append(
                f"{CERT} was issued by the site CA {ca.subject.rfc4514_string()} but was not "
                f"valid when the stream was served ({iso_time(served_ms or 0)}).")
            return
        if report.signer_established is None:
            report.signer_established = (f"its certificate was issued by the site CA "
                                         f"{ca.subject.rfc4514_string()} (--site-ca)")
        report.verified.append(f"the Archiver certificate was issued by the site CA "
                               f"{ca.subject.rfc4514_string()}")
        return
    report.failures.append(f"{CERT} ({cert.subject.rfc4514_string()}, issued by "
                           f"{cert.issuer.rfc4514_string()}) was not issued by the given site "
                           "CA: this package was not signed by an Archiver of that site.")


def _check_manifests(files: Mapping[str, bytes], index: Mapping[str, object],
                     cert: x509.Certificate, camera: str, report: Report
                     ) -> list[tuple[Manifest, bytes]]:
    key = signing_public_key(cert)  # checked EC P-256 by _certificate
    names = index["manifests"]
    assert isinstance(names, list)
    if not names:
        raise _Fatal("The package holds no signed manifest: nothing vouches for its video.")
    out: list[tuple[Manifest, bytes]] = []
    bad_signatures = 0
    for name in names:
        raw = files[name]
        try:
            manifest = decode_record(raw)
        except KeyServiceError as exc:
            raise _Fatal(f"{name} is not a manifest record: {exc}") from None
        if not isinstance(manifest, Manifest):
            raise _Fatal(f"{name} is not a manifest record.")
        if manifest.camera != camera:
            raise _Fatal(f"{name} is a manifest of camera {manifest.camera}, not {camera}.")
        if name != manifest_name(manifest.manifest_seq, "rec"):
            raise _Fatal(f"{name} holds manifest {manifest.manifest_seq}.")
        # The signature covers the body up to the signature field exactly as archived.
        signed = manifest.signed_bytes()
        body = raw[RECORD_HEADER_LEN:len(raw) - 2 - len(manifest.signature)]
        if signed[len(signed) - len(body):] != body:
            raise _Fatal(f"{name} is not canonically encoded.")
        stem = name[:-len(".rec")]
        if files[stem + ".signed"] != signed:
            report.failures.append(f"{stem}.signed is not the signed part of {name}.")
        if files[stem + ".sig"] != manifest.signature:
            report.failures.append(f"{stem}.sig is not the signature in {name}.")
        try:
            key.verify(manifest.signature, signed, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            bad_signatures += 1
            report.failures.append(f"{name}: the Archiver's signature does not verify (manifest "
                                   f"{manifest.manifest_seq} was altered or not signed by "
                                   f"{CERT}).")
        out.append((manifest, raw))
    broken = 0
    for (prev, prev_raw), (manifest, _) in itertools.pairwise(out):
        if manifest.manifest_seq != prev.manifest_seq + 1:
            broken += 1
            report.failures.append(f"The manifest chain is broken: manifest "
                                   f"{manifest.manifest_seq} follows {prev.manifest_seq}.")
        elif not hmac.compare_digest(manifest.prev_hash, record_digest(prev_raw)):
            broken += 1
            report.failures.append(f"The manifest chain is broken: manifest "
                                   f"{manifest.manifest_seq} does not name manifest "
                                   f"{prev.manifest_seq} (as packaged) as its predecessor.")
    first = out[0][0]
    if (first.manifest_seq == 0) != (first.prev_hash == bytes(32)):
        broken += 1
        report.failures.append(f"Manifest {first.manifest_seq} claims a chain start it is not.")
    report.manifests = len(out)
    if not bad_signatures:
        report.verified.append(f"{len(out)} manifest(s) {first.manifest_seq}.."
                               f"{out[-1][0].manifest_seq}: the Archiver's ECDSA P-256 "
                               "signature on each")
    if not broken:
        report.verified.append("the manifest chain: each manifest names the SHA-256 of the "
                               "one before it, no manifest left out")
    return out


def _check_segments(files: Mapping[str, bytes], index: Mapping[str, object],
                    manifests: list[tuple[Manifest, bytes]], camera: str, from_ms: int,
                    to_ms: int, report: Report) -> list[_Seg]:
    entries: dict[tuple[int, int], tuple[ManifestEntry, Manifest]] = {}
    for manifest, _ in manifests:
        for entry in manifest.entries:
            entries[(int(entry.stream), entry.seq)] = (entry, manifest)
    names = index["segments"]
    assert isinstance(names, list)
    out: list[_Seg] = []
    unvouched = 0
    seen: set[tuple[int, int]] = set()
    for name in names:
        raw = files[name]
        try:
            segment = decode_record(raw)
        except KeyServiceError as exc:
            raise _Fatal(f"{name} is not a segment record: {exc}") from None
        if not isinstance(segment, Segment) or segment.camera != camera:
            raise _Fatal(f"{name} is not a segment record of camera {camera}.")
        where = (int(segment.stream), segment.seq)
        if where in seen:
            raise _Fatal(f"{name} repeats segment {segment.seq}.")
        seen.add(where)
        item = _Seg(name, raw, segment)
        found = entries.get(where)
        digest = record_digest(raw)
        if found is None:
            unvouched += 1
            report.failures.append(f"{name}: segment {segment.seq} is in no signed manifest of "
                                   "the package.")
        elif not (hmac.compare_digest(found[0].digest, digest)
                  and found[0].capture_ms == segment.capture_ms
                  and found[0].duration_ms == segment.duration_ms
                  and found[0].key_id == segment.key_id and found[0].tag == segment.tag):
            unvouched += 1
            report.failures.append(
                f"{name}: its SHA-256 ({digest.hex()}) is not the digest the Archiver signed "
                f"for segment {segment.seq} in manifest {found[1].manifest_seq} "
                f"({found[0].digest.hex()}): the segment was altered.")
        else:
            item.entry, item.manifest = found
        end = segment.capture_ms + segment.duration_ms
        if segment.capture_ms > to_ms or (end < from_ms if segment.duration_ms
                                          else segment.capture_ms < from_ms and out):
            report.failures.append(f"{name}: segment {segment.seq} was captured "
                                   f"{iso_time(segment.capture_ms)}, outside the package's range.")
        out.append(item)
    order = [(s.manifest.manifest_seq, s.manifest.entries.index(s.entry)) for s in out
             if s.manifest is not None and s.entry is not None]
    if order != sorted(order):
        report.failures.append("The segments are not in the order the manifests list them.")
    report.segments = len(out)
    if out:
        report.first_ms = min(s.segment.capture_ms for s in out)
        report.last_ms = max(s.segment.capture_ms + s.segment.duration_ms for s in out)
    if not unvouched:
        report.verified.append(f"{len(out)} segment(s): each record's SHA-256 is the digest "
                               "in a signed manifest (the ciphertext exactly as archived)")
    return out


def _check_stream(files: Mapping[str, bytes], cert: x509.Certificate, camera: str,
                  from_ms: int, to_ms: int, manifests: list[tuple[Manifest, bytes]],
                  segments: list[_Seg], report: Report) -> dict[str, int] | None:
    """The Archiver's END signature over the stream the export received: it makes the range,
    the exporting viewer and the time signed facts, shows the packaged records were sent in
    that order, and gives the camera's chain head (the end of the recording then).
    Returns the END's chain heads, or None if this could not be shown."""
    try:
        header = decode_record(files[STREAM_HEADER])
        end = decode_record(files[STREAM_END])
    except KeyServiceError as exc:
        report.failures.append(f"The stream's header or END record is malformed: {exc}")
        return None
    if not isinstance(header, Header) or not isinstance(end, End):
        report.failures.append(f"{STREAM_HEADER} / {STREAM_END} are not a header and an END.")
        return None
    problems: list[str] = []
    lines = files[STREAM_DIGESTS].decode("ascii", "replace").splitlines()
    if not lines or not all(_HEX64.fullmatch(line) for line in lines):
        report.failures.append(f"{STREAM_DIGESTS} is not one SHA-256 (hex) per line.")
        return None
    digests = [bytes.fromhex(line) for line in lines]
    transcript = Transcript()
    for digest in digests:
        transcript.add(digest)
    if files[STREAM_END_SIGNED] != end.signed_bytes() or files[STREAM_END_SIG] != end.signature:
        problems.append(f"{STREAM_END_SIGNED} / {STREAM_END_SIG} are not the signed part and "
                        f"signature of {STREAM_END}.")
    key = signing_public_key(cert)  # checked EC P-256 by _certificate
    try:
        key.verify(end.signature, end.signed_bytes(), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        problems.append(f"{STREAM_END}: the Archiver's signature does not verify.")
    if not hmac.compare_digest(end.transcript_hash, transcript.digest()):
        problems.append(f"{STREAM_DIGESTS} is not the transcript the Archiver's END record "
                        "signs (a record digest was changed, added or left out).")
    if digests[0] != record_digest(files[STREAM_HEADER]) or end.request_id != header.request_id:
        problems.append(f"{STREAM_HEADER} is not the header of the signed stream.")
    if header.archiver_cert_der != cert.public_bytes(Encoding.DER):
        problems.append(f"The signed stream names another Archiver certificate than {CERT}.")
    if header.mode != Mode.PLAYBACK or header.cameras != (camera,):
        problems.append(f"The signed stream is not a recording of camera {camera} alone.")
    if (header.range_from_ms, header.range_to_ms) != (from_ms, to_ms):
        problems.append(f"The signed stream answers the range {iso_time(header.range_from_ms)} .. "
                        f"{iso_time(header.range_to_ms)}, not the one in {INDEX}.")
    # The packaged manifests and segments are records of that stream, in its order.
    manifest_digests = [record_digest(raw) for _, raw in manifests]
    segment_digests = [record_digest(s.raw) for s in segments]
    if not set(manifest_digests + segment_digests) <= set(digests):
        problems.append("Some packaged records are not in the signed stream's transcript.")
    elif not (_in_order(digests, manifest_digests) and _in_order(digests, segment_digests)):
        problems.append("The packaged records are not in the signed stream's order.")
    index = json.loads(files[INDEX])  # parsed before (_index)
    stated = {"exported_by_sha256": header.viewer_fingerprint.hex(),
              "archiver_subject": cert.subject.rfc4514_string(),
              "from": iso_time(from_ms), "to": iso_time(to_ms),
              "exported": iso_time(index["exported_ms"])}
    for name, value in stated.items():
        if index.get(name) != value:
            problems.append(f"{INDEX} states {name} {index.get(name)!r}, but the signed data "
                            f"says {value!r}.")
    report.failures.extend(problems)
    if problems:
        return None
    report.exported_ms = header.created_ms
    report.exported_by = header.viewer_fingerprint.hex()
    report.exported_signed = True
    report.verified.append(
        f"the Archiver's signed END record over the {len(digests)} records of the stream it "
        f"served: camera {camera}, range {iso_time(from_ms)} .. {iso_time(to_ms)}, to viewer "
        f"certificate sha256 {header.viewer_fingerprint.hex()} at {iso_time(header.created_ms)}; "
        "every packaged record is one of them, in order")
    return dict(end.heads)


def _in_order(digests: list[bytes], wanted: list[bytes]) -> bool:
    """``wanted`` is a subsequence of ``digests``."""
    it = iter(digests)
    return all(any(d == w for d in it) for w in wanted)


def parse_keys(text: bytes) -> dict[bytes, tuple[int, bytes]]:
    """keys.txt: ``KEY_ID_HEX STREAM KEY_HEX`` per line -> key id -> (stream, key)."""
    keys: dict[bytes, tuple[int, bytes]] = {}
    try:
        lines = text.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise EvidenceError(f"{KEYS} is not ASCII text.") from None
    for number, line in enumerate(lines, 1):
        parts = line.split(" ")
        try:
            key_id, stream, key = bytes.fromhex(parts[0]), int(parts[1]), bytes.fromhex(parts[2])
            DataStream(stream)
        except (ValueError, IndexError):
            raise EvidenceError(f"{KEYS} line {number} is not 'KEY_ID STREAM KEY'.") from None
        if len(parts) != 3 or len(key_id) != ID_LEN or len(key) != KEY_LEN or key_id in keys:
            raise EvidenceError(f"{KEYS} line {number} is not 'KEY_ID STREAM KEY' (16-byte id, "
                                "32-byte key, each id once).")
        keys[key_id] = (stream, key)
    return keys


def _keys(files: Mapping[str, bytes], index: Mapping[str, object], report: Report,
          open_keys: Callable[[bytes], bytes] | None) -> dict[bytes, tuple[int, bytes]] | None:
    key_info = index["keys"]
    assert isinstance(key_info, dict)
    if key_info["file"] == SEALED_KEYS:
        _, subject, recipient_fp = _load_certificate(files[RECIPIENT], RECIPIENT)
        rfp = recipient_fp.hex()
        report.notes.append(f"the minute keys are sealed to {subject} (certificate sha256 "
                            f"{rfp})")
        if key_info.get("recipient_sha256") != rfp:
            report.failures.append(f"{RECIPIENT} is not the recipient {INDEX} names.")
        if open_keys is None:
            return None
        try:
            text = open_keys(files[SEALED_KEYS])
        except EvidenceError as exc:
            raise _Fatal(str(exc)) from None
        report.verified.append(f"{SEALED_KEYS} opened with the recipient's token")
    else:
        text = files[KEYS]
    try:
        return parse_keys(text)
    except EvidenceError as exc:
        raise _Fatal(str(exc)) from None


def _check_keys_and_decrypt(keys: dict[bytes, tuple[int, bytes]], segments: list[_Seg],
                            camera: str, report: Report) -> bytes | None:
    report.keys = len(keys)
    used = {s.segment.key_id for s in segments}
    extra, missing = set(keys) - used, used - set(keys)
    for key_id in sorted(extra):
        report.failures.append(f"The package reveals key {key_id.hex()}, which none of its "
                               "segments uses: a package must hold exactly its range's keys.")
    for key_id in sorted(missing):
        report.failures.append(f"The key {key_id.hex()} of the package's segments is missing.")
    bad_commitments: set[bytes] = set()
    for s in segments:
        key_id = s.segment.key_id
        if key_id not in keys or s.manifest is None or key_id in bad_commitments:
            continue
        stream, key = keys[key_id]
        signed = next(c.commitment for c in s.manifest.commitments if c.key_id == key_id)
        mine = key_commitment(key, camera, DataStream(stream), key_id)
        if stream != s.segment.stream or not hmac.compare_digest(mine, signed):
            bad_commitments.add(key_id)
            report.failures.append(f"Key {key_id.hex()} does not match the Archiver's signed key "
                                   f"commitment in manifest {s.manifest.manifest_seq}: the key "
                                   "was altered.")
    if not (extra or missing or bad_commitments):
        report.verified.append(f"{len(keys)} minute key(s): each matches the Archiver's signed "
                               "key commitment, and they are exactly the segments' keys")
    parts: list[bytes] = []
    failed = False
    for s in segments:
        key_id = s.segment.key_id
        if key_id not in keys or key_id in bad_commitments or s.manifest is None:
            failed = True
            continue
        try:
            parts.append(open_segment(keys[key_id][1], s.segment))
        except IntegrityError:
            failed = True
            report.failures.append(f"{s.name} does not decrypt under its key (the AES-GCM tag "
                                   "check failed).")
    if failed:
        report.failures.append("The video was not checked: not every segment decrypted.")
        return None
    report.verified.append(f"decryption: all {len(segments)} segment(s) decrypted and "
                           "authenticated (AES-256-GCM) under their committed keys")
    return b"".join(parts)


def _check_video(video: bytes, plaintext: bytes, report: Report) -> None:
    if hmac.compare_digest(video, plaintext):
        report.video = plaintext
        report.verified.append(f"{VIDEO}: exactly the decrypted segments, in order "
                               f"({len(video)} bytes)")
        return
    if len(video) != len(plaintext):
        where = f"{len(video)} bytes instead of {len(plaintext)}"
    else:
        offset = next(i for i, (a, b) in enumerate(zip(video, plaintext, strict=True)) if a != b)
        where = f"first difference at byte {offset}"
    report.failures.append(f"{VIDEO} is not the decrypted segments ({where}): the video was "
                           "altered.")


def _gaps(manifests: list[tuple[Manifest, bytes]], segments: Sequence[_Seg], from_ms: int,
          to_ms: int, heads: Mapping[str, int] | None, report: Report) -> None:
    """Recorded but not in the package (listed in a signed manifest within the range), and
    not recorded (between one segment's signed end and the next one's start)."""
    present = {(int(s.segment.stream), s.segment.seq) for s in segments}
    absent: list[ManifestEntry] = []
    for manifest, _ in manifests:
        for entry in manifest.entries:
            overlaps = (entry.capture_ms <= to_ms
                        and entry.capture_ms + entry.duration_ms >= from_ms)
            if overlaps and (int(entry.stream), entry.seq) not in present:
                absent.append(entry)
    if absent:
        report.gaps.append(
            f"{len(absent)} recorded segment(s) in the range, captured "
            f"{iso_time(absent[0].capture_ms)} .. {iso_time(absent[-1].capture_ms)}, are listed in the "
            "Archiver's signed manifests but not in the package (the exporting viewer held no "
            "key for them, or they were withheld)")
        report.missing.append(
            f"{len(absent)} segment(s) the signed manifests list in the range (stream/seq "
            + ", ".join(f"{int(e.stream)}/{e.seq}" for e in absent[:20])
            + (", ..." if len(absent) > 20 else "") + ")")
    ordered = sorted((s.segment for s in segments), key=lambda g: (g.stream, g.seq))
    for prev, nxt in itertools.pairwise(ordered):
        if prev.stream == nxt.stream and prev.duration_ms:
            end = prev.capture_ms + prev.duration_ms
            if nxt.capture_ms - end > GAP_MS and not any(
                    end <= e.capture_ms < nxt.capture_ms for e in absent):
                report.gaps.append(f"no recording between {iso_time(end)} and "
                                   f"{iso_time(nxt.capture_ms)}")
    _edges(manifests, segments, from_ms, to_ms, heads, report)


def _edges(manifests: list[tuple[Manifest, bytes]], segments: Sequence[_Seg], from_ms: int,
           to_ms: int, heads: Mapping[str, int] | None, report: Report) -> None:
    """The range's coverage from signed data, judged as the viewer's reader judges a stream:
    the first manifest starts the camera's chain or is a bare manifest whose video all ends
    before the range; the last is the chain head the Archiver's signed END names or a bare
    manifest whose video all starts after the range. A package cut at either end fails this
    (its manifests are still one signed, unbroken piece) and is reported as partial."""
    packaged = {(int(s.segment.stream), s.segment.seq) for s in segments}

    def bare(manifest: Manifest) -> bool:
        return bool(manifest.entries) and not any(
            (int(e.stream), e.seq) in packaged for e in manifest.entries)

    first, last = manifests[0][0], manifests[-1][0]
    if first.manifest_seq == 0 or (bare(first) and all(
            e.capture_ms + e.duration_ms < from_ms for e in first.entries)):
        report.verified.append("the start of the range: " + (
            "the first manifest starts the camera's chain" if first.manifest_seq == 0 else
            f"manifest {first.manifest_seq}, linked to the rest, holds only video from before "
            "the range"))
    else:
        report.missing.append(
            f"the start of the range ({iso_time(from_ms)}): manifest {first.manifest_seq - 1} "
            f"(which manifest {first.manifest_seq} names by its SHA-256) and any before it "
            "are not in the package, so the signed data does not show that nothing was "
            f"recorded between the range's start and the first packaged video"
            + (f" ({iso_time(report.first_ms)})" if report.first_ms is not None else ""))
    head = heads.get(last.camera) if heads is not None else None
    if head == last.manifest_seq + 1:
        report.verified.append("the end of the range: the Archiver's signed chain head shows "
                               "that nothing was recorded after the last manifest when the "
                               "stream was served")
    elif bare(last) and all(e.capture_ms > to_ms for e in last.entries):
        report.verified.append(f"the end of the range: manifest {last.manifest_seq}, linked to "
                               "the rest, holds only video from after the range")
    elif head is not None and head > last.manifest_seq + 1:
        report.missing.append(
            f"the end of the range ({iso_time(to_ms)}): manifests {last.manifest_seq + 1}.."
            f"{head - 1} are not in the package, though the Archiver's signed END names chain "
            f"head {head} (the recording went on after the last packaged manifest, "
            f"{last.manifest_seq})")
    else:
        report.missing.append(
            f"the end of the range ({iso_time(to_ms)}): the signed data does not show that "
            f"nothing was recorded after manifest {last.manifest_seq} (no signed chain head "
            "confirms it, and no later manifest is in the package)")
