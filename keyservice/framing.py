"""Framing of a fusion stream: cutting arriving bytes into records, the buffers they are
assembled in, and the END record's transcript hash.

The record codec (dataclasses, exact encoding, strict decoding) is ``keyservice.format``; this
module only knows where records begin and end, and checks the prefix and each record's type and
length before buffering it. Split from ``format.py`` in format v2.

Pure: no I/O, no cryptography beyond SHA-256.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from keyservice.errors import FormatError
from keyservice.format import (
    HASH_LEN,
    LABEL_TRANSCRIPT,
    MAGIC,
    PREFIX_LEN,
    RECORD_HEADER,
    RECORD_HEADER_LEN,
    VERSION,
    RawRecord,
    Record,
    RecordType,
    check_record_header,
    decode_body,
    stream_prefix,
)


class Transcript:
    """The END record's ``transcript_hash``, built incrementally:
    SHA-256(``"FSE1 transcript\\x00"`` || prefix || SHA-256(record) for every record before END).

    Hashing the records' digests instead of their bytes lets a reader and a writer reuse the
    segment digests they need for the manifests anyway, so segment bytes are hashed once.
    A list of fixed-size digests parses unambiguously, so the hash still fixes the exact
    sequence of records (order, presence, content) unless SHA-256 collides.
    """

    __slots__ = ("_hash",)

    def __init__(self) -> None:
        self._hash = hashlib.sha256(LABEL_TRANSCRIPT + stream_prefix())

    def add(self, digest: bytes) -> None:
        """Append the SHA-256 digest of the next record (see :func:`record_digest`)."""
        if len(digest) != HASH_LEN:
            raise ValueError("A transcript entry is the 32-byte SHA-256 of one record.")
        self._hash.update(digest)

    def digest(self) -> bytes:
        return self._hash.digest()



class BufferPool:
    """Reusable buffers into which a consumer lets the splitter copy large records, instead
    of a fresh allocation per record.

    Why: fresh memory costs a page fault per 4 KiB the first time it is touched, and glibc
    returns freed blocks of this size to the kernel at once, so a reader copying each 1 MiB
    segment into new memory spent about as long in page faults as in SHA-256. Only a consumer
    that knows when a record's bytes are no longer read may use a pool: a record copied here
    is a read-only view of a buffer that :meth:`give_back` makes reusable. Records of
    ``min_size`` to ``max_size`` bytes are pooled; idle buffers total at most ``max_idle``.
    """

    def __init__(self, min_size: int = 256 * 2**10, max_size: int = 8 * 2**20,
                 max_idle: int = 16 * 2**20) -> None:
        self.min_size = min_size
        self.max_size = max_size
        self.max_idle = max_idle
        self._idle: list[bytearray] = []
        self._idle_bytes = 0
        self._lent: dict[int, bytearray] = {}

    def take(self, size: int) -> bytearray | None:
        """A buffer of at least ``size`` bytes, or None if records of that size are not pooled."""
        if not self.min_size <= size <= self.max_size:
            return None
        # The smallest idle buffer that fits, found by position: list.remove() would compare
        # contents and could take out an equal-looking other buffer, lending one twice.
        fits = [(len(buf), i) for i, buf in enumerate(self._idle) if len(buf) >= size]
        if fits:
            buf = self._idle.pop(min(fits)[1])
            self._idle_bytes -= len(buf)
        else:  # headroom, so that segments of varying size reuse it
            buf = bytearray(min(size + size // 4, self.max_size))
        self._lent[id(buf)] = buf
        return buf

    def give_back(self, raw: RawRecord) -> None:
        """Make the buffer behind ``raw`` reusable (no-op for records not from this pool).
        The caller guarantees that nothing reads ``raw`` or a view of it any more."""
        if not isinstance(raw, memoryview):
            return
        buf = self._lent.pop(id(raw.obj), None)
        if buf is not None and buf is raw.obj and self._idle_bytes + len(buf) <= self.max_idle:
            self._idle.append(buf)
            self._idle_bytes += len(buf)


class RecordSplitter:
    """Cuts a byte stream, arriving in arbitrary pieces, into records.

    Consumes and checks the prefix first (an unknown version is named in the error), checks
    each record's type and length as soon as its 5-byte header is there (so no more than one
    bounded record is ever buffered), and refuses any byte after the END record. Once it has
    raised, it stays failed.

    Each record's bytes are copied at most once: a record that arrives in several pieces is
    joined once when complete (until then its pieces are views of the fed ``bytes``, so an
    incomplete record pins at most one fed piece beyond its own bytes), and one that fills at
    least half of a fed piece is handed out as a read-only view of that piece instead of a
    copy. A view keeps its piece alive, which is why smaller records are copied: a record a
    consumer retains never pins more than twice its own size. Given a :class:`BufferPool`,
    the copies of large records go into its reused buffers instead of fresh memory.
    """

    def __init__(self, buffers: BufferPool | None = None) -> None:
        self._buffers = buffers  # where large split records are assembled, if given
        self._prefix = b""  # the prefix bytes received so far, until it is complete
        self._prefix_done = False
        self._head = b""  # a record's type and length, while they arrive in pieces
        self._kind: RecordType | None = None  # set while a record's body is arriving
        self._pieces: list[RawRecord] = []  # the incomplete record: header, body pieces
        self._missing = 0  # body bytes still to come
        self._ended = False
        self._failed = False

    @property
    def finished_cleanly(self) -> bool:
        """True if the prefix was read and no partial record is left over."""
        return (self._prefix_done and not self._failed and not self._head
                and self._kind is None)

    @property
    def ended(self) -> bool:
        return self._ended

    def feed(self, data: bytes) -> list[tuple[Record, RawRecord]]:
        """All records completed by ``data``, each with its exact encoded bytes."""
        return list(self.iter_feed(data))

    def iter_feed(self, data: bytes) -> Iterator[tuple[Record, RawRecord]]:
        """Like :meth:`feed`, one record at a time: a consumer can act on (and fail at) a
        record before a later one is parsed, so errors come in stream order however the
        bytes are chunked."""
        if self._failed:
            raise FormatError("The stream already failed to parse; start over.")
        if not data:
            return
        if self._ended:
            self._fail("Bytes follow the end record; nothing may follow it.")
        if type(data) is not bytes:
            # Records view (or keep pieces of) what is fed: it must not change afterwards.
            data = bytes(data)
        size = len(data)
        try:
            pos = 0 if self._prefix_done else self._read_prefix(data)
            if pos < 0:
                return
            view = memoryview(data)
            while pos < size:
                start = pos  # where this record starts, if it starts in this piece
                if self._kind is None:
                    if self._head or size - pos < RECORD_HEADER_LEN:
                        take = RECORD_HEADER_LEN - len(self._head)
                        self._head += data[pos:pos + take]
                        pos = min(size, pos + take)
                        if len(self._head) < RECORD_HEADER_LEN:
                            return
                        head, self._head, start = self._head, b"", -1
                    else:
                        head = data[pos:pos + RECORD_HEADER_LEN]
                        pos += RECORD_HEADER_LEN
                    record_type, length = RECORD_HEADER.unpack(head)
                    self._kind = check_record_header(record_type, length)
                    self._pieces = [head]
                    self._missing = length
                else:
                    start = -1
                take = min(self._missing, size - pos)
                if take:
                    self._pieces.append(view[pos:pos + take])
                    pos += take
                    self._missing -= take
                if self._missing:
                    return  # pos == size: the rest comes with a later piece
                kind, self._kind = self._kind, None
                pieces, self._pieces = self._pieces, []
                if start < 0:
                    raw = self._copy(pieces)  # the one copy of a split record
                elif 2 * (pos - start) >= size:
                    raw = view[start:pos]  # most of the piece: no copy at all
                else:
                    pooled = self._pooled([view[start:pos]], pos - start)
                    raw = data[start:pos] if pooled is None else pooled
                record = decode_body(kind, memoryview(raw)[RECORD_HEADER_LEN:])
                if kind == RecordType.END:
                    self._ended = True
                    yield record, raw
                    if pos != size:
                        self._fail("Bytes follow the end record; nothing may follow it.")
                    return
                yield record, raw
        except FormatError:
            self._failed = True
            raise

    def _copy(self, pieces: list[RawRecord]) -> RawRecord:
        """The record's bytes in memory of their own: in a pooled buffer if there is one."""
        pooled = self._pooled(pieces, sum(map(len, pieces)))
        return b"".join(pieces) if pooled is None else pooled

    def _pooled(self, pieces: list[RawRecord], size: int) -> memoryview | None:
        buf = None if self._buffers is None else self._buffers.take(size)
        if buf is None:
            return None
        pos = 0
        for piece in pieces:
            buf[pos:pos + len(piece)] = piece
            pos += len(piece)
        return memoryview(buf)[:size].toreadonly()

    def _read_prefix(self, data: bytes) -> int:
        """Consume prefix bytes; the position after the prefix in ``data``, or -1 if more
        bytes are needed."""
        take = PREFIX_LEN - len(self._prefix)
        have = self._prefix + data[:take]
        # Refuse a wrong magic at the first differing byte: garbage fails fast.
        if have[:len(MAGIC)] != MAGIC[:len(have)]:
            self._fail("This is not a fusion stream (wrong magic bytes).")
        if len(have) < PREFIX_LEN:
            self._prefix = have
            return -1
        version = int.from_bytes(have[len(MAGIC):PREFIX_LEN], "big")
        if version != VERSION:
            self._fail(f"Unsupported fusion stream version {version}; this reader supports "
                       f"version {VERSION} only.")
        self._prefix = b""
        self._prefix_done = True
        return take

    def _fail(self, message: str) -> None:
        self._failed = True
        raise FormatError(message)
