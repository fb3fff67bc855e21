"""docs/deployment.md's recipe for the site CA and the Archiver's TLS certificate, tested as
written: the marked shell block is taken from the page verbatim and run by bash in an empty
directory; an Archiver serves HTTPS with the certificate it made; fusion-client and
fusion-archiver, given --tls-ca site-ca.pem, reach it by IP address and by DNS name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from fusion_testkit import forkserver
from keyservice.errors import ArchiverUnreachable
from tests.fixtures.server import ArchiverServer
from tests.fixtures.tokens import TokenHandle, enroll_viewer

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "deployment.md"
MARKER = "<!-- tested-recipe: tls"


def recipe() -> str:
    """The fenced block right after the marker, exactly as the page shows it."""
    text = DOC.read_text()
    found = re.search(re.escape(MARKER) + r"[^\n]*\n```sh\n(.*?)\n```\n", text, re.S)
    assert found, f"no block marked {MARKER!r} in {DOC}"
    return found[1]


def run(module: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = forkserver.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, env=env)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_recipe_is_plain_commands() -> None:
    block = recipe()
    assert "openssl req -x509" in block and "subjectAltName=DNS:$ARCHIVER_DNS,IP:$ARCHIVER_IP" \
        in block
    assert "sudo" not in block and "/tmp" not in block  # runs as written in any directory


def test_recipe_makes_a_certificate_clients_verify_by_ip_and_by_name(
        tmp_path: Path, softhsm_token: TokenHandle) -> None:
    work = tmp_path / "ca"
    work.mkdir()
    made = subprocess.run(["bash", "-euo", "pipefail", "-c", recipe()], cwd=work, text=True,
                          capture_output=True, timeout=120,
                          env={**os.environ, "ARCHIVER_DNS": "localhost",
                               "ARCHIVER_IP": "127.0.0.1"})
    assert made.returncode == 0, made.stderr
    assert "tls.crt: OK" in made.stdout  # the recipe's own check
    assert "DNS:localhost, IP Address:127.0.0.1" in made.stdout
    for name in ("site-ca.key", "tls.key"):
        assert (work / name).stat().st_mode & 0o077 == 0, name
    ca = work / "site-ca.pem"

    server = ArchiverServer(tmp_path / "archiver", tls_ca=ca, extra_args=(
        "--tls-cert", str(work / "tls.crt"), "--tls-key", str(work / "tls.key"))).start()
    try:
        pem = enroll_viewer(softhsm_token, "alice")
        server.add_camera("lobby")
        server.add_viewer(pem, ["lobby"])
        env = {k: v for k, v in os.environ.items()
               if k not in ("FUSION_TLS_CA", "SSL_CERT_FILE", "SSL_CERT_DIR", "FUSION_PIN")}
        env["FUSION_CLIENT_HOME"] = str(tmp_path / "home")
        for host in ("127.0.0.1", "localhost"):
            url = f"https://{host}:{server.port}"
            admin = run("archiver", env, "cameras", "list", "--url", url, "--tls-ca", str(ca),
                        "--data", str(server.data_dir))
            assert admin.returncode == 0, (host, admin.stderr)
            assert admin.stdout.split()[0] == "lobby", admin.stdout
            viewer = run("client", env, "cameras", "--archiver", url, "--tls-ca", str(ca),
                         "--token", softhsm_token.object_uri("alice"))
            assert viewer.returncode == 0, (host, viewer.stderr)
            assert viewer.stdout.split()[0] == "lobby", viewer.stdout
        # Without the site CA the same connection is refused: the CA is what is trusted.
        untrusted = run("client", env, "cameras", "--archiver", f"https://localhost:{server.port}",
                        "--token", softhsm_token.object_uri("alice"))
        assert untrusted.returncode == ArchiverUnreachable.exit_code, untrusted.stderr
        assert "TLS certificate verification failed" in untrusted.stderr
    finally:
        server.stop()


def test_recipe_puts_the_admins_names_in_the_certificate(tmp_path: Path) -> None:
    """The SANs are the ones the admin set, of both kinds, and no others."""
    made = subprocess.run(["bash", "-euo", "pipefail", "-c", recipe()], cwd=tmp_path,
                          text=True, capture_output=True, timeout=120,
                          env={**os.environ, "ARCHIVER_DNS": "archiver.example",
                               "ARCHIVER_IP": "192.0.2.10"})
    assert made.returncode == 0, made.stderr
    text = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "tls.crt"), "-noout",
                           "-ext", "subjectAltName,basicConstraints,extendedKeyUsage"],
                          capture_output=True, text=True, check=True).stdout
    sans = [line.strip() for line in text.splitlines() if "DNS:" in line or "IP Address" in line]
    assert sans == ["DNS:archiver.example, IP Address:192.0.2.10"], text
    assert "CA:FALSE" in text and "TLS Web Server Authentication" in text
