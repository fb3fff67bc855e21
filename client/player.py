"""The viewer library: turns fusion-stream bytes into verified MPEG-TS, and says what it got.

``Player`` drives ``keyservice.reader.StreamReader`` (which checks the Archiver's signatures, the
manifest chain, key commitments and GCM tags, and releases a segment only once all of that
holds), writes each released segment, and keeps the summary: segments, bytes, capture-time range,
gaps, token operations. ``FileOutput`` makes sure an output file only ever gets its final name
after the stream's signed end record verified; otherwise it is renamed ``FILE.incomplete``.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from keyservice.errors import (
    ArchiverMismatch,
    KeyServiceError,
    RangeIncomplete,
    StreamTruncated,
    UsageError,
)
from keyservice.exitcodes import ExitCode
from keyservice.format import Header
from keyservice.identity import Identity, fingerprint
from keyservice.records import FrozenRecord
from keyservice.request_policy import StreamRequest
from keyservice.timespec import format_ms

if TYPE_CHECKING:
    from cryptography import x509

    from keyservice.reader import (
        SegmentMissing,
        SegmentPlaintext,
        SegmentSkipped,
        StreamEnded,
        VerifiedKey,
    )

# keyservice.reader (with the crypto core) is imported when a Player is made: ``play`` has it
# imported in a thread while the login waits for the Archiver (client.preload, issue 23).

__all__ = [
    "EXACT_GAP_MS",
    "GAP_FACTOR",
    "MIN_GAP_MS",
    "MISSING",
    "NOT_AUTHORIZED",
    "NO_RECORDING",
    "DiscardOutput",
    "FileOutput",
    "Gap",
    "MemoryOutput",
    "NothingAuthorized",
    "Output",
    "OutputFailed",
    "PartOutput",
    "PipeOutput",
    "Player",
    "Position",
    "ReaderClosed",
    "StreamTruncated",
    "Summary",
    "archiver_pin_check",
]

# StreamTruncated (50) and RangeIncomplete (53, also for segments that did not come) are
# keyservice.errors' own; StreamTruncated stays importable from here.


class NothingAuthorized(KeyServiceError):
    """Every segment in the stream was recorded while this viewer held no key for it."""

    exit_code = ExitCode.NOTHING_AUTHORIZED


class OutputFailed(KeyServiceError):
    """The decrypted video could not be written (disk full, permissions, a broken output)."""

    exit_code = ExitCode.OUTPUT_FAILED


class ReaderClosed(OutputFailed):
    """The program reading the video from standard output closed the pipe (``| ffprobe -``,
    ``| head -c N``, a player window closed). Its choice, not a failure of ours: what it read
    was verified, and it has all it wanted. The stream commands stop and exit 0 (docs/client.md)."""

    exit_code = ExitCode.OK


NOT_AUTHORIZED = "not authorized"
MISSING = "missing"
NO_RECORDING = "no recording"
# A capture-time jump is a gap when it exceeds both this and GAP_FACTOR x the typical interval
# between segments (segments last 1-10 s; a jump of several segment lengths is a real hole).
MIN_GAP_MS = 5_000
GAP_FACTOR = 3
# With signed durations a gap is exact: more than this between one segment's end and the next
# one's start (the Archiver's own tolerance, archiver.cameras.GAP_TOLERANCE_MS).
EXACT_GAP_MS = 1_000


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class Gap(FrozenRecord):
    """A hole in what was written: nothing recorded, or recorded while not authorized."""

    camera: str
    stream: int
    from_ms: int
    to_ms: int
    kind: str
    segments: int = 0  # segments skipped (kind NOT_AUTHORIZED or MISSING)

    def describe(self) -> str:
        """One sentence for a person."""
        span = f"{format_ms(self.from_ms)} .. {format_ms(self.to_ms)}"
        if self.kind == NOT_AUTHORIZED:
            return (f"camera {self.camera}: {self.segments} segment(s) {span} withheld: not "
                    "authorized for you (the Archiver's signed recipients of their key chain, "
                    "from its start and its joins, do not list this viewer)")
        if self.kind == MISSING:
            return (f"camera {self.camera}: {self.segments} segment(s) {span} MISSING: "
                    "recorded (signed manifests list them) but not delivered, and nothing "
                    "signed says you were not authorized")
        return f"camera {self.camera}: no recording between {span}"


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class Position(FrozenRecord):
    """The last verified segment written: where output stops if the stream fails after it."""

    camera: str
    stream: int
    seq: int
    capture_ms: int

    def describe(self) -> str:
        """One sentence for a person."""
        return (f"segment {self.seq} of camera {self.camera} "
                f"(captured {format_ms(self.capture_ms)})")


@dataclass
class Summary:
    """What a stream gave: segments written, skipped (not authorized) and missing, bytes,
    signed capture-time range, gaps, token operations, whether its signed end record came."""

    segments: int = 0
    skipped: int = 0
    missing: int = 0
    bytes: int = 0
    first_ms: int | None = None
    last_ms: int | None = None
    gaps: list[Gap] = field(default_factory=list)
    epoch_openings: int = 0  # token operations spent on epoch openers
    ended: bool = False
    end_reason: int | None = None
    last: Position | None = None


class Output(Protocol):
    """Where verified video goes: ``write`` each released segment, then ``commit`` once the
    stream verified to its end, or ``abort`` (both may return the file they left)."""

    def write(self, data: bytes) -> None:
        """Take the next verified segment's bytes."""
        ...

    def commit(self) -> Path | None:
        """The stream verified to its end: make the output final (returns its file)."""
        ...

    def abort(self) -> Path | None:
        """The stream failed: keep what was written under a name that says so, or nothing."""
        ...


