"""Consolidation throughput (issue 22, item 8): MB/s of recording an Archiver copies from
another, against a plain HTTPS download of the same bytes, measured in one run.

    python -m bench.consolidation [--segments 48] [--segment-kib 1024] [--rounds 3] [--json FILE]

Two real Archivers (``fusion-archiver serve`` under a site CA, HTTPS, one PostgreSQL site
directory: a throwaway cluster of fusion_testkit/postgres.py) and one pushed camera: a1 adds
it, it moves to a2, a2 archives ``--segments`` incompressible segments (each acknowledged
after its fsync), it moves back to a1. Then, alternating in each round so that a shared
machine's noise hits both alike:

* **consolidate**: ``POST /v1/admin/cameras/C/consolidate`` on a1, timed from the request to
  its answer: a1 signs the request, a2 authenticates it and reads its archive, the records
  cross HTTPS, a1 verifies every signature and digest against a2's certificate and stores the
  part (fsynced, renamed into place). The part is deleted after each round (the next copies
  it again);
* **download**: the same export asked of a2 by this process (a registered Archiver's signed
  request) and read to the end, nothing verified or stored: the same bytes over the same
  HTTPS, the baseline.

MB/s is of the copied part's bytes (records and key streams); the ratio is consolidate /
download throughput (1.0: verification and storage cost nothing on top of the transfer).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.serialization import Encoding

from archiver.consolidation import EXPORT_PATH, SETTLE_MS, ExportRequest
from archiver.directory import ArchiverRow, open_directory
from bench.common import MB, CertFactory, Report, run_bench
from fusion_testkit.pki import SiteCa
from fusion_testkit.postgres import PostgresCluster
from fusion_testkit.server import ArchiverServer, production_archiver
from keyservice.certs import certificate_pem

CAMERA = "bench-consolidate"


@dataclass
class Options:
    segments: int = 48
    segment_kib: int = 1024
    rounds: int = 3
    viewers: int = 5


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _probe() -> Any:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from keyservice.identity import SoftwareSigner

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-probe")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    return SoftwareSigner(cert, key)


def _wait_until_accepted(server: ArchiverServer, token: str) -> None:
    deadline = time.monotonic() + 60
    while server.put_segment(CAMERA, token, b"#EXTM3U\n", name="index.m3u8") >= 300:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.url} never took the camera's pushes")
        time.sleep(0.2)


def run(report: Report, workdir: Path, opts: Options) -> dict[str, Any]:
    result = report.section("consolidation", asdict(opts))
    cluster = PostgresCluster.start()
    try:
        url = cluster.create_database()
        ca = SiteCa.create(workdir / "site-ca")
        common = ("--directory", url, "--peer-tls-ca", str(ca.path), "--consolidate-every",
                  "0", "--key-period", "60")
        a1 = production_archiver(ca, workdir / "a1", extra_args=(*common, "--name", "a1"))
        a2 = production_archiver(ca, workdir / "a2", extra_args=(*common, "--name", "a2"))
        directory = open_directory(url, workdir / "directory-client")
        with a1, a2:
            token = a1.add_camera(CAMERA)
            pems = CertFactory()
            for i in range(opts.viewers):
                a1.add_viewer(certificate_pem(pems.certificate(i)).decode(), [CAMERA])
            a2.stop()  # its chains start with the viewers in them
            a2.start()
            since = _now_ms()
            directory.move_camera(CAMERA, "a2", since)
            _wait_until_accepted(a2, token)
            t0 = time.perf_counter()
            for i in range(opts.segments):
                body = os.urandom(opts.segment_kib * 1024)
                status = a2.put_segment(CAMERA, token, body, name=f"s{i}.ts")
                if status != 201:
                    raise RuntimeError(f"segment {i}: HTTP {status}")
            ingest_s = time.perf_counter() - t0
            until = _now_ms()
            directory.move_camera(CAMERA, "a1", until)
            time.sleep(SETTLE_MS / 1000)  # a placement is copied once it settled
            probe = _probe()
            directory.register_archiver(ArchiverRow(
                "bench-probe", "https://127.0.0.1:9", probe.certificate.public_bytes(
                    Encoding.DER), _now_ms(), _now_ms()))
            report.line(f"a2 archived {opts.segments} x {opts.segment_kib} KiB in "
                        f"{ingest_s:.1f} s; load average {os.getloadavg()[0]:.2f}")
            rounds: list[dict[str, float]] = []
            part_dir = a1.data_dir / "consolidated" / CAMERA
            for r in range(opts.rounds):
                shutil.rmtree(part_dir, ignore_errors=True)
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                done = a1.admin("POST", f"/v1/admin/cameras/{CAMERA}/consolidate", expect=200)
                consolidate_s = time.perf_counter() - t0
                stored = [p for p in done["parts"] if p["stored"]]
                if len(stored) != 1:
                    raise RuntimeError(f"consolidation stored {done['parts']}")
                part_bytes = int(stored[0]["bytes"])
                ask = ExportRequest.make(probe, "bench-probe", CAMERA, since, until + 30_000,
                                         _now_ms())
                t0 = time.perf_counter()
                answer = httpx.post(a2.url + EXPORT_PATH, json=asdict(ask), verify=a2.verify,
                                    timeout=600)
                download_s = time.perf_counter() - t0
                answer.raise_for_status()
                row = {"bytes": part_bytes, "export_bytes": len(answer.content),
                       "consolidate_s": consolidate_s, "download_s": download_s,
                       "consolidate_mb_s": part_bytes / MB / consolidate_s,
                       "download_mb_s": len(answer.content) / MB / download_s,
                       "load_at_start": load}
                row["ratio"] = row["consolidate_mb_s"] / row["download_mb_s"]
                rounds.append(row)
                report.line(f"round {r + 1}: consolidate {part_bytes / MB:.1f} MB in "
                            f"{consolidate_s:.2f} s = {row['consolidate_mb_s']:.1f} MB/s; "
                            f"download {len(answer.content) / MB:.1f} MB in {download_s:.2f} s "
                            f"= {row['download_mb_s']:.1f} MB/s; ratio {row['ratio']:.2f} "
                            f"(load {load:.2f})")
            result["rounds"] = rounds
            for key in ("consolidate_mb_s", "download_mb_s", "ratio"):
                result[f"median_{key}"] = statistics.median(r[key] for r in rounds)
            report.line(f"median: consolidate {result['median_consolidate_mb_s']:.1f} MB/s, "
                        f"download {result['median_download_mb_s']:.1f} MB/s, ratio "
                        f"{result['median_ratio']:.2f}")
        directory.close()
    finally:
        cluster.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    return run_bench("consolidation", __doc__, Options(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
