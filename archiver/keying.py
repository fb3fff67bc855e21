"""Key chains, minute keys and per-viewer key streams, in memory only.

For every camera data stream a *key chain* (format v2, keyservice.crypto.KeyChain): a fresh
random starting state when a viewer loses the camera (revoked, or the camera removed from it:
it cannot open what is recorded after), at every UTC day boundary and at every Archiver start;
every key period's minute key is derived one-way from the chain's state, which then steps
forward (the previous state is dropped). A chain's starting state is wrapped once for every
viewer authorized at its start, under the viewer's epoch KEK (one RSA-OAEP encryption per
viewer per epoch, see keyservice.crypto.Epoch): one chain record per viewer per camera stream
per day, plus one per revocation.

A viewer authorized on a camera while its chain runs *joins* it (issue 23): at the chain's next
rotation it gets the state of the first step not used yet (a join record) and the Archiver signs
a join statement naming it and that step; nobody else's records change. The state is one-way,
so the new viewer opens nothing recorded before it was added.

Plaintext keys, chain states and KEKs never reach the database or the disk: only epoch openers
and chain records.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from archiver.db import Database, KeyMaterial
from archiver.directory import Directory, ViewerRow
from keyservice.crypto import Epoch, KeyChain, PeriodKey, max_ratchet_index
from keyservice.format import MAX_RECIPIENTS_PER_PART, DataStream, encode_record
from keyservice.fusion_writer import issue_chain_join, issue_chain_recipients
from keyservice.identity import Signer
from keyservice.keyscheme import KeyScheme, Recipient

Rng = Callable[[int], bytes]
DAY_MS = 86_400_000


@dataclass
class _ViewerEpoch:
    epoch: Epoch
    utc_day: dt.date


_MAX_STATEMENTS = 0xFFFF  # a chain's statements are numbered u16 (start parts, then joins)


@dataclass
class _Members:
    """Who holds a running chain's state: its start recipients (a set shared by the chains
    started for the same viewers), the viewers that joined it (fingerprint -> first step), the
    viewers authorized since that join at its next rotation, and how many signed statements
    (start parts and joins) it has: the next join statement's number."""

    chain_id: bytes
    start: frozenset[str]
    parts: int
    statements: int
    joined: dict[str, int]
    pending: set[str]

    def holds(self, fingerprint: str) -> bool:
        return fingerprint in self.start or fingerprint in self.joined


