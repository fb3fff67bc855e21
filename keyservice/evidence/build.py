"""Evidence packages, building one (docs/evidence.md): what an export keeps of a verified
stream (collect) and the package's files from it (build_package), the minute keys in clear or
sealed to a recipient (seal_keys).

Pure: bytes in, bytes out. No I/O (the client writes the zip), no ``pkcs11``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding

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
    STREAM_HEADER,
    SUMS,
    VIDEO,
    EvidenceError,
    iso_time,
    manifest_name,
    segment_name,
)
from keyservice.format import (
    ID_LEN,
    KEY_LEN,
    End,
    Header,
    Manifest,
    Record,
    Segment,
    decode_record,
    record_digest,
    validate_name,
)
from keyservice.identity import fingerprint
from keyservice.keyscheme import Recipient
from keyservice.labels import evidence_key_context


@dataclass(frozen=True)
class Collected:
    """What an export keeps of a verified stream: the camera's manifests (chain order) and
    the segments it decrypted (stream order), each as its exact record bytes; the stream's
    header and END records and the digest of every record before END (the END transcript)."""

    manifests: list[bytes] = field(default_factory=list)
    segments: list[bytes] = field(default_factory=list)
    header: bytes = b""
    end: bytes = b""
    digests: list[bytes] = field(default_factory=list)


def collect(records: Iterable[tuple[Record, bytes]], camera: str,
            opened: Mapping[bytes, bytes]) -> Collected:
    """From a verified fusion stream's records: every manifest of ``camera`` and every segment
    of it whose key the reader opened (the ones it released). Key records, openers and grants
    are the exporting viewer's and stay out of the package (only their digests go in, for
    the END transcript)."""
    out = Collected()
    header = end = b""
    for record, raw in records:
        data = bytes(raw)
        if isinstance(record, End):
            end = data
            continue
        out.digests.append(record_digest(data))
        if isinstance(record, Header):
            header = data
        elif isinstance(record, Manifest) and record.camera == camera:
            out.manifests.append(data)
        elif (isinstance(record, Segment) and record.camera == camera
              and record.key_id in opened):
            out.segments.append(data)
    if not header or not end:
        raise EvidenceError("The stream has no header or no END record; nothing to export.")
    return Collected(out.manifests, out.segments, header, end, out.digests)


def _keys_text(keys: Mapping[bytes, bytes], streams: Mapping[bytes, int]) -> bytes:
    lines = []
    for key_id in sorted(keys):
        key = keys[key_id]
        if len(key_id) != ID_LEN or len(key) != KEY_LEN:
            raise EvidenceError("A minute key has a 16-byte id and a 32-byte key.")
        lines.append(f"{key_id.hex()} {streams[key_id]} {key.hex()}\n")
    return "".join(lines).encode("ascii")


def sha256sums(files: Mapping[str, bytes]) -> bytes:
    """``sha256sum`` output for every file (sorted by name): ``sha256sum -c`` checks it."""
    return "".join(f"{hashlib.sha256(files[name]).hexdigest()}  {name}\n"
                   for name in sorted(files)).encode("ascii")


def seal_keys(keys_text: bytes, recipient: Recipient, rng: Callable[[int], bytes] = os.urandom
              ) -> bytes:
    """``keys.sealed``: a fresh package key wrapped to the recipient (its key scheme) and
    keys.txt under AES-256-GCM with it."""
    package_key = rng(KEY_LEN)
    sealed = recipient.wrap(package_key, evidence_key_context(recipient.fingerprint), rng)
    nonce = rng(12)
    ciphertext = AESGCM(package_key).encrypt(
        nonce, keys_text, LABEL_EVIDENCE_KEYS_AD + recipient.fingerprint)
    return (json.dumps({
        "recipient_sha256": recipient.fingerprint.hex(),
        # The field keeps its format-v2 name and spelling (sha256, sha1, ecdh-p256).
        "oaep_hash": sealed.scheme.legacy_label,
        "sealed_key": base64.b64encode(sealed.body).decode(),
        "nonce": nonce.hex(),
        "ciphertext": base64.b64encode(ciphertext).decode(),
    }, indent=1) + "\n").encode()


def build_package(*, camera: str, from_ms: int, to_ms: int, archiver_cert: x509.Certificate,
                  collected: Collected, keys: Mapping[bytes, bytes], video: bytes,
                  exported_ms: int, recipient: Recipient | None = None) -> dict[str, bytes]:
    """The package's files (name -> bytes). ``keys``: the minute keys the export opened;
    only those of the collected segments go in (a package reveals only its range's keys).
    ``recipient``: seal the keys to this certificate instead of including them in clear."""
    validate_name(camera)
    files: dict[str, bytes] = {CERT: archiver_cert.public_bytes(Encoding.PEM)}
    manifest_files = []
    for raw in collected.manifests:
        manifest = decode_record(raw)
        assert isinstance(manifest, Manifest)
        seq = manifest.manifest_seq
        files[manifest_name(seq, "rec")] = raw
        files[manifest_name(seq, "signed")] = manifest.signed_bytes()
        files[manifest_name(seq, "sig")] = manifest.signature
        manifest_files.append(manifest_name(seq, "rec"))
    streams: dict[bytes, int] = {}
    for index, raw in enumerate(collected.segments):
        segment = decode_record(raw)
        assert isinstance(segment, Segment)
        streams[segment.key_id] = int(segment.stream)
        files[segment_name(index)] = raw
    missing = set(streams) - set(keys)
    if missing:
        raise EvidenceError(f"No minute key for {len(missing)} of the exported segments' keys.")
    keys_text = _keys_text({k: keys[k] for k in streams}, streams)
    if recipient is None:
        files[KEYS] = keys_text
        key_info: dict[str, str] = {"file": KEYS}
    else:
        files[SEALED_KEYS] = seal_keys(keys_text, recipient)
        files[RECIPIENT] = recipient.certificate.public_bytes(Encoding.PEM)
        key_info = {"file": SEALED_KEYS, "recipient": RECIPIENT,
                    "recipient_sha256": recipient.fingerprint.hex(),
                    "recipient_subject": recipient.certificate.subject.rfc4514_string()}
    end, header = decode_record(collected.end), decode_record(collected.header)
    assert isinstance(end, End) and isinstance(header, Header)
    files[STREAM_HEADER] = collected.header
    files[STREAM_DIGESTS] = "".join(d.hex() + "\n" for d in collected.digests).encode()
    files[STREAM_END] = collected.end
    files[STREAM_END_SIGNED] = end.signed_bytes()
    files[STREAM_END_SIG] = end.signature
    files[VIDEO] = video
    files[INDEX] = (json.dumps({
        "format": FORMAT,
        "camera": camera,
        "from_ms": from_ms, "to_ms": to_ms, "from": iso_time(from_ms), "to": iso_time(to_ms),
        "exported_ms": exported_ms, "exported": iso_time(exported_ms),
        "exported_by_sha256": header.viewer_fingerprint.hex(),
        "archiver_sha256": fingerprint(archiver_cert).hex(),
        "archiver_subject": archiver_cert.subject.rfc4514_string(),
        "manifests": manifest_files,
        "segments": [segment_name(i) for i in range(len(collected.segments))],
        "keys": key_info,
        "video": VIDEO,
    }, indent=1) + "\n").encode()
    files[SUMS] = sha256sums(files)
    return files


