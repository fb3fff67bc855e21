"""Consolidation (issue 22, item 4): an Archiver fills a gap in its copy of a camera with what
another Archiver of the site recorded, copying the ciphertext, the signed manifests, the
signed chain recipients and the viewers' chain records EXACTLY as the other Archiver made
them. Nothing is decrypted (this Archiver is no recipient) and nothing is signed again: a
viewer verifies the filled part against the OTHER Archiver's certificate.

Three pieces, each without HTTP:

* the request: an Archiver asks another with a statement signed by its own token's signing
  key (``ExportRequest``), which the other checks against the site's registry, so a viewer or
  an anonymous caller cannot bulk-download the site's key streams;
* the export (the asked Archiver, ``export_records``): the records of the range, in chain
  order, with the manifest just before and just after it (bare: the part's signed edges), the
  chains' signed recipients, and the chain records and epoch openers of viewers not revoked;
* the copy (``Consolidator``): the placements say which gaps another Archiver recorded;
  each is asked of it, every record verified against its registry certificate before
  anything is stored, and stored atomically, once (archiver/consolidated.py: ``verify_part``,
  ``PartStore``), by the admin command or the background pass.

Serving a kept part to a viewer, ``check`` and retention of parts: archiver/consolidated.py;
the layout: docs/architecture.md, "Consolidated parts".
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.serialization import Encoding

from archiver.consolidated import (
    ARCHIVED,
    CONSOLIDATED_DIR,
    HANDOVER_MS,
    JOURNALED,
    ConsolidationRefused,
    PartIndex,
    PartInfo,
    PartStore,
    ec_key_of,
    encode_prelude,
    parse_export,
    part_stream,
    shred_viewer_in_parts,
    signed_by,
    split_records,
    verify_part,
)
from archiver.directory import Directory
from archiver.services.refused import Refused
from keyservice.crypto import chain_key_id, split_key_id
from keyservice.errors import FormatError, KeyServiceError
from keyservice.identity import Signer
from keyservice.labels import LABEL_CONSOLIDATION_REQUEST
from keyservice.timespec import format_ms
from keyservice.wire import ErrorCode

if TYPE_CHECKING:
    from archiver.archive import Archive
    from archiver.audit import AuditLog
    from archiver.settings import Settings

log = logging.getLogger("archiver.consolidation")

EXPORT_PATH = "/v1/site/consolidation/export"
# A request older (or further in the future) than this is refused; its nonce is remembered
# that long, so a captured request cannot be replayed.
REQUEST_MAX_AGE_MS = 60_000
# A placement that ended less than this ago is not copied yet: the old holder records until it
# notices the move (it re-reads the cameras it holds every 2 s) and archives its last segment.
SETTLE_MS = 10_000

__all__ = ["ARCHIVED", "CONSOLIDATED_DIR", "EXPORT_PATH", "JOURNALED", "ConsolidationRefused",
           "Consolidator", "ExportRequest", "Exporter", "Outcome", "PartInfo", "PartStore",
           "export_records", "parse_export", "shred_viewer_in_parts", "split_records",
           "verify_part"]


# --- the request ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportRequest:
    """One Archiver's signed ask for another's records of a camera's range."""

    archiver: str  # who asks (its registry name: the certificate that must verify this)
    camera: str
    from_ms: int
    to_ms: int
    issued_ms: int
    nonce: str  # hex, 16 random bytes
    signature: str = ""  # base64 DER ECDSA over signed_bytes()

    def signed_bytes(self) -> bytes:
        body = {k: v for k, v in asdict(self).items() if k != "signature"}
        # A label of its own: the signing key also signs manifests, which must never be
        # mistaken for a request (or the reverse).
        return LABEL_CONSOLIDATION_REQUEST + json.dumps(
            body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def make(cls, signer: Signer, archiver: str, camera: str, from_ms: int, to_ms: int,
             now_ms: int) -> ExportRequest:
        unsigned = cls(archiver, camera, from_ms, to_ms, now_ms, secrets.token_hex(16))
        signature = signer.sign(unsigned.signed_bytes())
        return cls(**{**asdict(unsigned), "signature": base64.b64encode(signature).decode()})


class _SeenNonces:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}

    def first_use(self, nonce: str, now_ms: int) -> bool:
        with self._lock:
            for old in [n for n, t in self._seen.items() if t < now_ms - 2 * REQUEST_MAX_AGE_MS]:
                del self._seen[old]
            if nonce in self._seen:
                return False
            self._seen[nonce] = now_ms
            return True


