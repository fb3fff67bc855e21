"""Key chains, minute keys and per-viewer key streams, in memory only.

For every camera data stream a *key chain* (format v2, keyservice.crypto.KeyChain): a fresh
random starting state when a viewer loses the camera (revoked, or the camera removed from it:
it cannot open what is recorded after the current key period), at every UTC day boundary and
at every Archiver start; every key period's minute key is derived one-way from the chain's
state, which then steps forward (the previous state is dropped). A chain's starting state is
wrapped once for every viewer authorized at its start, under the viewer's epoch KEK (one
RSA-OAEP encryption per viewer per epoch, see keyservice.crypto.Epoch): one chain record per
viewer per camera stream per day, plus one per revocation.

A viewer authorized on a camera while its chain runs *joins* it (issue 23): at the chain's next
rotation it gets the state of the first step not used yet (a join record) and the Archiver signs
a join statement naming it and that step; nobody else's records change. The state is one-way,
so the new viewer opens nothing recorded before it was added.

A revocation (or cameras taken from a viewer: ``access_removed``) does not stop ingest: the
revoked viewer already holds the current key period's key, so the cameras keep sealing that
period under it while a background thread prepares every affected camera's next chain (wrapped
for the remaining viewers, journaled and committed). At the next period boundary each camera
switches to its prepared chain; a camera whose chain is not prepared by then starts one itself
before its segment is sealed, never using a key the revoked viewer can derive. A viewer
added while a camera's chain is retiring joins the prepared chain at the switch as well.

With the system's random source, that thread hands the wrapping to the chain preparation
process (archiver.chain_worker: a child at a lower priority, fed over a pipe), and joins are
prepared the same way, so that viewers added by the thousand do not wrap on the ingest path;
the key journal, the index write and the signing stay here (one signer, one writer).

Plaintext keys, chain states and KEKs never reach the database or the disk: only epoch openers
and chain records.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from cryptography import x509

from archiver.chain_worker import (
    ChainStart,
    ChainWorker,
    PreparedChain,
    PrepareRequest,
    PrepareResult,
    ViewerKek,
)
from archiver.db import Database, KeyMaterial
from archiver.directory import Directory, ViewerRow
from keyservice.crypto import Epoch, KeyChain, PeriodKey, max_ratchet_index
from keyservice.crypto.ratchet import chain_record_tail
from keyservice.format import MAX_RECIPIENTS_PER_PART, DataStream, encode_record
from keyservice.fusion_writer import issue_chain_join, issue_chain_recipients
from keyservice.identity import Signer
from keyservice.keyscheme import KeyScheme, Recipient

Rng = Callable[[int], bytes]
DAY_MS = 86_400_000
log = logging.getLogger("archiver")
CameraStream = tuple[str, DataStream]
# Chain records stored per transaction when chains are prepared in the background: bounds the
# memory a batch holds (~0.4 KB a record) while each index page is written once per batch.
PREPARE_BATCH_RECORDS = 100_000
# How long close() waits for the batch being prepared before it ends the preparation process.
CLOSE_WAIT_S = 10.0
# How long before a UTC midnight the next day's chains are prepared, off the ingest path: at
# 10 000 viewers on 100 cameras the day's first chains are a million records, which wrapped by
# the cameras' own first segments of the day took ingest to 0.22 of its baseline for a minute.
# The lead covers a preparation slowed by a saturated machine (151 s seen for a million
# records) several times over; the chains' states are in memory that much earlier, no longer.
NEXT_DAY_LEAD_MS = 10 * 60_000


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _next_midnight(now_ms: int) -> int:
    return (now_ms // DAY_MS + 1) * DAY_MS


def _utc_day(now_ms: int) -> dt.date:
    return dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC).date()


@dataclass
class _ViewerEpoch:
    epoch: Epoch
    utc_day: dt.date


_MAX_STATEMENTS = 0xFFFF  # a chain's statements are numbered u16 (start parts, then joins)


@dataclass
class _Members:
    """Who holds a chain's state: its start recipients (a set shared by the chains started
    for the same viewers), the viewers that joined it (fingerprint -> first step), the viewers
    authorized since, to join at its next rotation, and how many signed statements (start
    parts and joins) it has: the next join statement's number."""

    chain_id: bytes
    start: frozenset[str]
    parts: int
    statements: int
    joined: dict[str, int]
    pending: set[str]

    def holds(self, fingerprint: str) -> bool:
        return fingerprint in self.start or fingerprint in self.joined


@dataclass(frozen=True)
class _Chain:
    """A camera stream's chain, the UTC day it serves, the earliest certificate expiry among
    its recipients (it ends then: an expired viewer derives no later key), and the
    authorization generation whose viewer list it was wrapped for."""

    chain: KeyChain
    utc_day: dt.date
    expires_ms: int
    generation: int

    def serves(self, now_ms: int, today: dt.date) -> bool:
        return self.utc_day == today and now_ms <= self.expires_ms and self.chain.usable_at(now_ms)


@dataclass
class _Wrapped:
    """One chain's key material, made and not stored yet."""

    chain: KeyChain
    material: list[KeyMaterial] = field(default_factory=list)
    journal: list[bytes] = field(default_factory=list)  # openers and records, in order
    started: list[str] = field(default_factory=list)  # viewers whose epoch starts here
    expires_ms: int = 2**63
    record_bytes: int = 0
    opener_bytes: int = 0
    # Made by the chain preparation process: who it is wrapped for (material stays empty)
    members: tuple[str, ...] | None = None


