"""Site: a directory outage (issue 22, item 5). One real Archiver (HTTPS under a site CA, its
own SoftHSM signing token) with a real PostgreSQL directory of its own; ffmpeg pushes a camera
at real time (1 s segments). PostgreSQL is stopped (``pg_ctl stop -m fast``) 10 s into the
push, for ``--outage`` seconds, then started again. Figures: segments ffmpeg
sent (from its own log), archived and refused; and the time from PostgreSQL's return until an
admin change goes through again.

``--before PATH`` runs the same against another checkout first (its packages through
PYTHONPATH), for a comparison in one run:

    python -m bench.directory_outage                           # this checkout only
    python -m bench.directory_outage --before ../main --json out.json

The machine's load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from fusion_testkit.camera import make_source
from fusion_testkit.pki import SiteCa
from fusion_testkit.postgres import PostgresCluster
from fusion_testkit.server import production_archiver


def run_once(workdir: Path, checkout: Path | None, seconds: int, outage_s: int) -> dict[str, Any]:
    cluster = PostgresCluster.start()
    try:
        url = cluster.create_database()
        env = dict(os.environ, PYTHONPATH=str(checkout)) if checkout else None
        server = production_archiver(SiteCa.create(workdir / "site-ca"), workdir / "a1",
                                     extra_args=("--directory", url, "--name", "a1"), env=env)
        with server:
            token = server.add_camera("door")
            source = make_source(workdir / "door.ts", seconds=seconds)
            camera = subprocess.Popen(
                ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "verbose", "-re", "-i",
                 str(source), "-c", "copy", "-f", "hls", "-hls_time", "1", "-hls_list_size", "5",
                 "-method", "PUT", "-headers", f"Authorization: Bearer {token}\r\n",
                 f"{server.url}/ingest/door/index.m3u8"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            log: list[str] = []
            reader = threading.Thread(target=lambda: log.extend(camera.stderr or ()), daemon=True)
            reader.start()
            time.sleep(10)
            cluster.pause()
            time.sleep(outage_s)
            cluster.resume()
            back = time.monotonic()
            while True:  # an admin change goes through again
                answer = httpx.post(f"{server.url}/v1/admin/cameras", json={"name": "probe"},
                                    verify=server.verify, timeout=60,
                                    headers={"Authorization": f"Bearer {server.admin_token}"})
                if answer.status_code == 201:
                    break
                time.sleep(0.1)
            writes_back_s = time.monotonic() - back
            camera.wait(timeout=seconds * 4)
            reader.join(10)
            sent = len(set(re.findall(r"Opening '[^']*/([^/']+\.ts)' for writing",
                                      "".join(log))))
            deadline = time.monotonic() + 30
            while True:
                row = next(c for c in server.admin("GET", "/v1/admin/cameras", expect=200)
                           if c["name"] == "door")
                if row["segments"] + row["refused"] >= sent or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        return {"checkout": str(checkout) if checkout else "this", "sent": sent,
                "archived": row["segments"], "refused": row["refused"],
                "admin_change_back_s": round(writes_back_s, 2)}
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.directory_outage",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=45, help="the push's length (s)")
    parser.add_argument("--outage", type=int, default=20, help="the outage's length (s)")
    parser.add_argument("--before", type=Path, help="another checkout to run first")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    print(f"load average before: {os.getloadavg()}")
    results = []
    for checkout in ([args.before.resolve()] if args.before else []) + [None]:
        with tempfile.TemporaryDirectory(prefix="bench-dirdown-") as tmp:
            result = run_once(Path(tmp), checkout, args.seconds, args.outage)
        print(json.dumps(result))
        results.append(result)
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