# --- the export (the Archiver asked) ---------------------------------------------------------
class Exporter:
    """The asked Archiver's side: checks who asks, then hands out the raw signed records."""

    def __init__(self, archive: Archive, name: str, clock: Callable[[], int],
                 audit: AuditLog | None = None) -> None:
        self._archive = archive
        self._name = name
        self._clock = clock
        self._audit = audit
        self._nonces = _SeenNonces()

    def answer(self, request: ExportRequest) -> bytes:
        """The export a registered Archiver asked for (Refused otherwise), in the audit log."""
        self.authenticate(request)
        body = self.export(request)
        if self._audit is not None:
            self._audit.record(f"archiver:{request.archiver}", "consolidation.export",
                               self._clock(), camera=request.camera, from_ms=request.from_ms,
                               to_ms=request.to_ms, bytes=len(body))
        return body

    def authenticate(self, request: ExportRequest) -> None:
        """Refused unless an Archiver of the registry (not this one) signed the request now."""
        now = self._clock()
        refused = Refused(ErrorCode.UNAUTHENTICATED,
                          "Only an Archiver of the site may ask for another's records: the "
                          "request must be signed by a registered Archiver's signing key, now.")
        row = self._archive.directory.archiver(request.archiver)
        if row is None or request.archiver == self._name:
            raise refused
        try:
            _, key = ec_key_of(row.certificate)
            signature = base64.b64decode(request.signature, validate=True)
        except ValueError:
            raise refused from None
        if abs(now - request.issued_ms) > REQUEST_MAX_AGE_MS or len(request.nonce) != 32:
            raise refused
        if not signed_by(key, request.signed_bytes(), signature):
            raise refused
        if not self._nonces.first_use(request.nonce, now):
            raise refused  # a replay of a request seen before
        if request.from_ms > request.to_ms:
            raise Refused(ErrorCode.BAD_RANGE, "The range's start is after its end.")

    def export(self, request: ExportRequest) -> bytes:
        """The prelude (who signed, what range) and the records, in one body."""
        certificate = self._archive.signer.certificate.public_bytes(Encoding.DER)
        prelude = encode_prelude({"archiver": self._name, "camera": request.camera,
                                  "from_ms": request.from_ms, "to_ms": request.to_ms,
                                  "nonce": request.nonce,
                                  "certificate": base64.b64encode(certificate).decode()})
        records = export_records(self._archive, request.camera, request.from_ms,
                                 request.to_ms)
        return b"".join((prelude, *records))


