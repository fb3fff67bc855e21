"""Consolidated parts (issue 22, item 4): another Archiver's recording of a camera, kept by
this one exactly as the other signed it, verified, stored, checked and served.

* ``verify_part`` (pure): every record of a copy verified against its signer's certificate;
* ``PartStore``: ``DATA/consolidated/CAMERA/PART/`` (``part.json``, ``signer.der``,
  ``records.fsa``, ``keys.fsk``), each part written whole or not at all, found by its files
  alone (no index: parts are few), retention and crypto-shredding on it;
* ``check_part``: a kept part verified again from its files (``fusion-archiver check``);
* ``PartIndex`` and ``part_stream``: a viewer's fusion stream from a kept part, the signer's
  records as it signed them, END signed by the serving Archiver.

How a part is copied (the request, the export, the background pass) is
archiver/consolidation.py. Outside ``DATA/archive``: a foreign part never enters this
Archiver's own manifest chain, index or recovery.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from keyservice.crypto import split_key_id
from keyservice.errors import FormatError, IntegrityError, KeyServiceError
from keyservice.format import (
    RECORD_HEADER_LEN,
    ChainRecipients,
    ChainRecord,
    EpochOpener,
    Manifest,
    RecordType,
    Segment,
    decode_record,
    max_body,
)
from keyservice.identity import Signer, fingerprint
from keyservice.keyscheme import signing_public_key

log = logging.getLogger("archiver.consolidation")

CONSOLIDATED_DIR = "consolidated"
# The old holder records on until it notices a move (it re-reads its cameras every 2 s, a
# pulled camera's stream ends with its segment): its video reaches this far past the
# placement's end.
HANDOVER_MS = 30_000
_ECDSA = ec.ECDSA(hashes.SHA256())
_RECORD_HEADER = struct.Struct(">BI")
_PRELUDE_LEN = struct.Struct(">I")
ARCHIVED = (RecordType.SEGMENT, RecordType.MANIFEST, RecordType.CHAIN_RECIPIENTS)
JOURNALED = (RecordType.EPOCH_OPENER, RecordType.CHAIN_RECORD)


class ConsolidationRefused(KeyServiceError):
    """A copy that does not verify, or an Archiver that would not give one: nothing stored."""


def ec_key_of(cert_der: bytes) -> tuple[x509.Certificate, ec.EllipticCurvePublicKey]:
    cert = x509.load_der_x509_certificate(cert_der)
    try:
        return cert, signing_public_key(cert)
    except IntegrityError:
        raise ValueError("not an Archiver's (EC) signing key") from None


def signed_by(key: ec.EllipticCurvePublicKey, data: bytes, signature: bytes) -> bool:
    try:
        key.verify(signature, data, _ECDSA)
    except (InvalidSignature, ValueError):
        return False
    return True


# --- verification (pure) ---------------------------------------------------------------------
@dataclass(frozen=True)
class VerifiedPart:
    """A copy whose every record verified against its signer's certificate."""

    camera: str
    first_seq: int  # the first and last manifest with segments (the edges are outside)
    last_seq: int
    from_ms: int  # the first segment's start, the last segment's end (signed)
    to_ms: int
    edge_before: bool
    edge_after: bool
    segments: int
    manifests: int
    archived: list[bytes]  # records.fsa, in order
    keys: list[bytes]  # keys.fsk: openers, then chain records
    viewers: int  # distinct viewers whose chain records were copied
    chains: frozenset[bytes] = frozenset()

    @property
    def bytes(self) -> int:
        return sum(map(len, self.archived)) + sum(map(len, self.keys))


def split_records(data: bytes | memoryview, kinds: tuple[RecordType, ...]) -> list[bytes]:
    """The records of ``data``, exactly; FormatError on anything else (a torn or unknown one)."""
    view, out, offset = memoryview(data), [], 0
    while offset < len(view):
        if len(view) - offset < RECORD_HEADER_LEN:
            raise FormatError("The copy stops in the middle of a record.")
        kind, length = _RECORD_HEADER.unpack_from(view, offset)
        if kind not in kinds or length > max_body(kind):
            raise FormatError("The copy holds a record that is not an archived one.")
        end = offset + RECORD_HEADER_LEN + length
        if end > len(view):
            raise FormatError("The copy stops in the middle of a record.")
        out.append(bytes(view[offset:end]))
        offset = end
    return out


