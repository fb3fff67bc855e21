"""RTSP pull on every core: worker processes pull, demux and remux groups of cameras; the
Archiver's own process encrypts, signs and indexes what they hand back.

Why: one interpreter's GIL held in-process pulling (``archiver.rtsp.RtspSupervisor``) to about
0.9 of a core, so a 2-core Archiver stalled from about 144 cameras at 1 Mbit/s, although most of
the work per camera (PyAV demux and remux, Python per packet) needs nothing of the archive.

- ``RtspWorkerPool`` starts ``workers`` processes (``python -m archiver.rtsp_workers``, a
  setting, default ``os.cpu_count()``), each holding a group of cameras, one puller thread per
  camera (``archiver.rtsp.run_puller``, the same loop as in-process).
- Segments come back over the worker's stdout and are archived here by ``Ingest``: one signer
  and one index writer per camera, as the format requires, and no key ever leaves this process
  (measured: encryption is a small share of a segment's cost; docs/architecture.md).
- The protocol is ours and parsed strictly: a worker parses hostile camera streams with FFmpeg,
  so it is treated as untrusted. A length-prefixed JSON header (no pickle: a compromised worker
  must not be able to run code here), a size bound on every segment, and only cameras given to
  that worker. A worker that breaks it is killed.
- Commands go on the worker's stdin (the camera URL with its credentials: never in argv,
  readable by every local user). A worker exits when its stdin closes, so the Archiver dying,
  even by SIGKILL, leaves no orphan.
- A worker that dies is restarted (with backoff if it dies young) and its cameras resume; each is
  reported ``unreachable`` with the reason until its next segment, and the hole is counted as a
  gap. What was acknowledged (archived) is never lost: only what the dead worker held.
- Per camera, segments and reports are archived in the order the worker sent them (a queue per
  camera, drained by a small thread pool), so cameras do not wait on one another.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

from archiver.cameras import CameraState
from archiver.rtsp import (
    PULLER_STOP_S,
    Ingest,
    PullSink,
    ReportFault,
    ReportProblem,
    run_puller,
)
from archiver.storage import StorageFailed, StorageFull
from keyservice.exitcodes import ExitCode

log = logging.getLogger("archiver.rtsp")
MAX_HEADER = 64 * 1024
# The segmenter cuts before a packet would take the segment over its cap; closing the MPEG-TS
# muxer may add a little: anything beyond this is a broken or hostile worker.
SEGMENT_SLACK = 1024 * 1024
RESTART_START_S = 0.5
RESTART_MAX_S = 10.0
# A worker that lived this long before dying is restarted at once (not a crash loop).
HEALTHY_LIFETIME_S = 30.0
INGEST_THREADS = 16


class ProtocolError(Exception):
    """What a worker sent is not what the protocol allows."""


# --- the Archiver's side -------------------------------------------------------------------

@dataclass
class _Worker:
    index: int
    cameras: dict[str, tuple[str, int]] = field(default_factory=dict)  # camera -> (url, gen)
    process: subprocess.Popen[bytes] | None = None
    allowed: set[str] = field(default_factory=set)  # cameras this process may report on
    started_at: float = 0.0
    restart_delay: float = RESTART_START_S
    reader: threading.Thread | None = None


@dataclass
class _Queue:
    items: deque[tuple[Any, ...]] = field(default_factory=deque)
    busy: bool = False


class RtspWorkerPool:
    """Pulls RTSP cameras in ``workers`` processes (see the module docstring); the same
    interface as ``RtspSupervisor`` (``archiver.rtsp.CameraPullers``)."""

    def __init__(self, ingest: Ingest, report_problem: ReportProblem,
                 report_fault: ReportFault | None = None, max_segment_bytes: int = 32 * 2**20,
                 max_segment_s: float = 20.0, workers: int = 2,
                 ingest_threads: int = INGEST_THREADS,
                 command: tuple[str, ...] = (sys.executable, "-P", "-m",
                                             "archiver.rtsp_workers")) -> None:
        if workers < 1:
            raise ValueError("A worker pool needs at least one worker.")
        self._ingest = ingest
        self._report = report_problem
        self._report_fault = report_fault
        self._max_segment_bytes = max_segment_bytes
        self._max_segment_s = max_segment_s
        self._workers = [_Worker(i) for i in range(workers)]
        self._command = command  # the worker program (tests give a hostile one)
        self._where: dict[str, int] = {}  # camera -> worker index
        self._gen = 0
        self._stopped: dict[tuple[str, int], threading.Event] = {}
        self._queues: dict[str, _Queue] = {}
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._executor = ThreadPoolExecutor(ingest_threads, thread_name_prefix="rtsp-ingest")
        self.restarts = 0  # worker processes restarted after dying (for tests and metrics)

    # -- the CameraPullers interface
    def start(self, camera: str, url: str) -> None:
        self.stop(camera)
        with self._lock:
            if self._closing.is_set():
                return
            worker = min(self._workers, key=lambda w: len(w.cameras))
            self._gen += 1
            worker.cameras[camera] = (url, self._gen)
            self._where[camera] = worker.index
            if worker.process is None:
                self._spawn(worker)  # it is sent all its cameras, this one included
            else:
                worker.allowed.add(camera)
                self._send(worker, {"op": "start", "camera": camera, "url": url,
                                    "gen": self._gen})

    def stop(self, camera: str, wait_s: float = 0.0) -> None:
        """Stop pulling ``camera``; with ``wait_s``, wait (that long at most) until the segment
        its worker was building has been archived."""
        with self._lock:
            index = self._where.pop(camera, None)
            if index is None:
                return
            worker = self._workers[index]
            _, gen = worker.cameras.pop(camera)
            done = self._stopped[(camera, gen)] = threading.Event()
            if worker.process is None or worker.process.poll() is not None:
                # Its worker is dead (being restarted): nothing more comes for this camera.
                self._stopped.pop((camera, gen))
                done.set()
            else:
                self._send(worker, {"op": "stop", "camera": camera})
        if wait_s:
            done.wait(wait_s)

    def stop_all(self) -> None:
        """Ask every worker to stop its pullers and exit, archive what they hand back (each
        finishes the segment it was building), then reap them: no orphan process is left."""
        with self._lock:
            self._closing.set()
            for worker in self._workers:
                if worker.process is not None and worker.process.stdin is not None:
                    self._send(worker, {"op": "exit"})
                    try:
                        worker.process.stdin.close()
                    except OSError:
                        pass
        deadline = time.monotonic() + PULLER_STOP_S + 2
        for worker in self._workers:
            if worker.reader is not None:
                worker.reader.join(max(0.0, deadline - time.monotonic()))
        for worker in self._workers:
            process = worker.process
            if process is not None and process.poll() is None:
                log.warning("RTSP worker %d (pid %d) did not exit in time; killed", worker.index,
                            process.pid)
                process.kill()
            if process is not None:
                process.wait()
        for worker in self._workers:  # a reader blocked on a killed worker's pipe ends now
            if worker.reader is not None:
                worker.reader.join(5)
        self._executor.shutdown(wait=True)  # archives every segment already handed back

    def worker_pids(self) -> list[int]:
        """The live worker processes' ids (tests, the benchmark's CPU figures)."""
        with self._lock:
            return [w.process.pid for w in self._workers
                    if w.process is not None and w.process.poll() is None]

    # -- worker processes
    def _spawn(self, worker: _Worker) -> None:
        """Start ``worker``'s process and hand it its cameras (under the lock)."""
        process = subprocess.Popen(
            list(self._command), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, close_fds=True)
        worker.process = process
        worker.started_at = time.monotonic()
        worker.allowed = set(worker.cameras)
        self._send(worker, {"op": "config", "max_segment_bytes": self._max_segment_bytes,
                            "max_segment_s": self._max_segment_s})
        for camera, (url, gen) in worker.cameras.items():
            self._send(worker, {"op": "start", "camera": camera, "url": url, "gen": gen})
        worker.reader = threading.Thread(target=self._read, args=(worker, process), daemon=True,
                                         name=f"rtsp-worker-{worker.index}")
        worker.reader.start()
        log.info("RTSP worker %d started (pid %d, %d camera(s))", worker.index, process.pid,
                 len(worker.cameras))

    @staticmethod
    def _send(worker: _Worker, command: dict[str, Any]) -> None:
        process = worker.process
        if process is None or process.stdin is None or process.stdin.closed:
            return
        try:
            process.stdin.write(json.dumps(command).encode() + b"\n")
            process.stdin.flush()
        except OSError:
            pass  # the worker died: its reader restarts it and hands it its cameras again

    def _read(self, worker: _Worker, process: subprocess.Popen[bytes]) -> None:
        """Archive what one worker process hands back, until it ends; then restart it."""
        assert process.stdout is not None
        try:
            while self._read_one(worker, process.stdout):
                pass
        except ProtocolError as exc:
            log.error("RTSP worker %d (pid %d) broke the protocol (%s); killed and restarted",
                      worker.index, process.pid, exc)
            process.kill()
        except OSError:
            pass
        returncode = process.wait()
        self._ended(worker, process, returncode)

    def _read_one(self, worker: _Worker, stream: IO[bytes]) -> bool:
        head = _read_exact(stream, 4)
        if head is None:
            return False
        length = int.from_bytes(head, "big")
        if length > MAX_HEADER:
            raise ProtocolError(f"a {length}-byte header")
        raw = _read_exact(stream, length)
        if raw is None:
            raise ProtocolError("cut inside a header")
        try:
            header = json.loads(raw)
            kind, camera = header["type"], header["camera"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError("an unreadable header") from exc
        if not isinstance(camera, str):
            raise ProtocolError("a camera name that is not a string")
        with self._lock:
            allowed = camera in worker.allowed
        if not allowed:
            raise ProtocolError("a camera it was not given")
        if kind == "segment":
            size, closed_at = header.get("size"), header.get("closed_at")
            session, captured_by = header.get("session"), header.get("captured_by")
            if (not isinstance(size, int) or not 0 < size <= self._max_segment_bytes
                    + SEGMENT_SLACK or not isinstance(closed_at, int | float)
                    or not isinstance(session, int)
                    or not (captured_by is None or isinstance(captured_by, int | float))):
                raise ProtocolError("a segment of a size beyond the cap or without its timing")
            data = _read_exact(stream, size)
            if data is None:
                raise ProtocolError("cut inside a segment")
            # captured_by is the worker's claim: the Archiver clamps it (archiver.cameras).
            self._enqueue(camera, ("segment", data, float(closed_at), session,
                                   None if captured_by is None else float(captured_by)))
        elif kind == "problem":
            try:
                state = CameraState(header["state"])
                message = str(header["message"])
            except (ValueError, KeyError) as exc:
                raise ProtocolError("an unknown camera state") from exc
            self._enqueue(camera, ("problem", state, message))
        elif kind == "fault":
            self._enqueue(camera, ("fault", str(header.get("message", ""))))
        elif kind == "stopped":
            gen = header.get("gen")
            self._enqueue(camera, ("stopped", gen))
        else:
            raise ProtocolError(f"an unknown message type {kind!r}")
        return True

    def _ended(self, worker: _Worker, process: subprocess.Popen[bytes], returncode: int) -> None:
        """A worker process ended: at shutdown that is expected; otherwise its cameras are
        reported and it is restarted (after a backoff if it died young: no crash loop)."""
        with self._lock:
            stopping = [key for key in self._stopped if key[0] in worker.allowed
                        and key[0] not in worker.cameras]
            for key in stopping:  # nothing more comes from this process for them
                self._enqueue(key[0], ("stopped", key[1]))
            if self._closing.is_set() or worker.process is not process:
                return
            how = (f"killed by signal {-returncode}" if returncode < 0
                   else f"exit status {returncode}")
            cameras = list(worker.cameras)
            lived = time.monotonic() - worker.started_at
            worker.restart_delay = (RESTART_START_S if lived > HEALTHY_LIFETIME_S
                                    else min(worker.restart_delay * 2, RESTART_MAX_S))
            delay = worker.restart_delay
            worker.process = None
        log.error("RTSP worker %d (pid %d) died (%s) with %d camera(s); restarting it in "
                  "%.1f s", worker.index, process.pid, how, len(cameras), delay)
        for camera in cameras:
            self._enqueue(camera, ("problem", CameraState.UNREACHABLE,
                                   f"the process pulling it died ({how}); restarted, the video "
                                   "it held is missing"))
        if self._closing.wait(delay):
            return
        with self._lock:
            if self._closing.is_set() or worker.process is not None:
                return
            self.restarts += 1
            if worker.cameras:
                self._spawn(worker)

    # -- archiving, in order per camera
    def _enqueue(self, camera: str, item: tuple[Any, ...]) -> None:
        with self._lock:
            queue = self._queues.setdefault(camera, _Queue())
            queue.items.append(item)
            if queue.busy:
                return
            queue.busy = True
        self._executor.submit(self._drain, camera, queue)

    def _drain(self, camera: str, queue: _Queue) -> None:
        while True:
            with self._lock:
                if not queue.items:
                    queue.busy = False
                    return
                item = queue.items.popleft()
            try:
                self._handle(camera, item)
            except Exception:  # one camera's failure must not stop its queue
                log.exception("camera %s: handling what its puller sent failed", camera)

    def _handle(self, camera: str, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "segment":
            try:
                self._ingest(camera, item[1], item[2], session=item[3], captured_by=item[4])
            except (StorageFull, StorageFailed) as exc:
                # Not archived and counted as refused by ingest; the camera shows why.
                self._report(camera, CameraState.STALLED, str(exc))
        elif kind == "problem":
            self._report(camera, item[1], item[2])
        elif kind == "fault":
            if self._report_fault is not None:
                self._report_fault(camera, item[1])
        elif kind == "stopped":
            with self._lock:
                done = self._stopped.pop((camera, item[1]), None)
            if done is not None:
                done.set()


def _read_exact(stream: IO[bytes], size: int) -> bytes | None:
    """``size`` bytes, or None at end of stream before the first of them."""
    data = stream.read(size)
    if not data:
        return None
    while len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            raise ProtocolError("the stream ended inside a message")
        data += more
    return data


# --- the worker process --------------------------------------------------------------------

class _PipeSink:
    """Hands a puller's results to the Archiver over stdout, one whole message at a time."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._lock = threading.Lock()

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        raw = json.dumps(header).encode()
        try:
            with self._lock:
                self._out.write(len(raw).to_bytes(4, "big") + raw)
                if payload:
                    self._out.write(payload)
                self._out.flush()
        except (OSError, ValueError):
            os._exit(ExitCode.OK)  # the Archiver is gone: nothing to pull for

    def segment(self, camera: str, data: bytes, closed_at: float, session: int,
                captured_by: float | None = None) -> None:
        self.send({"type": "segment", "camera": camera, "size": len(data),
                   "closed_at": closed_at, "session": session, "captured_by": captured_by},
                  data)

    def problem(self, camera: str, state: CameraState, message: str) -> None:
        self.send({"type": "problem", "camera": camera, "state": state.value,
                   "message": message})

    def fault(self, camera: str, message: str) -> None:
        self.send({"type": "fault", "camera": camera, "message": message})


def worker_main() -> None:
    """A worker process: pull the cameras its stdin names until stdin closes."""
    # The Archiver drives shutdown (so that each puller archives what it holds): a Ctrl-C or a
    # service manager's SIGTERM to the whole process group must not cut a worker short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s[worker {os.getpid()}]: "
                               "%(message)s")
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but the protocol goes to the Archiver's pipe
    pipe = _PipeSink(out)
    sink: PullSink = pipe
    pullers: dict[str, tuple[threading.Event, threading.Thread]] = {}
    max_bytes, max_s = 32 * 2**20, 20.0

    def pull(camera: str, url: str, stop: threading.Event, gen: int) -> None:
        try:
            run_puller(camera, url, stop, sink, max_bytes, max_s)
        finally:
            pipe.send({"type": "stopped", "camera": camera, "gen": gen})

    for line in sys.stdin.buffer:
        command = json.loads(line)
        op = command["op"]
        if op == "config":
            max_bytes, max_s = int(command["max_segment_bytes"]), float(command["max_segment_s"])
        elif op == "start":
            camera = command["camera"]
            if camera in pullers:
                pullers.pop(camera)[0].set()
            stop = threading.Event()
            thread = threading.Thread(target=pull, args=(camera, command["url"], stop,
                                                         command["gen"]),
                                      daemon=True, name=f"rtsp-{camera}")
            pullers[camera] = (stop, thread)
            thread.start()
        elif op == "stop":
            found = pullers.pop(command["camera"], None)
            if found is not None:
                found[0].set()
        elif op == "exit":
            break
    # Exit (or the Archiver is gone): each puller archives what it holds, within a bound.
    for stop, _ in pullers.values():
        stop.set()
    deadline = time.monotonic() + PULLER_STOP_S
    for _, thread in pullers.values():
        thread.join(max(0.0, deadline - time.monotonic()))
    try:
        out.flush()
    except OSError:
        pass
    os._exit(ExitCode.OK)  # FFmpeg threads still blocked on a socket must not hold the process


if __name__ == "__main__":
    worker_main()
