"""Key rotation cost: CPU time per minute for C cameras x V viewers, as a share of one core.

Drives the Archiver's own ``KeyManager`` (the code ingest calls) against a real SQLite database
(synchronous=FULL, as in production) with an injected clock: minute 0 starts every viewer's
epoch (V RSA-OAEP epoch openers) and rotates every camera's key (C x V key records); minute 1 is
an ordinary minute (C x V key records, no RSA). CPU time is this process's (time.process_time),
so waiting for fsync does not count as CPU; wall time is reported beside it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from archiver.db import Database
from archiver.keying import KeyManager
from bench.common import CertFactory, Report
from keyservice.format import DataStream
from keyservice.identity import fingerprint

# 2025-06-02T00:00:00Z: a UTC day boundary, so minute 0 is where epochs start anyway.
T0_MS = 1_748_822_400_000
PERIOD_S = 60


def run(report: Report, workdir: Path, cameras: int, viewers: int, minutes: int = 2
        ) -> dict[str, Any]:
    result = report.section("rotation", {"cameras": cameras, "viewers": viewers,
                                         "key_period_s": PERIOD_S, "minutes": minutes,
                                         "oaep": "RSA-2048 OAEP-SHA256"})
    workdir.mkdir(parents=True, exist_ok=True)
    db = Database(workdir / "rotation.sqlite3")
    try:
        factory = CertFactory()
        from cryptography.hazmat.primitives.serialization import Encoding

        for i in range(viewers):
            cert = factory.certificate(i)
            db.add_viewer(fingerprint(cert).hex(), cert.public_bytes(Encoding.DER),
                          cert.subject.rfc4514_string(), int(factory.oaep_hash), None, T0_MS)
        keys = KeyManager(db, PERIOD_S)
        names = [f"cam{i:04d}" for i in range(cameras)]
        rows = []
        for minute in range(minutes):
            now = T0_MS + minute * PERIOD_S * 1000 + 500
            epochs_before, records_before = keys.epochs_started, keys.key_records_written
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for offset, camera in enumerate(names):
                # Cameras rotate at their first segment of the minute, spread over it.
                keys.key_for(camera, DataStream.VIDEO, now + offset)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            row = {
                "minute": minute,
                "epoch_openers": keys.epochs_started - epochs_before,
                "key_records": keys.key_records_written - records_before,
                "cpu_s": cpu, "wall_s": wall,
                "core_share": cpu / PERIOD_S,
                "us_per_key_record": cpu / max(1, keys.key_records_written - records_before) * 1e6,
            }
            rows.append(row)
            kind = "epoch start" if row["epoch_openers"] else "ordinary"
            report.line(f"minute {minute} ({kind}): {row['epoch_openers']} epoch openers, "
                        f"{row['key_records']} key records: CPU {cpu:.2f} s (wall {wall:.2f} s) "
                        f"= {row['core_share'] * 100:.2f} % of one core per minute "
                        f"({row['us_per_key_record']:.1f} us CPU per key record)")
        result["minutes"] = rows
        db_size = sum(p.stat().st_size for p in workdir.glob("rotation.sqlite3*"))
        result["db_bytes"] = db_size
        report.line(f"database after {minutes} minutes: {db_size / 2**20:.1f} MiB "
                    f"({db_size / max(1, keys.key_records_written):.0f} bytes per key record)")
        return result
    finally:
        db.close()
