"""CPU cost of the Archiver's write path per MB, without HTTP: ``Archive.ingest_segment`` in
the plaintext baseline mode and encrypting (1 viewer), on the same segments, in one thread.

    python -m bench.writepath --data DIR --segments 40 --size 2621440

Process CPU time (not wall time), so waiting for fsync and a noisy neighbour count far less
than in MB/s. The encrypted path's extra work is also timed piece by piece: AES-256-GCM
(``seal_segment``), the SHA-256 segment digest the signed manifest carries, and the manifest's
ECDSA signature on the Archiver's SoftHSM token. Runs in a process of its own (the token).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from archiver.admin import Admin
from archiver.archive import Archive
from archiver.audit import AuditLog
from archiver.settings import Settings
from archiver.signing import open_signer
from bench.common import MB, CertFactory
from bench.generate import authorize
from keyservice.crypto import new_minute_key, seal_segment
from keyservice.format import DataStream, segment_digest

T0_MS = 1_748_822_400_000


def measure(data_dir: Path, segments: int, size: int) -> dict[str, float]:
    payloads = [os.urandom(size) for _ in range(4)]
    cpu = {}
    # One signing token for both (SoftHSM reads one configuration per process); the baseline
    # never uses it.
    signer = open_signer(Settings(data_dir=data_dir / "signer"))
    for mode in ("baseline", "encrypted"):
        settings = Settings(data_dir=data_dir / mode,
                            benchmark_plaintext_baseline=mode == "baseline")
        archive = Archive(settings, signer, clock=lambda: T0_MS)
        try:
            if mode == "encrypted":
                audit = AuditLog(settings.audit_log_path)
                try:
                    authorize(Admin(archive, audit), CertFactory().pems(0, 1)[0].encode())
                finally:
                    audit.close()
            archive.ingest_segment("warmup", payloads[0], now_ms=T0_MS)
            start = time.process_time()
            for index in range(segments):
                archive.ingest_segment("cam", payloads[index % 4], now_ms=T0_MS + index)
            cpu[mode] = time.process_time() - start
        finally:
            archive.close()
    mb = segments * size / MB
    # The pieces the encrypted path adds, timed on their own.
    key = new_minute_key("cam", DataStream.VIDEO, T0_MS)
    aes = sha = 0.0
    for index in range(segments):  # one segment alive at a time, as in the Archiver
        start = time.process_time()
        segment = seal_segment(key, index, T0_MS, payloads[index % 4])
        sealed = time.process_time()
        segment_digest(segment)
        aes += sealed - start
        sha += time.process_time() - sealed
    start = time.perf_counter()
    for _ in range(segments):
        signer.sign(b"a manifest of one segment: about 200 bytes of header, tag and digest")
    sign = time.perf_counter() - start
    return {
        "segments": segments, "segment_bytes": size,
        "baseline_cpu_ms_per_mb": cpu["baseline"] * 1000 / mb,
        "encrypted_cpu_ms_per_mb": cpu["encrypted"] * 1000 / mb,
        "aes_gcm_ms_per_mb": aes * 1000 / mb,
        "sha256_digest_ms_per_mb": sha * 1000 / mb,
        # Wall time: the token works in its own library, partly outside this thread's CPU.
        "ecdsa_sign_ms_per_segment": sign * 1000 / segments,
        "ecdsa_sign_ms_per_mb": sign * 1000 / mb,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.writepath")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--segments", type=int, default=40)
    parser.add_argument("--size", type=int, default=int(2.5 * 2**20))
    args = parser.parse_args(argv)
    json.dump(measure(args.data, args.segments, args.size), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