class FileOutput:
    """Writes to FILE.partial; ``commit`` renames to FILE (only after a verified end record),
    ``abort`` to FILE.incomplete so a cut-off export never looks complete. Opened at once, so a
    bad path fails before the Archiver and the token are bothered."""

    def __init__(self, path: Path) -> None:
        if path.exists() and not path.is_file():
            # FILE.partial renamed over a device or a pipe would replace it (/dev/null made a
            # regular file, as root); ``open_output`` writes to those directly instead.
            raise UsageError(f"{path} is not a regular file; give a file name to save to.")
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.incomplete = path.with_name(path.name + ".incomplete")
        try:
            self._fh: BinaryIO | None = open(self.partial, "wb")
        except OSError as exc:
            raise OutputFailed(f"Cannot write {self.partial}: {exc.strerror or exc}.") from None
        self.written = 0

    def write(self, data: bytes) -> None:
        """Take the next verified segment's bytes."""
        assert self._fh is not None
        try:
            self._fh.write(data)
        except OSError as exc:
            raise OutputFailed(f"Cannot write {self.partial}: {exc.strerror or exc}.") from None
        self.written += len(data)

    def commit(self) -> Path:
        """The stream verified to its end: make the output final."""
        assert self._fh is not None
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
            os.replace(self.partial, self.path)
        except OSError as exc:
            raise OutputFailed(f"Cannot finish {self.path}: {exc.strerror or exc}.") from None
        return self.path

    def abort(self) -> Path | None:
        """Keep what was verified under a name that says it is incomplete; None if empty."""
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None
        try:
            if self.written == 0:
                self.partial.unlink(missing_ok=True)
                return None
            os.replace(self.partial, self.incomplete)
            return self.incomplete
        except OSError:
            return self.partial if self.partial.exists() else None


class PipeOutput:
    """Writes each verified segment to a pipe at once (live viewing: ``-o - | ffplay -``), or
    to a named pipe or device it opened (``-o /dev/null``; ``owned``: closed at the end, so the
    reader sees the end of the video)."""

    def __init__(self, stream: BinaryIO, name: str = "standard output",
                 owned: bool = False) -> None:
        self._stream = stream
        self._name = name
        self._owned = owned

    def write(self, data: bytes) -> None:
        """Take the next verified segment's bytes."""
        try:
            self._stream.write(data)
            self._stream.flush()
        except BrokenPipeError:
            raise ReaderClosed("The program reading the video closed the pipe; stopped.") \
                from None
        except OSError as exc:
            raise OutputFailed(f"Cannot write the video to {self._name}: "
                               f"{exc.strerror or exc}.") from None

    def commit(self) -> None:
        """The stream verified to its end: make the output final."""
        self._close()

    def abort(self) -> None:
        """The stream failed: see ``Output.abort``."""
        self._close()

    def _close(self) -> None:
        if self._owned and not self._stream.closed:
            try:
                self._stream.close()
            except OSError:
                pass  # the reader went away: what it read was verified


