"""Cameras per Archiver (issue 23): how many RTSP cameras one Archiver pulls and archives on
this machine: the code before (``--modes before --before CHECKOUT``: another checkout's code,
in-process), in-process now (``0``) and in worker processes (``2``), in the same run.

    python -m bench.rtsp_cameras --cameras 96,144,192,250 --modes before,0,2 --before CHECKOUT

Per camera count N and mode: one RTSP server serving 640x360 H.264 at 1 Mbit/s to every
session, encoded once so that no encoder eats the cores the Archiver is measured on (default
``bench/rtsp_fanout.py``, a clip pre-encoded by ffmpeg; ``--server gst``: gst-rtsp-server's
shared live media, ``bench/rtsp_server.py``, which broke sessions in bursts here), a fresh
real Archiver (``fusion-archiver serve`` over loopback HTTP) with N RTSP cameras on it, a
warm-up, then a measured window in which the admin API's camera list is sampled every 2 s.
Printed per N and mode:

- archived segments in the window vs expected (N x window / 2 s segments);
- stalls: cameras seen ``stalled``/``unreachable`` or without video in any sample;
- the newest video's age (sample time minus the end of the camera's last archived segment, as
  placed on the wall clock), max and p95 over every camera in every sample: the goal is at most
  one segment + 1 s (3 s). The placement follows the stream's timestamps from the camera's first
  segment (archiver/cameras.py), so a late first segment shifts all of a camera's times; hence
  also the time since the newest archived segment reached the puller (``last_segment_ms``);
- CPU (cores) of the Archiver with all its processes, and of the RTSP server, over the window.

``--profile DIR`` also records the Archiver and its workers with ``py-spy record
--subprocesses`` during each window and prints where the CPU went by stage.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine_line, write_results
from bench.rtsp_fanout import encode_clip
from fusion_testkit.server import ArchiverServer, free_port

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER = Path(__file__).with_name("rtsp_server.py")
SEGMENT_S = 2.0
SAMPLE_S = 2.0
TICKS = os.sysconf("SC_CLK_TCK")
# py-spy frames -> the stage they belong to: the innermost frame that names one wins.
STAGES = (("pipe to/from the workers", ("_PipeSink", "_read_one", "_read_exact")),
          ("remux to MPEG-TS (PyAV)", ("_Segmenter.",)),
          ("demux (PyAV: RTSP, RTP)", ("_pull (archiver/rtsp.py",)),
          ("encrypt", ("seal_segment", "encode_record_parts")),
          ("sign the manifest", ("signing.py", "ManifestChain.issue")),
          ("keys", ("keying.py",)),
          ("read the segment's timestamps", ("mpegts.py",)),
          ("index (SQLite)", ("db.py",)),
          ("append + fsync", ("storage.py",)),
          ("HTTP API (the samples)", ("uvicorn", "starlette", "fastapi", "routers/")))


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


class CpuMeter:
    """CPU seconds used by a process tree between ``start`` and ``stop`` (processes that
    appear in between count from zero)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._before = {p: cpu_seconds(p) for p in process_tree(pid)}
        self._at = time.monotonic()

    def cores(self, tree: bool = True) -> float:
        pids = process_tree(self.pid) if tree else [self.pid]
        used = sum(cpu_seconds(p) - self._before.get(p, 0.0) for p in pids)
        return used / (time.monotonic() - self._at)


def start_rtsp_server(kbps: int, size: str, log: Path,
                      clip: Path | None) -> tuple[subprocess.Popen[bytes], int]:
    """A fresh server per run: the pre-encoded fan-out (``clip``) or gst-rtsp-server."""
    port = free_port()
    command = ([sys.executable, "-m", "bench.rtsp_fanout", str(port), str(clip)] if clip
               else [SYSTEM_PYTHON, str(SERVER), str(port), str(kbps), size])
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 30
    while b"ready" not in log.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the RTSP server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    return process, port


