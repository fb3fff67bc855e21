"""The per-viewer KEK ratchet (format v2, "Epochs"): KEK0 wrapped once to the viewer
(an epoch opener, through its ``Recipient``), then one HKDF step per key period; each chain's
S_0 is wrapped for each viewer under the KEK of its first period (a chain record).

Pure: no I/O.
"""

from __future__ import annotations

import hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyservice.crypto.chains import KeyChain, max_ratchet_index
from keyservice.crypto.segments import Rng
from keyservice.errors import IntegrityError, NoMatchingIdentity
from keyservice.format import (
    ID_LEN,
    KEY_LEN,
    MAX_PERIOD_S,
    NONCE_LEN,
    RECORD_HEADER,
    VERSION,
    ChainRecord,
    DataStream,
    EpochOpener,
    RecordType,
)
from keyservice.identity import fingerprint
from keyservice.keyscheme import Identity, IncorrectIdentity, Recipient, WrappedKey
from keyservice.labels import LABEL_CHAIN_RECORD, LABEL_KEK_RATCHET, epoch_opener_context

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_VERSION = _U16.pack(VERSION)


def _str8(name: str) -> bytes:
    raw = name.encode("ascii")
    return bytes((len(raw),)) + raw


def ratchet_kek(kek: bytes, epoch_id: bytes) -> bytes:
    """KEK_{i+1} = HKDF-SHA256(ikm=KEK_i, salt=epoch_id, info=label). One-way: whoever holds
    KEK_i learns nothing about KEK_0..KEK_{i-1} (forward secrecy on the Archiver)."""
    return HKDF(hashes.SHA256(), KEY_LEN, salt=epoch_id, info=LABEL_KEK_RATCHET).derive(kek)


def chain_record_ad(viewer_fingerprint: bytes, epoch_id: bytes, ratchet_index: int,
                    camera: str, stream: DataStream, chain_id: bytes, start_period: int,
                    first_step: int = 0) -> bytes:
    """Binds a wrapped chain state to its viewer, epoch, ratchet step, camera stream, chain id,
    start period and (a join record) the step of the state: a chain record cannot be replayed
    for another viewer, step, camera, stream or chain, nor a join's S_j passed off as S_0 or
    as another step's state. (A start record's associated data is that of format 2 before
    joins: the fixed-length fields end where it ends, so the two cannot collide.)"""
    return b"".join((LABEL_CHAIN_RECORD, _VERSION, viewer_fingerprint, epoch_id,
                     _U32.pack(ratchet_index), _str8(camera), bytes((stream,)), chain_id,
                     _U64.pack(start_period), _U32.pack(first_step) if first_step else b""))