class KeyManager:
    def __init__(self, db: Database, period_s: int, rng: Rng = os.urandom,
                 signer: Signer | None = None,
                 journal: Callable[[str, int, list[bytes]], None] | None = None,
                 clock: Callable[[], int] = _wall_clock_ms, *,
                 directory: Directory, prepare_elsewhere: bool = True) -> None:
        """``signer``: the Archiver's key, to sign each new chain's recipients statement (the
        viewers its state is wrapped for); archive.py writes it before the chain's first
        segment. ``journal(camera, now_ms, records)``: appends (durably) the openers and chain
        records made for a camera's new chain to the archive, before the database stores them.
        ``clock``: the time chains prepared in the background start at.
        ``prepare_elsewhere``: wrap chains prepared in the background in a child process
        (archiver.chain_worker), off the Archiver's interpreter; only with the system's random
        source (the child draws its nonces there), else in the preparing thread."""
        self._db = db
        self._directory = directory  # the viewers (the site directory's); key material: db
        self._journal = journal
        self._signer = signer
        self._period_s = period_s
        # chain id -> the signed recipients statement's parts, not archived yet
        self._recipients: dict[bytes, list[bytes]] = {}
        self._period_ms = period_s * 1000
        self._rng = rng
        # _lock guards _current, the chains (running, prepared, retiring) and their stepping,
        # and is only ever held briefly. _rotate serializes chain starts and guards what they
        # use (epochs, the viewer list): a chain start wraps its state for every viewer
        # (thousands of AES wraps and an fsynced commit), and segments of cameras whose chain
        # only steps must not wait for that. Order: _rotate before _lock.
        self._lock = threading.Lock()
        self._rotate = threading.Lock()
        # camera stream -> (key period, UTC day number) of its current minute key, and the key
        self._current: dict[tuple[str, DataStream], tuple[tuple[int, int], PeriodKey]] = {}
        # camera stream -> its chain, the chain's UTC day, and the earliest certificate expiry
        # among its recipients (the chain ends then: an expired viewer derives no later key)
        self._chains: dict[CameraStream, _Chain] = {}
        self._epochs: dict[str, _ViewerEpoch] = {}
        # The next UTC day's epochs, started for its chains prepared before midnight (their
        # openers stored): taken over by the first wrap of that day (_epoch_for).
        self._next_epochs: dict[str, _ViewerEpoch] = {}
        self._viewers: list[tuple[ViewerRow, Recipient, int]] | None = None
        # The one viewer-certificate cache: fingerprint -> (certificate, its Recipient,
        # not-after), parsed once, not per change (_load_viewers, _refresh_viewers); _index is
        # the viewer list by fingerprint (joiners are looked up there, not by a scan).
        self._parsed: dict[str, tuple[bytes, Recipient, int]] = {}
        self._index: dict[str, tuple[ViewerRow, Recipient, int]] = {}
        self._index_of: list[tuple[ViewerRow, Recipient, int]] | None = None
        # Joins (issue 23): camera stream -> who holds its running chain, and who holds its
        # prepared chain (installed with it at the switch: the running chain's members stay
        # until then). Start-recipient sets are shared between chains (10 000 viewers on 100
        # cameras: one set, not 100).
        self._members: dict[CameraStream, _Members] = {}
        self._prepared_members: dict[CameraStream, _Members] = {}
        self._member_sets: dict[frozenset[str], frozenset[str]] = {}
        self._clock = clock
        # Every authorization change bumps the generation; a chain remembers the generation
        # of the viewer list it was wrapped for.
        self._generation = 0
        # camera stream -> (the generation its next chain must have, the last key period its
        # older chain may still serve): set by access_removed, cleared once the camera runs a
        # chain of that generation.
        self._retiring: dict[CameraStream, tuple[int, int]] = {}
        # camera stream -> its next chain, prepared off the ingest path (already committed)
        self._prepared: dict[CameraStream, _Chain] = {}
        self._prepare_failed: set[CameraStream] = set()
        # camera stream -> its chain of the next UTC day, prepared in the last NEXT_DAY_LEAD_MS
        # of this one (committed), and who holds it; installed by its first segment of that day.
        self._next_day: dict[CameraStream, _Chain] = {}
        self._next_day_members: dict[CameraStream, _Members] = {}
        self._next_day_failed: dict[CameraStream, int] = {}  # -> the midnight it failed for
        self._join_failed: set[CameraStream] = set()  # joins left to the ingest path
        # camera stream -> the arrival of the segment waiting for its new chain, which the
        # preparing thread starts (_start_by_preparing_thread); notified under _rotate.
        self._start_requests: dict[CameraStream, int] = {}
        self._start_failed: set[CameraStream] = set()  # the last request of these failed
        self._starts_done = threading.Condition(self._rotate)
        self._worker: threading.Thread | None = None
        self.chain_worker = ChainWorker() if prepare_elsewhere and rng is os.urandom else None
        self._closed = False
        # Called (fingerprint, not_after_ms) once per viewer whose certificate has expired when
        # a key would be wrapped for it; the app audits it.
        self.on_expired: Callable[[str, int], None] | None = None
        self._expired_reported: set[str] = set()
        self.rotations = 0  # minute keys made (one per camera stream per key period in use)
        self.chains_started = 0
        self.key_records_written = 0  # chain records (one per viewer per chain)
        # Key material written, in encoded bytes (each is journaled and indexed once):
        self.key_record_bytes = 0  # chain records
        self.opener_bytes = 0  # epoch openers
        self.recipients_bytes = 0  # signed chain recipients (shared by all viewers)
        self.epochs_started = 0
        self.chains_prepared = 0  # of chains_started, those prepared in the background
        self.joins = 0  # join records written (one per joining viewer per running chain)
        self.joins_prepared = 0  # of joins, those prepared off the ingest path
        # CPU of the preparing thread (thread_time) in the Archiver's process, by part, for
        # chains made by the preparation process: what is left here (bench/revocation.py)
        self.prepare_cpu_s = {"viewers": 0.0, "pipe": 0.0, "journal": 0.0, "index": 0.0,
                              "sign": 0.0}

    def key_for(self, camera: str, stream: DataStream, now_ms: int) -> PeriodKey:
        """The key to seal a segment arriving now; rotates (and wraps for viewers) when due.

        A key period ends at the next period boundary or the next UTC midnight, whichever
        comes first: with a period that does not divide a day, one period straddles midnight,
        and reusing its key after midnight would seal the new day's first segments under the
        old day's chain, which retention of the old day could then not destroy."""
        period = (now_ms // self._period_ms, now_ms // DAY_MS)
        cam_stream = (camera, stream)
        # Stepping a running chain, or switching to a prepared one, wraps nothing: it needs
        # only _lock, so a chain being prepared (under _rotate) does not hold up the period
        # boundary of cameras that have theirs.
        with self._lock:
            current = self._current.get(cam_stream)
            if current is not None and current[0] == period:
                return current[1]
            key = self._ready_key(cam_stream, period, now_ms)
            if key is not None:
                return key
        with self._rotate:
            with self._lock:  # another thread may have rotated it while this one waited
                current = self._current.get(cam_stream)
                if current is not None and current[0] == period:
                    return current[1]
                key = self._ready_key(cam_stream, period, now_ms)
                if key is not None:
                    return key
            chain = self._chain_for(camera, stream, now_ms)
            with self._lock:
                key = chain.key_at(now_ms)
                self._current[cam_stream] = (period, key)
                self.rotations += 1
            return key

    def _ready_key(self, cam_stream: CameraStream, period: tuple[int, int], now_ms: int
                   ) -> PeriodKey | None:
        """Under _lock: now's key from the camera's running chain or its prepared one, or None
        if a chain must be started (and wrapped) or joined (join records wrapped)."""
        chain = self._ready_chain(cam_stream, now_ms)
        if chain is None:
            return None
        members = self._members.get(cam_stream)
        if members is not None and members.pending:
            return None  # viewers join it first (_chain_for, under _rotate)
        key = chain.key_at(now_ms)
        self._current[cam_stream] = (period, key)
        self.rotations += 1
        if self._worker is None and now_ms >= _next_midnight(now_ms) - NEXT_DAY_LEAD_MS:
            self._ensure_worker()  # the next day's chains, before midnight
        return key

    def _ready_chain(self, cam_stream: CameraStream, now_ms: int) -> KeyChain | None:
        """Under _lock: the chain that may serve now without wrapping anything. The running
        one, unless a removal retired it and now is past the removal's key period; then the
        prepared one if it is of the removal's generation (or a later one)."""
        today = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC).date()
        retiring = self._retiring.get(cam_stream)
        found = self._chains.get(cam_stream)
        if found is not None and found.serves(now_ms, today) and (
                retiring is None or found.generation >= retiring[0]
                or now_ms // self._period_ms <= retiring[1]):
            return found.chain
        ahead = self._next_day.get(cam_stream)
        if (ahead is not None and ahead.serves(now_ms, today)
                and (retiring is None or ahead.generation >= retiring[0])):
            # The day's chain, prepared before midnight (a removal since would have dropped it).
            del self._next_day[cam_stream]
            self._retiring.pop(cam_stream, None)
            self._drop_prepared(cam_stream)  # prepared for a key period of the day before
            self._chains[cam_stream] = ahead
            self._install_members(cam_stream, self._next_day_members.pop(cam_stream, None))
            return ahead.chain
        prepared = self._prepared.get(cam_stream)
        if (prepared is not None and retiring is not None
                and prepared.generation >= retiring[0] and prepared.serves(now_ms, today)):
            del self._prepared[cam_stream]
            del self._retiring[cam_stream]
            self._chains[cam_stream] = prepared
            # Its members (and viewers added since it was prepared, pending) replace the
            # retired chain's only now: until the switch the running chain is the retired one.
            self._install_members(cam_stream, self._prepared_members.pop(cam_stream, None))
            return prepared.chain
        return None

    def _install_members(self, cam_stream: CameraStream, members: _Members | None) -> None:
        if members is not None:
            self._members[cam_stream] = members
        else:
            self._members.pop(cam_stream, None)

    def authorization_changed(self, fingerprint: str, cameras: list[str] | None) -> None:
        """A viewer was added or re-authorized, or its cameras changed with some added: its
        epoch ends. On the affected cameras (None: all), a chain it holds but may no longer
        (a camera removed in the same change) starts anew before the next segment; a chain it
        may now hold but does not is joined at its next rotation (``_join_pending``), and so
        is a chain prepared for the camera's next period (at the switch); a chain prepared for
        the next day is prepared again; other chains run on untouched. Changes that only
        remove go through ``access_removed``."""
        self.viewers_authorized([fingerprint], cameras)

    def viewers_authorized(self, fingerprints: Sequence[str],
                           cameras: list[str] | None = None) -> None:
        """``authorization_changed`` for many viewers at once (a batch enrolment): their rows
        read in one query, the viewer list rebuilt once, each chain looked at once."""
        with self._rotate:
            found = self._directory.viewers_named(fingerprints)
            rows = {fp: found.get(fp) for fp in fingerprints}
            with self._lock:
                self._viewers_changed(rows)
                restart = []
                for cam_stream in list(self._chains):
                    if cameras is not None and cam_stream[0] not in cameras:
                        continue
                    members = self._members.get(cam_stream)
                    if members is None or self._signer is None:
                        restart.append(cam_stream)  # no join without a signed statement
                        continue
                    for fingerprint, row in rows.items():
                        allowed = (row is not None and row.revoked_ms is None
                                   and row.authorized_on(cam_stream[0]))
                        if not self._note_change(members, fingerprint, allowed):
                            restart.append(cam_stream)  # it must get nothing recorded after
                            break
                        prepared = self._prepared_members.get(cam_stream)
                        if (cam_stream in self._prepared
                                and (prepared is None
                                     or not self._note_change(prepared, fingerprint, allowed))):
                            # The prepared chain holds a viewer that lost the camera: not used.
                            self._drop_prepared(cam_stream)
                        ahead = self._next_day_members.get(cam_stream)
                        if (cam_stream in self._next_day
                                and (ahead is None or ahead.holds(fingerprint) != allowed)):
                            # Made again for the new viewer list: a join would open only from
                            # the step after the chain's first, which serves from midnight.
                            self._drop_next_day(cam_stream)
                for cam_stream in restart:
                    self._current.pop(cam_stream, None)
                    del self._chains[cam_stream]  # its state is erased with it
                    self._members.pop(cam_stream, None)
                    self._drop_prepared(cam_stream)
                    self._drop_next_day(cam_stream)
                    self._retiring.pop(cam_stream, None)  # the new chain is of this change
                self._ensure_worker()

    def _epoch_for(self, fingerprint: str, recipient: Recipient, today: dt.date,
                   now_ms: int, ahead: bool = False) -> tuple[_ViewerEpoch, bytes | None]:
        """The viewer's epoch to wrap under now, and the opener of a new one (None: it runs on).
        ``ahead``: for the next day's chains, prepared before its midnight (``now_ms``).

        Epochs end at the UTC day boundary, bounding how much one opener unlocks. A new one
        also starts when the ratchet is already past now's key period: a segment that read the
        clock just before a period boundary can rotate after a segment of the new period did,
        and the older KEK is erased (forward secrecy), so it cannot wrap."""
        for epochs in (self._epochs, self._next_epochs):
            viewer_epoch = epochs.get(fingerprint)
            if (viewer_epoch is not None and viewer_epoch.utc_day == today
                    and viewer_epoch.epoch.usable_at(now_ms)):
                if epochs is self._next_epochs and not ahead:
                    del self._next_epochs[fingerprint]  # the day came: started ahead of it
                    self._epochs[fingerprint] = viewer_epoch
                return viewer_epoch, None
        epoch, opener = Epoch.start(recipient, self._period_ms // 1000, now_ms, self._rng)
        viewer_epoch = _ViewerEpoch(epoch, today)
        (self._next_epochs if ahead else self._epochs)[fingerprint] = viewer_epoch
        return viewer_epoch, encode_record(opener)

    def _forget_epochs(self, fingerprints: Iterable[str], ahead: bool = False) -> None:
        """Epochs whose openers were never stored: the next wrap starts new ones."""
        epochs = self._next_epochs if ahead else self._epochs
        for fingerprint in fingerprints:
            epochs.pop(fingerprint, None)

    def _viewer_changed(self, fingerprint: str, row: ViewerRow | None) -> None:
        """Under ``_lock``, for any change of one viewer: see ``_viewers_changed``."""
        self._viewers_changed({fingerprint: row})

    def _viewers_changed(self, rows: dict[str, ViewerRow | None]) -> None:
        """Under ``_lock``, for any change of viewers (fingerprint -> row, None: gone): their
        epochs end, their entries are reread, and every chain prepared before now is outdated
        (the generation)."""
        self._generation += 1
        for fingerprint in rows:
            self._epochs.pop(fingerprint, None)
            self._next_epochs.pop(fingerprint, None)
        self._refresh_viewers(rows)
        self._prepare_failed.clear()
        self._join_failed.clear()

    @staticmethod
    def _note_change(members: _Members, fingerprint: str, allowed: bool) -> bool:
        """Records a viewer's change on a chain's members: a join pending if it is now
        allowed and does not hold the chain. False if it holds the chain but may no longer."""
        if members.holds(fingerprint):
            return allowed
        if allowed:
            members.pending.add(fingerprint)
        else:
            members.pending.discard(fingerprint)
        return True

    def access_removed(self, fingerprint: str, cameras: list[str] | None, now_ms: int) -> None:
        """A viewer lost cameras (None: all) or was revoked at ``now_ms``; nobody gained any.

        The affected cameras keep their current key until the end of now's key period (the
        viewer already holds it), and get a new chain without the viewer from the next period
        on: prepared now by a background thread, or by the camera's first segment of that
        period if the thread has not reached it by then."""
        with self._rotate:
            row = self._directory.viewer(fingerprint)
            with self._lock:
                self._viewer_changed(fingerprint, row)
                period = now_ms // self._period_ms
                for cam_stream in self._chains:
                    if cameras is None or cam_stream[0] in cameras:
                        current = self._current.get(cam_stream)
                        if current is not None and current[0][0] > period:
                            # Learnt late (another Archiver's revocation, notify.py): the key
                            # in use is of a period after the removal's, derivable by the
                            # viewer; the next segment must not be sealed under it.
                            del self._current[cam_stream]
                        older = self._retiring.get(cam_stream)
                        self._retiring[cam_stream] = (
                            self._generation, period if older is None else min(older[1], period))
                        # Wrapped for the viewer: prepared again once the retiring is over.
                        self._drop_next_day(cam_stream)
                        for members in (self._members.get(cam_stream),
                                        self._prepared_members.get(cam_stream)):
                            if members is not None:  # a join it was waiting for is off
                                members.pending.discard(fingerprint)
                self._ensure_worker()

    def _ensure_worker(self) -> None:
        """Under _lock: the preparing thread runs while a camera's chain is retiring, or
        (with the preparation process) while cameras wait for their new chain, viewers wait
        to join a running chain or, in the last NEXT_DAY_LEAD_MS of a UTC day, active cameras
        lack the next day's chain."""
        if self._worker is None and not self._closed and (
                self._start_requests or self._retiring or self._next_joins()
                or self._next_day_todo(self._clock())):
            self._worker = threading.Thread(target=self._prepare_chains, daemon=True,
                                            name="fusion-chain-prepare")
            self._worker.start()

    def close(self) -> None:
        """Stop preparing chains (after the one in progress); waits for the thread."""
        with self._lock:
            self._closed = True
            worker = self._worker
        if worker is not None:
            worker.join(CLOSE_WAIT_S)
            if worker.is_alive() and self.chain_worker is not None:
                # The preparation process does not answer (stopped, or starved): its batch is
                # dropped, and the thread sees its pipe close.
                self.chain_worker.kill()
            worker.join()
        if self.chain_worker is not None:
            self.chain_worker.close()

    def pending_chains(self) -> int:
        """Camera streams whose chain must still change at their next key period."""
        with self._lock:
            return len(self._retiring)

    def _prepare_chains(self) -> None:
        """The background thread of ``access_removed``. Chains are wrapped a few cameras at a
        time (up to PREPARE_BATCH_RECORDS records) and stored in one transaction: SQLite then
        writes each page of the chain record index once per batch, not once per camera."""
        while True:
            with self._rotate:
                now_ms = self._clock()
                with self._lock:
                    starts = [] if self._closed else list(self._start_requests)
                    todo = [] if self._closed or starts else self._next_to_prepare()
                    joins = [] if self._closed or starts or todo else self._next_joins()
                    ahead = ([] if self._closed or starts or todo or joins
                             else self._next_day_todo(now_ms))
                    if not starts and not todo and not joins and not ahead:
                        self._worker = None
                        self._starts_done.notify_all()  # waiting cameras wrap their own
                        return
                    generation = self._generation
                if starts:
                    assert self.chain_worker is not None
                    self._start_waiting(self.chain_worker, starts, generation)
                    continue
                today = _utc_day(now_ms)
                if joins:
                    assert self.chain_worker is not None
                    self._prepare_joins(self.chain_worker, joins, now_ms, today)
                    continue
                if ahead:
                    assert self.chain_worker is not None
                    self._prepare_next_day(self.chain_worker, ahead, now_ms, generation)
                    continue
                batch: list[_Wrapped] = []
                attempted: list[CameraStream] = []
                try:
                    if self.chain_worker is not None:
                        batch = self._prepare_elsewhere(self.chain_worker, todo, attempted,
                                                        now_ms, today, generation,
                                                        self._next_to_prepare)
                    else:
                        records = 0
                        for cam_stream in todo:
                            attempted.append(cam_stream)
                            chain, seed = KeyChain.start(cam_stream[0], cam_stream[1],
                                                         self._period_s, now_ms, self._rng)
                            batch.append(self._wrap(chain, seed, now_ms, today))
                            records += len(batch[-1].material)
                            if records >= PREPARE_BATCH_RECORDS:
                                break
                        self._commit(batch, now_ms)
                except Exception:
                    for wrapped in batch:  # their openers were never stored: start over
                        self._forget_epochs(wrapped.started)
                    # Those cameras' next segments start their chains themselves (and report
                    # why if that fails too).
                    log.warning("could not prepare the next key chains of %s",
                                ", ".join(sorted({c for c, _ in attempted})), exc_info=True)
                    with self._lock:
                        self._prepare_failed.update(attempted)
                    continue
                members = [self._members_of(wrapped.chain, wrapped.members)
                           if wrapped.members is not None else
                           self._members_of(wrapped.chain,
                                            [m.fingerprint for m in wrapped.material])
                           for wrapped in batch]
                with self._lock:
                    for wrapped, chain_members in zip(batch, members, strict=True):
                        cam_stream = (wrapped.chain.camera, wrapped.chain.stream)
                        self._drop_prepared(cam_stream)
                        self._prepared[cam_stream] = _Chain(wrapped.chain, today,
                                                            wrapped.expires_ms, generation)
                        # Kept next to the chain, installed at its switch (_ready_chain).
                        self._prepared_members[cam_stream] = chain_members
                    self.chains_started += len(batch)
                    self.chains_prepared += len(batch)

    def _prepare_elsewhere(self, worker: ChainWorker, todo: list[CameraStream],
                           attempted: list[CameraStream], now_ms: int, today: dt.date,
                           generation: int, still_to_do: Callable[[], list[CameraStream]],
                           ahead: bool = False) -> list[_Wrapped]:
        """Under _rotate, in the preparing thread: the next chains of the first cameras of
        ``todo`` (up to PREPARE_BATCH_RECORDS records), wrapped by the chain preparation
        process, then journaled, stored and signed here as ``_commit`` does. What crosses the
        pipe: each chain's starting state and the KEK of now's ratchet step of each viewer's
        epoch, which the Archiver holds anyway (never the RSA-OAEP openers' keys: epochs
        start here).

        _rotate is let go while the process works (epochs that start are stored before, see
        ``_viewer_keks``): a camera whose chain is not ready at its next period then starts
        one itself at once, as before, rather than waiting for a process that yields the CPU
        to ingest. The batch is then kept only for the cameras that still need it
        (``still_to_do``, under _lock), and not at all if an authorization changed meanwhile
        (the next round prepares for the new viewer list). ``ahead``: the chains start at the
        next UTC midnight (``now_ms``), under that day's epochs."""
        viewers = self._load_viewers()
        everywhere = sum(1 for row, _, _ in viewers if row.all_cameras)
        listed: dict[str, int] = {}
        for row, _, _ in viewers:
            if not row.all_cameras:
                for camera in row.cameras:
                    listed[camera] = listed.get(camera, 0) + 1
        records = 0
        for cam_stream in todo:
            attempted.append(cam_stream)
            records += everywhere + listed.get(cam_stream[0], 0)
            if records >= PREPARE_BATCH_RECORDS:
                break
        cameras = {camera for camera, _ in attempted}
        cpu0 = time.thread_time()
        kept = self._viewer_keks(viewers, cameras, attempted[0][0], now_ms, today, ahead)
        self.prepare_cpu_s["viewers"] += time.thread_time() - cpu0
        chains = [KeyChain.start(camera, stream, self._period_s, now_ms, self._rng)
                  for camera, stream in attempted]
        request = PrepareRequest(
            self._period_s, now_ms, kept,
            [ChainStart(chain.camera, int(chain.stream), chain.chain_id, seed,
                        chain.start_period) for chain, seed in chains])
        del kept  # the KEKs (and the seeds, below): the chains keep their own state
        result = self._exchange(worker, request)
        del request
        if len(result.chains) != len(chains):
            raise RuntimeError("the chain preparation process answered for other chains")
        with self._lock:
            wanted = set(still_to_do()) if generation == self._generation else set()
        batch = [self._prepared_wrapped(chain, made)
                 for (chain, _), made in zip(chains, result.chains, strict=True)
                 if (chain.camera, chain.stream) in wanted]
        del chains
        rows = result.rows
        if len(batch) != len(result.chains):
            kept_ids = {wrapped.chain.chain_id for wrapped in batch}
            rows = [row for row in rows if row[1] in kept_ids]
        if batch:
            self._commit_rows(batch, rows, now_ms)
        return batch

    def _viewer_keks(self, viewers: list[tuple[ViewerRow, Recipient, int]], cameras: set[str],
                     journal_camera: str, now_ms: int, today: dt.date, ahead: bool = False
                     ) -> list[ViewerKek]:
        """Under _rotate: the viewers of ``viewers`` authorized on any of ``cameras`` and not
        expired, each with its epoch at now's ratchet step. Epochs that must start do so here,
        and their openers are journaled (to ``journal_camera``'s key journal) and stored at
        once: the rotation lock can then be let go while the process wraps, and any chain
        wrapped meanwhile under those epochs finds their openers stored."""
        kept: list[ViewerKek] = []
        started: list[str] = []
        for row, recipient, not_after in viewers:
            if row.revoked_ms is not None or not (
                    row.all_cameras or not cameras.isdisjoint(row.cameras)):
                continue
            if now_ms > not_after:  # no key material, as in _wrap_into
                # (Ahead of midnight it has not expired yet: reported when its chain ends.)
                if not ahead and row.fingerprint not in self._expired_reported:
                    self._expired_reported.add(row.fingerprint)
                    if self.on_expired is not None:
                        self.on_expired(row.fingerprint, not_after)
                continue
            viewer_epoch, opener = self._epoch_for(row.fingerprint, recipient, today, now_ms,
                                                   ahead)
            if opener is not None:
                started.append(row.fingerprint)
            epoch = viewer_epoch.epoch
            index, kek = epoch.kek_at(now_ms)
            kept.append(ViewerKek(row.fingerprint, epoch.viewer_fingerprint, epoch.epoch_id,
                                  epoch.start_period, index, kek, opener, row.all_cameras,
                                  frozenset(row.cameras), not_after))
        if started:
            openers = [(v.epoch_id, v.fingerprint, now_ms, v.opener)
                       for v in kept if v.opener is not None]
            try:
                if self._journal is not None:
                    self._journal(journal_camera, now_ms, [b"".join(o[3] for o in openers)])
                self._db.store_key_rows(openers, [])
            except BaseException:
                self._forget_epochs(started, ahead)  # openers never stored: start over
                raise
            self.epochs_started += len(openers)
            self.opener_bytes += sum(len(o[3]) for o in openers)
            kept = [dataclasses.replace(v, opener=None) if v.opener is not None else v
                    for v in kept]
        return kept

    def _exchange(self, worker: ChainWorker, request: PrepareRequest) -> PrepareResult:
        """Under _rotate: the preparation process's answer; _rotate is let go meanwhile."""
        self._rotate.release()
        cpu0 = time.thread_time()
        try:
            return worker.prepare(request)
        finally:
            self.prepare_cpu_s["pipe"] += time.thread_time() - cpu0
            self._rotate.acquire()

    # --- joins prepared off the ingest path (issue 23 item 2) ----------------------------
    def _next_joins(self) -> list[CameraStream]:
        """Under _lock: running chains with viewers waiting to join, that are not retiring
        (a retiring camera's pending joins go to its prepared chain, at the switch). Only with
        the preparation process; else, and after a failure, the chain's next rotation joins
        them on the ingest path (``_join_pending``)."""
        if self.chain_worker is None:
            return []
        return [cam_stream for cam_stream, members in self._members.items()
                if members.pending and cam_stream not in self._retiring
                and cam_stream not in self._join_failed
                and (found := self._chains.get(cam_stream)) is not None
                and found.chain.chain_id == members.chain_id]

    def _prepare_joins(self, worker: ChainWorker, joins: list[CameraStream], now_ms: int,
                       today: dt.date) -> None:
        """Under _rotate, in the preparing thread: the join records of the viewers waiting
        to join running chains, wrapped by the preparation process, from the step each join
        would get on the ingest path now (``KeyChain.join_step_at``: the first step whose key
        has sealed nothing). Kept only if, back under _rotate, the chain has not derived that
        step's key yet, nobody changed meanwhile and the joiners still wait: a chain with
        pending joins steps only under _rotate, so nothing is sealed under that step before
        the join statement is queued for archiving, and the joining viewer opens exactly
        from its join on. Otherwise nothing is stored and the ingest path joins them (a
        viewer's chain record is one per chain: a second would not be stored)."""
        plan: list[tuple[CameraStream, _Chain, _Members, int, frozenset[str], bytes]] = []
        shared: dict[frozenset[str], frozenset[str]] = {}
        records = 0
        with self._lock:
            for cam_stream in joins:
                found, members = self._chains[cam_stream], self._members[cam_stream]
                step = found.chain.join_step_at(now_ms)
                if (step > max_ratchet_index(found.chain.period_s)
                        or members.statements
                        + -(-len(members.pending) // MAX_RECIPIENTS_PER_PART) > _MAX_STATEMENTS):
                    self._join_failed.add(cam_stream)  # a new chain, on the ingest path
                    continue
                joiners = frozenset(members.pending)
                plan.append((cam_stream, found, members, step,
                             shared.setdefault(joiners, joiners), found.chain.state_at(step)))
                records += len(joiners)
                if records >= PREPARE_BATCH_RECORDS:
                    break
        if not plan:
            return
        viewers = self._load_viewers()
        if self._index_of is not viewers:
            self._index = {v[0].fingerprint: v for v in viewers}
            self._index_of = viewers
        wanted = frozenset().union(*(p[4] for p in plan))
        try:
            kept = self._viewer_keks([self._index[fp] for fp in sorted(wanted)
                                      if fp in self._index],
                                     {cam for (cam, _), *_ in plan}, plan[0][0][0], now_ms, today)
            request = PrepareRequest(self._period_s, now_ms, kept, [
                ChainStart(found.chain.camera, int(found.chain.stream), found.chain.chain_id,
                           state, found.chain.start_period, step, joiners)
                for _, found, _, step, joiners, state in plan])
            del kept
            plan = [(*p[:5], b"") for p in plan]  # the states: not kept here either
            result = self._exchange(worker, request)
            del request
            if len(result.chains) != len(plan):
                raise RuntimeError("the chain preparation process answered for other chains")
            with self._lock:
                # Not the generation: adds meanwhile only add to pending (joined next round);
                # a removal takes its viewer out of pending, or retires or restarts the chain.
                kept_plan = [
                    (entry, made) for entry, made in zip(plan, result.chains, strict=True)
                    if self._chains.get(entry[0]) is entry[1]
                    and self._members.get(entry[0]) is entry[2]
                    and entry[1].chain.step < entry[3] and entry[4] <= entry[2].pending
                    and entry[0] not in self._retiring]
            ids = {entry[1].chain.chain_id for entry, _ in kept_plan}
            rows = [row for row in result.rows if row[1] in ids]
            if not kept_plan:
                return
            for entry, made in kept_plan:
                if self._journal is not None and made.members:
                    self._journal(entry[0][0], now_ms, [made.journal])
            self._db.store_key_rows([], rows)
        except Exception:
            log.warning("could not prepare the joins of %s; they join at their next key "
                        "period", ", ".join(sorted({c for (c, _), *_ in plan})), exc_info=True)
            with self._lock:
                self._join_failed.update(p[0] for p in plan)
            return
        assert self._signer is not None  # joins are only ever pending with a signer
        for (cam_stream, found, members, step, joiners, _), made in kept_plan:
            fps = sorted(made.members)
            statements = [
                issue_chain_join(found.chain, members.statements + i, members.parts, step,
                                 [bytes.fromhex(fp) for fp in fps[k:k + MAX_RECIPIENTS_PER_PART]],
                                 self._signer)
                for i, k in enumerate(range(0, len(fps), MAX_RECIPIENTS_PER_PART))]
            with self._lock:
                members.pending -= joiners
                for fp in fps:
                    members.joined[fp] = step
                members.statements += len(statements)
                self._chains[cam_stream] = dataclasses.replace(
                    found, expires_ms=min(found.expires_ms, made.expires_ms))
                if statements:
                    self._recipients.setdefault(found.chain.chain_id, []).extend(statements)
            self.joins += len(fps)
            self.joins_prepared += len(fps)
            self.key_records_written += len(fps)
            self.key_record_bytes += made.record_bytes
            self.opener_bytes += made.opener_bytes
            self.recipients_bytes += sum(map(len, statements))
        with self._lock:  # attempted and not kept: the ingest path joins them
            self._join_failed.update(p[0] for p in plan if p[0] not in {
                entry[0] for entry, _ in kept_plan})

    @staticmethod
    def _prepared_wrapped(chain: KeyChain, made: PreparedChain) -> _Wrapped:
        return _Wrapped(chain, journal=[made.journal], expires_ms=made.expires_ms,
                        record_bytes=made.record_bytes, opener_bytes=made.opener_bytes,
                        members=made.members)

    def _commit_rows(self, batch: list[_Wrapped],
                     rows: list[tuple[str, bytes, str, bytes, int, bytes]], now_ms: int
                     ) -> None:
        """``_commit`` for chains made by the chain preparation process: journaled (one
        write per camera), then stored in one transaction, then their recipients signed."""
        cpu0 = time.thread_time()
        for wrapped in batch:
            if self._journal is not None and wrapped.members:
                self._journal(wrapped.chain.camera, now_ms, wrapped.journal)
        cpu1 = time.thread_time()
        self._db.store_key_rows([], rows)
        cpu2 = time.thread_time()
        self.prepare_cpu_s["journal"] += cpu1 - cpu0
        self.prepare_cpu_s["index"] += cpu2 - cpu1
        self.key_records_written += len(rows)
        fingerprints: dict[int, list[bytes]] = {}  # per members tuple (shared by cameras)
        for wrapped in batch:
            wrapped.journal = []
            self.key_record_bytes += wrapped.record_bytes
            self.opener_bytes += wrapped.opener_bytes
            if self._signer is not None:
                assert wrapped.members is not None
                viewers = fingerprints.get(id(wrapped.members))
                if viewers is None:
                    viewers = fingerprints[id(wrapped.members)] = [
                        bytes.fromhex(fp) for fp in wrapped.members]
                parts = issue_chain_recipients(wrapped.chain, viewers, self._signer)
                self.recipients_bytes += sum(map(len, parts))
                with self._lock:
                    self._recipients[wrapped.chain.chain_id] = parts
        self.prepare_cpu_s["sign"] += time.thread_time() - cpu2

    def _start_waiting(self, worker: ChainWorker, starts: list[CameraStream],
                       generation: int) -> None:
        """Under _rotate, in the preparing thread: the new chains of the cameras waiting for
        one (``_start_requests``), as many as a batch takes, from the earliest arrival among
        them (a chain serves from its start period on), wrapped by the preparation process,
        committed and installed. If an authorization changed meanwhile nothing is kept and
        they wait for the next round; if it failed, they wrap their own."""
        now_ms = min(self._start_requests[cam_stream] for cam_stream in starts)
        today = _utc_day(now_ms)
        attempted: list[CameraStream] = []
        try:
            batch = self._prepare_elsewhere(worker, starts, attempted, now_ms, today,
                                            generation, lambda: list(self._start_requests))
        except Exception:
            log.warning("could not start the key chains of %s in the chain preparation "
                        "process; each camera wraps its own", ", ".join(sorted(
                            {c for c, _ in attempted})), exc_info=True)
            with self._lock:
                for cam_stream in attempted:
                    self._start_requests.pop(cam_stream, None)
                    self._start_failed.add(cam_stream)
            self._starts_done.notify_all()
            return
        for wrapped in batch:
            cam_stream = (wrapped.chain.camera, wrapped.chain.stream)
            assert wrapped.members is not None
            self._install_started(cam_stream, wrapped.chain, today, wrapped.expires_ms,
                                  generation, wrapped.members)
            with self._lock:
                self._start_requests.pop(cam_stream, None)
                self._start_failed.discard(cam_stream)
        self._starts_done.notify_all()

    def _next_day_todo(self, now_ms: int) -> list[CameraStream]:
        """Under _lock: in the last NEXT_DAY_LEAD_MS of a UTC day, the camera streams that
        sealed a segment in this key period or the one before (a camera gone quiet gets its
        chain at its next segment, as before) and still lack the next day's chain. Not while a
        removal retires a camera's chain: its prepared chain comes first. Only with the
        preparation process, which takes the wrapping off the Archiver's interpreter."""
        midnight = _next_midnight(now_ms)
        if self.chain_worker is None or now_ms < midnight - NEXT_DAY_LEAD_MS:
            return []
        recent = now_ms // self._period_ms - 1
        today, tomorrow = _utc_day(now_ms), _utc_day(midnight)
        return [cam_stream for cam_stream, found in self._chains.items()
                if found.utc_day == today and cam_stream not in self._retiring
                and (current := self._current.get(cam_stream)) is not None
                and current[0][0] >= recent
                and ((ahead := self._next_day.get(cam_stream)) is None
                     or ahead.utc_day != tomorrow)
                and self._next_day_failed.get(cam_stream) != midnight]

    def _prepare_next_day(self, worker: ChainWorker, todo: list[CameraStream], now_ms: int,
                          generation: int) -> None:
        """Under _rotate, in the preparing thread: the chains of the next UTC day of the first
        cameras of ``todo``, starting at its midnight, wrapped by the preparation process under
        that day's epochs and committed (journaled in that day's key journals, indexed, their
        recipients signed) as a revocation's are. Their first segment of that day switches to
        them (``_ready_chain``); a change in between drops them as it drops prepared chains."""
        midnight = _next_midnight(now_ms)
        tomorrow = _utc_day(midnight)
        attempted: list[CameraStream] = []
        try:
            batch = self._prepare_elsewhere(
                worker, todo, attempted, midnight, tomorrow, generation,
                lambda: self._next_day_todo(self._clock()), ahead=True)
        except Exception:
            log.warning("could not prepare the next day's key chains of %s; they start at "
                        "their first segment of the day", ", ".join(sorted(
                            {c for c, _ in attempted})), exc_info=True)
            with self._lock:
                self._next_day_failed.update(dict.fromkeys(attempted, midnight))
            return
        members = [self._members_of(wrapped.chain, wrapped.members or ()) for wrapped in batch]
        with self._lock:
            for wrapped, chain_members in zip(batch, members, strict=True):
                cam_stream = (wrapped.chain.camera, wrapped.chain.stream)
                self._drop_next_day(cam_stream)  # one of a day that went by unused
                self._next_day[cam_stream] = _Chain(wrapped.chain, tomorrow,
                                                    wrapped.expires_ms, generation)
                self._next_day_members[cam_stream] = chain_members
            self.chains_started += len(batch)
            self.chains_prepared += len(batch)
            # Not kept (someone changed meanwhile): the next round tries them again.

    def _next_to_prepare(self) -> list[CameraStream]:
        """The camera streams that still need their next chain, in the order of the change."""
        return [cam_stream for cam_stream, (generation, _) in self._retiring.items()
                if cam_stream not in self._prepare_failed
                and (cam_stream not in self._prepared
                     or self._prepared[cam_stream].generation < generation)
                and (cam_stream not in self._chains
                     or self._chains[cam_stream].generation < generation)]

    def _drop_prepared(self, cam_stream: CameraStream) -> None:
        """Forget a prepared chain that will not be used (its records stay in the index until
        retention removes the day: no segment names it)."""
        dropped = self._prepared.pop(cam_stream, None)
        self._prepared_members.pop(cam_stream, None)
        if dropped is not None:
            self._recipients.pop(dropped.chain.chain_id, None)

    def _drop_next_day(self, cam_stream: CameraStream) -> None:
        """``_drop_prepared`` for a chain prepared for the next UTC day."""
        dropped = self._next_day.pop(cam_stream, None)
        self._next_day_members.pop(cam_stream, None)
        if dropped is not None:
            self._recipients.pop(dropped.chain.chain_id, None)

    def take_recipients(self, chain_id: bytes) -> list[bytes]:
        """The signed recipients statement of a chain (its parts), once: the caller archives
        it before the chain's first segment (and gives it back with ``put_back_recipients``
        if that write failed)."""
        with self._lock:
            return self._recipients.pop(chain_id, [])

    def put_back_recipients(self, chain_id: bytes, parts: list[bytes]) -> None:
        with self._lock:  # before any join statement signed meanwhile: they are numbered
            self._recipients[chain_id] = parts + self._recipients.get(chain_id, [])

    def forget_camera(self, camera: str) -> None:
        with self._rotate, self._lock:
            for cam_stream in [k for k in self._current if k[0] == camera]:
                del self._current[cam_stream]
            for cam_stream in [k for k in self._chains if k[0] == camera]:
                del self._chains[cam_stream]
                self._members.pop(cam_stream, None)
            for cam_stream in [k for k in self._prepared if k[0] == camera]:
                self._drop_prepared(cam_stream)
            for cam_stream in [k for k in self._next_day if k[0] == camera]:
                self._drop_next_day(cam_stream)
            for cam_stream in [k for k in self._retiring if k[0] == camera]:
                del self._retiring[cam_stream]

    def active_viewers(self) -> int:
        with self._rotate:
            return len(self._load_viewers())

    def _parse(self, row: ViewerRow) -> tuple[bytes, Recipient, int]:
        """The viewer's certificate parsed, from the cache if it is the same certificate."""
        known = self._parsed.get(row.fingerprint)
        if known is None or known[0] != row.certificate:
            cert = x509.load_der_x509_certificate(row.certificate)
            not_after = int(cert.not_valid_after_utc.timestamp() * 1000)
            known = (row.certificate, Recipient(cert, KeyScheme(row.oaep_hash)), not_after)
        return known

    def _refresh_viewers(self, rows: dict[str, ViewerRow | None]) -> None:
        """Under _lock: the viewer list with these viewers' rows replaced (or dropped if
        revoked): parsing 10 000 certificates again for one change cost more than the change
        itself, and one pass serves a whole batch."""
        if self._viewers is None:
            return
        kept = [v for v in self._viewers if v[0].fingerprint not in rows]
        for fingerprint, row in rows.items():
            self._parsed.pop(fingerprint, None)
            if row is not None and row.revoked_ms is None:
                known = self._parse(row)
                self._parsed[fingerprint] = known
                kept.append((row, known[1], known[2]))
        self._viewers = kept

    def _load_viewers(self) -> list[tuple[ViewerRow, Recipient, int]]:
        if self._viewers is None:
            viewers = []
            parsed = {}
            for row in self._directory.viewers():
                if row.revoked_ms is not None:
                    continue
                known = self._parse(row)
                parsed[row.fingerprint] = known
                viewers.append((row, known[1], known[2]))
            self._parsed = parsed
            self._viewers = viewers
        return self._viewers

    def _chain_for(self, camera: str, stream: DataStream, now_ms: int) -> KeyChain:
        """The chain of a camera stream at now, started anew (and wrapped for its viewers) at
        the UTC day boundary, after an authorization change, and when the clock is behind the
        chain's state (a segment that read the clock just before a period boundary can rotate
        after one of the new period did; the older state is erased). After a removal
        (``access_removed``) the older chain serves no key period after the removal's: the
        prepared chain takes over, or one is started here, before the segment is sealed.
        Called under _rotate."""
        cam_stream = (camera, stream)
        today = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC).date()
        with self._lock:
            ready = self._ready_chain(cam_stream, now_ms)
            members = self._members.get(cam_stream)
            if ready is not None and (members is None or not members.pending):
                return ready
        if ready is not None:
            assert members is not None
            if self._join_pending(ready, members, now_ms, today):
                return ready
        with self._lock:
            self._drop_prepared(cam_stream)  # of an older generation, or past its day
            ahead = self._next_day.get(cam_stream)
            if ahead is not None and ahead.utc_day <= today:
                self._drop_next_day(cam_stream)  # past its day (one of today's, not taken)
        if self.chain_worker is not None and self._start_by_preparing_thread(cam_stream, now_ms):
            with self._lock:  # taken only if it may serve now, as any chain
                ready = self._ready_chain(cam_stream, now_ms)
                members = self._members.get(cam_stream)
            if ready is not None and (members is None or not members.pending
                                      or self._join_pending(ready, members, now_ms, today)):
                return ready
        # Wrapped here, under _rotate throughout.
        generation = self._generation
        chain, seed = KeyChain.start(camera, stream, self._period_s, now_ms, self._rng)
        wrapped = self._wrap(chain, seed, now_ms, today)
        self._commit([wrapped], now_ms)
        self._install_started(cam_stream, chain, today, wrapped.expires_ms, generation,
                              [m.fingerprint for m in wrapped.material])
        return chain

    def _install_started(self, cam_stream: CameraStream, chain: KeyChain, today: dt.date,
                         expires_ms: int, generation: int, fingerprints: Sequence[str]) -> None:
        """Under _rotate: a chain started for a camera stream (committed) serves it now."""
        members = self._members_of(chain, fingerprints)
        with self._lock:
            self._chains[cam_stream] = _Chain(chain, today, expires_ms, generation)
            self._members[cam_stream] = members
            retiring = self._retiring.get(cam_stream)
            if retiring is not None and generation >= retiring[0]:
                del self._retiring[cam_stream]
            self.chains_started += 1

    def _start_by_preparing_thread(self, cam_stream: CameraStream, now_ms: int) -> bool:
        """Under _rotate, on the ingest path: asks the preparing thread for the camera's new
        chain and waits for it (the rotation lock is let go meanwhile). At a restart with
        10 000 viewers every camera starts a chain at once: a million records, which wrapped
        one camera at a time in the Archiver's interpreter took ingest to 0.22 of its
        baseline; the thread has them wrapped by the preparation process, the cameras that
        wait in one batch (the viewers' KEKs cross the pipe once a batch, not once a camera).
        True once it installed one; False if it failed or stopped: the caller wraps one."""
        with self._lock:
            self._start_requests.setdefault(cam_stream, now_ms)
            self._start_failed.discard(cam_stream)
            self._ensure_worker()
        while True:
            with self._lock:
                if cam_stream not in self._start_requests:
                    return cam_stream not in self._start_failed
                worker = self._worker
                if worker is None or not worker.is_alive():  # stopped: closed, or died
                    del self._start_requests[cam_stream]
                    return False
            self._starts_done.wait(1.0)

    def _wrap(self, chain: KeyChain, seed: bytes, now_ms: int, today: dt.date) -> _Wrapped:
        """The chain records of ``seed`` for every viewer authorized on the chain's camera
        (and the epoch openers of viewers whose epoch starts), not stored yet. The records are
        encoded directly: no re-validation of what this process just built."""
        wrapped = _Wrapped(chain)
        try:
            self._wrap_into(wrapped, seed, now_ms, today)
        except BaseException:
            self._forget_epochs(wrapped.started)  # their openers will never be stored
            raise
        return wrapped

    def _wrap_into(self, wrapped: _Wrapped, seed: bytes, now_ms: int, today: dt.date) -> None:
        chain = wrapped.chain
        tail = chain_record_tail(chain)
        for row, recipient, not_after in self._load_viewers():
            if not row.authorized_on(chain.camera):
                continue
            if now_ms > not_after:
                # Expiry is checked at every chain start (and ends a chain), not only at
                # authorization: an expired
                # certificate gets no key material, as if revoked. (Not-before is checked at
                # authorization and login; archives generated with a simulated past clock
                # would otherwise get no keys.)
                if row.fingerprint not in self._expired_reported:
                    self._expired_reported.add(row.fingerprint)
                    if self.on_expired is not None:
                        self.on_expired(row.fingerprint, not_after)
                continue
            viewer_epoch, opener_bytes = self._epoch_for(row.fingerprint, recipient, today,
                                                         now_ms)
            if opener_bytes is not None:
                wrapped.started.append(row.fingerprint)
                wrapped.journal.append(opener_bytes)
                wrapped.opener_bytes += len(opener_bytes)
            record = viewer_epoch.epoch.wrap_chain_encoded(chain, seed, now_ms, self._rng, tail)
            wrapped.journal.append(record)
            wrapped.record_bytes += len(record)
            wrapped.expires_ms = min(wrapped.expires_ms, not_after)
            # Stored under the chain id (12 bytes) in the key_id column: the Assembler looks
            # a segment's chain up by the first 12 bytes of its key id.
            wrapped.material.append(KeyMaterial(
                row.fingerprint, chain.camera, chain.chain_id, viewer_epoch.epoch.epoch_id,
                now_ms, record, opener_bytes))

    def _commit(self, batch: list[_Wrapped], now_ms: int) -> None:
        """Journals each chain's records (one write per camera) and stores them all in one
        transaction, then signs each chain's recipients. Committed before any segment sealed
        under these chains is acknowledged: an acknowledged segment is never left without
        the chain records its viewers need."""
        try:
            for wrapped in batch:
                if self._journal is not None and wrapped.material:
                    # One buffer: one write, not one iovec per record.
                    self._journal(wrapped.chain.camera, now_ms, [b"".join(wrapped.journal)])
            self._db.store_key_material(
                [item for wrapped in batch for item in wrapped.material], now_ms)
        except BaseException:
            for wrapped in batch:
                self._forget_epochs(wrapped.started)  # openers never stored: start over
            raise
        for wrapped in batch:
            self.epochs_started += len(wrapped.started)
            self.key_records_written += len(wrapped.material)
            self.key_record_bytes += wrapped.record_bytes
            self.opener_bytes += wrapped.opener_bytes
            if self._signer is not None:
                # Signed now, from what this process wrapped: the index cannot later make a
                # withheld segment look like one this viewer was never authorized for.
                parts = issue_chain_recipients(
                    wrapped.chain, [bytes.fromhex(m.fingerprint) for m in wrapped.material],
                    self._signer)
                self.recipients_bytes += sum(map(len, parts))
                with self._lock:
                    self._recipients[wrapped.chain.chain_id] = parts

    # --- joins (issue 23) -------------------------------------------------------------
    def _members_of(self, chain: KeyChain, fingerprints: Sequence[str]) -> _Members:
        """Who a new chain was wrapped for (and how many start parts it signs). The caller
        installs it: a prepared chain's members only at its switch."""
        start = frozenset(fingerprints)
        with self._lock:
            start = self._member_sets.setdefault(start, start)
            if len(self._member_sets) > 2 * (len(self._members) + len(self._prepared_members)
                                             + len(self._next_day_members)) + 8:
                used = ({m.start for m in self._members.values()}
                        | {m.start for m in self._prepared_members.values()}
                        | {m.start for m in self._next_day_members.values()} | {start})
                self._member_sets = {s: s for s in used}  # drop sets no chain uses
        parts = max(1, -(-len(start) // MAX_RECIPIENTS_PER_PART))
        return _Members(chain.chain_id, start, parts, parts, {}, set())

    def _join_pending(self, chain: KeyChain, members: _Members, now_ms: int,
                      today: dt.date) -> bool:
        """Under _rotate: gives the viewers authorized since the chain started
        (``members.pending``) its state from the first step whose key has sealed nothing yet,
        S_j, each under its epoch KEK (a join record), and signs the join statement (archived
        before the chain's next segment). Only the joining viewers' records are written. False
        if the chain cannot take a join (its day or its statement numbers are used up): start
        a new one then."""
        cam_stream = (chain.camera, chain.stream)
        with self._lock:
            found = self._chains.get(cam_stream)
            if found is None or found.chain is not chain:
                return False  # switched meanwhile (a segment of a later period): start anew
            step = chain.join_step_at(now_ms)
            if (step > max_ratchet_index(chain.period_s)
                    or members.statements + -(-len(members.pending) // MAX_RECIPIENTS_PER_PART)
                    > _MAX_STATEMENTS):
                return False
            state = chain.state_at(step)
            expires = found.expires_ms
            pending = sorted(members.pending)
        assert self._signer is not None  # joins are only ever pending with a signer
        material, started = [], []
        viewers = self._load_viewers()
        if self._index_of is not viewers:  # one dict per viewer list, not a scan per camera
            self._index = {v[0].fingerprint: v for v in viewers}
            self._index_of = viewers
        joining = [self._index[fp] for fp in pending if fp in self._index]
        tail = chain_record_tail(chain)
        for row, recipient, not_after in joining:
            if not row.authorized_on(chain.camera):
                continue
            if now_ms > not_after:
                continue  # expired: no key (a new chain reports it, see _wrap_into)
            viewer_epoch, opener_bytes = self._epoch_for(row.fingerprint, recipient, today,
                                                         now_ms)
            if opener_bytes is not None:
                started.append(row.fingerprint)
            record = viewer_epoch.epoch.wrap_chain_encoded(chain, state, now_ms, self._rng,
                                                           tail, first_step=step)
            expires = min(expires, not_after)
            material.append(KeyMaterial(
                row.fingerprint, chain.camera, chain.chain_id, viewer_epoch.epoch.epoch_id,
                now_ms, record, opener_bytes))
        joiners = sorted(m.fingerprint for m in material)
        statements = [
            issue_chain_join(chain, members.statements + i, members.parts, step,
                             [bytes.fromhex(fp) for fp in joiners[k:k + MAX_RECIPIENTS_PER_PART]],
                             self._signer)
            for i, k in enumerate(range(0, len(joiners), MAX_RECIPIENTS_PER_PART))]
        try:
            if material:
                if self._journal is not None:
                    self._journal(chain.camera, now_ms, [
                        record for item in material
                        for record in (item.epoch_opener, item.key_record) if record is not None])
                self._db.store_key_material(material, now_ms)
        except BaseException:
            self._forget_epochs(started)  # openers never stored: start over next time
            raise
        with self._lock:
            members.pending.clear()
            for fp in joiners:
                members.joined[fp] = step
            members.statements += len(statements)
            found = self._chains.get(cam_stream)
            if found is not None and found.chain is chain:
                self._chains[cam_stream] = dataclasses.replace(found, expires_ms=expires)
            if statements:
                self._recipients.setdefault(chain.chain_id, []).extend(statements)
        self.epochs_started += len(started)
        self.key_records_written += len(material)
        self.joins += len(material)
        self.key_record_bytes += sum(len(m.key_record) for m in material)
        self.opener_bytes += sum(len(m.epoch_opener or b"") for m in material)
        self.recipients_bytes += sum(map(len, statements))
        return True
