"""Failover (issue 22): how long a camera goes unrecorded when its Archiver dies.

    python -m bench.failover [--kills 10] [--json FILE]

A real PostgreSQL directory (fusion_testkit/postgres.py), two real Archivers a1 and a2 in
production mode (HTTPS under a site CA, ``fusion-archiver serve --name``), and one real
gst-rtsp-server camera (bench/rtsp_server.py: H.264, 25 fps, a keyframe every second, as the
tests' cameras; the puller cuts a segment at the first keyframe 2 s or more after its start).
The camera is added with ``--archivers a1,a2``. Then, ``--kills`` times: wait until the holder
has archived 2 segments of its own, SIGKILL it, and measure

- **failover time**: from the SIGKILL to the first segment archived (fsynced, in its index) on
  the standby; split into *detection* (the SIGKILL to the takeover's time in the directory,
  ``camera_placements.since_ms``) and *first segment* (the rest: RTSP connect, one segment);
- **video lost**: the start of the standby's first segment minus the end of the dead holder's
  last one (their signed manifests' times, as the Archivers' indexes hold them).

The killed Archiver is started again (it is now the standby: the rule is "stay") and becomes the
next one killed, so the camera goes back and forth. Times come from one clock (one machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

from fusion_testkit.pki import SiteCa
from fusion_testkit.postgres import PostgresCluster
from fusion_testkit.server import ArchiverServer, production_archiver, server_env

SYSTEM_PYTHON = "/usr/bin/python3"
RTSP_SERVER = Path(__file__).with_name("rtsp_server.py")
CAMERA = "bench-gate"
TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _segments(server: ArchiverServer) -> list[tuple[int, int]]:
    """(start_ms, end_ms) of the camera's video segments in ``server``'s own index."""
    index = server.data_dir / "archiver.sqlite3"
    if not index.exists():
        return []
    with sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute("SELECT capture_ms, end_ms FROM segments WHERE camera = ? AND "
                            "stream = 0 ORDER BY capture_ms", (CAMERA,)).fetchall()


def _wait(condition: Any, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(interval)
    raise RuntimeError(f"timed out after {TIMEOUT_S:.0f} s waiting for {what}")


def _placements(url: str) -> list[tuple[str, int]]:
    with psycopg.connect(url) as conn:
        return [(a, int(s)) for a, s in conn.execute(
            "SELECT archiver, since_ms FROM camera_placements WHERE camera = %s ORDER BY "
            "since_ms", (CAMERA,)).fetchall()]


def _standing_by(server: ArchiverServer) -> bool:
    """Whether ``server`` watches the camera's lease (it read the camera as a standby)."""
    text = httpx.get(f"{server.url}/metrics", verify=server.verify, timeout=30,
                     headers={"Authorization": f"Bearer {server.admin_token}"}).text
    return "fusion_site_standby_cameras 1.0" in text


def _one_kill(url: str, dying: ArchiverServer, taking: ArchiverServer) -> dict[str, float]:
    """SIGKILL ``dying`` (the holder) once it archived 2 segments; ``taking`` takes over."""
    since = _placements(url)[-1][1]
    _wait(lambda: len([s for s in _segments(dying) if s[0] >= since]) >= 2,
          "2 segments on the holder")
    _wait(lambda: _standing_by(taking), "the standby to stand by", interval=0.5)
    before = len(_segments(taking))
    assert dying.process is not None
    killed_ms = time.time_ns() // 1_000_000
    killed = time.monotonic()
    os.kill(dying.process.pid, signal.SIGKILL)
    dying.process.wait()
    new = _wait(lambda: _segments(taking)[before:], "the standby's first segment")
    archived_s = time.monotonic() - killed
    took_ms = _placements(url)[-1][1]
    last_end = max(end for _, end in _segments(dying))
    return {"failover_s": archived_s, "detect_s": (took_ms - killed_ms) / 1000,
            "first_segment_s": archived_s - (took_ms - killed_ms) / 1000,
            "lost_s": (new[0][0] - last_end) / 1000,
            "first_segment_len_s": (new[0][1] - new[0][0]) / 1000}


def measure(url: str, workdir: Path, kills: int) -> list[dict[str, float]]:
    site_ca = SiteCa.create(workdir / "site-ca")
    port = _free_port()
    camera = subprocess.Popen([SYSTEM_PYTHON, str(RTSP_SERVER), str(port), "150", "320x240"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    servers: dict[str, ArchiverServer] = {}
    try:
        assert camera.stdout is not None
        if camera.stdout.readline().strip() != "ready":
            raise RuntimeError("the RTSP camera did not start (gst-rtsp-server installed?)")
        for name in ("a1", "a2"):
            servers[name] = production_archiver(
                site_ca, workdir / name, extra_args=("--name", name),
                env=server_env({"FUSION_DIRECTORY": url}), start_timeout_s=TIMEOUT_S).start()
        servers["a1"].admin("POST", "/v1/admin/cameras", {
            "name": CAMERA, "rtsp_url": f"rtsp://127.0.0.1:{port}/stream", "archiver": "a1",
            "standbys": ["a2"]}, expect=201)
        holder, standby = "a1", "a2"
        runs: list[dict[str, float]] = []
        for n in range(kills):
            run = _one_kill(url, servers[holder], servers[standby])
            runs.append(run)
            print(f"kill {n + 1:2d} of {holder}: failover {run['failover_s']:.2f} s "
                  f"(detect {run['detect_s']:.2f} s, then first segment "
                  f"{run['first_segment_s']:.2f} s), video lost {run['lost_s']:.2f} s",
                  flush=True)
            servers[holder].start()  # it returns as the standby (the rule: stay)
            holder, standby = standby, holder
        return runs
    finally:
        for server in servers.values():
            server.stop()
        camera.kill()
        camera.wait()


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "max": max(values), "min": min(values)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.failover",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="fusion-failover-bench-"))
    cluster = PostgresCluster.start()
    try:
        load_before = os.getloadavg()
        print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f}, "
              f"{os.cpu_count()} cores")
        runs = measure(cluster.create_database(), workdir, args.kills)
        results: dict[str, Any] = {
            "camera": "gst-rtsp-server H.264 320x240 25 fps 150 kbit/s, keyframe every 1 s; "
                      "segments cut at the first keyframe >= 2 s",
            "kills": len(runs), "load_before": load_before, "load_after": os.getloadavg(),
            "runs": runs}
        for key in ("failover_s", "detect_s", "first_segment_s", "lost_s"):
            results[key] = _summary([r[key] for r in runs])
            print(f"{key:16s} median {results[key]['median']:.2f} s, max "
                  f"{results[key]['max']:.2f} s, min {results[key]['min']:.2f} s")
        print(f"load average after: {results['load_after'][0]:.2f}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