class Epoch:
    """The Archiver's side of one viewer's epoch: KEK0 wrapped once, then one
    ratchet step per key period. Only the current KEK is kept; older ones are dropped at once,
    so a memory dump at time t exposes no key wrapped before t's period. (Python cannot wipe
    ``bytes``; dropping the last reference is the best it offers.) Not thread-safe: the
    caller serializes ``wrap``.
    """

    def __init__(self, epoch_id: bytes, viewer_fingerprint: bytes, period_s: int,
                 start_period: int, kek0: bytes) -> None:
        self.epoch_id = epoch_id
        self.viewer_fingerprint = viewer_fingerprint
        self.period_s = period_s
        self.start_period = start_period
        self._index = 0
        self._kek: bytes | None = kek0
        self._aead: AESGCM | None = None  # AESGCM(_kek), made once per step, not per chain

    @classmethod
    def start(cls, recipient: Recipient, period_s: int, now_ms: int, rng: Rng = os.urandom
              ) -> tuple[Epoch, EpochOpener]:
        if not isinstance(period_s, int) or not 1 <= period_s <= MAX_PERIOD_S:
            raise ValueError(f"The key period must be 1 to {MAX_PERIOD_S} seconds.")
        if now_ms < 0:
            raise ValueError("The clock must not be before 1970.")
        epoch_id = rng(ID_LEN)
        kek0 = rng(KEY_LEN)
        start_period = now_ms // (period_s * 1000)
        wrapped = recipient.wrap(kek0, epoch_opener_context(epoch_id), rng)
        opener = EpochOpener(epoch_id, recipient.fingerprint, wrapped.scheme, period_s,
                             start_period, wrapped.body)
        return cls(epoch_id, recipient.fingerprint, period_s, start_period, kek0), opener

    @classmethod
    def resume(cls, epoch_id: bytes, viewer_fingerprint: bytes, period_s: int,
               start_period: int, index: int, kek: bytes) -> Epoch:
        """The epoch at ratchet step ``index`` with that step's KEK (``kek_at``): how the
        Archiver's chain preparation process wraps under an epoch the Archiver holds. It can
        derive no KEK before ``index``."""
        if len(kek) != KEY_LEN or not 0 <= index <= max_ratchet_index(period_s):
            raise ValueError("An epoch resumes at a step of its day with a 32-byte KEK.")
        epoch = cls(epoch_id, viewer_fingerprint, period_s, start_period, kek)
        epoch._index = index
        return epoch

    def kek_at(self, now_ms: int) -> tuple[int, bytes]:
        """Now's ratchet step and its KEK (stepping forward to it as a wrap does, erasing the
        KEKs before), to hand to ``resume`` in another process over a pipe."""
        index, _ = self._aead_at(now_ms)
        assert self._kek is not None
        return index, self._kek

    @property
    def index(self) -> int:
        """The current ratchet step."""
        return self._index

    def index_at(self, now_ms: int) -> int:
        return now_ms // (self.period_s * 1000) - self.start_period

    def usable_at(self, now_ms: int) -> bool:
        """False once ``wrap(now_ms)`` would refuse: start a new epoch then."""
        return self._index <= self.index_at(now_ms) <= max_ratchet_index(self.period_s)

    def _aead_at(self, now_ms: int) -> tuple[int, AESGCM]:
        """The ratchet step of now's key period and an AEAD under its KEK; steps forward to
        it, erasing the KEKs before."""
        index = self.index_at(now_ms)
        if index < self._index:
            raise ValueError("The clock went back behind this epoch's ratchet (KEKs already "
                             "erased cannot be recovered); start a new epoch.")
        if index > max_ratchet_index(self.period_s):
            raise ValueError("This epoch has outlived its day; start a new epoch.")
        kek = self._kek
        assert kek is not None
        if index > self._index:
            while self._index < index:
                kek = ratchet_kek(kek, self.epoch_id)
                self._index += 1
            self._kek = kek
            self._aead = None
        if self._aead is None:
            self._aead = AESGCM(kek)
        return index, self._aead

    def wrap_chain(self, chain: KeyChain, seed: bytes, now_ms: int, rng: Rng = os.urandom,
                   first_step: int = 0) -> ChainRecord:
        """Wrap ``chain``'s starting state ``seed`` for this viewer under the KEK of now's key
        period; with ``first_step`` > 0, ``seed`` is the state of that step (a join record)."""
        index, aead = self._aead_at(now_ms)
        # Random nonce: per KEK_i only the chains started in one period are wrapped (one per
        # camera stream, or a few), far below the 2^32 limit for random 96-bit GCM nonces.
        nonce = rng(NONCE_LEN)
        ad = chain_record_ad(self.viewer_fingerprint, self.epoch_id, index, chain.camera,
                             chain.stream, chain.chain_id, chain.start_period, first_step)
        wrapped = aead.encrypt(nonce, seed, ad)
        return ChainRecord(self.epoch_id, index, chain.camera, chain.stream, chain.chain_id,
                           chain.start_period, nonce, wrapped, first_step)

    def wrap_chain_encoded(self, chain: KeyChain, seed: bytes, now_ms: int,
                           rng: Rng = os.urandom, tail: bytes | None = None,
                           first_step: int = 0) -> bytes:
        """``encode_record(self.wrap_chain(..., first_step))``, byte for byte, without
        building and re-validating a ChainRecord: the Archiver wraps one chain for thousands
        of viewers at a time, and every field here is its own (a revocation on every camera at
        10 000 viewers is a million of them). ``tail``: ``chain_record_tail(chain)``, computed
        once per chain by the caller. ``first_step`` > 0 makes a join record: the step is
        bound into the associated data and appended to the record, as wrap_chain does."""
        if not 0 <= first_step <= 0xFFFFFFFF:
            raise ValueError("A join record's first step is a 32-bit step number.")
        index, aead = self._aead_at(now_ms)
        nonce = rng(NONCE_LEN)
        if tail is None:
            tail = chain_record_tail(chain)
        head = self.epoch_id + _U32.pack(index)
        step = _U32.pack(first_step) if first_step else b""  # a start record carries none
        wrapped = aead.encrypt(
            nonce, seed, b"".join((LABEL_CHAIN_RECORD, _VERSION, self.viewer_fingerprint, head,
                                   tail, step)))
        body_len = len(head) + len(tail) + len(nonce) + len(wrapped) + len(step)
        return b"".join((RECORD_HEADER.pack(RecordType.CHAIN_RECORD, body_len), head, tail,
                         nonce, wrapped, step))


