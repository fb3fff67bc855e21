"""Retention pass cost: time per day of video removed, and space reclaimed.

    python -m bench.retention --work DIR [--days 2] [--segment-s 10] [--segment-bytes 32768]
        [--viewers 2]

Archives ``--days`` whole past UTC days of one camera through the real write path
(bench.generate, in a subprocess: SoftHSM signer, keys wrapped for the viewers), then runs one
retention pass with a 1-day period over them (every day expired) and reports what it took.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import REPO_ROOT

DAY_MS = 86_400_000


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _viewer_pems(work: Path, count: int) -> list[Path]:
    """Viewer certificates on software keys: generation only wraps keys to them, nobody
    plays them back here."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    from keyservice.certs import build_viewer_certificate, certificate_pem
    from keyservice.keyscheme import KeyScheme

    pems = []
    for index in range(count):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = build_viewer_certificate(key, f"bench-viewer-{index}", oaep_hash=KeyScheme.RSA_OAEP_SHA256,
                                        now=dt.datetime.now(dt.UTC))
        path = work / f"viewer-{index}.pem"
        path.write_bytes(certificate_pem(cert))
        pems.append(path)
    return pems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.retention")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--days", type=int, default=2)
    parser.add_argument("--segment-s", type=float, default=10.0)
    parser.add_argument("--segment-bytes", type=int, default=32768)
    parser.add_argument("--viewers", type=int, default=2)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / "archiver"
    today = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = today - dt.timedelta(days=args.days + 2)
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "FUSION_PIN")}
    command = [sys.executable, "-m", "bench.generate", "--data", str(data), "--camera", "cam",
               "--start", start.isoformat(), "--hours", str(24 * args.days),
               "--segment-s", str(args.segment_s), "--segment-bytes", str(args.segment_bytes)]
    for pem in _viewer_pems(args.work, args.viewers):
        command += ["--viewer", str(pem)]
    generated = json.loads(subprocess.run(command, cwd=REPO_ROOT, env=env, check=True,
                                          capture_output=True, text=True).stdout.splitlines()[-1])
    before = _size(data)

    from archiver.db import Database
    from archiver.directory import open_directory
    from archiver.retention import Retention
    from archiver.settings import Settings
    from archiver.storage import ArchiveFiles

    settings = Settings(data_dir=data.resolve(), retention_days=1, min_free_bytes=0)
    db = Database(settings.db_path)
    directory = open_directory(None, settings.data_dir)  # the cameras and holds
    files = ArchiveFiles(settings.archive_dir)
    try:
        def now_ms() -> int:
            return int(dt.datetime.now(dt.UTC).timestamp() * 1000)

        report = Retention(settings, db, files, now_ms, directory=directory).run()
    finally:
        files.close()
        directory.close()
        db.close()
    after = _size(data)
    result = {
        "days": args.days, "segments": generated["segments"],
        "segment_s": args.segment_s, "segment_bytes": args.segment_bytes,
        "viewers": args.viewers, "key_records_written": generated["key_records"],
        "pass_seconds": round(report.seconds, 3),
        "seconds_per_day": round(report.seconds / args.days, 3),
        "files_removed": report.files_removed, "journals_removed": report.journals_removed,
        "key_records_shredded": report.key_records_shredded,
        "epochs_shredded": report.epochs_shredded,
        "bytes_reclaimed_files": report.bytes_reclaimed,
        "data_dir_bytes_before": before, "data_dir_bytes_after": after,
    }
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