def export_records(archive: Archive, camera: str, from_ms: int, to_ms: int) -> list[bytes]:
    """The records of ``camera`` captured in [from_ms, to_ms], as this Archiver archived them:
    the manifest before the range (bare), then per manifest the signed recipients of each chain
    met for the first time, its segments and the manifest, then the manifest after the range
    (bare); then the epoch openers and chain records of those chains, for viewers not revoked
    (a revoked viewer's key stream is not copied: it must not outlive its revocation here)."""
    db, files = archive.db, archive.files
    readers: dict[str, Any] = {}

    def read(file: str, offset: int, length: int) -> bytes:
        if file not in readers:
            readers[file] = files.opener(file)
        return readers[file].read(offset, length)

    out: list[bytes] = []
    chains: list[bytes] = []
    try:
        after, first, last = -1, None, None
        while rows := db.manifests_from(camera, from_ms, to_ms, after):
            for row in rows:
                if first is None:
                    first = row.manifest_seq
                    if first > 0:
                        before = db.manifests_after(camera, first - 2, 1)
                        if before and before[0].manifest_seq == first - 1:
                            out.append(read(before[0].file, before[0].offset, before[0].length))
                segments = db.segments_of(camera, row.manifest_seq)
                for segment in segments:
                    chain_id = split_key_id(segment.key_id)[0]
                    if chain_id in chains:
                        continue
                    chains.append(chain_id)
                    part = 0
                    while (where := db.chain_recipients(chain_key_id(chain_id, part))) is not None:
                        out.append(read(where.file, where.offset, where.length))
                        part += 1
                out.extend(read(s.file, s.offset, s.length) for s in segments)
                out.append(read(row.file, row.offset, row.length))
                last = row.manifest_seq
            after = rows[-1].manifest_seq
        if last is not None:
            following = db.manifests_after(camera, last, 1)
            if following and following[0].manifest_seq == last + 1:
                out.append(read(following[0].file, following[0].offset, following[0].length))
    finally:
        for reader in readers.values():
            reader.close()
    directory = archive.directory
    sent_epochs: set[bytes] = set()
    for chain_id in chains:
        for fp, epoch_id, record in db.chain_records_of(chain_id):
            viewer = directory.viewer(fp)
            if viewer is None or viewer.revoked_ms is not None:
                continue
            if epoch_id not in sent_epochs:
                opener = db.epoch_opener(epoch_id)
                if opener is None:
                    continue
                out.append(opener)
                sent_epochs.add(epoch_id)
            out.append(record)
    return out


# --- the copy (the consolidating Archiver) -----------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """One placement of another Archiver, consolidated (or why not)."""

    archiver: str
    signer: str  # the signer certificate's subject
    asked_from_ms: int
    asked_to_ms: int
    stored: bool  # False: kept already (idempotent), or nothing recorded there
    part: str | None = None
    segments: int = 0
    bytes: int = 0
    viewers: int = 0
    from_ms: int | None = None
    to_ms: int | None = None
    message: str = ""

    def to_json(self) -> dict[str, object]:
        return asdict(self)


Fetch = Callable[[str, ExportRequest], bytes]


def _subject(certificate_der: bytes) -> str:
    try:
        return ec_key_of(certificate_der)[0].subject.rfc4514_string()
    except ValueError:
        return ""


