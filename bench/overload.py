"""Time under overload (issue 23, item 6): more RTSP cameras than the machine can take, and
whether the recorded times of cameras that fall behind stay true to within a segment.

    python -m bench.overload --points 400:2,600:2,800:2,250:0,400:0 --results overload.json
    python -m bench.overload --points 800:2 --before CHECKOUT   # also the code of CHECKOUT

Per load point ``N:WORKERS`` (N cameras, ``--rtsp-workers WORKERS``; 0 is in-process):

- a fresh real Archiver (``fusion-archiver serve`` over loopback HTTP, SoftHSM signer, fsynced
  archive, 60 s key period) with its admission limit raised to N + 1 (``--max-rtsp-cameras``);
- N RTSP cameras added through the admin API while the camera rack is not yet listening (so
  the admission-by-load rule, which refuses cameras once one is ``behind``, does not stop the
  adding: an Archiver restarting with N cameras, or given them at failover, is in that state);
- then the rack starts (``bench/rtsp_fanout.py --stamp``: one pre-encoded 640x360 H.264 clip at
  1 Mbit/s, 25 fps, a keyframe a second, sent in real time to every session) and every camera
  connects at once (with ``--early K``: K cameras first, connecting to a healthy Archiver,
  the other N - K added ``--early-wait`` s later: the first K then *fall behind* with sessions
  they opened in time, the rest open theirs on an overloaded machine);
- a warm-up, then a window in which the admin API's camera list is read every 1-3 s: archived
  segments vs expected (N x window / 2 s), stalls (cameras seen ``stalled``/``unreachable`` or
  without video), the newest video's age (read time minus the placed end of the camera's last
  segment; under overload this is the lag), the lag the Archiver reports (``lag_ms``,
  ``max_lag_ms``; ``fusion_camera_max_lag_seconds`` in ``/metrics``), the health states;
- an admission probe: one more camera added after the window (refused ``at_capacity`` when a
  camera is ``behind``);
- a viewer on a SoftHSM token is authorized on all cameras before any is recorded, and its
  fusion-client-equivalent (fusion_testkit's viewer: login, fetch, verify, decrypt) plays the
  whole recording of ``--marked`` cameras (spread over the order they were added). Every frame
  of the rack carries its capture time (the rack's RTP clock against the wall clock, in an SEI
  NAL unit the Archiver copies without reading it), so for every archived segment the signed
  start and end are compared with the true capture times of its first and last frame: the time
  error, in segments (2 s). Consecutive segments whose frames are consecutive (no frame lost)
  but whose signed times leave a gap over 1 s are *false gaps*.

``--before CHECKOUT`` runs each point twice, the Archiver from CHECKOUT's code first
(``PYTHONPATH``, as ``bench.rtsp_cameras --modes before``), then this code: a before/after in
the same run.

The rack runs on the same two cores: how late it sent frames (its own lateness, a camera-side
delay the Archiver cannot see through) is reported next to the error.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av
import httpx

from bench.common import machine_line, percentile, write_results
from bench.rtsp_cameras import CpuMeter
from bench.rtsp_fanout import Stamp, encode_clip, read_stamps
from fusion_testkit.playback import fetch, play
from fusion_testkit.server import ArchiverServer, free_port
from fusion_testkit.tokens import EnrolledViewer, SoftHsmStore
from fusion_testkit.viewer import login

SEGMENT_MS = 2000  # the puller's segment length (archiver.rtsp.SEGMENT_S)
FRAME_MS = 40  # 25 fps
GAP_TOLERANCE_MS = 1000  # archiver.cameras.GAP_TOLERANCE_MS
SAMPLE_S = 2.0


# --- the time error of one camera (pure) ------------------------------------------------------
@dataclass(frozen=True)
class SegmentTruth:
    """One archived segment: what the Archiver signed, and the stamps of its first and last
    frame (the truth)."""

    capture_ms: int  # signed start
    duration_ms: int  # signed length
    first: Stamp
    last: Stamp

    @property
    def start_error_ms(self) -> int:
        return self.capture_ms - self.first.capture_ms

    @property
    def end_error_ms(self) -> int:
        return self.capture_ms + self.duration_ms - (self.last.capture_ms + FRAME_MS)


@dataclass(frozen=True)
class TimeReport:
    segments: int
    unstamped: int  # segments without a stamp (should be none)
    max_error_ms: int  # the largest |signed - true| of any segment's start or end
    mean_error_ms: float  # signed start - true start, averaged (a constant offset shows here)
    false_gaps: int  # signed gap over the tolerance where no frame was lost
    real_gaps: int  # frames lost between two segments (a reconnect, the rack dropping a session)
    rack_late_max_ms: int  # the most the rack sent a frame after its capture time
    worst_index: int  # which segment (0: the first archived) had the largest error

    @property
    def max_error_segments(self) -> float:
        return self.max_error_ms / SEGMENT_MS


def time_report(segments: list[SegmentTruth], unstamped: int = 0) -> TimeReport:
    """The time error of one camera's archived segments, in archive order."""
    errors = [abs(e) for s in segments for e in (s.start_error_ms, s.end_error_ms)]
    false_gaps = real_gaps = 0
    for before, after in itertools.pairwise(segments):
        signed_gap = after.capture_ms - (before.capture_ms + before.duration_ms)
        if after.first.index == before.last.index + 1:
            false_gaps += signed_gap > GAP_TOLERANCE_MS
        else:
            real_gaps += 1
    late = [s.first.sent_ms - s.first.capture_ms for s in segments] + [
        s.last.sent_ms - s.last.capture_ms for s in segments]
    worst = max(range(len(segments)), default=0, key=lambda i: max(
        abs(segments[i].start_error_ms), abs(segments[i].end_error_ms)))
    return TimeReport(
        segments=len(segments), unstamped=unstamped, max_error_ms=max(errors, default=0),
        worst_index=worst,
        mean_error_ms=(round(sum(s.start_error_ms for s in segments) / len(segments), 1)
                       if segments else 0.0),
        false_gaps=false_gaps, real_gaps=real_gaps, rack_late_max_ms=max(late, default=0))


