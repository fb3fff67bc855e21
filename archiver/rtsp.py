"""RTSP pull: the Archiver pulls each RTSP camera itself, in-process, and archives what it receives
through the same ``Archive.ingest_segment`` as pushed segments.

Why in-process (FFmpeg's libraries through PyAV) and not an ffmpeg subprocess pushing into our
own HTTP ingest, as before:
- the camera's credentials stay in the Archiver's own processes (its worker processes get them
  over a pipe): no ffmpeg argv (readable by every local user through ``ps``), no ingest token a
  local user could steal to forge segments;
- the puller sees what happened to each segment (archived, disk full, I/O error) and backs off,
  instead of ffmpeg PUTting into a refusal it never reads;
- it knows the camera's state (connecting, refused login, gone) precisely, for camera health.

The stream is copied, never re-encoded (H.264 and H.265 alike): packets are remuxed into MPEG-TS
segments that start at a keyframe and last about ``SEGMENT_S`` seconds. Each thread pulls one
camera; FFmpeg releases the GIL while it waits on the network. ``run_puller`` is one camera's
loop; it runs in the Archiver (``RtspSupervisor``) or in worker processes that pull groups of
cameras and hand segments back (archiver/rtsp_workers.py, the default: one interpreter's GIL
caps in-process pulling at about one core).
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Protocol

import av
import av.error

from archiver.cameras import SLEW_DIVISOR, CameraState
from archiver.storage import StorageFailed, StorageFull

log = logging.getLogger("archiver.rtsp")
SEGMENT_S = 2
OPEN_TIMEOUT_S = 10.0
# No packet for this long: the camera is gone (a live camera sends many packets per second).
READ_TIMEOUT_S = 5.0
BACKOFF_START_S = 0.5
# A camera that comes back must be pulled again within seconds: every second of backoff is
# lost video, and a connection attempt to an absent camera costs next to nothing.
BACKOFF_MAX_S = 2.0
# Wrong credentials do not fix themselves: retry rarely, so a camera is not hammered with logins
# (some lock the account) and the log is not flooded.
AUTH_BACKOFF_S = 60.0
STORAGE_BACKOFF_S = 5.0
# How long stopping a puller may wait for it to archive what it holds.
PULLER_STOP_S = OPEN_TIMEOUT_S + 1



class Ingest(Protocol):
    """Archive one segment of ``camera``. ``closed_at`` (``time.time()``) is when its last
    packet reached the puller: its arrival, however long it then waits to be archived.
    ``session`` names the RTSP session (one connection) it came from: within one, the stream's
    clock is continuous video, so the Archiver keeps the segments at their capture times even
    when it reads them late (archiver.cameras). ``captured_by`` (``time.time()``): the
    session's bound on when the segment's capture ended (``CaptureBound``), None if unknown."""

    def __call__(self, camera: str, data: bytes, closed_at: float, *,
                 session: int | None = None, captured_by: float | None = None) -> object: ...


def new_session() -> int:
    """A session id no other connection has, in any process (pullers may run in several): a new
    connection is never taken for the continuation of an old one."""
    return int.from_bytes(os.urandom(8), "big")


ReportProblem = Callable[[str, CameraState, str], None]
ReportFault = Callable[[str, str], None]  # (camera, what its stream did)


def redact(url: str) -> str:
    """The URL without its credentials, for logs and the API."""
    return re.sub(r"//[^/@]*@", "//***@", url)


class CaptureBound:
    """When a session's video was captured, at the latest, from when its packets were read.

    A packet cannot be read before it was captured, so each read gives ``read - pts`` as an
    upper bound on the session's offset between the camera's clock and ours, and the least of
    them is the tightest: the packets read while the puller still kept up. An overloaded puller
    reads the first segment of a session late; its arrival alone put the whole session that
    late (archiver.cameras, rule 2). The bound ages by 1/SLEW_DIVISOR of the time (a camera
    clock running slow makes the true offset grow, never faster than that), so it stays an
    upper bound. Pure arithmetic per packet: no system call beyond the clock."""

    def __init__(self) -> None:
        self._offset: float | None = None
        self._at = 0.0

    def observe(self, pts_s: float, read_at: float) -> None:
        """A video packet at ``pts_s`` (seconds of the session's clock) read at ``read_at``."""
        offset = read_at - pts_s
        if self._offset is not None:
            offset = min(offset, self._offset + (read_at - self._at) / SLEW_DIVISOR)
        self._offset, self._at = offset, read_at

    def captured_by(self, pts_s: float) -> float | None:
        """The latest ``pts_s`` of the session's clock can have been captured (None: no packet
        read yet)."""
        return None if self._offset is None else self._offset + pts_s


class StreamFault(Exception):
    """What a camera's stream did that the segmenter would not buffer (for camera health)."""


class _Segmenter:
    """Cuts a demuxed stream into MPEG-TS segments at video keyframes.

    Bounded, whatever the camera sends: a segment is cut when it would exceed ``max_bytes`` or
    has been built for ``max_s`` seconds of arrival time (keyframes that do not come, or whose
    timestamps do not advance); a packet larger than ``max_bytes`` on its own (a giant NAL) is
    dropped. After a cut that was not at a keyframe, packets are dropped until the next one (a
    segment must start with one to be decodable alone). Each such event is counted in
    ``faults`` and described in ``fault``, for the camera's health.

    A stream clock that goes back (a camera's encoder or RTSP server restarting it under a live
    connection) cuts the segment there too, and sets ``clock_restarted``: the MPEG-TS muxer
    refuses a decoding time that goes back, and that refusal used to end the whole connection
    (reported as "unreachable (Invalid argument)") and lose the seconds of reconnecting. A clock
    that goes back again within ``max_s`` is a fault (a broken clock, not a restart). A clock
    that does not advance at all is still refused by the muxer (the camera is unreachable with
    FFmpeg's reason): cutting there would make one segment of every frame."""

    def __init__(self, container: av.container.InputContainer, max_bytes: int = 32 * 2**20,
                 max_s: float = 20.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._input_streams = list(container.streams)
        self._video = next((s for s in self._input_streams if s.type == "video"), None)
        self._buffer: io.BytesIO | None = None
        self._output: av.container.OutputContainer | None = None
        self._streams: dict[int, av.stream.Stream] = {}
        self._first_pts: int | None = None
        self._max_bytes = max_bytes
        self._max_s = max_s
        self._clock = clock
        self._opened_at = clock()
        self._waiting_since: float | None = clock()  # for a keyframe to start a segment
        self._last_read = clock()
        self._last_dts: dict[int, int] = {}  # per input stream, the last muxed, since a restart
        self.clock_restarted: str | None = None  # set by add(), taken by the puller
        self._restarted_at: float | None = None
        self.faults = 0
        self.dropped_bytes = 0
        self.fault: str | None = None  # the latest, taken by the puller

    def _fault(self, message: str) -> None:
        self.faults += 1
        self.fault = message

    def add(self, packet: av.Packet) -> bytes | None:
        """Mux one packet; returns the segment it closed, if it started a new one."""
        if packet.dts is None or packet.size == 0:
            return None  # FFmpeg's flush packets and packets without timing
        self._skip_pause()
        is_video = packet.stream is self._video or self._video is None
        keyframe = is_video and packet.is_keyframe
        finished = None
        if packet.size > self._max_bytes:
            # One packet over the cap (a giant NAL): never buffered; what came before is kept.
            self.dropped_bytes += packet.size
            self._fault(f"the camera sent a {packet.size}-byte frame, over the segment cap of "
                        f"{self._max_bytes} bytes; dropped")
            finished = self.close()
            self._waiting_since = self._waiting_since or self._clock()
            return finished
        last_dts = self._last_dts.get(packet.stream.index)
        if last_dts is not None and packet.dts < last_dts:
            # The camera's clock went back: what came before is good video, and what follows
            # is not its continuation in time (the puller gives it a new session).
            self.clock_restarted = (f"its stream clock went back ({last_dts} -> {packet.dts} in "
                                    f"stream {packet.stream.index})")
            now = self._clock()
            if self._restarted_at is not None and now - self._restarted_at <= self._max_s:
                self._fault(f"the camera's stream clock went back twice within "
                            f"{now - self._restarted_at:.1f} s; segments were cut there")
            self._restarted_at = now
            self._last_dts.clear()
            finished = self.close()
            self._waiting_since = self._clock()
        if self._output is not None:
            reason = self._over_cap(packet)
            if reason is not None:
                self._fault(reason)
                finished = self.close()
                if not keyframe:
                    self._waiting_since = self._clock()
        if self._output is None:
            if self._video is not None and not keyframe:
                self.dropped_bytes += packet.size
                waited = self._clock() - (self._waiting_since or self._clock())
                if waited > self._max_s:
                    self._fault(f"no keyframe from the camera for {waited:.0f} s; its video "
                                "cannot be archived")
                    self._waiting_since = self._clock()  # reported again after as long
                return finished  # a segment starts with a keyframe, or it cannot be decoded alone
            self._open()
        elif keyframe and self._long_enough(packet):
            finished = self.close()
            self._open()
        if is_video and self._first_pts is None:
            self._first_pts = packet.pts
        self._last_dts[packet.stream.index] = packet.dts
        packet.stream = self._streams[packet.stream.index]
        assert self._output is not None
        self._output.mux(packet)
        return finished

    def _skip_pause(self) -> None:
        """Time this process did not read (frozen, starved by overload) is not the camera's: a
        camera silent that long would have hit READ_TIMEOUT_S. So the arrival-time caps do not
        count it, and an Archiver catching up does not cut (and lose) good video as faulty."""
        now = self._clock()
        paused = now - self._last_read - READ_TIMEOUT_S
        self._last_read = now
        if paused > 0:
            self._opened_at += paused
            if self._waiting_since is not None:
                self._waiting_since += paused

    def _over_cap(self, packet: av.Packet) -> str | None:
        assert self._buffer is not None
        if self._buffer.tell() + packet.size > self._max_bytes:
            return (f"a segment reached the cap of {self._max_bytes} bytes before a keyframe "
                    "with advancing timestamps came to cut it at; cut there")
        if self._clock() - self._opened_at > self._max_s:
            return (f"no usable keyframe for {self._max_s:.0f} s (none came, or their "
                    "timestamps did not advance); the segment was cut there")
        return None

    def close(self) -> bytes | None:
        """Finish the segment being built (also on disconnect: what arrived is good video)."""
        if self._output is None or self._buffer is None:
            return None
        self._output.close()
        data = self._buffer.getvalue()
        self._output = self._buffer = None
        self._first_pts = None
        return data or None

    def _open(self) -> None:
        self._buffer = io.BytesIO()
        self._output = av.open(self._buffer, "w", format="mpegts")
        self._streams = {s.index: self._output.add_stream_from_template(s)
                         for s in self._input_streams}
        self._opened_at = self._clock()
        self._waiting_since = None

    def _long_enough(self, packet: av.Packet) -> bool:
        if self._first_pts is None or packet.pts is None or packet.time_base is None:
            return False
        return (packet.pts - self._first_pts) * Fraction(packet.time_base) >= SEGMENT_S


class PullSink(Protocol):
    """Where a puller's results go: the Archiver's ingest (in-process) or the pipe to the
    Archiver (a worker process, archiver/rtsp_workers.py)."""

    def segment(self, camera: str, data: bytes, closed_at: float, session: int,
                captured_by: float | None = None) -> None:
        """A finished segment; ``closed_at`` (``time.time()``) is when its last packet reached
        the puller, the segment's arrival, however long it waits to be archived; ``session``:
        the connection it came from (``new_session``); ``captured_by``: when its capture ended
        at the latest (``CaptureBound``)."""

    def problem(self, camera: str, state: CameraState, message: str) -> None: ...

    def fault(self, camera: str, message: str) -> None: ...


class CameraPullers(Protocol):
    """What the Archiver's admin and app need of whatever pulls its RTSP cameras."""

    def start(self, camera: str, url: str) -> None: ...

    def stop(self, camera: str, wait_s: float = 0.0) -> None: ...

    def stop_all(self) -> None: ...


def run_puller(camera: str, url: str, stop: threading.Event, sink: PullSink,
               max_segment_bytes: int, max_segment_s: float) -> None:
    """Pull one camera until ``stop`` is set: connect, remux, hand segments to ``sink``; on
    failure report the camera's state and retry with backoff."""
    backoff = BACKOFF_START_S
    safe_url = redact(url)
    while not stop.is_set():
        log.info("camera %s: pulling %s", camera, safe_url)
        delay = backoff
        try:
            received = _pull(camera, url, stop, sink, max_segment_bytes, max_segment_s)
            problem, message = CameraState.UNREACHABLE, "the camera ended the stream"
            if received:
                backoff = BACKOFF_START_S
        except (av.error.HTTPUnauthorizedError, av.error.HTTPForbiddenError) as exc:
            problem, message = CameraState.AUTH_FAILED, _reason(exc)
            delay = AUTH_BACKOFF_S
        except av.error.FFmpegError as exc:
            problem, message = CameraState.UNREACHABLE, _reason(exc)
        except (StorageFull, StorageFailed) as exc:
            problem, message = CameraState.STALLED, str(exc)
            delay = STORAGE_BACKOFF_S
        except Exception as exc:  # a stream FFmpeg or we cannot handle: keep trying, loudly
            log.exception("camera %s: pulling failed", camera)
            problem, message = CameraState.UNREACHABLE, f"cannot handle the stream ({exc})"
        if stop.is_set():
            break
        sink.problem(camera, problem, message)
        log.warning("camera %s: %s (%s); retrying in %.0f s", camera, problem.value, message,
                    delay)
        stop.wait(delay)
        if delay == backoff:
            backoff = min(backoff * 2, BACKOFF_MAX_S)


def _pull(camera: str, url: str, stop: threading.Event, sink: PullSink, max_segment_bytes: int,
          max_segment_s: float) -> bool:
    """Pull until the camera goes away or we are stopped; True if any segment was handed on."""
    received = False
    # Reads are bounded by FFmpeg's own socket timeout, not PyAV's read timeout: PyAV checks its
    # timeout in an interrupt callback that takes the GIL on every socket read, hundreds of
    # times a second per camera, and with a few dozen cameras per interpreter the threads
    # queue for the GIL (a convoy): pulls stalled with the cores half idle (issue 23).
    with av.open(url, options={"rtsp_transport": "tcp",
                               "timeout": str(int(READ_TIMEOUT_S * 1_000_000))},
                 timeout=(OPEN_TIMEOUT_S, None)) as container:
        segmenter = _Segmenter(container, max_segment_bytes, max_segment_s)
        session = new_session()
        video = next((s for s in container.streams if s.type == "video"), None)
        tick = float(video.time_base) if video is not None and video.time_base else 0.0
        bound, video_end = CaptureBound(), None  # video_end: seconds of the session's clock
        try:
            for packet in container.demux():
                if stop.is_set():
                    break
                read_at, video_at = time.time(), None
                if packet.stream is video and packet.pts is not None and tick:
                    video_at = packet.pts * tick
                segment = segmenter.add(packet)
                if segmenter.clock_restarted is not None:
                    # This packet starts a new session (below): its clock is a new one.
                    bound, video_end = CaptureBound(), None
                    captured_by = None
                elif video_at is not None:
                    bound.observe(video_at, read_at)
                    # What closed here ends where this packet starts: captured by then.
                    captured_by = bound.captured_by(video_at)
                else:
                    captured_by = bound.captured_by(video_end) if video_end is not None else None
                if video_at is not None:
                    if segmenter.clock_restarted is not None:
                        bound.observe(video_at, read_at)
                    video_end = video_at + (packet.duration or 0) * tick
                if segment is not None:
                    sink.segment(camera, segment, time.time(), session, captured_by)
                    received = True
                if segmenter.clock_restarted is not None:
                    # What follows owes nothing to the old clock: the Archiver anchors it anew.
                    log.info("camera %s: %s; segment cut there, a new session follows", camera,
                             segmenter.clock_restarted)
                    segmenter.clock_restarted = None
                    session = new_session()
                if segmenter.fault is not None:
                    fault, segmenter.fault = segmenter.fault, None
                    log.warning("camera %s: %s", camera, fault)
                    sink.fault(camera, fault)
        finally:
            # What arrived before the camera went away (or before shutdown) is archived.
            last = segmenter.close()
            if last is not None:
                sink.segment(camera, last, time.time(), session,
                             bound.captured_by(video_end) if video_end is not None else None)
                received = True
    return received


@dataclass
class _Puller:
    camera: str
    url: str
    stop: threading.Event = field(default_factory=threading.Event)


@dataclass
class _IngestSink:
    ingest: Ingest
    report: ReportProblem
    report_fault: ReportFault | None

    def segment(self, camera: str, data: bytes, closed_at: float, session: int,
                captured_by: float | None = None) -> None:
        self.ingest(camera, data, closed_at, session=session, captured_by=captured_by)

    def problem(self, camera: str, state: CameraState, message: str) -> None:
        self.report(camera, state, message)

    def fault(self, camera: str, message: str) -> None:
        if self.report_fault is not None:
            self.report_fault(camera, message)


class RtspSupervisor:
    """In-process pulling (``rtsp_workers = 0``): one puller thread per RTSP camera in the
    Archiver's own interpreter, archiving each segment as it is cut. One interpreter's GIL
    bounds it to about one core; archiver/rtsp_workers.py spreads cameras over processes."""

    def __init__(self, ingest: Ingest, report_problem: ReportProblem,
                 report_fault: ReportFault | None = None, max_segment_bytes: int = 32 * 2**20,
                 max_segment_s: float = 20.0) -> None:
        self._sink = _IngestSink(ingest, report_problem, report_fault)
        self._max_segment_bytes = max_segment_bytes
        self._max_segment_s = max_segment_s
        self._pullers: dict[str, _Puller] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def start(self, camera: str, url: str) -> None:
        self.stop(camera)
        puller = _Puller(camera, url)
        thread = threading.Thread(
            target=run_puller, args=(camera, url, puller.stop, self._sink,
                                     self._max_segment_bytes, self._max_segment_s),
            daemon=True, name=f"rtsp-{camera}")
        with self._lock:
            self._pullers[camera] = puller
            self._threads[camera] = thread
        thread.start()

    def stop(self, camera: str, wait_s: float = 0.0) -> None:
        with self._lock:
            puller = self._pullers.pop(camera, None)
            thread = self._threads.pop(camera, None)
        if puller is not None:
            puller.stop.set()
        if thread is not None and wait_s:
            thread.join(wait_s)

    def stop_all(self) -> None:
        """Stop every puller, then wait for them to archive what they hold (bounded: a puller
        checks its stop flag between packets and FFmpeg's waits are bounded by timeouts)."""
        with self._lock:
            threads = list(self._threads.values())
        for camera in list(self._pullers):
            self.stop(camera)
        deadline = time.monotonic() + PULLER_STOP_S
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _reason(exc: av.error.FFmpegError) -> str:
    """FFmpeg's reason without the URL it names (which carries the credentials)."""
    if isinstance(exc, av.error.ExitError | av.error.TimeoutError):  # a timeout interrupted it
        return f"no data from the camera for {READ_TIMEOUT_S:.0f} s"
    return exc.strerror or type(exc).__name__