def hold_media_open(port: int) -> subprocess.Popen[bytes]:
    """One client that stays for the whole run, started before the Archiver: hundreds of
    sessions joining the shared media while it was still being prepared (or after the last one
    left) got "Invalid argument" from the server, every retry after too."""
    keeper = subprocess.Popen(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-rtsp_transport", "tcp", "-i",
         f"rtsp://127.0.0.1:{port}/stream", "-c", "copy", "-f", "null", "-"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)
    if keeper.poll() is not None:
        raise RuntimeError("the RTSP server's stream could not be opened")
    return keeper


def _cameras(client: httpx.Client, server: ArchiverServer) -> list[dict[str, Any]]:
    answer = client.get(f"{server.url}/v1/admin/cameras",
                        headers={"Authorization": f"Bearer {server.admin_token}"}, timeout=60)
    answer.raise_for_status()
    return answer.json()


def run_one(n: int, mode: str, rtsp_port: int, rtsp_pid: int, warmup: float, window: float,
            work: Path, profile: Path | None, before: Path | None) -> dict[str, Any]:
    """``mode``: a worker count, or "before": the code of the checkout ``before`` (as it is,
    without --rtsp-workers), for a before/after in the same run."""
    data = work / f"archiver-{n}-{mode}"
    if mode == "before":
        if before is None:
            raise SystemExit("--modes before needs --before CHECKOUT")
        server = ArchiverServer(data, key_period_s=60, env={"PYTHONPATH": str(before)},
                                start_timeout_s=60, stop_timeout_s=60)
    else:
        # No admission limit: how many it can take is what is measured.
        server = ArchiverServer(data, key_period_s=60, extra_args=(
            "--rtsp-workers", mode, "--max-rtsp-cameras", "0"),
            start_timeout_s=60, stop_timeout_s=60)
    server.start()
    url = f"rtsp://127.0.0.1:{rtsp_port}/stream"
    try:
        with httpx.Client() as client:
            for i in range(n):
                client.post(f"{server.url}/v1/admin/cameras", json={
                    "name": f"cam{i:03d}", "rtsp_url": url}, timeout=60,
                    headers={"Authorization": f"Bearer {server.admin_token}"}).raise_for_status()
            time.sleep(warmup)
            assert server.process is not None
            spy = None
            if profile is not None:
                profile.mkdir(parents=True, exist_ok=True)
                spy = subprocess.Popen(
                    [_py_spy(), "record", "--subprocesses", "--nonblocking",
                     "--format", "raw", "-r", "50", "-d", str(int(window)), "-p",
                     str(server.process.pid), "-o", str(profile / f"{n}-{mode}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            archiver_cpu, rtsp_cpu = CpuMeter(server.process.pid), CpuMeter(rtsp_pid)
            first = {c["name"]: c["segments"] for c in _cameras(client, server)}
            first_at = time.monotonic()
            ages: list[float] = []
            waits: list[float] = []
            stalled: set[str] = set()
            started = time.monotonic()
            while time.monotonic() - started < window:
                # Jittered: every camera cuts at the same instants (one shared stream), and a
                # fixed phase would bias the ages.
                time.sleep(random.uniform(SAMPLE_S / 2, SAMPLE_S * 1.5))  # noqa: S311 (timing)
                now_ms = time.time() * 1000
                for camera in _cameras(client, server):
                    if camera["last_ms"] is None:
                        stalled.add(camera["name"])
                        continue
                    ages.append((now_ms - camera["last_ms"]) / 1000)
                    if camera["last_segment_ms"] is not None:
                        waits.append((now_ms - camera["last_segment_ms"]) / 1000)
                    if camera["state"] in ("stalled", "unreachable"):
                        stalled.add(camera["name"])
            elapsed = time.monotonic() - started
            final = _cameras(client, server)
            last = {c["name"]: c["segments"] for c in final}
            # Frames missing inside a segment (the RTSP server dropped data for a slow reader)
            # show as timestamp jumps; such a camera's placed times fall behind.
            jumps = sum(c.get("timestamp_jumps", 0) for c in final)
            counted_s = time.monotonic() - first_at  # between the two counts
            cpu, rtsp = archiver_cpu.cores(), rtsp_cpu.cores()
            main_cpu = archiver_cpu.cores(tree=False)
            if spy is not None:
                spy.wait()
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)
    archived = sum(last[name] - first.get(name, 0) for name in last)
    ages.sort()
    waits.sort()
    return {"cameras": n, "mode": mode, "window_s": round(elapsed, 1),
            "archived": archived, "expected": round(n * counted_s / SEGMENT_S),
            "stalled": len(stalled), "timestamp_jumps": jumps,
            "age_max_s": round(ages[-1], 2) if ages else None,
            "age_p95_s": round(ages[int(len(ages) * 0.95) - 1], 2) if ages else None,
            "age_median_s": round(statistics.median(ages), 2) if ages else None,
            "arrival_age_max_s": round(waits[-1], 2) if waits else None,
            "arrival_age_p95_s": round(waits[int(len(waits) * 0.95) - 1], 2) if waits else None,
            "archiver_cores": round(cpu, 2), "archiver_main_cores": round(main_cpu, 2),
            "rtsp_server_cores": round(rtsp, 2),
            "loadavg": round(os.getloadavg()[0], 2)}


def _py_spy() -> str:
    beside = Path(sys.executable).with_name("py-spy")  # the bench extra's, in the virtualenv
    return str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"


def stages(raw: Path) -> list[tuple[str, float]]:
    """Share of the samples per stage, from py-spy's raw (collapsed) output."""
    counts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        frames = [f for f in stack.split(";") if not f.startswith("process ")][::-1]
        counts[next((name for frame in frames for name, needles in STAGES
                     if any(needle in frame for needle in needles)),
                    "other (threads, queues, waits)")] += int(count)
    return [(name, count / total) for name, count in counts.most_common()] if total else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rtsp_cameras",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cameras", default="96,144,192,250")
    parser.add_argument("--modes", default=f"0,{os.cpu_count() or 1}",
                        help="what to compare: worker process counts (0: in-process) and "
                             "'before' (the code of --before, in-process)")
    parser.add_argument("--before", type=Path, help="a checkout of the code before (for "
                                                    "--modes before)")
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--kbps", type=int, default=1000)
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--server", choices=("fanout", "gst"), default="fanout",
                        help="the cameras: one pre-encoded clip fanned out to every session "
                             "(bench/rtsp_fanout.py), or gst-rtsp-server's shared live media")
    parser.add_argument("--profile", type=Path, help="py-spy raw profiles go here")
    parser.add_argument("--results", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)
    print(machine_line(), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-rtsp-") as work:
        clip = None
        if args.server == "fanout":
            clip = encode_clip(Path(work) / "clip.h264", size=args.size, kbps=args.kbps)
        for n in (int(x) for x in args.cameras.split(",")):
            for mode in args.modes.split(","):
                rtsp, port = start_rtsp_server(args.kbps, args.size,
                                               Path(work) / f"rtsp-{n}-{mode}.log", clip)
                keeper = None
                try:
                    keeper = hold_media_open(port)
                    result = run_one(n, mode, port, rtsp.pid, args.warmup, args.window,
                                     Path(work), args.profile, args.before)
                finally:
                    for process in (keeper, rtsp):  # by their ids: nothing left running
                        if process is not None:
                            process.kill()
                            process.wait()
                results.append(result)
                label = {"before": "before", "0": "in-process"}.get(mode, f"{mode} workers")
                print(f"{n:4d} cameras, {label:11s}: archived {result['archived']} of "
                      f"{result['expected']} expected; {result['stalled']} stalled; "
                  f"{result['timestamp_jumps']} timestamp jumps; newest "
                      f"video age max {result['age_max_s']} s, p95 {result['age_p95_s']} s, "
                      f"median {result['age_median_s']} s; since the newest segment reached "
                      f"the puller max {result['arrival_age_max_s']} s, p95 "
                      f"{result['arrival_age_p95_s']} s; Archiver "
                      f"{result['archiver_cores']} cores (its main process "
                      f"{result['archiver_main_cores']}), RTSP server "
                      f"{result['rtsp_server_cores']} cores; load {result['loadavg']}",
                      flush=True)
                if args.profile is not None:
                    raw = args.profile / f"{n}-{mode}.txt"
                    if raw.exists():
                        print("    " + "; ".join(f"{name} {share:.0%}"
                                                 for name, share in stages(raw)), flush=True)
    write_results(args.results, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