def chain_record_tail(chain: KeyChain) -> bytes:
    """camera, stream, chain id, start period: the part of a chain record (and of its AD)
    that is the same for every viewer of the chain."""
    return b"".join((_str8(chain.camera), bytes((chain.stream,)), chain.chain_id,
                     _U64.pack(chain.start_period)))


def open_epoch_opener(identity: Identity, opener: EpochOpener) -> bytes:
    """KEK0 of an epoch: one unwrap on the viewer's token (RSA-OAEP decryption or ECDH).

    The wrap context carries the epoch-opener label and this opener's epoch id, so a login
    challenge (or any other wrapped key) can never be passed off as an opener, and an opener
    cannot be moved to another epoch. IntegrityError (the stream's one opaque failure) if the
    identity's unwrap refuses it.
    """
    if not hmac.compare_digest(opener.viewer_fingerprint, fingerprint(identity.certificate)):
        raise NoMatchingIdentity(
            "The epoch opener is addressed to another viewer certificate; open the stream "
            "with the identity it was made for.")
    try:
        return identity.unwrap(WrappedKey(opener.key_scheme, opener.ciphertext),
                               epoch_opener_context(opener.epoch_id))
    except IncorrectIdentity:
        raise IntegrityError() from None  # a stream fails as a whole, one opaque error


class KekRatchet:
    """The viewer's side of an epoch: KEK_i for any step i, from KEK0 (viewers may seek
    back, so the steps computed so far are kept, in memory only)."""

    def __init__(self, epoch_id: bytes, kek0: bytes,
                 max_index: int = max_ratchet_index(1)) -> None:
        if len(kek0) != KEY_LEN:
            raise ValueError("KEK0 is 32 bytes.")
        self.epoch_id = epoch_id
        self.max_index = max_index
        self._keks = [kek0]

    def kek_at(self, index: int) -> bytes:
        if not 0 <= index <= self.max_index:
            raise IntegrityError()
        while len(self._keks) <= index:
            self._keks.append(ratchet_kek(self._keks[-1], self.epoch_id))
        return self._keks[index]


def unwrap_chain_record(kek: bytes, record: ChainRecord, viewer_fingerprint: bytes) -> bytes:
    """The chain state in ``record`` (S_0, or S_first_step of a join record); IntegrityError
    unless it was wrapped for this viewer, epoch, ratchet step, camera stream, chain id, start
    period and first step."""
    ad = chain_record_ad(viewer_fingerprint, record.epoch_id, record.ratchet_index,
                         record.camera, record.stream, record.chain_id, record.start_period,
                         record.first_step)
    try:
        return AESGCM(kek).decrypt(record.nonce, record.wrapped, ad)
    except InvalidTag:
        raise IntegrityError() from None
