"""Synthetic archives through the Archiver's real write path, with an injected clock.

    python -m bench.generate --data DIR --camera day --start 2025-06-02T00:00:00Z \\
        --hours 24 --segment-s 10 --segment-bytes 32768 --viewer alice.pem --viewer bob.pem

Every segment goes through ``Archive.ingest_segment`` exactly as an HTTP upload would: minute
keys rotated by ``KeyManager`` and wrapped for every authorized viewer (epoch openers at each
UTC day), AES-256-GCM, a manifest signed on the Archiver's own SoftHSM token, an fsynced append
and an indexed commit. Only the clock is simulated, so a day of recording takes minutes, not a
day. Viewers (certificates) are authorized on all cameras before the first segment, as
``fusion-archiver viewers add`` would do; the camera is created with a discarded ingest token.

Segment contents are deterministic (``segment_bytes(camera, index, size)``), so a viewer can
check what it decrypted. Run it in a process of its own: it loads the Archiver's SoftHSM token,
and SoftHSM reads its configuration once per process.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from archiver.admin import Admin, AdminRefused
from archiver.archive import Archive
from archiver.audit import AuditLog
from archiver.settings import Settings
from archiver.signing import open_signer
from keyservice.certs import load_certificate
from keyservice.identity import fingerprint


@dataclass
class Generated:
    camera: str
    segments: int
    plaintext_bytes: int
    first_ms: int
    last_ms: int
    segment_s: float
    segment_bytes: int
    key_rotations: int
    key_records: int
    epoch_openers: int
    seconds: float


def segment_bytes(camera: str, index: int, size: int) -> bytes:
    """The deterministic plaintext of segment ``index`` of ``camera`` (incompressible)."""
    # Benchmark data, not a secret: reproducible so the viewer can check what it decrypted.
    return random.Random(f"{camera}/{index}").randbytes(size)  # noqa: S311


def parse_utc(text: str) -> int:
    when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def authorize(admin: Admin, pem: bytes) -> str:
    """What the admin API's ``viewers add`` does (archiver.admin: site-CA check, new epoch,
    audit entry), unless the viewer is authorized already."""
    fp = fingerprint(load_certificate(pem)).hex()
    known = admin.archive.directory.viewer(fp)
    if known is None or known.revoked_ms is not None:
        admin.authorize_viewer("bench.generate", pem, None)
    return fp


def generate(data_dir: Path, camera: str, start_ms: int, hours: float, segment_s: float,
             size: int, viewers: list[bytes], key_period_s: int = 60,
             site_ca: tuple[Path, ...] = ()) -> Generated:
    settings = Settings(data_dir=data_dir.resolve(), key_period_s=key_period_s,
                        site_ca_files=site_ca)
    now = [start_ms]
    archive = Archive(settings, open_signer(settings), clock=lambda: now[0])
    audit = AuditLog(settings.audit_log_path)
    admin = Admin(archive, audit, site_ca=tuple(load_certificate(p.read_bytes())
                                                for p in settings.site_ca_files))
    try:
        for pem in viewers:
            authorize(admin, pem)
        if archive.directory.camera(camera) is None:
            # The ingest token is discarded: this camera is only ever fed by the generator.
            admin.add_camera("bench.generate", camera)
        count = max(1, int(hours * 3600 / segment_s))
        step_ms = int(segment_s * 1000)
        rotations0 = archive.keys.rotations
        records0 = archive.keys.key_records_written
        epochs0 = archive.keys.epochs_started
        started = time.perf_counter()
        for index in range(count):
            now[0] = start_ms + index * step_ms
            archive.ingest_segment(camera, segment_bytes(camera, index, size), now_ms=now[0])
        return Generated(
            camera=camera, segments=count, plaintext_bytes=count * size, first_ms=start_ms,
            last_ms=start_ms + (count - 1) * step_ms, segment_s=segment_s, segment_bytes=size,
            key_rotations=archive.keys.rotations - rotations0,
            key_records=archive.keys.key_records_written - records0,
            epoch_openers=archive.keys.epochs_started - epochs0,
            seconds=time.perf_counter() - started)
    finally:
        audit.close()
        archive.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the Archiver's data directory")
    parser.add_argument("--camera", required=True)
    parser.add_argument("--start", default="2025-06-02T00:00:00Z", help="UTC start (ISO 8601)")
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--segment-s", type=float, default=10.0)
    parser.add_argument("--segment-bytes", type=int, default=32768)
    parser.add_argument("--key-period", type=int, default=60)
    parser.add_argument("--viewer", type=Path, action="append", default=[],
                        help="a viewer certificate (PEM) to authorize on all cameras")
    parser.add_argument("--site-ca", type=Path, action="append", default=[],
                        help="the site CA viewer certificates must be issued by (as serve's)")
    args = parser.parse_args(argv)
    try:
        result = generate(args.data, args.camera, parse_utc(args.start), args.hours,
                          args.segment_s, args.segment_bytes,
                          [p.read_bytes() for p in args.viewer], args.key_period,
                          tuple(args.site_ca))
    except AdminRefused as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    json.dump(asdict(result), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