def segment_stamps(data: bytes) -> list[Stamp]:
    """The stamps of a decrypted MPEG-TS segment's video frames, in order (demuxed: a stamp
    may straddle two TS packets)."""
    stamps: list[Stamp] = []
    with av.open(io.BytesIO(data), format="mpegts") as container:
        for packet in container.demux(video=0):
            if packet.size:
                stamps.extend(read_stamps(bytes(packet)))
    return stamps


# --- one load point ---------------------------------------------------------------------------
def _cameras(client: httpx.Client, server: ArchiverServer) -> list[dict[str, Any]]:
    answer = client.get(f"{server.url}/v1/admin/cameras", timeout=120,
                        headers={"Authorization": f"Bearer {server.admin_token}"})
    answer.raise_for_status()
    return answer.json()


def _add(client: httpx.Client, server: ArchiverServer, name: str, url: str) -> httpx.Response:
    return client.post(f"{server.url}/v1/admin/cameras", json={"name": name, "rtsp_url": url},
                       headers={"Authorization": f"Bearer {server.admin_token}"}, timeout=120)


def start_rack(port: int, clip: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        rack = subprocess.Popen([sys.executable, "-m", "bench.rtsp_fanout", str(port),
                                 str(clip), "--stamp"], stdout=out, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 30
    while b"ready" not in log.read_bytes():
        if rack.poll() is not None or time.monotonic() > deadline:
            rack.kill()
            raise RuntimeError(f"the camera rack did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    return rack


def marked_indices(n: int, count: int) -> list[int]:
    """``count`` cameras spread over the order they were added, the first and the last among
    them (the last connect to an Archiver that is already loaded)."""
    if count <= 1:
        return [0][:count]
    return sorted({round(i * (n - 1) / (count - 1)) for i in range(count)})


def _max_metric(text: str, name: str) -> float | None:
    values = [float(v) for v in re.findall(rf'^{name}\{{camera="[^"]*"\}} (\S+)$', text, re.M)]
    return max(values) if values else None


def run_point(n: int, workers: int, args: argparse.Namespace, work: Path, clip: Path,
              viewer: EnrolledViewer, before: Path | None = None) -> dict[str, Any]:
    """``before``: a checkout whose code the Archiver runs (None: this code)."""
    data = work / f"archiver-{n}-{workers}-{'before' if before else 'after'}"
    server = ArchiverServer(data, key_period_s=60, extra_args=(
        "--rtsp-workers", str(workers), "--max-rtsp-cameras", str(n + 1)),
        env={"PYTHONPATH": str(before)} if before else None,
        start_timeout_s=60, stop_timeout_s=60)
    port = free_port()
    url = f"rtsp://127.0.0.1:{port}/stream"
    names = [f"ov{i:04d}" for i in range(n)]
    marked = [names[i] for i in marked_indices(n, args.marked)]
    rack: subprocess.Popen[bytes] | None = None
    server.start()
    try:
        with httpx.Client() as client:
            # --early K: the first K cameras connect to a healthy Archiver (sessions anchored
            # in time), and fall behind when the rest come.
            early = min(args.early, n) if args.early else n  # 0: all before the rack
            refused_adding = sum(_add(client, server, name, url).status_code == 409
                                 for name in names[:early])
            # All cameras, present and future, before any records: the viewer's chains start
            # with each camera's first segment (a viewer added later joins only from then).
            server.add_viewer(viewer.certificate, "all", client=client)
            rack = start_rack(port, clip, work / f"rack-{n}-{workers}.log")
            if early < n:
                time.sleep(args.early_wait)
                refused_adding += sum(_add(client, server, name, url).status_code == 409
                                      for name in names[early:])
            assert server.process is not None
            archiver_cpu, rack_cpu = CpuMeter(server.process.pid), CpuMeter(rack.pid)
            time.sleep(args.warmup)
            first = {c["name"]: c["segments"] for c in _cameras(client, server)}
            first_at = time.monotonic()
            ages: list[float] = []
            stalled: set[str] = set()
            behind: set[str] = set()
            states: Counter[str] = Counter()
            unanswered = 0
            while time.monotonic() - first_at < args.window:
                time.sleep(random.uniform(SAMPLE_S / 2, SAMPLE_S * 1.5))  # noqa: S311 (timing)
                now_ms = time.time() * 1000
                try:
                    sample = _cameras(client, server)
                except httpx.TimeoutException:
                    unanswered += 1  # the admin API did not answer within 2 min: counted
                    continue
                for camera in sample:
                    if camera["last_ms"] is None:
                        stalled.add(camera["name"])
                        continue
                    ages.append((now_ms - camera["last_ms"]) / 1000)
                    if camera["state"] in ("stalled", "unreachable"):
                        stalled.add(camera["name"])
                    if camera["state"] == "behind":
                        behind.add(camera["name"])
            final = _cameras(client, server)
            counted_s = time.monotonic() - first_at
            cpu, rack_cores = archiver_cpu.cores(), rack_cpu.cores()
            states.update(c["state"] for c in final)
            lags = [c["max_lag_ms"] for c in final if c.get("max_lag_ms") is not None]
            metrics = client.get(f"{server.url}/metrics", timeout=120, headers={
                "Authorization": f"Bearer {server.admin_token}"}).text
            probe = _add(client, server, "ovprobe", url)
            probe_answer = (f"{probe.status_code} {probe.json().get('code', '')}: "
                            f"{probe.json().get('message', probe.json().get('detail', ''))}"
                            if probe.status_code != 201 else "201 (taken)")
        by_name = {c["name"]: c for c in final}
        times = {}
        session = login(server.url, viewer.identity(), server.verify)
        for name in marked:
            answer = fetch(server.url, session, name, verify=server.verify)
            if answer.status_code != 200:  # e.g. nothing recorded yet: said, not judged
                print(f"    {name}: no recording to play (HTTP {answer.status_code}: "
                      f"{answer.text[:200]})", flush=True)
                continue
            played = play(viewer.identity(), answer.content)
            truths, unstamped = [], 0
            for segment in played.plaintexts:
                stamps = segment_stamps(segment.data)
                if not stamps:
                    unstamped += 1
                    continue
                truths.append(SegmentTruth(segment.capture_ms, segment.duration_ms,
                                           stamps[0], stamps[-1]))
            report = time_report(truths, unstamped)
            times[name] = {**asdict(report), "max_error_segments": report.max_error_segments,
                           "connected": ("early" if names.index(name) < early < n
                                         else "with the rest"),
                           "state": by_name[name]["state"],
                           "max_lag_ms": by_name[name].get("max_lag_ms"),
                           "gaps_reported": by_name[name].get("gaps"),
                           "overruns": by_name[name].get("overruns")}
    finally:
        if rack is not None:
            rack.kill()
            rack.wait()
        server.stop()
        shutil.rmtree(data, ignore_errors=True)
    archived = sum(c["segments"] - first.get(c["name"], 0) for c in final)
    return {
        "cameras": n, "workers": workers, "code": "before" if before else "after",
        "refused_adding": refused_adding,
        "taken": len(first),  # the cameras the Archiver took (admission may refuse some)
        "archived": archived, "expected": round(len(first) * counted_s * 1000 / SEGMENT_MS),
        "stalled": len(stalled), "ever_behind": len(behind), "states_at_end": dict(states),
        "api_unanswered": unanswered,
        "age_p95_s": round(percentile(ages, 0.95), 2) if ages else None,
        "age_max_s": round(max(ages), 2) if ages else None,
        "reported_max_lag_s": round(max(lags) / 1000, 2) if lags else None,
        "metrics_max_lag_s": _max_metric(metrics, "fusion_camera_max_lag_seconds"),
        "gaps_reported": sum(c.get("gaps", 0) for c in final),
        "overruns": sum(c.get("overruns", 0) for c in final),
        "admission_probe": probe_answer,
        "marked": times,
        "max_error_segments": max((t["max_error_segments"] for t in times.values()), default=0),
        "false_gaps": sum(t["false_gaps"] for t in times.values()),
        "archiver_cores": round(cpu, 2), "rack_cores": round(rack_cores, 2),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def _line(result: dict[str, Any]) -> str:
    label = "in-process" if result["workers"] == 0 else f"{result['workers']} workers"
    marked = "; ".join(
        f"{name} {t['segments']} seg, err max {t['max_error_ms']} ms "
        f"({t['max_error_segments']:.2f} seg; segment {t['worst_index']}), mean "
        f"{t['mean_error_ms']} ms, "
        f"false gaps {t['false_gaps']}, real gaps {t['real_gaps']}, rack late max "
        f"{t['rack_late_max_ms']} ms, {t['state']}, connected {t['connected']}"
        for name, t in result["marked"].items())
    return (f"{result['cameras']:4d} cameras ({result['taken']} taken), {label}, "
            f"{result['code']}: archived {result['archived']} of "
            f"{result['expected']}; {result['stalled']} stalled; {result['ever_behind']} seen "
            f"behind; states {result['states_at_end']}; newest video age p95 "
            f"{result['age_p95_s']} s, max {result['age_max_s']} s; reported max lag "
            f"{result['reported_max_lag_s']} s (metrics {result['metrics_max_lag_s']}); gaps "
            f"{result['gaps_reported']}; API reads unanswered "
            f"{result['api_unanswered']}; overruns {result['overruns']}; refused adding "
            f"{result['refused_adding']}; probe {result['admission_probe']}; Archiver "
            f"{result['archiver_cores']} cores, rack {result['rack_cores']}; load "
            f"{result['loadavg']}\n    time error of marked cameras: max "
            f"{result['max_error_segments']:.2f} segments, false gaps {result['false_gaps']}: "
            f"{marked}")


def parse_points(text: str) -> list[tuple[int, int]]:
    points = []
    for item in text.split(","):
        cameras, _, workers = item.partition(":")
        points.append((int(cameras), int(workers or os.cpu_count() or 1)))
    return points


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overload",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default="400:2,600:2,800:2,250:0,400:0",
                        help="load points CAMERAS:WORKERS (--rtsp-workers; 0: in-process)")
    parser.add_argument("--marked", type=int, default=8,
                        help="cameras whose recording is played and checked against the truth")
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--early", type=int, default=0,
                        help="this many cameras connect first, to a healthy Archiver; the "
                             "rest --early-wait s later (0: all at once, as at a restart)")
    parser.add_argument("--early-wait", type=float, default=15.0)
    parser.add_argument("--window", type=float, default=40.0)
    parser.add_argument("--kbps", type=int, default=1000)
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--before", type=Path, help="a checkout of the code before: each "
                                                    "point is run with it first")
    parser.add_argument("--results", type=Path, help="write the figures as JSON")
    args = parser.parse_args(list(argv) if argv is not None else None)
    print(machine_line(), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
        work = Path(tmp)
        clip = encode_clip(work / "clip.h264", size=args.size, kbps=args.kbps)
        store = SoftHsmStore.create(work / "softhsm")
        try:
            viewer = EnrolledViewer.enrol(store.new_token("overload"), "viewer")
            for n, workers in parse_points(args.points):
                for before in ([args.before] if args.before else []) + [None]:
                    try:
                        result = run_point(n, workers, args, work, clip, viewer, before)
                    except httpx.HTTPError as exc:  # the Archiver too overloaded to answer
                        print(f"{n:4d} cameras, {workers} workers, "
                              f"{'before' if before else 'after'}: the Archiver did not "
                              f"answer ({type(exc).__name__}: {exc})", flush=True)
                        results.append({"cameras": n, "workers": workers, "error": str(exc),
                                        "code": "before" if before else "after"})
                        continue
                    results.append(result)
                    print(_line(result), flush=True)
        finally:
            store.close()
    write_results(args.results, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
