"""Site: revocation propagation (issue 21, item 4). Three real Archivers (HTTPS under a site
CA, each with its own SoftHSM signing token) share one real PostgreSQL directory; a camera
pushes segments to Archiver 3. A viewer (its key on a SoftHSM token) is authorized through
Archiver 1, logs in on Archiver 3 and opens a live stream there; it is then revoked through
Archiver 2. The figure is the time from sending the revoke request to Archiver 2 until Archiver 3
ends the open stream (the request's own time at Archiver 2 included), over N revocations, with
LISTEN/NOTIFY and with polling alone (``--no-site-notify``, ``--site-poll``).

    python -m bench.site_propagation                      # 12 revocations per mode
    python -m bench.site_propagation --revocations 20 --poll 5 --json out.json

Each revocation comes after a random pause of up to one poll interval, so the polling figure
covers the whole interval. Figures depend on the load: the machine's load average
is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

from fusion_testkit.pki import SiteCa
from fusion_testkit.postgres import PostgresCluster
from fusion_testkit.server import ArchiverServer, production_archiver
from fusion_testkit.tokens import EnrolledViewer, SoftHsmStore, softhsm_conf
from fusion_testkit.viewer import login
from keyservice.identity import Identity

CAMERA = "benchcam"


@contextmanager
def _site(url: str, workdir: Path, key_period_s: int, *extra: str
          ) -> Iterator[list[ArchiverServer]]:
    site_ca = SiteCa.create(workdir / "site-ca")
    with ExitStack() as stack:
        servers = []
        for i in range(1, 4):
            server = production_archiver(
                site_ca, workdir / f"a{i}", key_period_s=key_period_s,
                extra_args=("--directory", url, "--name", f"a{i}", "--rtsp-workers", "0",
                            *extra))
            servers.append(stack.enter_context(server))
        yield servers


class _Camera(threading.Thread):
    """A camera pushing a 20 KB segment every half second to one Archiver."""

    def __init__(self, server: ArchiverServer, token: str) -> None:
        super().__init__(daemon=True)
        self.server, self.token = server, token
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        while not self.stop.wait(0.5):
            if self.server.put_segment(CAMERA, self.token, os.urandom(20_000)) == 201:
                self.sent += 1


class _Live(threading.Thread):
    """One open live stream; ``opened`` once its first bytes arrived, ``ended_at`` when the
    Archiver closed it."""

    def __init__(self, server: ArchiverServer, session: str) -> None:
        super().__init__(daemon=True)
        self.server, self.session = server, session
        self.opened = threading.Event()
        self.ended_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("GET", f"{self.server.url}/v1/cameras/{CAMERA}/live", timeout=120,
                              verify=self.server.verify,
                              params={"duration_s": 600, "nonce": os.urandom(16).hex()},
                              headers={"Authorization": f"Bearer {self.session}"}) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"live: HTTP {response.status_code}")
                for _ in response.iter_bytes():
                    self.opened.set()
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.opened.set()


def _measure(url: str, workdir: Path, identity: Identity, pem: str, revocations: int,
             key_period_s: int, spread_s: float, *extra: str) -> list[float]:
    times = []
    with _site(url, workdir, key_period_s, *extra) as (a1, a2, a3):
        camera = _Camera(a3, a3.add_camera(CAMERA))
        camera.start()
        try:
            for _ in range(revocations):
                fp = a1.add_viewer(pem, [CAMERA])  # authorized (again) through Archiver 1
                live = _Live(a3, login(a3.url, identity, verify=a3.verify))
                live.start()
                if not live.opened.wait(60) or live.error is not None:
                    raise RuntimeError(f"the live stream did not open: {live.error}")
                time.sleep(random.uniform(0, spread_s))  # noqa: S311 (a pause, not a secret)
                started = time.monotonic()
                a2.revoke(fp)  # revoked through Archiver 2
                live.join(120)
                if live.is_alive() or live.ended_at is None:
                    raise RuntimeError("the stream on Archiver 3 did not end within 120 s")
                times.append(live.ended_at - started)
                print(f"  {len(times):2d}: {times[-1] * 1000:8.1f} ms", flush=True)
        finally:
            camera.stop.set()
            camera.join()
    return times


def poll_cost(url: str, workdir: Path, viewers: int, rounds: int = 20) -> dict[str, Any]:
    """What one poll costs this Archiver with ``viewers`` in the directory (half of them on two
    cameras, the rest on all, 1 KB certificates): ``viewer_states`` (what the poll reads)
    against ``viewers`` (every row with its certificate), median wall and CPU of this process
    over ``rounds`` reads each, alternated."""
    from sqlalchemy import insert

    from archiver.directory import open_directory
    from archiver.directory import schema as t

    directory = open_directory(url, workdir)
    try:
        rows = [{"fingerprint": f"{i:064x}", "certificate": os.urandom(1000),
                 "subject": f"CN=v{i}", "oaep_hash": 1, "all_cameras": i % 2, "added_ms": i,
                 "revoked_ms": None, "key_streams_deleted": 0} for i in range(viewers)]
        cams = [{"fingerprint": f"{i:064x}", "camera": c} for i in range(0, viewers, 2)
                for c in ("door", "yard")]
        with directory.engine.begin() as conn:
            conn.execute(insert(t.viewers), rows)
            conn.execute(insert(t.viewer_cameras), cams)
        figures: dict[str, list[tuple[float, float]]] = {"viewer_states": [], "viewers": []}
        for _ in range(rounds):
            for name, read in (("viewer_states", directory.viewer_states),
                               ("viewers", directory.viewers)):
                wall, cpu = time.perf_counter(), time.process_time()
                read()
                figures[name].append((time.perf_counter() - wall, time.process_time() - cpu))
        return {name: {"median_wall_ms": round(statistics.median(w for w, _ in f) * 1000, 1),
                       "median_cpu_ms": round(statistics.median(c for _, c in f) * 1000, 1)}
                for name, f in figures.items()} | {"viewer_count": viewers, "rounds": rounds}
    finally:
        directory.close()


def _summary(times: list[float]) -> dict[str, Any]:
    return {"n": len(times), "median_ms": round(statistics.median(times) * 1000, 1),
            "max_ms": round(max(times) * 1000, 1), "min_ms": round(min(times) * 1000, 1),
            "all_ms": [round(t * 1000, 1) for t in times]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.site_propagation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--revocations", type=int, default=12)
    parser.add_argument("--poll", type=float, default=5.0,
                        help="--site-poll of the polling-only run (default 5 s, the default)")
    parser.add_argument("--key-period", type=int, default=60)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--poll-cost", type=int, metavar="VIEWERS",
                        help="only measure what one poll costs with this many viewers")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="fusion-site-bench-"))
    cluster = PostgresCluster.start()
    store = SoftHsmStore.create(workdir / "softhsm")
    try:
        if args.poll_cost:
            load = os.getloadavg()
            cost = poll_cost(cluster.create_database(), workdir / "cost", args.poll_cost)
            print(f"load average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
            print(json.dumps(cost, indent=2))
            if args.json:
                args.json.write_text(json.dumps(cost, indent=2) + "\n")
            return
        viewer = EnrolledViewer.enrol(store.new_token(), "bench")
        with softhsm_conf(store.conf):
            identity = viewer.identity()
        pem = viewer.certificate.read_text()
        load_before = os.getloadavg()
        results: dict[str, Any] = {"load_before": load_before, "key_period_s": args.key_period}
        print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f}, "
              f"{os.cpu_count()} cores")
        print("LISTEN/NOTIFY (and the 5 s poll):")
        results["notify"] = _summary(_measure(
            cluster.create_database(), workdir / "notify", identity, pem, args.revocations,
            args.key_period, args.poll))
        print(f"polling alone, every {args.poll:g} s (--no-site-notify):")
        results["poll"] = _summary(_measure(
            cluster.create_database(), workdir / "poll", identity, pem, args.revocations,
            args.key_period, args.poll, "--no-site-notify", "--site-poll", str(args.poll)))
        results["poll"]["poll_s"] = args.poll
        results["load_after"] = os.getloadavg()
        for mode in ("notify", "poll"):
            r = results[mode]
            print(f"{mode:6s}: median {r['median_ms']:.1f} ms, max {r['max_ms']:.1f} ms "
                  f"over {r['n']} revocations")
        print(f"load average after: {results['load_after'][0]:.2f}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        store.close()
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
