"""bench.generate authorizes viewers and adds its camera through archiver.admin, the code the
admin API runs: the site-CA check and the audit entries are not skipped."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from keyservice.certs import build_viewer_certificate, certificate_pem
from keyservice.identity import OaepHash

REPO_ROOT = Path(__file__).resolve().parents[2]


def _viewer_pem(tmp_path: Path) -> Path:
    key = rsa.generate_private_key(65537, 2048)
    cert = build_viewer_certificate(key, "gen-viewer", oaep_hash=OaepHash.SHA256,
                                    now=dt.datetime.now(dt.UTC), days=2)
    path = tmp_path / "viewer.pem"
    path.write_bytes(certificate_pem(cert))
    return path


def _ca_pem(tmp_path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = tmp_path / "ca.pem"
    path.write_bytes(certificate_pem(cert))
    return path


def _generate(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "FUSION_PIN")}
    return subprocess.run(
        [sys.executable, "-m", "bench.generate", "--data", str(tmp_path / "data"), "--camera",
         "gen", "--hours", "0.001", "--segment-s", "1", "--segment-bytes", "1024", *extra],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def _audit(tmp_path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in
            (tmp_path / "data" / "audit.jsonl").read_text().splitlines()]


def test_generate_audits_the_viewer_and_the_camera(tmp_path: Path) -> None:
    done = _generate(tmp_path, "--viewer", str(_viewer_pem(tmp_path)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["epoch_openers"] >= 1
    actions = [(e["actor"], e["action"]) for e in _audit(tmp_path)]
    assert ("bench.generate", "viewer.add") in actions
    assert ("bench.generate", "camera.add") in actions


def test_generate_refuses_a_viewer_the_site_ca_did_not_issue(tmp_path: Path) -> None:
    done = _generate(tmp_path, "--viewer", str(_viewer_pem(tmp_path)), "--site-ca",
                     str(_ca_pem(tmp_path)))
    assert done.returncode == 2, done.stdout + done.stderr[-2000:]
    assert "not issued by the site CA" in done.stderr and "Traceback" not in done.stderr
    assert not any(e["action"] == "viewer.add" for e in _audit(tmp_path))
