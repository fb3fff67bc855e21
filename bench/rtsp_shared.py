"""Several pullers on one RTSP camera: how often each drops, and the video it loses.

One gst-rtsp-server camera (tests/fixtures/rtsp_camera.py, 320x240 H.264, 25 fps, a keyframe a
second) and N pullers (``archiver.rtsp.run_puller``, in this process, one thread each) joining
it ``--stagger`` seconds apart, then all pulling for ``--seconds``. Per puller: drops (the
puller reporting the camera unreachable and reconnecting), drops per minute, and the video
missing from its recording: the segments are placed on the wall clock by the Archiver's own
rule (``archiver.cameras.SegmentClock``) and every hole over ``GAP_TOLERANCE_MS`` is a gap.
``sessions``: its connections, plus one per clock restart it cut a segment at.

    python bench/rtsp_shared.py [--pullers 3] [--seconds 60] [--restart-clock-on-join]

``--restart-clock-on-join``: the camera as it was before (gst-rtsp-server seeking the shared
pipeline for each PLAY: the stream clock of every client restarts when one joins). To measure
other code, put its checkout first on PYTHONPATH (``archiver`` is imported from there).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from archiver.cameras import GAP_TOLERANCE_MS, CameraState, SegmentClock
from archiver.mpegts import media_span
from archiver.rtsp import run_puller

CAMERA = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "rtsp_camera.py"


@dataclass
class Recorder:
    """A puller's sink: places each segment as the Archiver would, counts drops and gaps."""

    clock: SegmentClock = field(default_factory=SegmentClock)
    segments: int = 0
    sessions: set[int] = field(default_factory=set)
    drops: list[str] = field(default_factory=list)
    holes_ms: list[int] = field(default_factory=list)
    video_ms: int = 0
    first_ms: int | None = None
    last_end_ms: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def segment(self, camera: str, data: bytes, closed_at: float, session: int,
                captured_by: float | None = None) -> None:
        with self.lock:
            placed = self.clock.place(int(closed_at * 1000), media_span(data), session,
                                      None if captured_by is None else int(captured_by * 1000))
            if self.last_end_ms is not None and placed.start_ms - self.last_end_ms > 0:
                self.holes_ms.append(placed.start_ms - self.last_end_ms)
            if self.first_ms is None:
                self.first_ms = placed.start_ms
            self.last_end_ms = placed.end_ms
            self.video_ms += placed.end_ms - placed.start_ms
            self.segments += 1
            self.sessions.add(session)

    def problem(self, camera: str, state: CameraState, message: str) -> None:
        with self.lock:
            self.drops.append(f"{state.value} ({message})")

    def fault(self, camera: str, message: str) -> None:
        pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run(pullers: int, seconds: float, stagger: float, restart_clock: bool) -> dict[str, object]:
    port = free_port()
    command = ["/usr/bin/python3", str(CAMERA)]
    if restart_clock:
        command.append("--restart-clock-on-join")
    camera = subprocess.Popen([*command, str(port), "h264", "150"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    assert camera.stdout is not None
    if camera.stdout.readline().strip() != "ready":
        raise SystemExit("the RTSP camera did not start")
    url = f"rtsp://127.0.0.1:{port}/stream"
    stop = threading.Event()
    recorders = [Recorder() for _ in range(pullers)]
    threads = []
    try:
        for index, recorder in enumerate(recorders):
            thread = threading.Thread(target=run_puller, args=(
                f"p{index}", url, stop, recorder, 32 * 2**20, 20.0), daemon=True)
            thread.start()
            threads.append(thread)
            time.sleep(stagger)
        time.sleep(seconds)
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
        camera.kill()
        camera.wait()
    rows = []
    for index, recorder in enumerate(recorders):
        span_ms = (recorder.last_end_ms or 0) - (recorder.first_ms or 0)
        gaps = [ms for ms in recorder.holes_ms if ms > GAP_TOLERANCE_MS]
        rows.append({
            "puller": f"p{index}", "segments": recorder.segments,
            "sessions": len(recorder.sessions), "drops": len(recorder.drops),
            "drops_per_min": round(len(recorder.drops) * 60_000 / span_ms, 1) if span_ms else None,
            "gaps": len(gaps), "gap_s": [round(ms / 1000, 2) for ms in gaps],
            "missing_s": round(sum(recorder.holes_ms) / 1000, 2),
            "recorded_s": round(recorder.video_ms / 1000, 1), "span_s": round(span_ms / 1000, 1),
            "first_drop": recorder.drops[0] if recorder.drops else None})
    return {"pullers": pullers, "seconds": seconds, "restart_clock_on_join": restart_clock,
            "load": [round(x, 2) for x in os.getloadavg()], "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pullers", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--stagger", type=float, default=2)
    parser.add_argument("--restart-clock-on-join", action="store_true")
    args = parser.parse_args()
    result = run(args.pullers, args.seconds, args.stagger, args.restart_clock_on_join)
    rows = result.pop("rows")
    print(json.dumps(result))
    for row in rows:  # type: ignore[union-attr]
        print(json.dumps(row))


if __name__ == "__main__":
    main()