@dataclass
class Consolidator:
    """Fills this Archiver's gaps in a camera from the other Archivers that recorded them."""

    archive: Archive
    settings: Settings
    audit: AuditLog | None = None
    fetch: Fetch | None = None  # (url, request) -> body; default: HTTPS under --peer-tls-ca
    on_file: Callable[[str], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.store = PartStore(self.settings.data_dir / CONSOLIDATED_DIR)
        self.store.clean_incoming()

    @property
    def directory(self) -> Directory:
        return self.archive.directory

    def gaps(self, camera: str, from_ms: int | None = None,
             to_ms: int | None = None) -> list[tuple[str, int, int, bool]]:
        """(archiver, since, until, settled) of each closed placement of ANOTHER Archiver
        overlapping [from_ms, to_ms], not consolidated yet. An open one is being recorded
        still; one that closed less than SETTLE_MS ago may still get its last segments on the
        old holder (``settled`` False: not copied yet, or the copy would end early)."""
        name = self.settings.archiver_name
        kept = self.store.parts(camera)
        now = self.archive.clock()
        out = []
        for p in self.directory.placements(camera, from_ms, None if to_ms is None else to_ms + 1):
            if p.archiver == name or p.until_ms is None:
                continue
            since = p.since_ms if from_ms is None else max(p.since_ms, from_ms)
            until = p.until_ms if to_ms is None else min(p.until_ms, to_ms)
            if any(k.archiver == p.archiver and k.asked_from_ms <= since
                   and k.asked_to_ms >= until for k in kept):
                continue
            out.append((p.archiver, since, until, p.until_ms <= now - SETTLE_MS))
        return out

    def consolidate(self, camera: str, from_ms: int | None = None,
                    to_ms: int | None = None) -> list[Outcome]:
        """Each gap of ``camera`` in the range, copied and verified (one at a time: a camera's
        parts are never copied twice at once)."""
        if self.directory.camera(camera) is None:
            raise Refused(ErrorCode.UNKNOWN_CAMERA, f"No camera named '{camera}'.")
        with self._lock:
            return [self._one(camera, archiver, since, until) if settled
                    else self._unsettled(camera, archiver, since, until)
                    for archiver, since, until, settled in self.gaps(camera, from_ms, to_ms)]

    def _unsettled(self, camera: str, archiver: str, since: int, until: int) -> Outcome:
        row = self.directory.archiver(archiver)
        subject = "" if row is None else _subject(row.certificate)
        retry = max(p.until_ms for p in self.directory.placements(camera, since, until + 1)
                    if p.until_ms is not None) + SETTLE_MS
        return Outcome(archiver, subject, since, until, False, message=(
            f"its recording ended less than {SETTLE_MS // 1000} s ago and {archiver} may still "
            f"be archiving its last segments; not copied yet (try again after "
            f"{format_ms(retry)}; the background pass will)"))

    def _one(self, camera: str, archiver: str, since: int, until: int) -> Outcome:
        row = self.directory.archiver(archiver)
        if row is None:
            raise ConsolidationRefused(f"Archiver '{archiver}', which recorded camera "
                                       f"'{camera}', is not in the site's registry; nothing "
                                       "was copied.")
        try:
            cert, key = ec_key_of(row.certificate)
        except ValueError:
            raise ConsolidationRefused(f"Archiver '{archiver}''s certificate in the registry "
                                       "is not usable; nothing was copied.") from None
        # The registry is the Archivers' trust (the directory decides who is in the site);
        # a viewer still checks this signer against its pins or the site CA when it plays.
        # Its video reaches past the placement's end until it noticed the move.
        request = ExportRequest.make(self.archive.signer, self.settings.archiver_name, camera,
                                     since, until + HANDOVER_MS, self.archive.clock())
        body = (self.fetch or self._https)(row.url, request)
        try:
            prelude, records = parse_export(body)
        except FormatError as exc:
            raise ConsolidationRefused(f"Archiver '{archiver}' answered something that is not "
                                       f"an export ({exc.message}); nothing was stored.") from None
        given = base64.b64decode(str(prelude.get("certificate", "")))
        if (prelude.get("nonce") != request.nonce or prelude.get("camera") != camera
                or not hmac.compare_digest(given, row.certificate)):
            raise ConsolidationRefused(f"Archiver '{archiver}' answered with a signing "
                                       "certificate (or a request) that is not the registry's; "
                                       "nothing was stored.")
        subject = cert.subject.rfc4514_string()
        if not records:
            return Outcome(archiver, subject, since, until, False,
                           message="nothing recorded there (or removed by retention)")

        def allowed(fp: str) -> bool:
            viewer = self.directory.viewer(fp)
            return viewer is not None and viewer.revoked_ms is None

        part = verify_part(camera, records, key, (request.from_ms, request.to_ms), allowed)
        info = self.store.store(part, archiver, row.certificate, (since, until),
                                self.archive.clock(), self.on_file)
        if info is None:
            return Outcome(archiver, subject, since, until, False,
                           message="consolidated already")
        log.info("consolidated camera %s from %s: %d segments, %d bytes, part %s", camera,
                 archiver, part.segments, part.bytes, info.part)
        return Outcome(archiver, subject, since, until, True, info.part, part.segments,
                       part.bytes, part.viewers, part.from_ms, part.to_ms)

    def _https(self, url: str, request: ExportRequest) -> bytes:
        import httpx

        from keyservice.tls import trust

        try:
            answer = httpx.post(url.rstrip("/") + EXPORT_PATH, json=asdict(request),
                                verify=trust(self.settings.peer_tls_ca), timeout=120)
        except httpx.HTTPError as exc:
            raise ConsolidationRefused(f"The Archiver at {url} could not be reached "
                                       f"({type(exc).__name__}: {exc}); nothing was "
                                       "copied.") from None
        if answer.status_code != 200:
            raise ConsolidationRefused(f"The Archiver at {url} refused the copy (HTTP "
                                       f"{answer.status_code}: {answer.text[:200]}).")
        return answer.content

    def for_admin(self, actor: str, camera: str, from_ms: int | None = None,
                  to_ms: int | None = None) -> list[Outcome]:
        """``consolidate`` as an admin asked it: each part stored, or the refusal, in the audit
        log; a copy that could not be had or did not verify is a Refused."""
        try:
            outcomes = self.consolidate(camera, from_ms, to_ms)
        except ConsolidationRefused as exc:
            self._record(actor, "consolidation.refused", camera=camera, message=exc.message)
            raise Refused(ErrorCode.CONSOLIDATION_REFUSED, exc.message) from None
        for outcome in outcomes:
            if outcome.stored:
                self._record(actor, "consolidation.stored", camera=camera,
                             source=outcome.archiver, part=outcome.part,
                             segments=outcome.segments, bytes=outcome.bytes)
        return outcomes

    def _record(self, actor: str, action: str, **details: object) -> None:
        if self.audit is not None:
            self.audit.record(actor, action, self.archive.clock(), **details)

    def part_for(self, archiver: str, camera: str, from_ms: int,
                 to_ms: int) -> PartInfo | None:
        """The kept part of ``archiver``'s recording that answers [from_ms, to_ms] of
        ``camera``: the placement it fills covers the range, give or take the handover (a
        viewer asks from the end of the previous Archiver's video, to the next one's start)."""
        for info in self.store.parts(camera):
            if (info.archiver == archiver and info.asked_from_ms - HANDOVER_MS <= from_ms
                    and to_ms <= info.asked_to_ms + HANDOVER_MS
                    and from_ms <= info.asked_to_ms + HANDOVER_MS):
                return info
        return None

    def holds_copy(self, archiver: str, camera: str, from_ms: int, to_ms: int) -> bool:
        """Whether a kept part fills exactly this placement of ``archiver`` (placements)."""
        return any(info.archiver == archiver and info.asked_from_ms <= from_ms
                   and to_ms <= info.asked_to_ms for info in self.store.parts(camera))

    def stream(self, archiver: str, viewer_fingerprint: str, camera: str, from_ms: int,
               to_ms: int, nonce: bytes,
               still_authorized: Callable[[], bool]) -> Iterator[bytes] | None:
        """A viewer's stream of [from_ms, to_ms] from the kept part of ``archiver``'s recording
        that covers it (None: none does): as the signer signed it, END signed here."""
        info = self.part_for(archiver, camera, from_ms, to_ms)
        if info is None:
            return None
        index = PartIndex(self.store, info)
        archive = self.archive
        return part_stream(index, archiver_cert_der=archive.signer.certificate.public_bytes(
            Encoding.DER), server_signer=archive.signer, viewer_fingerprint=viewer_fingerprint,
            from_ms=from_ms, to_ms=to_ms, nonce=nonce, request_id=archive.rng(16),
            created_ms=archive.clock(), still_authorized=still_authorized)

    def run_once(self) -> list[Outcome]:
        """Every camera this Archiver holds now: its gaps, consolidated (the background task).
        A failure is logged and tried again next time; it never touches recording."""
        outcomes: list[Outcome] = []
        for camera in self.directory.cameras_held(self.settings.archiver_name):
            try:
                outcomes.extend(self.for_admin("archiver", camera))
            except (KeyServiceError, Refused, OSError) as exc:
                log.warning("consolidation of camera %s failed, tried again later: %s", camera,
                            getattr(exc, "message", None) or exc)
        return outcomes

    def expire(self) -> int:
        """Retention on consolidated parts, as on this Archiver's own days: a part whose video
        ended more than its camera's retention ago, and that no evidence hold covers, is
        removed (its viewers' key streams first)."""
        removed = 0
        now = self.archive.clock()
        for info in self.store.parts():
            days = self.archive.retention.days_of(info.camera)
            if info.to_ms >= now - days * 86_400_000:
                continue
            if any(h.from_ms <= info.to_ms and h.to_ms >= info.from_ms
                   for h in self.directory.holds(info.camera)):
                continue  # held: kept like any other copy of the video
            self.store.remove(info)
            removed += 1
            log.info("retention removed consolidated part %s of %s", info.part, info.camera)
        return removed
