"""Makes ``datadir-v6/``: an Archiver data directory written by a release from before the site
directory (commit 26698b6, index schema version 6, before migration 7), for
tests/archiver/test_old_datadir.py. TEST-ONLY: its signing token's PIN is in it.

    git worktree add --detach OLD 26698b67839771c136962c5b0f00f9e90e2ac6ec
    python tests/archiver/data/make_old_datadir.py OLD tests/archiver/data/datadir-v6

The old Archiver runs from OLD (PYTHONPATH); this checkout's client library logs in and makes
the access grant (the wire protocol of both is the same). What it holds is written to
``datadir-v6.json`` beside it for the test: a camera with three segments, viewer olga
(authorized on the camera) and viewer otto (no camera), an evidence hold and a retention
period on the camera, a pending access grant from olga to otto, a personal admin (carol).
The viewers' TEST-ONLY software keys are in ``datadir-v6-viewers/``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from client.pinning import KnownArchivers
from client.session import ArchiverSession
from client.viewer import load_certificate_file, login, make_grant_for, recipient_for
from fusion_testkit.server import ArchiverServer, server_env
from keyservice.certs import build_viewer_certificate
from keyservice.identity import SoftwareIdentity
from keyservice.keyscheme import KeyScheme

CAMERA = "olddoor"


def make_viewer(keys: Path, name: str) -> Path:
    """A TEST-ONLY viewer key (RSA-2048, software) and its certificate, valid for a century:
    the committed data directory must keep working."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = build_viewer_certificate(key, name, oaep_hash=KeyScheme.RSA_OAEP_SHA256,
                                    now=dt.datetime.now(dt.UTC), days=36500)
    keys.mkdir(parents=True, exist_ok=True)
    (keys / f"TEST-ONLY-{name}.key.pem").write_bytes(key.private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    (keys / f"TEST-ONLY-{name}.cert.pem").write_bytes(cert.public_bytes(Encoding.PEM))
    return keys / f"TEST-ONLY-{name}.cert.pem"


def identity(keys: Path, name: str) -> SoftwareIdentity:
    cert = load_certificate_file(keys / f"TEST-ONLY-{name}.cert.pem")
    key = load_pem_private_key((keys / f"TEST-ONLY-{name}.key.pem").read_bytes(), None)
    return SoftwareIdentity(cert, key)  # type: ignore[arg-type]


def segment(i: int) -> bytes:
    """The camera's i-th segment (the test compares what it plays with these)."""
    return f"old segment {i} ".encode() * 64


def main(old: Path, out: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="old-datadir-"))
    keys = out.parent / f"{out.name}-viewers"
    if keys.exists():
        shutil.rmtree(keys)
    cert_a, cert_b, cert_c = (make_viewer(keys, n) for n in ("olga", "otto", "carol"))
    data = work / "archiver"
    server = ArchiverServer(data, key_period_s=60,
                            env=server_env({**os.environ, "PYTHONPATH": str(old.resolve())}))
    segments = [segment(i) for i in range(3)]
    with server:
        token = server.add_camera(CAMERA)
        fp_a = server.add_viewer(cert_a, [CAMERA])
        fp_b = server.add_viewer(cert_b, [])
        t0 = time.time_ns() // 1_000_000
        for chunk in segments:
            assert server.put_segment(CAMERA, token, chunk) == 201
        t1 = time.time_ns() // 1_000_000 + 1
        hold = server.admin("POST", "/v1/admin/holds", {
            "camera": CAMERA, "from_ms": t0 - 3_600_000, "to_ms": t1 + 3_600_000,
            "reason": "case 6 (kept through retention)"}, expect=201)
        server.admin("PUT", f"/v1/admin/cameras/{CAMERA}/retention", {"days": 36500},
                     expect=200)
        carol = server.admin("POST", "/v1/admin/admins", {
            "certificate": cert_c.read_text(), "name": "carol"},
            expect=201)
        known = work / "known_archivers"
        with ArchiverSession(server.url) as session:
            olga = identity(keys, "olga")
            me = login(session, olga, known=KnownArchivers(known))
            made = make_grant_for(session, olga, me, CAMERA, t0, t1,
                                  recipient_for(load_certificate_file(cert_b)), note="case 6")
    if out.exists():
        shutil.rmtree(out)
    # Not the disk reserve (16 MiB of nothing: made again at start), nor the lock.
    shutil.copytree(data, out, ignore=shutil.ignore_patterns("*.lock", "*-wal", "*-shm",
                                                             "retention-reserve"))
    # The SoftHSM configuration names its token directory by absolute path: this machine's
    # is not for the repository (the test writes its own, keyservice.softhsm.write_config).
    (out / "token" / "softhsm2.conf").write_text("directories.tokendir = tokens\n"
                                                 "objectstore.backend = file\n")
    (out.parent / f"{out.name}.json").write_text(json.dumps({
        "release": "26698b67839771c136962c5b0f00f9e90e2ac6ec", "schema_version": 6,
        "camera": CAMERA, "camera_token": token, "viewer_a": fp_a, "viewer_b": fp_b,
        "segments": len(segments), "from_ms": t0, "to_ms": t1,
        "hold": hold, "grant_id": made.grant.grant_id, "admin": carol["fingerprint"],
    }, indent=2) + "\n")
    shutil.rmtree(work)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
