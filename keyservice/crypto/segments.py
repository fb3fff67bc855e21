"""Segments: the minute keys of a camera data stream and the AES-256-GCM sealing of its
segments, with the key commitment the signed manifest carries (format v2, "Segments").

Nonces are derived from the segment sequence number; the associated data binds the camera,
data stream, sequence number, capture time, duration, key id and flags. Every decryption
failure is the opaque ``IntegrityError``.

Pure: no I/O.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyservice.errors import IntegrityError
from keyservice.format import (
    ID_LEN,
    KEY_LEN,
    MAX_SEGMENT_BODY,
    SEGMENT_LAST,
    TAG_LEN,
    VERSION,
    DataStream,
    Segment,
    validate_name,
)
from keyservice.labels import LABEL_KEY_COMMITMENT, LABEL_SEGMENT
from keyservice.records import FrozenRecord

Rng = Callable[[int], bytes]

_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_VERSION = _U16.pack(VERSION)
_NONCE_PAD = bytes(4)
_SEGMENT_AD_TAIL = struct.Struct(">QQI16sB")  # seq, capture_ms, duration_ms, key_id, flags


def _str8(name: str) -> bytes:
    raw = name.encode("ascii")
    return bytes((len(raw),)) + raw


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class PeriodKey(FrozenRecord):
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
                   ) -> PeriodKey:
    """A standalone random key with a random id, outside any chain: for tests and benchmarks
    of the segment layer (a reader can only use it when given it, ``known_keys``)."""
    key_id = rng(ID_LEN)
    key = rng(KEY_LEN)
    return PeriodKey(camera, stream, key_id, key, now_ms)

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


def seal_segment(key: PeriodKey, seq: int, capture_ms: int, plaintext: bytes, flags: int = 0,
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
    # Every field was checked above or by PeriodKey: skip re-checking on the hot path.
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
