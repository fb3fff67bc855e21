"""Ingest latency under a viewer query flood (issue 12, finding 6).

    python -m bench.queryflood [--manifests 1000000] [--flood 16] [--seconds 10]
        [--source DIR] [--server-arg=--viewer-concurrency=64 ...]

One camera ("big") has a large index (``--manifests`` rows, inserted straight into SQLite: an
empty-range query scans the index only, so no archive bytes are needed); one viewer floods the
Archiver with ``--flood`` parallel recording requests for an empty range of "big", while a
second camera uploads a 20 kB segment every 0.2 s. Printed: the upload latency (median, p90,
max) without and with the flood, and what the flood got (answers by status, queries a second).

``--source DIR`` runs the Archiver from another checkout (e.g. the code before the fix:
``git archive COMMIT | tar -x -C DIR``), so before and after are measured the same way. The
Archiver is ``fusion-archiver serve`` in a subprocess, as in production.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sqlite3
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from bench.common import REPO_ROOT, machine_line, percentile
from fusion_testkit.server import ArchiverServer, free_port
from fusion_testkit.viewer import login
from keyservice.certs import build_viewer_certificate
from keyservice.identity import SoftwareIdentity
from keyservice.keyscheme import KeyScheme


def _server(source: Path, data: Path, port: int, extra: list[str]) -> ArchiverServer:
    """`fusion-archiver serve` as the checkout ``source`` has it (its code first on the path)."""
    return ArchiverServer(data, key_period_s=60, port=port, extra_args=tuple(extra),
                          env={**os.environ, "PYTHONPATH": str(source)}, cwd=source,
                          start_timeout_s=120, stop_timeout_s=30)


def _start(server: ArchiverServer) -> ArchiverServer:
    try:
        return server.start()
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


def fill_index(db: Path, camera: str, count: int) -> None:
    """``count`` manifest rows for ``camera``, one a second from 2020-01-01 (far from the empty
    range the flood asks for, which lies before them)."""
    start = int(dt.datetime(2020, 1, 1, tzinfo=dt.UTC).timestamp() * 1000)
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO manifests VALUES (?,?,?,?,?,?,?,?)",
            ((camera, i, f"{camera}/2020-01-01.fsa", i * 100, 100, bytes(32),
              start + i * 1000, start + i * 1000) for i in range(count)))


def _viewer() -> SoftwareIdentity:
    key = rsa.generate_private_key(65537, 2048)
    cert = build_viewer_certificate(key, "flood-viewer", oaep_hash=KeyScheme.RSA_OAEP_SHA256,
                                    now=dt.datetime.now(dt.UTC), days=2)
    return SoftwareIdentity(cert, key)


def _uploads(url: str, token: str, seconds: float) -> list[float]:
    latencies = []
    body = os.urandom(20_000)
    with httpx.Client(timeout=60) as client:
        end = time.monotonic() + seconds
        number = 0
        while time.monotonic() < end:
            started = time.perf_counter()
            response = client.put(f"{url}/ingest/cam/s{number}.ts", content=body,
                                  headers={"Authorization": f"Bearer {token}"})
            latencies.append(time.perf_counter() - started)
            if response.status_code != 201:
                raise SystemExit(f"upload refused: {response.status_code} {response.text}")
            number += 1
            time.sleep(max(0.0, 0.2 - latencies[-1]))
    return latencies


def _flood(url: str, session: str, workers: int, stop: threading.Event) -> Counter[int]:
    answers: Counter[int] = Counter()
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                response = client.get(f"{url}/v1/cameras/big/recording",
                                      params={"from_ms": 0, "to_ms": 1000,
                                              "nonce": os.urandom(16).hex()},
                                      headers={"Authorization": f"Bearer {session}"})
                with lock:
                    answers[response.status_code] += 1
                if response.status_code == 429:
                    time.sleep(0.05)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    stop.wait()
    for thread in threads:
        thread.join()
    return answers


def _summary(latencies: list[float]) -> str:
    ms = [v * 1000 for v in latencies]
    return (f"median {statistics.median(ms):7.1f} ms  p90 {percentile(ms, 0.9):7.1f} ms  "
            f"max {max(ms):7.1f} ms  ({len(ms)} uploads)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.queryflood",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifests", type=int, default=1_000_000)
    parser.add_argument("--flood", type=int, default=16, help="parallel viewer requests")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--source", type=Path, default=REPO_ROOT,
                        help="checkout to run the Archiver from (default: this one)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra argument for fusion-archiver serve (repeatable)")
    args = parser.parse_args(argv)
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="queryflood-") as tmp:
        data = Path(tmp) / "archiver"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        extra = [a for arg in args.server_arg for a in arg.split("=", 1)]
        server = _start(_server(args.source.resolve(), data, port, extra))
        token = server.add_camera("cam")
        server.add_camera("big")
        viewer = _viewer()
        server.add_viewer(viewer.certificate.public_bytes(Encoding.PEM).decode())
        server.stop()
        started = time.monotonic()
        fill_index(data / "archiver.sqlite3", "big", args.manifests)
        print(f"index of camera 'big': {args.manifests} manifests "
              f"({time.monotonic() - started:.0f} s to insert)")
        server = _start(_server(args.source.resolve(), data, port, extra))
        try:
            session = login(url, viewer)
            print(f"Archiver from {args.source}  {' '.join(extra) or '(default limits)'}")
            print(f"  uploads alone:           {_summary(_uploads(url, token, args.seconds))}")
            stop = threading.Event()
            result: list[Counter[int]] = []
            flood = threading.Thread(target=lambda: result.append(
                _flood(url, session, args.flood, stop)))
            flood.start()
            time.sleep(1.0)  # let the flood build up
            latencies = _uploads(url, token, args.seconds)
            stop.set()
            flood.join()
            print(f"  uploads under the flood: {_summary(latencies)}")
            answers = result[0]
            print(f"  flood ({args.flood} parallel): {sum(answers.values())} answers in "
                  f"{args.seconds + 1:.0f} s, by status: {dict(sorted(answers.items()))}")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
