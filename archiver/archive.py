"""The Archiver's core, without HTTP: ingest (encrypt, sign, append durably, index) and the
assembly of per-viewer fusion streams from the archive.

The HTTP routers are thin wrappers around this class; the benchmarks and the synthetic-archive
generator call it directly with an injected clock, through the same write path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import anyio.to_thread
from cryptography.hazmat.primitives.serialization import Encoding

from archiver.cameras import CameraState, HealthBoard, SavedHealth, SegmentClock, SegmentTime
from archiver.db import ChainRecipientsRow, Database, HealthRow, ManifestRow, SegmentRow
from archiver.directory import ViewerRow, open_directory
from archiver.keying import KeyManager
from archiver.mpegts import media_span
from archiver.reindex import ec_public_key as _ec_key
from archiver.reindex import recover
from archiver.retention import Retention
from archiver.settings import Settings
from archiver.storage import ArchiveFiles, ArchiveReader, StorageFailed, StorageFull
from archiver.storage_watch import StorageWatch
from keyservice.crypto import chain_key_id, seal_segment, split_key_id
from keyservice.format import (
    ZERO_HASH,
    ChainRecord,
    DataStream,
    EndReason,
    Header,
    Manifest,
    Mode,
    chain_statement_number,
    decode_record,
    encode_record_parts,
)
from keyservice.fusion_writer import ManifestChain, StreamWriter
from keyservice.identity import Signer

log = logging.getLogger("archiver")


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class _CameraState:
    chain: ManifestChain
    next_seq: dict[DataStream, int] = field(default_factory=dict)
    clocks: dict[DataStream, SegmentClock] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Notifier:
    """Wakes live viewers when a camera's archive grows. Ingest runs in worker threads, the
    live responses in the event loop: versions make a missed wake-up impossible."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[str, int] = {}
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def version(self, camera: str) -> int:
        with self._lock:
            return self._versions.get(camera, 0)

    def publish(self, camera: str) -> None:
        with self._lock:
            self._versions[camera] = self._versions.get(camera, 0) + 1
            waiters = list(self._waiters.get(camera, ()))
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    def wake_all(self) -> None:
        """Wake every waiting live stream (an authorization changed: each re-checks its own)."""
        with self._lock:
            waiters = [w for camera_waiters in self._waiters.values() for w in camera_waiters]
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    async def wait(self, camera: str, seen_version: int, timeout: float) -> None:
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._lock:
            if self._versions.get(camera, 0) != seen_version:
                return
            self._waiters.setdefault(camera, set()).add(waiter)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters[camera].discard(waiter)


