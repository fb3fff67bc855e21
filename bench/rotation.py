"""Key material cost of format v2's key chains: CPU time and bytes for C cameras x V viewers.

Drives the Archiver's own ``KeyManager`` (the code ingest calls) against a real SQLite database
(synchronous=FULL, as in production), with a key journal appended and fsynced as the Archiver's
is, signed chain recipients (a software P-256 key: the Archiver signs on its token, a few ms
more per chain) and an injected clock. Minute 0 is a UTC day's start: every viewer's epoch
starts (V RSA-OAEP epoch openers) and every camera starts a key chain wrapped for every viewer
(C x V chain records): that is all the key material of a day without authorization changes.
Minute 1 is an ordinary minute: chains step, nothing is wrapped. Then one viewer is added on
every camera, twice: first as before issue 23 (every chain restarted, wrapped for every viewer),
then as now (it joins every running chain: one join record per camera); then one viewer is
revoked on one camera: that camera starts a new chain, wrapped for every remaining viewer.
CPU time is this process's (time.process_time), so waiting for fsync does not count as CPU;
wall time is reported beside it.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from archiver.db import Database
from archiver.directory import open_directory
from archiver.keying import KeyManager
from bench.common import CertFactory, Report
from keyservice.certs import build_archiver_certificate
from keyservice.format import DataStream
from keyservice.identity import SoftwareSigner, fingerprint

# 2025-06-02T00:00:00Z: a UTC day boundary, so minute 0 is where epochs start anyway.
T0_MS = 1_748_822_400_000
PERIOD_S = 60


def _material(keys: KeyManager) -> int:
    return keys.key_record_bytes + keys.opener_bytes + keys.recipients_bytes


def run(report: Report, workdir: Path, cameras: int, viewers: int, minutes: int = 2
        ) -> dict[str, Any]:
    result = report.section("rotation", {"cameras": cameras, "viewers": viewers,
                                         "key_period_s": PERIOD_S, "minutes": minutes,
                                         "oaep": "RSA-2048 OAEP-SHA256"})
    workdir.mkdir(parents=True, exist_ok=True)
    db = Database(workdir / "archiver.sqlite3")
    directory = open_directory(None, workdir)  # the embedded directory: the index's file
    journal_path = workdir / "keys.fsk"
    journal_fd = os.open(journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def journal(camera: str, now_ms: int, records: list[bytes]) -> None:
        os.write(journal_fd, b"".join(records))
        os.fsync(journal_fd)

    try:
        factory = CertFactory()
        from cryptography.hazmat.primitives.serialization import Encoding

        fingerprints = []
        for i in range(viewers):
            cert = factory.certificate(i)
            fingerprints.append(fingerprint(cert).hex())
            directory.add_viewer(fingerprints[-1], cert.public_bytes(Encoding.DER),
                          cert.subject.rfc4514_string(), int(factory.oaep_hash), None, T0_MS)
        signing_key = ec.generate_private_key(ec.SECP256R1())
        signer = SoftwareSigner(build_archiver_certificate(
            signing_key, "bench archiver", now=dt.datetime.now(dt.UTC)), signing_key)
        keys = KeyManager(db, PERIOD_S, signer=signer, journal=journal, directory=directory)
        names = [f"cam{i:04d}" for i in range(cameras)]
        rows = []

        def measure(label: str, now: int, which: list[str]) -> dict[str, Any]:
            epochs, records, chains = (keys.epochs_started, keys.key_records_written,
                                       keys.chains_started)
            material = _material(keys)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for offset, camera in enumerate(which):
                # Cameras reach their first segment of the minute spread over it.
                keys.key_for(camera, DataStream.VIDEO, now + offset)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            row = {"what": label, "epoch_openers": keys.epochs_started - epochs,
                   "chains_started": keys.chains_started - chains,
                   "key_records": keys.key_records_written - records,
                   "key_material_bytes": _material(keys) - material,
                   "cpu_s": cpu, "wall_s": wall, "core_share": cpu / PERIOD_S,
                   "us_per_key_record": cpu / max(1, keys.key_records_written - records) * 1e6}
            report.line(f"{label}: {row['epoch_openers']} epoch openers, {row['chains_started']} "
                        f"chains, {row['key_records']} chain records, "
                        f"{row['key_material_bytes'] / 2**20:.2f} MiB key material: CPU "
                        f"{cpu:.2f} s (wall {wall:.2f} s) = {row['core_share'] * 100:.2f} % of "
                        f"one core per minute")
            return row

        for minute in range(minutes):
            now = T0_MS + minute * PERIOD_S * 1000 + 500
            kind = "day start" if minute == 0 else "ordinary"
            row = measure(f"minute {minute} ({kind})", now, names)
            row["minute"] = minute
            rows.append(row)
        result["minutes"] = rows
        # Adding one viewer on every camera (issue 23), before and after, in the same run.
        # Before: as the Archiver did until issue 23, the change restarts every chain, wrapped
        # for every viewer. After: the viewer joins each running chain at its next period (one
        # join record per camera, one signed join statement).
        now = T0_MS + minutes * PERIOD_S * 1000 + 500
        def add_viewer(index: int) -> None:
            cert = factory.certificate(index)
            directory.add_viewer(fingerprint(cert).hex(), cert.public_bytes(Encoding.DER),
                          cert.subject.rfc4514_string(), int(factory.oaep_hash), None, now)
            keys.authorization_changed(fingerprint(cert).hex(), None)

        add_viewer(viewers)
        for camera in names:
            keys.forget_camera(camera)  # the old rule: a new chain on every camera
        result["add_viewer_restart"] = measure(
            f"add one viewer, before (every chain restarted) with {viewers + 1} viewers", now,
            names)
        now += PERIOD_S * 1000
        add_viewer(viewers + 1)
        result["add_viewer_join"] = measure(
            f"add one viewer, after (joins every running chain) with {viewers + 2} viewers",
            now, names)
        # A revocation still starts a new chain, wrapped for every remaining viewer: one camera.
        now += PERIOD_S * 1000
        directory.revoke_viewer(fingerprints[0], now)
        keys.authorization_changed(fingerprints[0], [names[0]])
        result["authorization_change"] = measure(
            f"revocation on one camera with {viewers + 1} viewers left", now, names[:1])
        db_size = sum(p.stat().st_size for p in workdir.glob("archiver.sqlite3*"))
        journal_size = journal_path.stat().st_size
        result["db_bytes"] = db_size
        result["journal_bytes"] = journal_size
        day = rows[0]["key_material_bytes"]
        # The day's key material is what minute 0 wrote (chains run until the next day); the
        # database holds the same records plus their index columns.
        result["key_material_bytes_per_day"] = day
        result["disk_bytes_per_day"] = day + db_size * day / max(1, _material(keys))
        report.line(f"key material of a day without authorization changes ({cameras} cameras x "
                    f"{viewers} viewers): {day / 1e6:.1f} MB of records; on disk with the "
                    f"database (journal {journal_size / 1e6:.1f} MB + SQLite {db_size / 1e6:.1f} "
                    f"MB in total for the run): about {result['disk_bytes_per_day'] / 1e6:.1f} "
                    "MB per day, plus one chain (V records) per camera per authorization change")
        return result
    finally:
        os.close(journal_fd)
        directory.close()
        db.close()
