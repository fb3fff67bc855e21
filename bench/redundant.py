"""What redundant archiving costs (issue 22, item 8): CPU-seconds per MB archived when one
Archiver records N RTSP cameras, against the same N cameras recorded redundantly by two
Archivers (``cameras add --archivers a1,a2 --redundant``), measured one after the other in
the same run.

Each mode gets a fresh site: a database of its own on one real PostgreSQL, two real Archivers
(``fusion-archiver serve --name a1|a2``, HTTPS under a site CA, SoftHSM signers, fsynced
archives), the cameras served by ``bench/rtsp_fanout.py`` (a pre-encoded clip sent to every
session in real time: no encoder on the cores measured). After a warm-up, the CPU of each
Archiver's process tree and the bytes its archive files grew by are read over the window.

``python -m bench.redundant --cameras 8 --warmup 15 --window 30 --json redundant.json``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine_line
from bench.rtsp_cameras import CpuMeter, hold_media_open, start_rtsp_server
from bench.rtsp_fanout import encode_clip
from fusion_testkit.pki import SiteCa
from fusion_testkit.postgres import PostgresCluster
from fusion_testkit.server import ArchiverServer, production_archiver, server_env

MB = 1_000_000


def archived_bytes(server: ArchiverServer) -> int:
    """The bytes of the Archiver's archive files (ciphertext and signed manifests)."""
    return sum(p.stat().st_size for p in (server.data_dir / "archive").rglob("*.fsa"))


def run_mode(mode: str, cameras: int, url: str, rtsp_url: str, workdir: Path, warmup: float,
             window: float) -> dict[str, Any]:
    """One site of two Archivers; the cameras on a1 alone (``single``) or on both."""
    site_ca = SiteCa.create(workdir / "site-ca")
    servers = [production_archiver(site_ca, workdir / name, start_timeout_s=120,
                                   extra_args=("--name", name, "--max-rtsp-cameras", "0"),
                                   env=server_env({"FUSION_DIRECTORY": url}))
               for name in ("a1", "a2")]
    try:
        for server in servers:
            server.start()
        a1 = servers[0]
        for i in range(cameras):
            body: dict[str, Any] = {"name": f"cam{i}", "rtsp_url": rtsp_url, "archiver": "a1"}
            if mode == "redundant":
                body |= {"standbys": ["a2"], "redundant": True}
            a1.admin("POST", "/v1/admin/cameras", body, expect=201)
        time.sleep(warmup)  # every puller connected and cutting segments
        assert all(s.process is not None for s in servers)
        meters = [CpuMeter(s.process.pid) for s in servers]  # type: ignore[union-attr]
        before = [archived_bytes(s) for s in servers]
        started = time.monotonic()
        load_before = os.getloadavg()[0]
        time.sleep(window)
        elapsed = time.monotonic() - started
        cpu = [m.cores() * elapsed for m in meters]
        grown = [archived_bytes(s) - b for s, b in zip(servers, before, strict=True)]
        load_after = os.getloadavg()[0]
    finally:
        for server in servers:
            server.stop()
    camera_mb = grown[0] / MB  # the cameras' video (a1 records all of it in both modes)
    archived_mb = sum(grown) / MB  # every copy
    return {"mode": mode, "cameras": cameras, "window_s": round(elapsed, 1),
            "cpu_s": [round(c, 2) for c in cpu], "archived_mb": [round(g / MB, 2) for g in grown],
            "cpu_s_per_archived_mb": round(sum(cpu) / archived_mb, 4),
            "cpu_s_per_camera_mb": round(sum(cpu) / camera_mb, 4),
            "load": [round(load_before, 2), round(load_after, 2)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redundant",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cameras", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--kbps", type=int, default=1000)
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--rounds", type=int, default=2,
                        help="single then redundant, this many times (alternating)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    print(machine_line(), flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="fusion-redundant-bench-"))
    cluster = PostgresCluster.start()
    results = []
    try:
        clip = encode_clip(workdir / "clip.h264", size=args.size, kbps=args.kbps)
        for round_ in range(args.rounds):
            for mode in ("single", "redundant"):
                rtsp, port = start_rtsp_server(args.kbps, args.size,
                                               workdir / f"rtsp-{mode}-{round_}.log", clip)
                keeper = None
                try:
                    keeper = hold_media_open(port)
                    result = run_mode(mode, args.cameras, cluster.create_database(),
                                      f"rtsp://127.0.0.1:{port}/stream",
                                      workdir / f"{mode}-{round_}", args.warmup, args.window)
                finally:
                    for process in (keeper, rtsp):  # by their ids: nothing left running
                        if process is not None:
                            process.kill()
                            process.wait()
                results.append(result)
                print(f"{mode:9s} {args.cameras} cameras: CPU a1 {result['cpu_s'][0]} s, a2 "
                      f"{result['cpu_s'][1]} s over {result['window_s']} s; archived a1 "
                      f"{result['archived_mb'][0]} MB, a2 {result['archived_mb'][1]} MB; "
                      f"{result['cpu_s_per_archived_mb']} CPU-s per MB archived, "
                      f"{result['cpu_s_per_camera_mb']} per MB of camera video; load "
                      f"{result['load'][0]} -> {result['load'][1]}", flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine_line(), "results": results},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
