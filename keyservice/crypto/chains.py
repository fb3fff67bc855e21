"""Key chains (format v2): one random S_0 per camera data stream and chain, one HKDF step per
key period, and the minute key of each step. The Archiver keeps only the current state
(``KeyChain``); a viewer derives any step from S_0 (``ChainDeriver``).

Pure: no I/O.
"""

from __future__ import annotations

import os
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyservice.crypto.segments import PeriodKey, Rng
from keyservice.errors import IntegrityError
from keyservice.format import (
    CHAIN_ID_LEN,
    ID_LEN,
    KEY_LEN,
    MAX_PERIOD_S,
    ChainRecord,
    DataStream,
    validate_name,
)
from keyservice.labels import LABEL_CHAIN_KEY, LABEL_CHAIN_STEP

EPOCH_MAX_SECONDS = 86400  # epochs (and chains) end at the UTC day boundary


def _str8(name: str) -> bytes:
    raw = name.encode("ascii")
    return bytes((len(raw),)) + raw


def max_ratchet_index(period_s: int) -> int:
    """The last ratchet step an epoch can reach: it lasts at most one UTC day, which touches
    at most ``86400 // period_s + 1`` key periods. A reader refuses larger indices, so a
    forged chain record (or key id) cannot make it run an HKDF chain for hours."""
    return EPOCH_MAX_SECONDS // period_s + 1


_STEP = struct.Struct(">I")


def chain_key_id(chain_id: bytes, step: int) -> bytes:
    """The key id of step ``step`` of a chain: chain id (12 bytes) || step (u32 BE)."""
    if len(chain_id) != CHAIN_ID_LEN or not 0 <= step < 2**32:
        raise ValueError("A chain id is 12 bytes and a step an unsigned 32-bit integer.")
    return chain_id + _STEP.pack(step)


def split_key_id(key_id: bytes) -> tuple[bytes, int]:
    """(chain id, step) of a key id (every 16-byte key id parses; whether such a chain exists
    is for the reader to find out)."""
    if len(key_id) != ID_LEN:
        raise ValueError("A key id is 16 bytes.")
    return key_id[:CHAIN_ID_LEN], _STEP.unpack_from(key_id, CHAIN_ID_LEN)[0]


def chain_minute_key(state: bytes, chain_id: bytes, camera: str, stream: DataStream,
                     step: int) -> bytes:
    """K_i = HKDF-SHA256(ikm=S_i, salt=chain_id, info="FSE2 chain-minute-key\\0" || camera ||
    stream || u32 i). One-way: a minute key reveals neither S_i nor any other minute key."""
    info = LABEL_CHAIN_KEY + _str8(camera) + bytes((stream,)) + _STEP.pack(step)
    return HKDF(hashes.SHA256(), KEY_LEN, salt=chain_id, info=info).derive(state)


def chain_step(state: bytes, chain_id: bytes) -> bytes:
    """S_{i+1} = HKDF-SHA256(ikm=S_i, salt=chain_id, info="FSE2 chain-step\\0"). One-way:
    whoever holds S_i learns nothing about S_0..S_{i-1}, hence no earlier minute key."""
    return HKDF(hashes.SHA256(), KEY_LEN, salt=chain_id, info=LABEL_CHAIN_STEP).derive(state)


class KeyChain:
    """The Archiver's side of one key chain of one camera data stream: a random S_0 at its
    start, one step per key period. Only the current state is kept (the previous one is
    dropped at every step), so a memory dump at time t exposes no minute key of an earlier
    period. Not thread-safe: the caller serializes ``key_at``.
    """

    def __init__(self, camera: str, stream: DataStream, chain_id: bytes, seed: bytes,
                 period_s: int, start_period: int) -> None:
        validate_name(camera)
        if len(chain_id) != CHAIN_ID_LEN or len(seed) != KEY_LEN:
            raise ValueError("A chain has a 12-byte id and a 32-byte starting state.")
        self.camera = camera
        self.stream = DataStream(stream)
        self.chain_id = chain_id
        self.period_s = period_s
        self.start_period = start_period
        self._step = 0
        self._state: bytes | None = seed

    @classmethod
    def start(cls, camera: str, stream: DataStream, period_s: int, now_ms: int,
              rng: Rng = os.urandom) -> tuple[KeyChain, bytes]:
        """A new chain starting at now's key period, and its S_0 (to wrap for the viewers at
        once; the caller drops it after)."""
        if not isinstance(period_s, int) or not 1 <= period_s <= MAX_PERIOD_S:
            raise ValueError(f"The key period must be 1 to {MAX_PERIOD_S} seconds.")
        chain_id = rng(CHAIN_ID_LEN)
        seed = rng(KEY_LEN)
        chain = cls(camera, stream, chain_id, seed, period_s, now_ms // (period_s * 1000))
        return chain, seed

    @property
    def step(self) -> int:
        return self._step

    def step_at(self, now_ms: int) -> int:
        return now_ms // (self.period_s * 1000) - self.start_period

    def usable_at(self, now_ms: int) -> bool:
        """False once ``key_at(now_ms)`` would refuse: start a new chain then."""
        return self._step <= self.step_at(now_ms) <= max_ratchet_index(self.period_s)

    def join_step_at(self, now_ms: int) -> int:
        """The first step a viewer authorized now may be given (issue 23): now's step if the
        chain has not derived its key yet (no segment is sealed under it), else the next
        one. Never a step whose key may have sealed a segment recorded before now."""
        return max(self._step + 1, self.step_at(now_ms))

    def state_at(self, step: int) -> bytes:
        """S_step for a step after the current one, without stepping the chain (its current
        state still derives the current key): what a join record wraps. One-way, so it
        reveals no minute key before ``step``."""
        if step <= self._step:
            raise ValueError("A join is given a later step than the chain's current one.")
        state = self._state
        assert state is not None
        for _ in range(step - self._step):
            state = chain_step(state, self.chain_id)
        return state

    def key_at(self, now_ms: int) -> PeriodKey:
        """The minute key of now's key period; steps the chain forward to it, erasing the
        states before."""
        step = self.step_at(now_ms)
        if not self.usable_at(now_ms):
            raise ValueError("The clock is behind this chain's state (erased states cannot be "
                             "recovered) or past its day; start a new chain.")
        state = self._state
        assert state is not None
        while self._step < step:
            state = chain_step(state, self.chain_id)
            self._step += 1
        self._state = state
        key = chain_minute_key(state, self.chain_id, self.camera, self.stream, step)
        return PeriodKey(self.camera, self.stream, chain_key_id(self.chain_id, step), key,
                         now_ms)


class ChainDeriver:
    """The viewer's side of one chain: the minute key of any step from the state its record
    wraps, S_0 or (a join record) S_first_step; viewers may seek back, so the states computed
    so far are kept, in memory only. Steps before a join's first step are not derivable."""

    def __init__(self, record: ChainRecord, seed: bytes, max_step: int) -> None:
        if len(seed) != KEY_LEN:
            raise ValueError("A chain state is 32 bytes.")
        self.record = record
        self.max_step = max_step
        self.first_step = record.first_step
        self._states = [seed]  # _states[k] is S_(first_step + k)

    def key(self, step: int) -> bytes:
        if not self.first_step <= step <= self.max_step:
            raise IntegrityError()  # beyond the chain's day, or before this viewer's join
        index = step - self.first_step
        while len(self._states) <= index:
            self._states.append(chain_step(self._states[-1], self.record.chain_id))
        return chain_minute_key(self._states[index], self.record.chain_id, self.record.camera,
                                self.record.stream, step)
