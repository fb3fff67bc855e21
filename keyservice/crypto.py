"""The crypto core of fusion stream format v2: key chains and their minute keys, segments, the
per-viewer KEK ratchet, epoch openers, chain records, key commitments and the login challenge.

Built from `cryptography` primitives only (AES-256-GCM, HKDF-SHA256, HMAC-SHA256; RSA-OAEP
through ``Recipient``/``Identity``). Clocks are millisecond integers passed in and randomness is
an injectable ``rng(n) -> bytes`` (``os.urandom`` by default), so tests and test vectors are
deterministic. Every decryption or verification failure is the opaque ``IntegrityError``.

Pure: no I/O, no ``pkcs11``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keyservice.certs import load_certificate
from keyservice.errors import ArchiverFailed, CertificateError, IntegrityError, NoMatchingIdentity
from keyservice.format import (
    CHAIN_ID_LEN,
    ID_LEN,
    KEY_LEN,
    MAX_PERIOD_S,
    MAX_SEGMENT_BODY,
    NONCE_LEN,
    SEGMENT_LAST,
    TAG_LEN,
    VERSION,
    ChainRecord,
    DataStream,
    EpochOpener,
    Segment,
    validate_name,
)
from keyservice.identity import EcIdentity, Identity, OaepHash, Recipient, fingerprint

Rng = Callable[[int], bytes]

# Domain-separation labels: every derivation, every AEAD and every RSA plaintext carries its
# own, so a value made for one purpose is never accepted for another.
LABEL_EPOCH_OPENER = b"FSE1 epoch-opener\x00"
LABEL_CHAIN_RECORD = b"FSE2 chain-record"
LABEL_CHAIN_KEY = b"FSE2 chain-minute-key\x00"
LABEL_CHAIN_STEP = b"FSE2 chain-step\x00"
LABEL_KEK_RATCHET = b"FSE1 kek-ratchet"
LABEL_SEGMENT = b"FSE1 segment"
LABEL_KEY_COMMITMENT = b"FSE1 key-commitment"
LABEL_LOGIN_CHALLENGE = b"FSE1 login-challenge\x00"
LABEL_LOGIN_PROOF = b"FSE1 login-proof"
# EC P-256 viewers: the HKDF info of the key that wraps KEK0 / the login secret.
LABEL_EC_EPOCH_OPENER = b"FSE1 ec-epoch-opener\x00"
LABEL_EC_LOGIN_CHALLENGE = b"FSE1 ec-login-challenge\x00"
LABEL_EC_SALT = b"FSE1 ec-p256"
EC_POINT_LEN = 65  # uncompressed SEC1 point: 04 || x || y
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

SECRET_LEN = 32  # login challenge secret
EPOCH_MAX_SECONDS = 86400  # epochs end at the UTC day boundary

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_VERSION = _U16.pack(VERSION)
_NONCE_PAD = bytes(4)
_SEGMENT_AD_TAIL = struct.Struct(">QQI16sB")  # seq, capture_ms, duration_ms, key_id, flags


def _str8(name: str) -> bytes:
    raw = name.encode("ascii")
    return bytes((len(raw),)) + raw


def max_ratchet_index(period_s: int) -> int:
    """The last ratchet step an epoch can reach: it lasts at most one UTC day, which touches
    at most ``86400 // period_s + 1`` key periods. A reader refuses larger indices, so a
    forged chain record (or key id) cannot make it run an HKDF chain for hours."""
    return EPOCH_MAX_SECONDS // period_s + 1


# --- minute keys and segments -------------------------------------------------------------
@dataclass(frozen=True)
class MinuteKey:
    """The random key of one camera data stream for one key period (shared by all viewers).

    Nonces are derived from the segment sequence number, so a key must never seal the same
    ``seq`` twice with different data: this object refuses any ``seq`` not above the last
    one it sealed (one key serves one camera stream in one process, see the spec).
    """

    camera: str
    stream: DataStream
    key_id: bytes
    key: bytes = field(repr=False)  # secret: never in logs or tracebacks
    valid_from_ms: int
    _last_seq: list[int] = field(default_factory=lambda: [-1], init=False, repr=False,
                                 compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False,
                                  compare=False)

    def __post_init__(self) -> None:
        validate_name(self.camera)
        object.__setattr__(self, "stream", DataStream(self.stream))
        if len(self.key_id) != ID_LEN or len(self.key) != KEY_LEN:
            raise ValueError("A minute key has a 16-byte id and a 32-byte key.")

    @cached_property
    def commitment(self) -> bytes:
        return key_commitment(self.key, self.camera, self.stream, self.key_id)

    @cached_property
    def _aead(self) -> AESGCM:
        return AESGCM(self.key)

    def _reserve(self, seq: int) -> None:
        with self._lock:
            if seq <= self._last_seq[0]:
                raise ValueError(
                    f"Segment sequence number {seq} is not above {self._last_seq[0]}, the last "
                    "one sealed under this minute key: that would reuse an AES-GCM nonce. "
                    "Use a fresh, higher sequence number (skipping numbers is fine).")
            self._last_seq[0] = seq


def new_minute_key(camera: str, stream: DataStream, now_ms: int, rng: Rng = os.urandom
                   ) -> MinuteKey:
    """A standalone random key with a random id, outside any chain: for tests and benchmarks
    of the segment layer (a reader can only use it when given it, ``known_keys``)."""
    key_id = rng(ID_LEN)
    key = rng(KEY_LEN)
    return MinuteKey(camera, stream, key_id, key, now_ms)


# --- key chains (format v2) ----------------------------------------------------------------
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

    def key_at(self, now_ms: int) -> MinuteKey:
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
        return MinuteKey(self.camera, self.stream, chain_key_id(self.chain_id, step), key,
                         now_ms)


class ChainDeriver:
    """The viewer's side of one chain: the minute key of any step from S_0 (viewers may seek
    back, so the states computed so far are kept, in memory only)."""

    def __init__(self, record: ChainRecord, seed: bytes, max_step: int) -> None:
        if len(seed) != KEY_LEN:
            raise ValueError("A chain state is 32 bytes.")
        self.record = record
        self.max_step = max_step
        self._states = [seed]

    def key(self, step: int) -> bytes:
        if not 0 <= step <= self.max_step:
            raise IntegrityError()  # no honest Archiver steps a chain beyond its day
        while len(self._states) <= step:
            self._states.append(chain_step(self._states[-1], self.record.chain_id))
        return chain_minute_key(self._states[step], self.record.chain_id, self.record.camera,
                                self.record.stream, step)


def key_commitment(key: bytes, camera: str, stream: DataStream, key_id: bytes) -> bytes:
    """HMAC-SHA256 under the minute key: AES-GCM is not key-committing (one ciphertext can be
    made to open under two keys), so the signed manifest commits to the key itself."""
    return hmac.new(key, LABEL_KEY_COMMITMENT + _str8(camera) + bytes((stream,)) + key_id,
                    hashlib.sha256).digest()


def segment_nonce(seq: int) -> bytes:
    # Unique per key: seq strictly increases per camera stream, and a key serves one stream.
    return _NONCE_PAD + _U64.pack(seq)


def segment_ad(camera: str, stream: DataStream, seq: int, capture_ms: int, key_id: bytes,
               flags: int, duration_ms: int = 0) -> bytes:
    """Binds everything a reader relies on, so reordering, splicing between cameras, streams
    or minutes, and flipping the last-segment flag all fail authentication."""
    if len(key_id) != ID_LEN:  # "16s" would pad or cut it silently
        raise ValueError("A key id is 16 bytes.")
    return _segment_ad_prefix(camera, stream) + _SEGMENT_AD_TAIL.pack(seq, capture_ms,
                                                                     duration_ms, key_id, flags)


@functools.lru_cache(maxsize=1024)
def _segment_ad_prefix(camera: str, stream: int) -> bytes:
    return LABEL_SEGMENT + _VERSION + _str8(camera) + bytes((stream,))


def seal_segment(key: MinuteKey, seq: int, capture_ms: int, plaintext: bytes, flags: int = 0,
                 duration_ms: int = 0) -> Segment:
    """Encrypt one segment under ``key`` (its camera and data stream are the key's)."""
    if type(flags) is not int or flags & ~SEGMENT_LAST or not 0 <= flags <= 0xFF:
        raise ValueError(f"Unknown segment flags {flags!r}.")
    if (type(seq) is not int or type(capture_ms) is not int or not 0 <= seq < 2**64
            or not 0 <= capture_ms < 2**64 or type(duration_ms) is not int
            or not 0 <= duration_ms < 2**32):
        raise ValueError("Sequence numbers and capture times are unsigned 64-bit integers, "
                         "durations 32-bit.")
    # The record body is the 39-byte fixed part, the name, the ciphertext and the tag.
    if len(plaintext) + TAG_LEN > MAX_SEGMENT_BODY - 39 - len(key.camera):
        raise ValueError("A segment is limited to 64 MiB; cut it into smaller segments.")
    key._reserve(seq)
    ad = segment_ad(key.camera, key.stream, seq, capture_ms, key.key_id, flags, duration_ms)
    ciphertext = key._aead.encrypt(segment_nonce(seq), plaintext, ad)
    # Every field was checked above or by MinuteKey: skip re-checking on the hot path.
    return Segment._unchecked(key.camera, key.stream, seq, capture_ms, key.key_id, flags,
                              ciphertext, duration_ms)


def open_segment(key: bytes | AESGCM, segment: Segment) -> bytes:
    """Decrypt and authenticate one segment; IntegrityError if anything was altered.
    ``key`` may be a prepared ``AESGCM`` to save its key schedule on every segment."""
    aead = key if isinstance(key, AESGCM) else AESGCM(key)
    ad = segment_ad(segment.camera, segment.stream, segment.seq, segment.capture_ms,
                    segment.key_id, segment.flags, segment.duration_ms)
    try:
        return aead.decrypt(segment_nonce(segment.seq), segment.ciphertext, ad)
    except InvalidTag:
        raise IntegrityError() from None


# --- the per-viewer KEK ratchet -----------------------------------------------------------
def ratchet_kek(kek: bytes, epoch_id: bytes) -> bytes:
    """KEK_{i+1} = HKDF-SHA256(ikm=KEK_i, salt=epoch_id, info=label). One-way: whoever holds
    KEK_i learns nothing about KEK_0..KEK_{i-1} (forward secrecy on the Archiver)."""
    return HKDF(hashes.SHA256(), KEY_LEN, salt=epoch_id, info=LABEL_KEK_RATCHET).derive(kek)


def chain_record_ad(viewer_fingerprint: bytes, epoch_id: bytes, ratchet_index: int,
                    camera: str, stream: DataStream, chain_id: bytes, start_period: int) -> bytes:
    """Binds a wrapped chain state to its viewer, epoch, ratchet step, camera stream, chain id
    and start period: a chain record cannot be replayed for another viewer, step, camera,
    stream or chain."""
    return b"".join((LABEL_CHAIN_RECORD, _VERSION, viewer_fingerprint, epoch_id,
                     _U32.pack(ratchet_index), _str8(camera), bytes((stream,)), chain_id,
                     _U64.pack(start_period)))


class Epoch:
    """The Archiver's side of one viewer's epoch: KEK0 sent once (RSA-OAEP), then one
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
        if recipient.oaep_hash.is_ec:
            ciphertext = ec_seal(recipient, LABEL_EC_EPOCH_OPENER + epoch_id, kek0, rng)
        else:
            ciphertext = recipient.encrypt(LABEL_EPOCH_OPENER + epoch_id + kek0)
        opener = EpochOpener(epoch_id, recipient.fingerprint, recipient.oaep_hash, period_s,
                             start_period, ciphertext)
        return cls(epoch_id, recipient.fingerprint, period_s, start_period, kek0), opener

    @property
    def index(self) -> int:
        """The current ratchet step."""
        return self._index

    def index_at(self, now_ms: int) -> int:
        return now_ms // (self.period_s * 1000) - self.start_period

    def usable_at(self, now_ms: int) -> bool:
        """False once ``wrap(now_ms)`` would refuse: start a new epoch then."""
        return self._index <= self.index_at(now_ms) <= max_ratchet_index(self.period_s)

    def wrap_chain(self, chain: KeyChain, seed: bytes, now_ms: int, rng: Rng = os.urandom
                   ) -> ChainRecord:
        """Wrap ``chain``'s starting state ``seed`` for this viewer under the KEK of now's key
        period."""
        index = self.index_at(now_ms)
        if index < self._index:
            raise ValueError("The clock went back behind this epoch's ratchet (KEKs already "
                             "erased cannot be recovered); start a new epoch.")
        if index > max_ratchet_index(self.period_s):
            raise ValueError("This epoch has outlived its day; start a new epoch.")
        kek = self._kek
        assert kek is not None
        while self._index < index:
            kek = ratchet_kek(kek, self.epoch_id)
            self._index += 1
        self._kek = kek
        # Random nonce: per KEK_i only the chains started in one period are wrapped (one per
        # camera stream, or a few), far below the 2^32 limit for random 96-bit GCM nonces.
        nonce = rng(NONCE_LEN)
        ad = chain_record_ad(self.viewer_fingerprint, self.epoch_id, index, chain.camera,
                             chain.stream, chain.chain_id, chain.start_period)
        wrapped = AESGCM(kek).encrypt(nonce, seed, ad)
        return ChainRecord(self.epoch_id, index, chain.camera, chain.stream, chain.chain_id,
                           chain.start_period, nonce, wrapped)


def open_epoch_opener(identity: Identity | EcIdentity, opener: EpochOpener) -> bytes:
    """KEK0 of an epoch: one RSA-OAEP decryption (EC viewers: one ECDH) on the viewer's token.

    The plaintext must carry the epoch-opener label and this opener's epoch id, so a login
    challenge (or any other ciphertext) can never be passed off as an opener, and an opener
    cannot be moved to another epoch.
    """
    if not hmac.compare_digest(opener.viewer_fingerprint, fingerprint(identity.certificate)):
        raise NoMatchingIdentity(
            "The epoch opener is addressed to another viewer certificate; open the stream "
            "with the identity it was made for.")
    if OaepHash(opener.oaep_hash).is_ec:
        return ec_open(identity, LABEL_EC_EPOCH_OPENER + opener.epoch_id, opener.ciphertext)
    if not isinstance(identity, Identity) or _is_ec(identity):
        raise IntegrityError()  # an EC identity cannot have a matching RSA opener
    plaintext = identity.rsa_decrypt(opener.ciphertext, OaepHash(opener.oaep_hash))
    expected = LABEL_EPOCH_OPENER + opener.epoch_id
    if (len(plaintext) != len(expected) + KEY_LEN
            or not hmac.compare_digest(plaintext[:len(expected)], expected)):
        raise IntegrityError()
    return plaintext[len(expected):]


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
    """The chain's starting state S_0 in ``record``; IntegrityError unless it was wrapped for
    this viewer, epoch, ratchet step, camera stream, chain id and start period."""
    ad = chain_record_ad(viewer_fingerprint, record.epoch_id, record.ratchet_index,
                         record.camera, record.stream, record.chain_id, record.start_period)
    try:
        return AESGCM(kek).decrypt(record.nonce, record.wrapped, ad)
    except InvalidTag:
        raise IntegrityError() from None


# --- EC P-256 viewers: ephemeral-static ECDH + HKDF-SHA256 + AES key wrap ------------------
def _is_ec(identity: Identity | EcIdentity) -> bool:
    return isinstance(identity.certificate.public_key(), ec.EllipticCurvePublicKey)


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def _ec_wrapping_key(shared: bytes, enc: bytes, recipient_point: bytes, info: bytes) -> bytes:
    # As HPKE's DHKEM(P-256, HKDF-SHA256): the KDF input binds the ephemeral and the recipient
    # public keys; ``info`` separates epoch openers (with their epoch id) from login challenges.
    return HKDF(hashes.SHA256(), KEY_LEN, salt=LABEL_EC_SALT + enc + recipient_point,
                info=info).derive(shared)


def ec_seal(recipient: Recipient, info: bytes, secret: bytes, rng: Rng = os.urandom) -> bytes:
    """``enc || AES-KW(K, secret)``: enc is a fresh ephemeral P-256 point (65 bytes), K the
    HKDF-SHA256 of the ECDH secret with the recipient's key. ``secret`` is 32 bytes (-> 105)."""
    public = recipient.certificate.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise TypeError("ec_seal needs an EC P-256 recipient.")
    while True:  # a scalar in [1, n-1] from the rng (deterministic rngs make test vectors)
        scalar = int.from_bytes(rng(32), "big")
        if 1 <= scalar < _P256_ORDER:
            break
    ephemeral = ec.derive_private_key(scalar, ec.SECP256R1())
    enc = _point(ephemeral.public_key())
    shared = ephemeral.exchange(ec.ECDH(), public)
    key = _ec_wrapping_key(shared, enc, _point(public), info)
    return enc + aes_key_wrap(key, secret)


def ec_open(identity: Identity | EcIdentity, info: bytes, ciphertext: bytes) -> bytes:
    """The 32-byte secret of an ``ec_seal`` ciphertext: one ECDH on the viewer's token. Any
    failure (malformed point, another key, another ``info``, altered bytes) is IntegrityError."""
    public = identity.certificate.public_key()
    if (not isinstance(identity, EcIdentity) or not isinstance(public, ec.EllipticCurvePublicKey)
            or len(ciphertext) != EC_POINT_LEN + KEY_LEN + 8):
        raise IntegrityError()
    enc, wrapped = ciphertext[:EC_POINT_LEN], ciphertext[EC_POINT_LEN:]
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), enc)  # on the curve
    except ValueError:
        raise IntegrityError() from None
    shared = identity.ecdh(enc)
    key = _ec_wrapping_key(shared, enc, _point(public), info)
    try:
        return aes_key_unwrap(key, wrapped)
    except InvalidUnwrap:
        raise IntegrityError() from None