class Archive:
    def __init__(self, settings: Settings, signer: Signer,
                 clock: Callable[[], int] = wall_clock_ms,
                 rng: Callable[[int], bytes] = os.urandom,
                 free_bytes: Callable[[], int] | None = None) -> None:
        """``free_bytes``: the archive file system's free space (default: its real reading)."""
        self.settings = settings
        self.signer = signer
        self.clock = clock
        self.rng = rng
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.db_path)
        try:
            # After the index: on SQLite the directory shares its file, and the index's legacy
            # migrations made the directory's first tables (archiver/directory/migrate.py).
            self.directory = open_directory(settings.directory_url, settings.data_dir)
        except BaseException:
            self.db.close()
            raise
        self.files = ArchiveFiles(settings.archive_dir)
        # The files are the source of truth: signed groups the index lacks are indexed again,
        # only unsigned or torn bytes are cut.
        self.recovery_actions = recover(settings.archive_dir, self.db,
                                        _ec_key(signer.certificate.public_key()))
        self.keys = KeyManager(self.db, settings.key_period_s, rng, signer,
                               journal=self._journal_keys, clock=clock,
                               directory=self.directory)
        self.retention = Retention(settings, self.db, self.files, clock, free_bytes,
                                   directory=self.directory)
        self.notifier = Notifier()
        self.health = HealthBoard()
        # Whether this Archiver can archive (its own disk): a holder that cannot gives its
        # cameras with standbys to a standby (archiver/registry.py).
        self.storage_watch = StorageWatch([settings.archive_dir, settings.data_dir], clock)
        for saved in self.db.camera_health():  # the last known state, until heard of again
            with contextlib.suppress(ValueError):
                self.health.restore(SavedHealth(saved.camera, CameraState(saved.state),
                                                saved.message, saved.last_segment_ms,
                                                saved.saved_ms))
        # Per viewer, how often its authorization changed in this process: an open stream
        # re-checks the viewer's authorization whenever its count moved (revocation ends it).
        self._auth_changes: dict[str, int] = {}
        self._cameras: dict[str, _CameraState] = {}
        self._cameras_lock = threading.Lock()
        self._archiver_cert_der = signer.certificate.public_bytes(Encoding.DER)
        self.segments_ingested = 0
        self.bytes_ingested = 0

    def _journal_keys(self, camera: str, now_ms: int, records: list[bytes]) -> None:
        self.files.append(self.files.key_file_for(camera, now_ms), records)

    def save_health(self, every_ms: int) -> None:
        """Write the cameras' health that changed to the index (``HealthBoard.to_save``)."""
        names = [camera.name for camera in self.directory.cameras()]
        self.db.save_camera_health([
            HealthRow(saved.camera, saved.state.value, saved.message, saved.last_segment_ms,
                      saved.saved_ms)
            for saved in self.health.to_save(names, self.clock(), every_ms)])

    def close(self) -> None:
        self.keys.close()  # a chain being prepared is committed (or not) before the index closes
        with self.retention.lock:  # a pass in progress finishes its step first
            self.files.close()
            self.directory.close()
            self.db.close()

    # --- ingest -----------------------------------------------------------------------
    def ingest_segment(self, camera: str, data: bytes, stream: DataStream = DataStream.VIDEO,
                       now_ms: int | None = None, *, session: int | None = None,
                       captured_by_ms: int | None = None) -> SegmentRow:
        """Encrypt, sign, append durably and index one segment. Returns only once it is
        acknowledged: fsynced and committed. Its time is [start, end] of the video it holds
        (archiver.cameras explains the rule); ``now_ms`` is its arrival; ``session``: the
        RTSP session of a pulled camera's segment (its clock is trusted across it, bounded);
        ``captured_by_ms``: the puller's bound on the end of its capture (archiver.rtsp)."""
        try:
            row = self._ingest_making_room(camera, data, stream, now_ms, session,
                                           captured_by_ms)
        except (StorageFull, StorageFailed) as exc:
            self.storage_watch.refused(camera, exc)  # after eviction found nothing
            raise
        self.storage_watch.archived(camera)
        return row

    def _ingest_making_room(self, camera: str, data: bytes, stream: DataStream,
                            now_ms: int | None, session: int | None,
                            captured_by_ms: int | None = None) -> SegmentRow:
        try:
            return self._ingest(camera, data, stream, now_ms, session, captured_by_ms)
        except StorageFull:
            # Ingest does not stop while unheld video of a past day can go: the oldest goes
            # now (not at the next retention pass) and the segment is tried once more.
            if not self.retention.make_room():
                raise
            log.warning("the disk was full: removed the oldest unheld video to archive a "
                        "segment of %s", camera)
            return self._ingest(camera, data, stream, now_ms, session, captured_by_ms)

    def _ingest(self, camera: str, data: bytes, stream: DataStream,
                now_ms: int | None, session: int | None = None,
                captured_by_ms: int | None = None) -> SegmentRow:
        now = self.clock() if now_ms is None else now_ms
        span = media_span(data)  # reads the PES headers, outside the lock
        state = self._camera_state(camera)
        try:
            with state.lock:
                seq = state.next_seq.setdefault(stream, self.db.next_segment_seq(camera, stream))
                clock = state.clocks.get(stream)
                if clock is None:
                    clock = state.clocks[stream] = SegmentClock(
                        self.db.last_segment_end(camera, stream),
                        round(self.settings.max_behind_s * 1000))
                time = clock.place(now, span, session, captured_by_ms)
                overrun = clock.overrun_ms
                try:
                    if self.settings.benchmark_plaintext_baseline:
                        row = self._append_plaintext(camera, stream, seq, data, time, now)
                    else:
                        row = self._append_encrypted(state, camera, stream, seq, data, time, now)
                finally:
                    # Even after a failure: the attempt may have sealed under this seq, and the
                    # minute key refuses a seq twice (nonce reuse). Gaps in seq are fine.
                    state.next_seq[stream] = seq + 1
        except BaseException as exc:
            self.health.segment_refused(camera, f"not archived: {str(exc) or type(exc).__name__}")
            raise
        self.segments_ingested += 1
        self.bytes_ingested += len(data)
        self.health.segment_archived(camera, now, len(data), time,
                                     span.jump_ms if span is not None else 0,
                                     archived_ms=self.clock() if now_ms is None else now,
                                     overrun_ms=overrun)
        if overrun:
            log.warning("camera %s: its stream clock fell %d s behind its arrival, more than "
                        "the bound; the segment was placed at its arrival", camera, overrun // 1000)
        self.notifier.publish(camera)
        return row

    def _append_encrypted(self, state: _CameraState, camera: str, stream: DataStream, seq: int,
                          data: bytes, time: SegmentTime, now: int) -> SegmentRow:
        key = self.keys.key_for(camera, stream, now)
        chain_id = split_key_id(key.key_id)[0]
        # The chain's signed recipients statement (who its state was wrapped for, in one or
        # more parts) goes before its first segment.
        recipients = self.keys.take_recipients(chain_id)
        segment = seal_segment(key, seq, time.start_ms, data,
                               duration_ms=min(time.end_ms - time.start_ms, 2**32 - 1))
        chain_before = (state.chain.next_seq, state.chain.prev_hash)
        manifest, manifest_bytes = state.chain.issue([segment], [key], self.signer, now)
        # The segment record stays in pieces (header, ciphertext) down to the writev.
        segment_parts = encode_record_parts(segment)
        segment_len = sum(len(part) for part in segment_parts)
        rel = self.files.file_for(camera, now)
        offset = None
        try:
            offset = self.files.append(rel, [*recipients, *segment_parts, manifest_bytes])
            seg_offset = offset + sum(map(len, recipients))
            # One index row per part, under chain id || part (u32): see _Assembler.manifest.
            # A join statement (issue 23) carries its own number, after the start parts.
            recipient_rows, part_offset = [], offset
            for raw in recipients:
                # Read at its place, not decoded: this process signed it a moment ago (at
                # 10 000 viewers, 2000 fingerprints a part were decoded and checked here).
                part = chain_statement_number(raw)
                recipient_rows.append(ChainRecipientsRow(chain_key_id(chain_id, part), camera,
                                                         rel, part_offset, len(raw)))
                part_offset += len(raw)
            row = SegmentRow(camera, int(stream), seq, time.start_ms, key.key_id, len(data),
                             manifest.entries[0].digest, rel, seg_offset, segment_len,
                             manifest.manifest_seq, time.end_ms)
            self.db.record_segments([row], ManifestRow(
                camera, manifest.manifest_seq, rel, seg_offset + segment_len,
                len(manifest_bytes), hashlib.sha256(manifest_bytes).digest(), time.start_ms,
                time.end_ms), recipient_rows)
        except BaseException:
            if recipients:
                self.keys.put_back_recipients(chain_id, recipients)
            # Not acknowledged: the chain must not point at a manifest that was never archived,
            # and the file must not keep records the index does not know (e.g. the index
            # commit failed on a full disk).
            state.chain.next_seq, state.chain.prev_hash = chain_before
            if offset is not None:
                self.files.cut_back(rel, offset)
            raise
        return row

    def _append_plaintext(self, camera: str, stream: DataStream, seq: int, data: bytes,
                          time: SegmentTime, now: int) -> SegmentRow:
        """Benchmark baseline only (Settings.benchmark_plaintext_baseline): same durable write
        and index, no encryption, no signature."""
        rel = self.files.file_for(camera, now)
        offset = self.files.append(rel, data)
        row = SegmentRow(camera, int(stream), seq, time.start_ms, b"", len(data), ZERO_HASH, rel,
                         offset, len(data), seq, time.end_ms)
        self.db.record_segments([row], ManifestRow(camera, seq, rel, offset + len(data), 0,
                                                   ZERO_HASH, time.start_ms, time.end_ms))
        return row

    def _camera_state(self, camera: str) -> _CameraState:
        with self._cameras_lock:
            state = self._cameras.get(camera)
            if state is None:
                tail = self.db.chain_tail(camera)
                chain = (ManifestChain(camera) if tail is None
                         else ManifestChain(camera, tail[0] + 1, tail[1]))
                state = self._cameras[camera] = _CameraState(chain)
            return state

    def chain_head(self, camera: str) -> int:
        """The sequence number the camera's next manifest will have, from memory: under the
        camera's lock, so every manifest before it is archived and indexed."""
        state = self._camera_state(camera)
        with state.lock:
            return state.chain.next_seq

    # --- authorization ----------------------------------------------------------------
    def authorization_changed(self, fingerprint: str, cameras: list[str] | None) -> None:
        self.keys.authorization_changed(fingerprint, cameras)
        self._authorizations_changed([fingerprint])

    def viewers_authorized(self, fingerprints: Sequence[str]) -> None:
        """Viewers added or re-authorized at once (a batch enrolment), on all their cameras."""
        self.keys.viewers_authorized(fingerprints)
        self._authorizations_changed(fingerprints)

    def _authorizations_changed(self, fingerprints: Iterable[str]) -> None:
        with self._cameras_lock:
            for fingerprint in fingerprints:
                self._auth_changes[fingerprint] = self._auth_changes.get(fingerprint, 0) + 1
        self.notifier.wake_all()  # live streams waiting for segments re-check at once

    def access_removed(self, fingerprint: str, cameras: list[str] | None,
                       at_ms: int | None = None) -> None:
        """A viewer was revoked or lost cameras (None: all), and gained none: the cameras
        keep the current key period's key (the viewer holds it already) and switch to chains
        without it from the next period on, prepared off the ingest path. ``at_ms``: when it
        happened, if earlier than now (a change made through another Archiver of the site):
        no key of a later period than that one's is used again."""
        now = self.clock()
        self.keys.access_removed(fingerprint, cameras, now if at_ms is None else min(at_ms, now))
        self._authorizations_changed([fingerprint])

    def authorization_changes(self, fingerprint: str) -> int:
        with self._cameras_lock:
            return self._auth_changes.get(fingerprint, 0)

    # --- fusion streams ---------------------------------------------------------------
    def has_recording(self, camera: str, from_ms: int, to_ms: int) -> bool:
        return bool(self.db.manifests_from(camera, from_ms, to_ms, limit=1))

    def playback(self, viewer: ViewerRow, camera: str, from_ms: int, to_ms: int,
                 nonce: bytes, grant: GrantedKeys | None = None) -> Iterator[bytes]:
        """The fusion stream of a recorded range, bound to the viewer's request ``nonce``.
        Seeks through the time index, then reads manifests in chain order; the archive's
        record bytes are passed through, never re-encrypted. ``grant``: served under an
        access grant (the viewer's keys come from the grant, not from its key stream)."""
        assembler = _Assembler(self, viewer, camera, Mode.PLAYBACK, from_ms, to_ms, nonce,
                               grant)
        try:
            yield assembler.start()
            after = -1
            while rows := self.db.manifests_from(camera, from_ms, to_ms, after):
                if after < 0 and rows[0].manifest_seq > 0:
                    # The range's opening edge: the manifest just before it, bare.
                    yield assembler.edge(camera, rows[0].manifest_seq - 1)
                for row in rows:
                    if not assembler.still_authorized():
                        return  # revoked: ends without an end record, nothing more is sent
                    yield assembler.manifest(row)
                after = rows[-1].manifest_seq
            # The closing edge: the chain head from memory (not the index), and, if the chain
            # went on, the manifest right after the range, bare.
            while True:
                head = self.chain_head(camera)
                if after < 0 or after >= head - 1:
                    break
                following = self.db.manifests_after(camera, after, 1)
                if not following or following[0].manifest_seq != after + 1:
                    # Removed by retention: its kept manifest is the edge. Otherwise not
                    # indexed: the viewer will report the end as unproven.
                    yield assembler.edge(camera, after + 1)
                    break
                row = following[0]
                if row.first_capture_ms <= to_ms:  # archived while this stream was served
                    yield assembler.manifest(row)
                    after = row.manifest_seq
                    continue
                yield assembler.edge(camera, row.manifest_seq)
                break
            yield assembler.end(EndReason.RANGE_COMPLETE, ((camera, head),))
        finally:
            assembler.close()

    async def live(self, viewer: ViewerRow, camera: str, duration_s: float,
                   nonce: bytes, from_ms: int | None = None) -> AsyncIterator[bytes]:
        """A live fusion stream: segments as they are acknowledged, for duration_s. Reads from
        the archive (not from memory), so a slow viewer costs no memory; one that falls more
        than live_max_lag manifests behind is dropped (its stream stops without an end record,
        which the viewer reports as truncated).

        ``from_ms``: the viewer's clock when it sent the request (the caller checked it is
        within the allowed clock difference); the stream starts there, so a relay that holds
        the request back skips nothing. Its edges are proven as a recorded range's are: the
        manifest before the first one reaching the start goes first, bare, and END states the
        chain head from memory (every manifest before it was sent)."""
        now = self.clock()
        start = now if from_ms is None else from_ms
        assembler = _Assembler(self, viewer, camera, Mode.LIVE, start,
                               start + int(duration_s * 1000), nonce)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + duration_s
        try:
            yield assembler.start()
            head = self.chain_head(camera)
            after = await anyio.to_thread.run_sync(self._issued_before, camera, head, start)
            if after >= 0:  # the opening edge
                yield await anyio.to_thread.run_sync(assembler.edge, camera, after)
            while True:
                if not await anyio.to_thread.run_sync(assembler.still_authorized):
                    log.warning("ending the live stream of %s: its authorization ended",
                                viewer.fingerprint[:16])
                    return  # revoked: the stream ends at once, without an end record
                version = self.notifier.version(camera)
                max_lag = self.settings.live_max_lag
                rows = await anyio.to_thread.run_sync(
                    self.db.manifests_after, camera, after, max_lag + 1)
                if len(rows) > max_lag:
                    log.warning("dropping live viewer %s: too far behind", viewer.fingerprint[:16])
                    return
                for row in rows:
                    if not await anyio.to_thread.run_sync(assembler.still_authorized):
                        return
                    yield await anyio.to_thread.run_sync(assembler.manifest, row)
                    after = row.manifest_seq
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                if not rows:
                    await self.notifier.wait(camera, version, min(remaining, 1.0))
            # The closing edge: the head from memory, and every manifest before it not sent yet.
            head = self.chain_head(camera)
            rows = await anyio.to_thread.run_sync(self.db.manifests_after, camera, after,
                                                  max(0, head - 1 - after))
            for row in rows:
                if row.manifest_seq >= head:
                    break
                if not await anyio.to_thread.run_sync(assembler.still_authorized):
                    return
                yield await anyio.to_thread.run_sync(assembler.manifest, row)
            yield await anyio.to_thread.run_sync(assembler.end, EndReason.LIVE_ENDED,
                                                 ((camera, head),))
        finally:
            assembler.close()


    def _issued_before(self, camera: str, head: int, start_ms: int) -> int:
        """The last manifest (below ``head``) issued before ``start_ms`` by its signed
        issued_ms: a live stream's opening edge. Looks back at most live_max_lag manifests
        (a live start is at most a minute from now); -1 if the chain had none."""
        rows = [row for row in self.db.manifests_after(
            camera, max(-1, head - 1 - self.settings.live_max_lag), self.settings.live_max_lag + 1)
            if row.manifest_seq < head]
        for row in reversed(rows):
            reader = self.files.opener(row.file)
            try:
                manifest = decode_record(reader.read(row.offset, row.length))
            finally:
                reader.close()
            if isinstance(manifest, Manifest) and manifest.issued_ms < start_ms:
                return row.manifest_seq
        return (rows[0].manifest_seq if rows else head) - 1


@dataclass(frozen=True)
class GrantedKeys:
    """A stream served under an access grant: the key ids the grant carries (its public part;
    the keys themselves are wrapped for the grantee) and a check that it is still approved."""

    key_ids: frozenset[bytes]
    still_valid: Callable[[], bool]


class _Assembler:
    """Builds one viewer's fusion stream: only that viewer's epoch openers and chain records,
    each sent once, before the first segment that needs it. Under an access grant: only the
    segments whose keys the grant carries, and no key material at all."""

    def __init__(self, archive: Archive, viewer: ViewerRow, camera: str, mode: Mode,
                 from_ms: int, to_ms: int, nonce: bytes,
                 grant: GrantedKeys | None = None) -> None:
        self._grant = grant
        self._archive = archive
        self._db = archive.db
        self._fingerprint = viewer.fingerprint
        self._camera = camera
        self._writer = StreamWriter(Header(
            archiver_cert_der=archive._archiver_cert_der,
            viewer_fingerprint=bytes.fromhex(viewer.fingerprint),
            request_id=archive.rng(16),
            created_ms=archive.clock(),
            mode=mode,
            range_from_ms=from_ms,
            range_to_ms=to_ms,
            cameras=(camera,),
            request_nonce=nonce,
        ))
        self._auth_changes = archive.authorization_changes(viewer.fingerprint)
        self._authorized = True
        self._sent_epochs: set[bytes] = set()
        self._sent_chains: set[bytes] = set()
        self._sent_recipients: dict[bytes, int] = {}  # chain id -> statements sent so far
        self._first_steps: dict[bytes, int] = {}  # chain id -> this viewer's record's first step
        self._readers: dict[str, ArchiveReader] = {}

    def start(self) -> bytes:
        return self._writer.start()

    def still_authorized(self) -> bool:
        """False once the viewer was revoked or lost this camera: cheap (a counter) unless its
        authorization changed since the last look, then the index says."""
        if self._grant is not None:
            # Checked at every manifest: a revoked grant (or grantee) stops the stream at once.
            self._authorized = self._authorized and self._grant.still_valid()
            return self._authorized
        changes = self._archive.authorization_changes(self._fingerprint)
        if self._authorized and changes != self._auth_changes:
            self._auth_changes = changes
            viewer = self._archive.directory.viewer(self._fingerprint)
            self._authorized = viewer is not None and viewer.authorized_on(self._camera)
        return self._authorized

    def manifest(self, row: ManifestRow) -> bytes:
        parts = []
        for segment in self._db.segments_of(self._camera, row.manifest_seq):
            if self._grant is not None and segment.key_id in self._grant.key_ids:
                parts.append(self._writer.add(
                    self._read(segment.file, segment.offset, segment.length),
                    digest=segment.digest))
                continue
            chain_id = split_key_id(segment.key_id)[0]
            # The chain record is indexed under the chain id (keying.py).
            found = (None if self._grant is not None
                     else self._db.chain_record(self._fingerprint, chain_id))
            if found is None:
                # No key for this viewer: the manifest alone is sent, with the chain's signed
                # recipients (every part), which let the viewer check that it was not
                # authorized then (without them it reports the segment as missing).
                if chain_id not in self._sent_recipients:
                    parts.extend(self._recipients_after(chain_id))
                continue
            epoch_id, chain_record = found
            first_step = self._first_step(chain_id, chain_record)
            if first_step:
                # A join record (issue 23): its viewer was given the chain from first_step
                # on. Earlier segments go as manifest entries only (the signed join statement
                # shows they precede its join), with the chain's statements.
                if split_key_id(segment.key_id)[1] < first_step:
                    if chain_id not in self._sent_recipients:
                        parts.extend(self._recipients_after(chain_id))
                    continue
                if chain_id not in self._sent_chains:
                    # Every statement not sent yet goes before the record, which the reader
                    # accepts only under its join statement (a live stream may have sent the
                    # start statement before the join was made).
                    parts.extend(self._recipients_after(chain_id))
            if epoch_id not in self._sent_epochs:
                opener = self._db.epoch_opener(epoch_id)
                if opener is None:
                    continue  # key streams deleted concurrently: nothing this viewer can open
                parts.append(self._writer.add(opener))
                self._sent_epochs.add(epoch_id)
            if chain_id not in self._sent_chains:
                parts.append(self._writer.add(chain_record))
                self._sent_chains.add(chain_id)
            # Digests were computed at ingest: serving hashes no segment bytes again.
            parts.append(self._writer.add(self._read(segment.file, segment.offset, segment.length),
                                          digest=segment.digest))
        parts.append(self._writer.add(self._read(row.file, row.offset, row.length), digest=row.hash))
        return b"".join(parts)

    def _recipients_after(self, chain_id: bytes) -> list[bytes]:
        """The signed statements of a chain archived so far and not sent yet in this stream:
        its start parts, then its join statements, each indexed under chain id || its
        number."""
        out, part = [], self._sent_recipients.get(chain_id, 0)
        while (where := self._db.chain_recipients(chain_key_id(chain_id, part))) is not None:
            out.append(self._writer.add(self._read(where.file, where.offset, where.length)))
            part += 1
        self._sent_recipients[chain_id] = part
        return out

    def _first_step(self, chain_id: bytes, chain_record: bytes) -> int:
        """The first step of this viewer's record of a chain: 0, or a join's step."""
        step = self._first_steps.get(chain_id)
        if step is None:
            record = decode_record(chain_record)
            step = self._first_steps[chain_id] = (
                record.first_step if isinstance(record, ChainRecord) else 0)
        return step

    def end(self, reason: EndReason, heads: tuple[tuple[str, int], ...] = ()) -> bytes:
        return self._writer.end(self._archive.signer, reason, heads)

    def edge(self, camera: str, manifest_seq: int) -> bytes:
        """A manifest just outside the range, without its segments: it links the range's
        first or last manifest to the chain around it (nothing there if it is not indexed;
        the viewer then reports the range's edge as unproven)."""
        rows = self._db.manifests_after(camera, manifest_seq - 1, 1)
        if not rows or rows[0].manifest_seq != manifest_seq:
            anchor = self._db.anchor(camera, manifest_seq)  # next to video retention removed
            return b"" if anchor is None else self._writer.add(anchor)
        row = rows[0]
        return self._writer.add(self._read(row.file, row.offset, row.length), digest=row.hash)

    def _read(self, file: str, offset: int, length: int) -> bytes:
        reader = self._readers.get(file)
        if reader is None:
            reader = self._readers[file] = self._archive.files.opener(file)
        return reader.read(offset, length)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