class MemoryOutput:
    """Keeps the verified video in memory (``data()`` once the stream verified)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        """Take the next verified segment's bytes."""
        self._parts.append(data)

    def commit(self) -> None:
        """The stream verified to its end: make the output final."""
        return None

    def abort(self) -> None:
        """The stream failed: see ``Output.abort``."""
        self._parts.clear()

    def data(self) -> bytes:
        """Everything written so far, as one bytes object."""
        if len(self._parts) != 1:
            self._parts = [b"".join(self._parts)]
        return self._parts[0]


class PartOutput:
    """One part's view of the command's output: writes go through; committing or aborting is
    the whole command's, once every part is played."""

    def __init__(self, output: Output) -> None:
        self._output = output

    def write(self, data: bytes) -> None:
        """Write verified video to the command's output."""
        self._output.write(data)

    def commit(self) -> Path | None:
        """Nothing yet: the output is committed after the last part."""
        return None

    def abort(self) -> Path | None:
        """Nothing yet: the command aborts the output (keeping what verified)."""
        return None


class DiscardOutput:
    """Verifies without writing: the stream is checked to its signed end, the video dropped
    (a grantor checks the range it grants; the web page takes segments through on_segment)."""

    def write(self, data: bytes) -> None:
        """Take the next verified segment's bytes."""
        pass

    def commit(self) -> None:
        """The stream verified to its end: make the output final."""
        return None

    def abort(self) -> None:
        """The stream failed: see ``Output.abort``."""
        return None


def archiver_pin_check(pinned_fingerprint: bytes) -> Callable[[x509.Certificate], None]:
    """The reader's Archiver check: the stream must be signed by the certificate logged in to
    (and pinned), or it could be someone else's validly signed stream."""
    def check(cert: x509.Certificate) -> None:
        if fingerprint(cert) != pinned_fingerprint:
            raise ArchiverMismatch(
                f"The stream names Archiver certificate sha256 {fingerprint(cert).hex()}, not "
                f"the pinned one (sha256 {pinned_fingerprint.hex()}); nothing was decrypted.")
    return check