# --- login: proof of possession of the viewer's token -------------------------------------
def _proof(secret: bytes, context: bytes) -> bytes:
    proof_key = HKDF(hashes.SHA256(), 32, salt=None, info=LABEL_LOGIN_PROOF).derive(secret)
    return hmac.new(proof_key, context, hashlib.sha256).digest()


def make_login_challenge(recipient: Recipient, rng: Rng = os.urandom) -> tuple[bytes, bytes]:
    """(ciphertext for the viewer, secret the Archiver keeps to check the answer)."""
    secret = rng(SECRET_LEN)
    if recipient.oaep_hash.is_ec:
        return ec_seal(recipient, LABEL_EC_LOGIN_CHALLENGE, secret, rng), secret
    return recipient.encrypt(LABEL_LOGIN_CHALLENGE + secret), secret


def answer_login_challenge(identity: Identity | EcIdentity, ciphertext: bytes,
                           oaep_hash: OaepHash, context: bytes) -> bytes:
    """Decrypt a challenge on the token and answer with an HMAC over ``context``.

    Refuses (IntegrityError) any plaintext without the login label: otherwise a hostile
    Archiver could send an epoch opener as a "challenge" and use the viewer's token to open
    it. The answer never reveals the secret, only a MAC keyed by a value derived from it.
    """
    if oaep_hash.is_ec:
        # The label is the HKDF info: an epoch opener's point yields another wrapping key,
        # so the unwrap fails and the token cannot be used as an oracle for openers.
        return _proof(ec_open(identity, LABEL_EC_LOGIN_CHALLENGE, ciphertext), context)
    if not isinstance(identity, Identity) or _is_ec(identity):
        raise IntegrityError()
    plaintext = identity.rsa_decrypt(ciphertext, oaep_hash)
    if (len(plaintext) != len(LABEL_LOGIN_CHALLENGE) + SECRET_LEN
            or not plaintext.startswith(LABEL_LOGIN_CHALLENGE)):
        raise IntegrityError()
    return _proof(plaintext[len(LABEL_LOGIN_CHALLENGE):], context)