def verify_part(camera: str, records: Iterable[bytes], key: ec.EllipticCurvePublicKey,
                asked: tuple[int, int],
                viewer_allowed: Callable[[str], bool] = lambda fp: True) -> VerifiedPart:
    """Every archived record verified against ``key``: the chain recipients and manifests
    signed by it, for ``camera``; each manifest continuing the previous one (its sequence and
    the previous record's hash); each segment exactly as its manifest's entry (digest, seq,
    stream, times, key id, tag); a bare manifest only at either edge and outside the range
    ``asked`` (else a segment was left out: the copy would end early); every chain's signed
    recipients present. Key records: openers and chain records of the copied chains only, for
    viewers ``viewer_allowed`` (others are left out). ConsolidationRefused says what failed."""

    def refuse(why: str) -> ConsolidationRefused:
        return ConsolidationRefused(f"The copy of camera '{camera}' does not verify against "
                                    f"its signer's certificate: {why}; nothing was stored.")

    archived: list[bytes] = []
    openers: dict[bytes, tuple[str, bytes]] = {}
    chain_records: list[tuple[bytes, bytes]] = []
    pending: list[tuple[bytes, Segment]] = []
    statements: set[bytes] = set()
    chains: set[bytes] = set()
    manifests: list[tuple[Manifest, bool]] = []  # (manifest, bare)
    prev_hash: bytes | None = None
    segments = 0
    times: list[tuple[int, int]] = []
    for raw in records:
        try:
            record = decode_record(raw)
        except FormatError as exc:
            raise refuse(f"a damaged record ({exc.message})") from None
        if isinstance(record, EpochOpener):
            openers[record.epoch_id] = (record.viewer_fingerprint.hex(), raw)
            continue
        if isinstance(record, ChainRecord):
            if record.camera != camera:
                raise refuse("a chain record of another camera")
            chain_records.append((record.epoch_id, raw))
            continue
        if isinstance(record, ChainRecipients):
            if record.camera != camera or not signed_by(key, record.signed_bytes(),
                                                      record.signature):
                raise refuse("a chain recipients statement not signed by it")
            statements.add(record.chain_id)
            archived.append(raw)
            continue
        if isinstance(record, Segment):
            if record.camera != camera:
                raise refuse("a segment of another camera")
            pending.append((raw, record))
            archived.append(raw)
            continue
        if not isinstance(record, Manifest):
            raise refuse("a record that is not archived")
        if record.camera != camera or not signed_by(key, record.signed_bytes(), record.signature):
            raise refuse(f"manifest {record.manifest_seq} is not signed by it")
        if manifests and (record.manifest_seq != manifests[-1][0].manifest_seq + 1
                          or prev_hash is None
                          or not hmac.compare_digest(record.prev_hash, prev_hash)):
            raise refuse(f"manifest {record.manifest_seq} does not continue the chain")
        bare = not pending  # an edge: checked below to be the first or the last manifest
        captures = [entry.capture_ms for entry in record.entries]
        if bare and captures and min(captures) <= asked[1] and max(captures) >= asked[0]:
            raise refuse(f"manifest {record.manifest_seq}, inside the range, came without "
                         "its segments")
        if not bare:
            if len(record.entries) != len(pending):
                raise refuse(f"manifest {record.manifest_seq} does not list its segments")
            for entry, (seg_raw, segment) in zip(record.entries, pending, strict=True):
                digest = hashlib.sha256(seg_raw).digest()
                if not (hmac.compare_digest(digest, entry.digest) and segment.seq == entry.seq
                        and segment.stream == entry.stream
                        and segment.capture_ms == entry.capture_ms
                        and segment.duration_ms == entry.duration_ms
                        and hmac.compare_digest(segment.key_id, entry.key_id)
                        and hmac.compare_digest(segment.tag, entry.tag)):
                    raise refuse(f"a segment of manifest {record.manifest_seq} is not the one "
                                 "it signed")
                chains.add(split_key_id(segment.key_id)[0])
                times.append((segment.capture_ms, segment.capture_ms + segment.duration_ms))
            segments += len(pending)
            pending = []
        manifests.append((record, bare))
        archived.append(raw)
        prev_hash = hashlib.sha256(raw).digest()
    if pending:
        raise refuse("segments no manifest vouches for")
    inner = [m for m, bare in manifests if not bare]
    if not inner:
        raise refuse("no manifest with segments")
    bare_at = [i for i, (_, bare) in enumerate(manifests) if bare]
    if any(i not in (0, len(manifests) - 1) for i in bare_at):
        raise refuse("a manifest without its segments inside the range")
    missing = chains - statements
    if missing:
        raise refuse("a key chain without its signed recipients")
    keys: list[bytes] = []
    viewers: set[str] = set()
    used_epochs: set[bytes] = set()
    kept_records: list[bytes] = []
    for epoch_id, raw in chain_records:
        record = decode_record(raw)
        assert isinstance(record, ChainRecord)
        if record.chain_id not in chains:
            raise refuse("a chain record of a chain the part does not use")
        opener = openers.get(epoch_id)
        if opener is None:
            raise refuse("a chain record without its epoch opener")
        if not viewer_allowed(opener[0]):
            continue  # revoked since (or unknown here): its key stream is not kept
        used_epochs.add(epoch_id)
        viewers.add(opener[0])
        kept_records.append(raw)
    keys.extend(raw for epoch_id, (_, raw) in openers.items() if epoch_id in used_epochs)
    keys.extend(kept_records)
    return VerifiedPart(camera, inner[0].manifest_seq, inner[-1].manifest_seq,
                        min(t[0] for t in times), max(t[1] for t in times),
                        manifests[0][1], len(manifests) > 1 and manifests[-1][1],
                        segments, len(manifests), archived, keys, len(viewers),
                        frozenset(chains))


