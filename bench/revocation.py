"""Revocation at scale (issue 23): one viewer revoked on every camera, C cameras x V viewers.

Drives the Archiver's own ``KeyManager`` in process, as bench/rotation.py does (a real SQLite
index with synchronous=FULL, the key journal appended and fsynced, signed chain recipients, an
injected clock). Minute 0 is a UTC day's start (every camera starts a chain for every viewer).

* **synchronous** (what a revocation did before issue 23, and what any other authorization
  change still does): ``authorization_changed`` drops every camera's chain; each camera's next
  segment (minute 1) starts a new chain and wraps it for every viewer before it is sealed. The
  time those segments wait is the "foreground" time: ingest stands still for it.
* **prepared** (``access_removed``, when the KeyManager has it): 20 s into minute 2, the cameras
  keep their current key for the rest of the period while a background thread prepares every
  camera's next chain; a segment of each camera after the change (minute 2) and the first one
  of minute 3 (the switch) are timed in the foreground, the thread's work separately.

Runs against any checkout: ``PYTHONPATH=<checkout> python -m bench.revocation`` from a copy of
this file measures that checkout's KeyManager (only the synchronous path if it predates
issue 23). CPU is the whole process's (all threads); wall is the foreground's unless stated.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from archiver.db import Database
from archiver.keying import KeyManager
from bench.common import CertFactory
from keyservice.certs import build_archiver_certificate
from keyservice.format import DataStream
from keyservice.identity import SoftwareSigner, fingerprint

T0_MS = 1_748_822_400_000  # 2025-06-02T00:00:00Z, a UTC day's start
PERIOD_S = 60
MINUTE_MS = PERIOD_S * 1000


def _first_segments(keys: KeyManager, names: list[str], now_ms: int) -> dict[str, float]:
    """Each camera's first segment of a period asks for its key; the longest and total wait."""
    waits = []
    cpu0 = time.process_time()
    for offset, camera in enumerate(names):
        t0 = time.perf_counter()
        keys.key_for(camera, DataStream.VIDEO, now_ms + offset)
        waits.append(time.perf_counter() - t0)
    return {"foreground_wall_s": sum(waits), "longest_wait_s": max(waits),
            "cpu_s": time.process_time() - cpu0}


def _directory(db: Database, workdir: Path) -> Any:
    """Where the viewers are: the site directory (beside the index), or, in a checkout from
    before it, the index itself."""
    try:
        from archiver.directory import open_directory
    except ImportError:
        return db
    return open_directory(None, workdir)


def _revoke(directory: Any, db: Database, fp: str, now_ms: int) -> None:
    if directory is db:  # a checkout before the site directory
        db.revoke_viewer(fp, now_ms, delete_key_streams=False)  # type: ignore[attr-defined]
    else:
        directory.revoke_viewer(fp, now_ms)


def run(workdir: Path, cameras: int, viewers: int) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    db = Database(workdir / "revocation.sqlite3")
    directory: Any = _directory(db, workdir)
    journal_fd = os.open(workdir / "keys.fsk", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def journal(camera: str, now_ms: int, records: list[bytes]) -> None:
        os.write(journal_fd, b"".join(records))
        os.fsync(journal_fd)

    clock_ms = [T0_MS]
    result: dict[str, Any] = {"cameras": cameras, "viewers": viewers, "key_period_s": PERIOD_S}
    try:
        factory = CertFactory()
        fps = []
        for i in range(viewers):
            cert = factory.certificate(i)
            fps.append(fingerprint(cert).hex())
            directory.add_viewer(fps[-1], cert.public_bytes(Encoding.DER),
                                 cert.subject.rfc4514_string(), int(factory.oaep_hash), None,
                                 T0_MS)
        signing_key = ec.generate_private_key(ec.SECP256R1())
        signer = SoftwareSigner(build_archiver_certificate(
            signing_key, "bench archiver", now=dt.datetime.now(dt.UTC)), signing_key)
        try:
            keys = KeyManager(db, PERIOD_S, signer=signer, journal=journal,  # type: ignore[call-arg]
                              clock=lambda: clock_ms[0],
                              **({} if directory is db else {"directory": directory}))
        except TypeError:  # a checkout before issue 23
            keys = KeyManager(db, PERIOD_S, signer=signer, journal=journal)
        names = [f"cam{i:04d}" for i in range(cameras)]
        clock_ms[0] = T0_MS + 500
        day = _first_segments(keys, names, T0_MS + 500)
        result["day_start"] = day | {"records": keys.key_records_written}
        print(f"day start: {keys.key_records_written} chain records, CPU {day['cpu_s']:.1f} s",
              flush=True)

        # Synchronous: every camera's first segment after the change wraps its new chain.
        now = T0_MS + MINUTE_MS + 500
        records0 = keys.key_records_written
        _revoke(directory, db, fps[0], now - 100)
        keys.authorization_changed(fps[0], None)
        sync = _first_segments(keys, names, now)
        sync["records"] = keys.key_records_written - records0
        result["synchronous"] = sync
        print(f"synchronous revocation: {sync['records']} chain records; segments waited "
              f"{sync['foreground_wall_s']:.2f} s in all (longest {sync['longest_wait_s']:.2f} "
              f"s), CPU {sync['cpu_s']:.2f} s", flush=True)

        if hasattr(keys, "access_removed"):
            # The cameras' first segments of minute 2 (chains step), then the revocation 20 s
            # into it, then one more segment per camera in that period.
            _first_segments(keys, names, T0_MS + 2 * MINUTE_MS + 500)
            now = T0_MS + 2 * MINUTE_MS + 20_000
            clock_ms[0] = now
            records0 = keys.key_records_written
            _revoke(directory, db, fps[1], now - 100)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            keys.access_removed(fps[1], None, now)
            during = _first_segments(keys, names, now + 200)
            while keys.chains_prepared < cameras:  # the background thread's work
                time.sleep(0.01)
            prepared_wall = time.perf_counter() - wall0
            prepared_cpu = time.process_time() - cpu0
            switch = _first_segments(keys, names, T0_MS + 3 * MINUTE_MS + 500)
            result["prepared"] = {
                "records": keys.key_records_written - records0,
                "during_period": during, "preparation_wall_s": prepared_wall,
                "preparation_cpu_s": prepared_cpu,
                "core_share_of_period": prepared_cpu / PERIOD_S, "switch": switch,
                "pending_after_switch": keys.pending_chains()}
            print(f"prepared revocation: {result['prepared']['records']} chain records in "
                  f"{prepared_wall:.2f} s (CPU {prepared_cpu:.2f} s = "
                  f"{prepared_cpu / PERIOD_S * 100:.0f} % of one core over the {PERIOD_S} s "
                  f"period) off the ingest path; first segments in the change's period waited "
                  f"{during['foreground_wall_s']:.3f} s in all (longest "
                  f"{during['longest_wait_s'] * 1000:.1f} ms); at the switch "
                  f"{switch['foreground_wall_s']:.3f} s in all (longest "
                  f"{switch['longest_wait_s'] * 1000:.1f} ms)", flush=True)
        return result
    finally:
        os.close(journal_fd)
        if directory is not db:
            directory.close()
        db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.revocation", description=__doc__)
    parser.add_argument("--size", default="100x10000", help="CAMERASxVIEWERS")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    cameras, viewers = (int(x) for x in args.size.lower().split("x"))
    workdir = Path(tempfile.mkdtemp(prefix="bench-revocation-"))
    try:
        result = run(workdir, cameras, viewers)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