class KeyManager:
    def __init__(self, db: Database, period_s: int, rng: Rng = os.urandom,
                 signer: Signer | None = None,
                 journal: Callable[[str, int, list[bytes]], None] | None = None, *,
                 directory: Directory) -> None:
        """``signer``: the Archiver's key, to sign each new chain's recipients statement (the
        viewers its state is wrapped for); archive.py writes it before the chain's first
        segment. ``journal(camera, now_ms, records)``: appends (durably) the openers and chain
        records made for a camera's new chain to the archive, before the database stores them."""
        self._db = db
        self._directory = directory  # the viewers (the site directory's); key material: db
        self._journal = journal
        self._signer = signer
        self._period_s = period_s
        # chain id -> the signed recipients statement's parts, not archived yet
        self._recipients: dict[bytes, list[bytes]] = {}
        self._period_ms = period_s * 1000
        self._rng = rng
        # _lock guards _current and is only ever held briefly. _rotate serializes rotations
        # and guards what they use (chains, epochs, the viewer list): a chain start wraps its
        # state for every viewer (thousands of AES wraps and an fsynced commit), and segments
        # of cameras whose key is current must not wait for that. Order: _rotate before _lock.
        self._lock = threading.Lock()
        self._rotate = threading.Lock()
        # camera stream -> (key period, UTC day number) of its current minute key, and the key
        self._current: dict[tuple[str, DataStream], tuple[tuple[int, int], PeriodKey]] = {}
        # camera stream -> its chain, the chain's UTC day, and the earliest certificate expiry
        # among its recipients (the chain ends then: an expired viewer derives no later key)
        self._chains: dict[tuple[str, DataStream], tuple[KeyChain, dt.date, int]] = {}
        self._epochs: dict[str, _ViewerEpoch] = {}
        self._viewers: list[tuple[ViewerRow, Recipient, int]] | None = None
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
        # Joins (issue 23): camera stream -> who holds its running chain; start-recipient sets
        # are shared between chains (10 000 viewers on 100 cameras: one set, not 100).
        self._members: dict[tuple[str, DataStream], _Members] = {}
        self._member_sets: dict[frozenset[str], frozenset[str]] = {}
        self.joins = 0  # join records written (one per joining viewer per running chain)
        self._index: dict[str, tuple[ViewerRow, Recipient, int]] = {}
        self._index_of: list[tuple[ViewerRow, Recipient, int]] | None = None

    def key_for(self, camera: str, stream: DataStream, now_ms: int) -> PeriodKey:
        """The key to seal a segment arriving now; rotates (and wraps for viewers) when due.

        A key period ends at the next period boundary or the next UTC midnight, whichever
        comes first: with a period that does not divide a day, one period straddles midnight,
        and reusing its key after midnight would seal the new day's first segments under the
        old day's chain, which retention of the old day could then not destroy."""
        period = (now_ms // self._period_ms, now_ms // DAY_MS)
        with self._lock:
            current = self._current.get((camera, stream))
            if current is not None and current[0] == period:
                return current[1]
        with self._rotate:
            with self._lock:  # another thread may have rotated it while this one waited
                current = self._current.get((camera, stream))
                if current is not None and current[0] == period:
                    return current[1]
            key = self._chain_for(camera, stream, now_ms).key_at(now_ms)
            with self._lock:
                self._current[(camera, stream)] = (period, key)
                self.rotations += 1
            return key

    def authorization_changed(self, fingerprint: str, cameras: list[str] | None) -> None:
        """A viewer was added, changed or revoked: its epoch ends. On the affected cameras
        (None: all), a chain it holds but may no longer (revoked, camera removed) starts anew
        before the next segment; a chain it may now hold but does not is joined at its next
        rotation (``_join_pending``); other chains run on untouched."""
        with self._rotate:
            row = self._directory.viewer(fingerprint)
            with self._lock:
                self._epochs.pop(fingerprint, None)
                self._refresh_viewer(fingerprint, row)
                restart = []
                for cam_stream in list(self._chains):
                    if cameras is not None and cam_stream[0] not in cameras:
                        continue
                    members = self._members.get(cam_stream)
                    allowed = (row is not None and row.revoked_ms is None
                               and row.authorized_on(cam_stream[0]))
                    if members is None or self._signer is None:
                        restart.append(cam_stream)  # no join without a signed statement
                    elif members.holds(fingerprint):
                        if not allowed:
                            restart.append(cam_stream)  # it must get nothing recorded after
                    elif allowed:
                        members.pending.add(fingerprint)
                    else:
                        members.pending.discard(fingerprint)
                for cam_stream in restart:
                    self._current.pop(cam_stream, None)
                    del self._chains[cam_stream]  # its state is erased with it
                    self._members.pop(cam_stream, None)

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

    def active_viewers(self) -> int:
        with self._rotate:
            return len(self._load_viewers())

    def _refresh_viewer(self, fingerprint: str, row: ViewerRow | None) -> None:
        """The viewer list with one viewer's row replaced (or dropped if revoked): parsing
        10 000 certificates again for one change cost more than the join itself."""
        if self._viewers is None:
            return
        kept = [v for v in self._viewers if v[0].fingerprint != fingerprint]
        if row is not None and row.revoked_ms is None:
            cert = x509.load_der_x509_certificate(row.certificate)
            not_after = int(cert.not_valid_after_utc.timestamp() * 1000)
            kept.append((row, Recipient(cert, KeyScheme(row.oaep_hash)), not_after))
        self._viewers = kept

    def _load_viewers(self) -> list[tuple[ViewerRow, Recipient, int]]:
        if self._viewers is None:
            viewers = []
            for row in self._directory.viewers():
                if row.revoked_ms is not None:
                    continue
                cert = x509.load_der_x509_certificate(row.certificate)
                not_after = int(cert.not_valid_after_utc.timestamp() * 1000)
                viewers.append((row, Recipient(cert, KeyScheme(row.oaep_hash)), not_after))
            self._viewers = viewers
        return self._viewers

    def _chain_for(self, camera: str, stream: DataStream, now_ms: int) -> KeyChain:
        """The chain of a camera stream at now, started anew (and wrapped for its viewers) at
        the UTC day boundary, after an authorization change, and when the clock is behind the
        chain's state (a segment that read the clock just before a period boundary can rotate
        after one of the new period did; the older state is erased)."""
        today = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC).date()
        found = self._chains.get((camera, stream))
        if (found is not None and found[1] == today and now_ms <= found[2]
                and found[0].usable_at(now_ms)):
            members = self._members.get((camera, stream))
            if members is None or not members.pending:
                return found[0]
            if self._join_pending(found[0], members, now_ms, today):
                return found[0]
        chain, seed = KeyChain.start(camera, stream, self._period_s, now_ms, self._rng)
        expires = self._wrap_for_viewers(chain, seed, now_ms, today)
        self._chains[(camera, stream)] = (chain, today, expires)
        self.chains_started += 1
        return chain

    def _wrap_for_viewers(self, chain: KeyChain, seed: bytes, now_ms: int,
                          today: dt.date) -> int:
        """Wraps ``seed`` for every viewer authorized on the chain's camera; returns the
        earliest certificate expiry among them."""
        material = []
        expires = 2**63
        started: list[str] = []
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
            opener_bytes = None
            viewer_epoch = self._epochs.get(row.fingerprint)
            # Epochs end at the UTC day boundary, bounding how much one opener unlocks. A new
            # one also starts when the ratchet is already past now's key period: a segment that
            # read the clock just before a period boundary can rotate after a segment of the
            # new period did, and the older KEK is erased (forward secrecy), so it cannot wrap.
            if (viewer_epoch is None or viewer_epoch.utc_day != today
                    or not viewer_epoch.epoch.usable_at(now_ms)):
                epoch, opener = Epoch.start(recipient, self._period_ms // 1000, now_ms, self._rng)
                viewer_epoch = self._epochs[row.fingerprint] = _ViewerEpoch(epoch, today)
                opener_bytes = encode_record(opener)
                started.append(row.fingerprint)
            record = viewer_epoch.epoch.wrap_chain(chain, seed, now_ms, self._rng)
            expires = min(expires, not_after)
            # Stored under the chain id (12 bytes) in the key_id column: the Assembler looks
            # a segment's chain up by the first 12 bytes of its key id.
            material.append(KeyMaterial(
                row.fingerprint, chain.camera, chain.chain_id, viewer_epoch.epoch.epoch_id,
                now_ms, encode_record(record), opener_bytes))
        # Committed before any segment sealed under this chain is acknowledged: an acknowledged
        # segment is never left without the chain records its viewers need.
        try:
            if self._journal is not None and material:
                self._journal(chain.camera, now_ms, [
                    record for item in material
                    for record in (item.epoch_opener, item.key_record) if record is not None])
            self._db.store_key_material(material, now_ms)
        except BaseException:
            for fingerprint in started:  # their openers were never stored: start over next time
                del self._epochs[fingerprint]
            raise
        self._note_members(chain, [m.fingerprint for m in material])
        self.epochs_started += len(started)
        self.key_records_written += len(material)
        self.key_record_bytes += sum(len(m.key_record) for m in material)
        self.opener_bytes += sum(len(m.epoch_opener or b"") for m in material)
        if self._signer is not None:
            # Signed now, from what this process wrapped: the index cannot later make a
            # withheld segment look like one this viewer was never authorized for.
            parts = issue_chain_recipients(
                chain, [bytes.fromhex(m.fingerprint) for m in material], self._signer)
            self.recipients_bytes += sum(map(len, parts))
            with self._lock:
                self._recipients[chain.chain_id] = parts
        return expires

    # --- joins (issue 23) -------------------------------------------------------------
    def _note_members(self, chain: KeyChain, fingerprints: list[str]) -> None:
        """Remember who a new chain was wrapped for (and how many start parts it signs)."""
        start = frozenset(fingerprints)
        start = self._member_sets.setdefault(start, start)
        if len(self._member_sets) > 2 * len(self._members) + 8:  # drop sets no chain uses
            used = {m.start for m in self._members.values()} | {start}
            self._member_sets = {s: s for s in used}
        parts = max(1, -(-len(start) // MAX_RECIPIENTS_PER_PART))
        self._members[(chain.camera, chain.stream)] = _Members(
            chain.chain_id, start, parts, parts, {}, set())

    def _join_pending(self, chain: KeyChain, members: _Members, now_ms: int,
                      today: dt.date) -> bool:
        """Gives the viewers authorized since the chain started (``members.pending``) its
        state from the first step whose key has sealed nothing yet, S_j, each under its epoch
        KEK (a join record), and signs the join statement (archived before the chain's next
        segment). Only the joining viewers' records are written. False if the chain cannot
        take a join (its day or its statement numbers are used up): start a new one then."""
        step = chain.join_step_at(now_ms)
        if (step > max_ratchet_index(chain.period_s)
                or members.statements + -(-len(members.pending) // MAX_RECIPIENTS_PER_PART)
                > _MAX_STATEMENTS):
            return False
        assert self._signer is not None  # joins are only ever pending with a signer
        state = chain.state_at(step)
        material, started, expires = [], [], self._chains[(chain.camera, chain.stream)][2]
        viewers = self._load_viewers()
        if self._index_of is not viewers:  # one dict per viewer list, not a scan per camera
            self._index = {v[0].fingerprint: v for v in viewers}
            self._index_of = viewers
        joining = [self._index[fp] for fp in sorted(members.pending) if fp in self._index]
        for row, recipient, not_after in joining:
            if not row.authorized_on(chain.camera):
                continue
            if now_ms > not_after:
                continue  # expired: no key (a new chain reports it, see _wrap_for_viewers)
            opener_bytes = None
            viewer_epoch = self._epochs.get(row.fingerprint)
            if (viewer_epoch is None or viewer_epoch.utc_day != today
                    or not viewer_epoch.epoch.usable_at(now_ms)):
                epoch, opener = Epoch.start(recipient, self._period_ms // 1000, now_ms, self._rng)
                viewer_epoch = self._epochs[row.fingerprint] = _ViewerEpoch(epoch, today)
                opener_bytes = encode_record(opener)
                started.append(row.fingerprint)
            record = viewer_epoch.epoch.wrap_chain(chain, state, now_ms, self._rng,
                                                   first_step=step)
            expires = min(expires, not_after)
            material.append(KeyMaterial(
                row.fingerprint, chain.camera, chain.chain_id, viewer_epoch.epoch.epoch_id,
                now_ms, encode_record(record), opener_bytes))
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
            for fingerprint in started:  # their openers were never stored: start over next time
                del self._epochs[fingerprint]
            raise
        members.pending.clear()
        for fp in joiners:
            members.joined[fp] = step
        members.statements += len(statements)
        self._chains[(chain.camera, chain.stream)] = (chain, today, expires)
        self.epochs_started += len(started)
        self.key_records_written += len(material)
        self.joins += len(material)
        self.key_record_bytes += sum(len(m.key_record) for m in material)
        self.opener_bytes += sum(len(m.epoch_opener or b"") for m in material)
        self.recipients_bytes += sum(map(len, statements))
        if statements:
            with self._lock:
                self._recipients.setdefault(chain.chain_id, []).extend(statements)
        return True