def verify_login_proof(secret: bytes, context: bytes, proof: bytes) -> bool:
    return hmac.compare_digest(_proof(secret, context), proof)


LABEL_LOGIN_CONTEXT = b"FSE1 login\x00"


@dataclass(frozen=True)
class LoginChallenge:
    """The Archiver's login challenge (a viewer's or an admin's), as its JSON answer carries
    it: the Archiver's certificate, the challenge id, and the challenge encrypted to the
    certificate logging in."""

    archiver_certificate: x509.Certificate
    challenge_id: bytes
    ciphertext: bytes
    oaep_hash: OaepHash

    @classmethod
    def from_answer(cls, answer: Any) -> LoginChallenge:
        """ArchiverFailed if the answer is not a well-formed challenge."""
        try:  # a non-mapping answer fails its first lookup with TypeError
            return cls(load_certificate(str(answer["archiver_certificate"]).encode()),
                       bytes.fromhex(answer["challenge_id"]),
                       base64.b64decode(answer["ciphertext"], validate=True),
                       OaepHash.from_label(str(answer["oaep_hash"])))
        except (KeyError, TypeError, ValueError, binascii.Error, CertificateError):
            raise ArchiverFailed("The Archiver's login challenge is malformed.") from None


def login_context(archiver_fingerprint: bytes, viewer_fingerprint: bytes,
                  challenge_id: bytes) -> bytes:
    """What a login proof is a MAC over: binds it to this Archiver, this viewer and this
    challenge, so a proof cannot be relayed to another Archiver or replayed."""
    return LABEL_LOGIN_CONTEXT + archiver_fingerprint + viewer_fingerprint + challenge_id


LABEL_ADMIN_LOGIN_CONTEXT = b"FSE1 admin login\x00"


def admin_login_context(archiver_fingerprint: bytes, admin_fingerprint: bytes,
                        challenge_id: bytes) -> bytes:
    """What an admin's login proof is a MAC over: as ``login_context``, under its own label, so
    a viewer's login proof can never open an admin session (one certificate may be both)."""
    return LABEL_ADMIN_LOGIN_CONTEXT + archiver_fingerprint + admin_fingerprint + challenge_id