def _median(values: Iterable[int]) -> float:
    """statistics.median's value, without importing statistics (its import is a start-up
    cost the first segment would pay: issue 23)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


class Player:
    """Feeds fusion-stream bytes to the reader and writes what it releases, in order.

    Always bound to a request: the stream must answer exactly what was asked (nonce, camera,
    mode, range, signed capture times, freshness), so a stream saved from another request and
    replayed is refused. A saved stream verified offline is the one exception, and it is
    explicit: ``Player.for_saved_stream``.
    """

    def __init__(self, identity: Identity, check_archiver: Callable[[x509.Certificate], None],
                 output: Output, *, request: StreamRequest,
                 on_segment: Callable[[SegmentPlaintext], None] | None = None,
                 min_gap_ms: int = MIN_GAP_MS,
                 critical: Callable[[], AbstractContextManager[object]] = nullcontext,
                 known_keys: Mapping[bytes, bytes] | None = None) -> None:
        """``request``: what was asked for (client.session.playback_request/live_request);
        required. ``known_keys``: minute keys from an opened access grant (see StreamReader).
        ``critical`` wraps writing and counting one segment (the CLI defers Ctrl-C there,
        so the summary and "output stops after" always match what was written)."""
        if not isinstance(request, StreamRequest):
            # Not a type check for its own sake: None here would silently turn off the
            # binding that refuses a replayed stream (issue 24).
            raise TypeError("Player needs the StreamRequest the stream answers; for a saved "
                            "stream verified offline use Player.for_saved_stream.")
        self._setup(identity, check_archiver, output, request, on_segment, min_gap_ms,
                    critical, known_keys)

    @classmethod
    def for_saved_stream(cls, identity: Identity,
                         check_archiver: Callable[[x509.Certificate], None], output: Output, *,
                         on_segment: Callable[[SegmentPlaintext], None] | None = None,
                         min_gap_ms: int = MIN_GAP_MS,
                         critical: Callable[[], AbstractContextManager[object]] = nullcontext,
                         ) -> Player:
        """A player for a stream saved earlier (``--save-stream``) and verified offline:
        signatures, chain, commitments and tags are checked, but no request is, because the
        stream answered one in the past. Its header says which; never use this for a stream
        fetched now (that is what ``Player(..., request=...)`` is for)."""
        player = cls.__new__(cls)
        player._setup(identity, check_archiver, output, None, on_segment, min_gap_ms,
                      critical, None)
        return player

    def _setup(self, identity: Identity, check_archiver: Callable[[x509.Certificate], None],
               output: Output, request: StreamRequest | None,
               on_segment: Callable[[SegmentPlaintext], None] | None, min_gap_ms: int,
               critical: Callable[[], AbstractContextManager[object]],
               known_keys: Mapping[bytes, bytes] | None) -> None:
        from keyservice.reader import (
            SegmentMissing,
            SegmentPlaintext,
            SegmentSkipped,
            StreamEnded,
            StreamReader,
        )

        self.request = request
        self._reader = StreamReader(identity, check_archiver, request=request,
                                    known_keys=known_keys)
        # What each event the reader releases calls (its classes are final: no subclass).
        self._handlers: dict[type, Callable[[Any], None]] = {
            SegmentPlaintext: self._plaintext, SegmentSkipped: self._skipped,
            SegmentMissing: self._missing, StreamEnded: self._ended}
        self._output = output
        self._on_segment = on_segment
        self._critical = critical
        self._min_gap_ms = min_gap_ms
        self.summary = Summary()
        # Per (camera, stream): last capture time seen, recent intervals, an open skipped run.
        self._last_seen: dict[tuple[str, int], int] = {}
        self._last_end: dict[tuple[str, int], int | None] = {}
        self._intervals: dict[tuple[str, int], deque[int]] = {}
        self._skipped_run: dict[tuple[str, int], list[int]] = {}
        self._missing_run: dict[tuple[str, int], list[int]] = {}

    def feed(self, data: bytes) -> None:
        """Give the next bytes of the stream (any chunking); writes what they release."""
        try:
            events = self._reader.feed(data)
        finally:
            # Counted even when the feed fails: the token was used all the same.
            self.summary.epoch_openings = self._reader.token_operations
        for event in events:
            handler = self._handlers.get(type(event))
            if handler is not None:
                handler(event)

    def _ended(self, event: StreamEnded) -> None:
        self.summary.ended = True
        self.summary.end_reason = int(event.reason)

    @property
    def verified_keys(self) -> dict[bytes, VerifiedKey]:
        """The minute keys of the released segments, each checked against its signed key
        commitment (complete once ``finish`` returned)."""
        return self._reader.verified_keys

    @property
    def header(self) -> Header | None:
        """The stream's header once received (authenticated only once the END verified)."""
        return self._reader.header

    def finish(self) -> Summary:
        """Call at the end of the bytes. Raises StreamTruncated without a verified end record,
        NothingAuthorized when segments came but none this viewer could open."""
        for key in list(self._skipped_run):
            self._close_skipped(key)
        for key in list(self._missing_run):
            self._close_missing(key)
        if not self.summary.ended:
            raise StreamTruncated(
                "The stream stopped before the Archiver's signed end record: it was truncated, "
                "the connection was lost, or the Archiver dropped this viewer.")
        self._reader.finish()
        self.summary.epoch_openings = self._reader.token_operations
        if self.summary.missing:
            spans = "; ".join(g.describe() for g in self.summary.gaps if g.kind == MISSING)
            raise RangeIncomplete(
                f"The stream is authentic but incomplete: {self.summary.missing} recorded "
                f"segment(s) are missing ({spans}).",
                "Their keys were withheld or lost; ask the Archiver's admin (its index may "
                "have been tampered with).")
        if self.summary.segments == 0 and self.summary.skipped > 0:
            raise NothingAuthorized(
                f"All {self.summary.skipped} segment(s) in the range were recorded while this "
                "viewer was not authorized on the camera; there is no video it can decrypt.")
        return self.summary

    def where(self) -> str:
        """Where the written output stops, for error messages."""
        last = self.summary.last
        return f"after {last.describe()}" if last else "before the first segment"

    def run(self, chunks: Iterable[bytes]) -> Summary:
        """Feed every chunk, then ``finish``: the summary of a stream that verified to its
        signed end record (raises the reader's errors otherwise; the output is the caller's
        to commit or abort)."""
        for chunk in chunks:
            self.feed(chunk)
        return self.finish()

    # --- events -----------------------------------------------------------------------
    def _note_time(self, key: tuple[str, int], capture_ms: int, duration_ms: int) -> None:
        """Report a stretch with nothing recorded between consecutive segments: exactly, from
        the signed start and duration of the previous segment when it has one; otherwise from
        a capture-time jump well beyond the typical interval."""
        previous = self._last_seen.get(key)
        self._last_seen[key] = capture_ms
        previous_end = self._last_end.get(key)
        self._last_end[key] = capture_ms + duration_ms if duration_ms else None
        if previous is None:
            return
        if previous_end is not None:
            if capture_ms - previous_end > EXACT_GAP_MS:
                self.summary.gaps.append(Gap(key[0], key[1], previous_end, capture_ms,
                                             NO_RECORDING))
            return
        delta = capture_ms - previous
        recent = self._intervals.setdefault(key, deque(maxlen=16))
        typical = _median(recent) if recent else 0
        if delta > max(self._min_gap_ms, GAP_FACTOR * typical):
            self.summary.gaps.append(Gap(key[0], key[1], previous, capture_ms, NO_RECORDING))
        else:
            recent.append(delta)

    def _plaintext(self, event: SegmentPlaintext) -> None:
        key = (event.camera, int(event.stream))
        self._close_skipped(key)
        self._close_missing(key)
        self._note_time(key, event.capture_ms, event.duration_ms)
        s = self.summary
        with self._critical():
            # Only verified segments reach here: the reader released it after its manifest's
            # signature and chain, the key commitment and the GCM tag all checked.
            self._output.write(event.data)
            s.segments += 1
            s.bytes += len(event.data)
            s.first_ms = event.capture_ms if s.first_ms is None else min(s.first_ms,
                                                                         event.capture_ms)
            end = event.capture_ms + event.duration_ms
            s.last_ms = end if s.last_ms is None else max(s.last_ms, end)
            s.last = Position(event.camera, int(event.stream), event.seq, event.capture_ms)
        if self._on_segment is not None:
            self._on_segment(event)

    def _missing(self, event: SegmentMissing) -> None:
        key = (event.camera, int(event.stream))
        self._close_skipped(key)
        self._note_time(key, event.capture_ms, event.duration_ms)
        self.summary.missing += 1
        end = event.capture_ms + event.duration_ms
        run = self._missing_run.setdefault(key, [event.capture_ms, end, 0])
        run[1] = end  # the gap ends where its last segment does, not where it starts
        run[2] += 1

    def _close_missing(self, key: tuple[str, int]) -> None:
        run = self._missing_run.pop(key, None)
        if run is not None:
            self.summary.gaps.append(Gap(key[0], key[1], run[0], run[1], MISSING, run[2]))

    def _skipped(self, event: SegmentSkipped) -> None:
        key = (event.camera, int(event.stream))
        self._close_missing(key)
        self._note_time(key, event.capture_ms, event.duration_ms)
        self.summary.skipped += 1
        end = event.capture_ms + event.duration_ms
        run = self._skipped_run.setdefault(key, [event.capture_ms, end, 0])
        run[1] = end  # the gap ends where its last segment does, not where it starts
        run[2] += 1

    def _close_skipped(self, key: tuple[str, int]) -> None:
        run = self._skipped_run.pop(key, None)
        if run is not None:
            self.summary.gaps.append(Gap(key[0], key[1], run[0], run[1], NOT_AUTHORIZED, run[2]))