def encode_prelude(prelude: dict[str, Any]) -> bytes:
    """An export body's start: its JSON prelude, length first (the records follow)."""
    data = json.dumps(prelude).encode()
    return _PRELUDE_LEN.pack(len(data)) + data


def parse_export(data: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """The prelude (JSON) and the records of an export body; FormatError if malformed."""
    if len(data) < _PRELUDE_LEN.size:
        raise FormatError("The answer is not an export.")
    (length,) = _PRELUDE_LEN.unpack_from(data)
    if length > 1 << 20 or len(data) < _PRELUDE_LEN.size + length:
        raise FormatError("The answer is not an export.")
    try:
        prelude = json.loads(data[_PRELUDE_LEN.size:_PRELUDE_LEN.size + length])
    except ValueError:
        raise FormatError("The answer is not an export.") from None
    if not isinstance(prelude, dict):
        raise FormatError("The answer is not an export.")
    return prelude, split_records(memoryview(data)[_PRELUDE_LEN.size + length:],
                                  ARCHIVED + JOURNALED)


# --- the store ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PartInfo:
    """A consolidated part as kept (part.json)."""

    part: str
    camera: str
    archiver: str
    signer_fingerprint: str
    signer_subject: str
    first_seq: int
    last_seq: int
    from_ms: int
    to_ms: int
    asked_from_ms: int
    asked_to_ms: int
    segments: int
    manifests: int
    viewers: int
    bytes: int
    consolidated_ms: int
    edge_before: bool
    edge_after: bool


class PartStore:
    """``DATA/consolidated``: one directory per part, made whole or not at all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()

    def _camera_dir(self, camera: str) -> Path:
        return self.root / camera

    def clean_incoming(self) -> int:
        """Remove what a copy that stopped half way (a kill, a full disk) left: it was never
        renamed into place, so nothing reads it."""
        removed = 0
        if not self.root.exists():
            return 0
        for path in self.root.glob("*/.incoming-*"):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        return removed

    def parts(self, camera: str | None = None) -> list[PartInfo]:
        pattern = f"{camera}/*/part.json" if camera else "*/*/part.json"
        out = []
        for path in sorted(self.root.glob(pattern)) if self.root.exists() else []:
            if path.parent.name.startswith("."):
                continue
            try:
                out.append(PartInfo(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                log.warning("consolidated part %s: part.json unreadable", path.parent)
        return sorted(out, key=lambda p: (p.camera, p.from_ms))

    def path_of(self, info: PartInfo) -> Path:
        return self._camera_dir(info.camera) / info.part

    def store(self, part: VerifiedPart, archiver: str, certificate: bytes, asked: tuple[int, int],
              now_ms: int, on_file: Callable[[str], None] | None = None) -> PartInfo | None:
        """Keep ``part`` (None: it is kept already). Written in a hidden directory, each file
        fsynced, then renamed into place and the rename fsynced: a kill at any point leaves the
        part whole or absent. ``on_file``: called after each file is written (a test's fault)."""
        cert = x509.load_der_x509_certificate(certificate)
        fp = fingerprint(cert).hex()
        name = f"{fp[:16]}-{part.first_seq:010d}-{part.last_seq:010d}"
        info = PartInfo(name, part.camera, archiver, fp, cert.subject.rfc4514_string(),
                        part.first_seq, part.last_seq, part.from_ms, part.to_ms, asked[0],
                        asked[1], part.segments, part.manifests, part.viewers, part.bytes,
                        now_ms, part.edge_before, part.edge_after)
        with self._lock:
            camera_dir = self._camera_dir(part.camera)
            final = camera_dir / name
            if final.exists():
                return None
            new_dirs = [p for p in (self.root, camera_dir) if not p.exists()]
            camera_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            for made in new_dirs:
                _fsync_dir(made.parent)
            incoming = camera_dir / f".incoming-{name}-{secrets.token_hex(4)}"
            incoming.mkdir(mode=0o700)
            try:
                for file, data in (("records.fsa", part.archived), ("keys.fsk", part.keys),
                                   ("signer.der", [certificate]),
                                   ("part.json", [json.dumps(asdict(info), indent=1).encode()])):
                    _write_synced(incoming / file, data)
                    if on_file is not None:
                        on_file(file)
                _fsync_dir(incoming)
                os.rename(incoming, final)
            except BaseException:
                shutil.rmtree(incoming, ignore_errors=True)
                raise
            _fsync_dir(camera_dir)
        return info

    def remove(self, info: PartInfo) -> int:
        """Delete a part for good (retention): its keys first, then the rest."""
        path = self.path_of(info)
        size = sum(p.stat().st_size for p in path.iterdir()) if path.exists() else 0
        with self._lock:
            keys = path / "keys.fsk"
            if keys.exists():
                keys.unlink()  # the viewers' key streams go first: crypto-shredding
                _fsync_dir(path)
            doomed = path.with_name(f".incoming-removed-{path.name}")
            if path.exists():
                os.rename(path, doomed)
                _fsync_dir(path.parent)
                shutil.rmtree(doomed, ignore_errors=True)
        return size

    def shred_viewer(self, fingerprint_hex: str) -> int:
        """Crypto-shredding of one viewer in every kept part (``viewers revoke
        --delete-key-streams``): its epoch openers and chain records leave ``keys.fsk``, which
        is replaced atomically. Returns the records removed."""
        removed = 0
        for info in self.parts():
            path = self.path_of(info) / "keys.fsk"
            with self._lock:
                try:
                    records = split_records(path.read_bytes(), JOURNALED)
                except (OSError, FormatError):
                    continue  # check reports a damaged part; nothing to shred in it here
                epochs = {r.epoch_id for r in map(decode_record, records)
                          if isinstance(r, EpochOpener)
                          and r.viewer_fingerprint.hex() == fingerprint_hex}
                kept = [raw for raw in records if not _of_epochs(decode_record(raw), epochs)]
                if len(kept) == len(records):
                    continue
                tmp = path.with_name("keys.fsk.tmp")
                tmp.unlink(missing_ok=True)
                _write_synced(tmp, kept)
                os.replace(tmp, path)
                _fsync_dir(path.parent)
                removed += len(records) - len(kept)
        return removed

    def load(self, info: PartInfo) -> tuple[bytes, list[bytes], list[bytes]]:
        """(signer certificate DER, archived records, key records) of a kept part."""
        path = self.path_of(info)
        return ((path / "signer.der").read_bytes(),
                split_records((path / "records.fsa").read_bytes(), ARCHIVED),
                split_records((path / "keys.fsk").read_bytes(), JOURNALED))


def _of_epochs(record: object, epochs: set[bytes]) -> bool:
    return isinstance(record, EpochOpener | ChainRecord) and record.epoch_id in epochs


def shred_viewer_in_parts(data_dir: Path, fingerprint_hex: str) -> int:
    """``PartStore.shred_viewer`` on a data directory's consolidated parts."""
    return PartStore(data_dir / CONSOLIDATED_DIR).shred_viewer(fingerprint_hex)


def check_part(store: PartStore, info: PartInfo,
               expected_signer: bytes | None = None) -> VerifiedPart:
    """A kept part verified again, from its files alone, against its own signer certificate
    (and, when given, the registry's certificate for its Archiver): ``fusion-archiver check``."""
    try:
        cert_der, archived, keys = store.load(info)
    except OSError as exc:
        raise ConsolidationRefused(f"Consolidated part {info.part} of camera '{info.camera}' "
                                   f"cannot be read ({exc.strerror}).") from None
    except FormatError as exc:
        raise ConsolidationRefused(f"Consolidated part {info.part} of camera '{info.camera}' "
                                   f"is damaged: {exc.message}") from None
    if expected_signer is not None and not hmac.compare_digest(cert_der, expected_signer):
        raise ConsolidationRefused(f"Consolidated part {info.part} of camera '{info.camera}' "
                                   f"names a signer that is not Archiver '{info.archiver}''s "
                                   "certificate in the registry.")
    cert, key = ec_key_of(cert_der)
    if fingerprint(cert).hex() != info.signer_fingerprint:
        raise ConsolidationRefused(f"Consolidated part {info.part}: its signer certificate "
                                   "is not the one its part.json names.")
    part = verify_part(info.camera, [*archived, *keys], key,
                       (info.asked_from_ms, info.asked_to_ms + HANDOVER_MS))
    if (part.first_seq, part.last_seq, part.segments) != (info.first_seq, info.last_seq,
                                                          info.segments):
        raise ConsolidationRefused(f"Consolidated part {info.part} of camera '{info.camera}' "
                                   "does not hold the manifests its part.json names.")
    return part


def _write_synced(path: Path, chunks: Iterable[bytes]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- serving a kept part (the consolidating Archiver answers a viewer) --------------------------
@dataclass
class _Group:
    manifest: Manifest
    raw: bytes
    segments: list[tuple[Segment, bytes]]


class PartIndex:
    """A kept part, read back and indexed in memory to serve one stream (parts are a few
    thousand records: minutes to hours of one camera)."""

    def __init__(self, store: PartStore, info: PartInfo) -> None:
        self.info = info
        self.signer_cert, archived, keys = store.load(info)
        self.recipients: dict[bytes, list[tuple[int, bytes]]] = {}
        self.groups: list[_Group] = []
        self.edge_before: bytes | None = None
        self.edge_after: bytes | None = None
        pending: list[tuple[Segment, bytes]] = []
        for raw in archived:
            record = decode_record(raw)
            if isinstance(record, ChainRecipients):
                self.recipients.setdefault(record.chain_id, []).append((record.part, raw))
            elif isinstance(record, Segment):
                pending.append((record, raw))
            elif isinstance(record, Manifest):
                if pending:
                    self.groups.append(_Group(record, raw, pending))
                    pending = []
                elif self.groups:
                    self.edge_after = raw
                else:
                    self.edge_before = raw
        for parts in self.recipients.values():
            parts.sort(key=lambda p: p[0])
        self.openers: dict[bytes, tuple[str, bytes]] = {}
        self.records: dict[tuple[str, bytes], tuple[bytes, bytes, int]] = {}
        chain_records: list[tuple[ChainRecord, bytes]] = []
        for raw in keys:
            record = decode_record(raw)
            if isinstance(record, EpochOpener):
                self.openers[record.epoch_id] = (record.viewer_fingerprint.hex(), raw)
            elif isinstance(record, ChainRecord):
                chain_records.append((record, raw))
        for record, raw in chain_records:
            opener = self.openers.get(record.epoch_id)
            if opener is not None:
                self.records[(opener[0], record.chain_id)] = (record.epoch_id, raw,
                                                              record.first_step)


def part_stream(index: PartIndex, *, archiver_cert_der: bytes, server_signer: Signer,
                viewer_fingerprint: str, from_ms: int, to_ms: int, nonce: bytes,
                request_id: bytes, created_ms: int,
                still_authorized: Callable[[], bool]) -> Iterator[bytes]:
    """A playback fusion stream of [from_ms, to_ms] from a kept part: the header names this
    Archiver (it signs END over the viewer's request) and the part's signer (whose manifests
    and chain recipients go out exactly as it signed them); the viewer's own chain records and
    openers, each once; the part's edges as the signer made them. Without a closing edge the
    END states the copy's head: the last manifest kept here (this Archiver's word, not the
    signer's, that its copy ends there)."""
    from keyservice.format import EndReason, Header, Mode
    from keyservice.fusion_writer import StreamWriter

    camera = index.info.camera
    writer = StreamWriter(Header(
        archiver_cert_der=archiver_cert_der, viewer_fingerprint=bytes.fromhex(viewer_fingerprint),
        request_id=request_id, created_ms=created_ms, mode=Mode.PLAYBACK,
        range_from_ms=from_ms, range_to_ms=to_ms, cameras=(camera,), request_nonce=nonce,
        signer_cert_der=index.signer_cert))
    yield writer.start()
    groups = index.groups
    chosen = [i for i, g in enumerate(groups)
              if min(e.capture_ms for e in g.manifest.entries) <= to_ms
              and max(e.capture_ms + e.duration_ms for e in g.manifest.entries) >= from_ms]
    sent_recipients: set[bytes] = set()
    sent_chains: set[bytes] = set()
    sent_epochs: set[bytes] = set()

    def recipients(chain_id: bytes) -> list[bytes]:
        if chain_id in sent_recipients:
            return []
        sent_recipients.add(chain_id)
        return [writer.add(raw) for _, raw in index.recipients.get(chain_id, [])]

    if chosen:
        first, last = chosen[0], chosen[-1]
        if first > 0:
            yield writer.add(groups[first - 1].raw)  # the opening edge, bare
        elif index.edge_before is not None:
            yield writer.add(index.edge_before)
        for i in range(first, last + 1):
            if not still_authorized():
                return  # revoked: ends without an end record
            group, out = groups[i], []
            for segment, raw in group.segments:
                chain_id, step = split_key_id(segment.key_id)
                found = index.records.get((viewer_fingerprint, chain_id))
                if found is None:
                    out.extend(recipients(chain_id))  # "not authorized" shown by the signer
                    continue
                epoch_id, record, first_step = found
                if first_step and step < first_step:
                    out.extend(recipients(chain_id))
                    continue
                if chain_id not in sent_chains:
                    out.extend(recipients(chain_id))
                    if epoch_id not in sent_epochs:
                        out.append(writer.add(index.openers[epoch_id][1]))
                        sent_epochs.add(epoch_id)
                    out.append(writer.add(record))
                    sent_chains.add(chain_id)
                out.append(writer.add(raw))
            out.append(writer.add(group.raw))
            yield b"".join(out)
        if last + 1 < len(groups):
            yield writer.add(groups[last + 1].raw)  # the closing edge, bare
            heads: tuple[tuple[str, int], ...] = ()
        elif index.edge_after is not None:
            yield writer.add(index.edge_after)
            heads = ()
        else:
            heads = ((camera, groups[last].manifest.manifest_seq + 1),)
    else:
        heads = ()
    yield writer.end(server_signer, EndReason.RANGE_COMPLETE, heads)
