"""The three CLIs share one error-to-exit path (keyservice.exits): --version, and a connection
that fails says what failed -- TLS verification with its reason, refused, timed out, no DNS --
against real servers and sockets."""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import sys

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from client.session import ArchiverSession
from keyservice.certs import build_viewer_certificate
from keyservice.errors import ArchiverUnreachable
from keyservice.exits import connection_failure, failure
from keyservice.identity import OaepHash, SoftwareIdentity
from tests.fixtures.server import ArchiverServer

CLIS = {"fusion-keys": "keyservice.cli", "fusion-archiver": "archiver", "fusion-client": "client"}


def run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def closed_port() -> int:
    with socket.socket() as sock:  # bound, then closed: nothing listens there now
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("prog", sorted(CLIS))
def test_version(prog: str) -> None:
    done = run(CLIS[prog], "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{prog} ") and done.stdout.split()[1][0].isdigit()


def test_admin_cli_reports_tls_verification_and_trusts_tls_ca(
        https_archiver: ArchiverServer) -> None:
    common = ["--url", https_archiver.url, "--data", str(https_archiver.data_dir)]
    refused = run("archiver", "cameras", "list", *common)
    assert refused.returncode == ArchiverUnreachable.exit_code, refused.stderr
    assert "TLS certificate verification failed" in refused.stderr
    assert "self-signed" in refused.stderr or "issuer" in refused.stderr  # OpenSSL's reason
    assert "--tls-ca" in refused.stderr
    assert https_archiver.tls_ca is not None
    trusted = run("archiver", "cameras", "add", "lobby", *common, "--tls-ca",
                  str(https_archiver.tls_ca), "--json")
    assert trusted.returncode == 0, trusted.stderr
    listed = run("archiver", "viewers", "list", *common, "--tls-ca", str(https_archiver.tls_ca))
    assert listed.returncode == 0 and "no viewers" in listed.stdout


def test_admin_cli_reports_https_spoken_to_a_plain_http_port(
        archiver_server: ArchiverServer) -> None:
    url = archiver_server.url.replace("http://", "https://")
    done = run("archiver", "cameras", "list", "--url", url, "--admin-token", "x")
    assert done.returncode == ArchiverUnreachable.exit_code
    assert "TLS handshake failed" in done.stderr, done.stderr


def test_admin_cli_reports_refused_and_dns() -> None:
    refused = run("archiver", "cameras", "list", "--url", f"http://127.0.0.1:{closed_port()}",
                  "--admin-token", "x")
    assert refused.returncode == ArchiverUnreachable.exit_code
    assert "connection refused" in refused.stderr, refused.stderr
    # .invalid never resolves (RFC 6761).
    unresolved = run("archiver", "cameras", "list", "--url", "http://archiver.invalid:8080",
                     "--admin-token", "x")
    assert unresolved.returncode == ArchiverUnreachable.exit_code
    assert "does not resolve" in unresolved.stderr, unresolved.stderr


def test_a_silent_server_is_reported_as_a_timeout() -> None:
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(httpx.TimeoutException) as caught:
            httpx.get(url, timeout=0.3)
        assert "timeout" in connection_failure(caught.value)
        message, code = failure(caught.value)
        assert code == ArchiverUnreachable.exit_code and "timeout" in message
        # The viewer's session says the same through its own path (the login's first request).
        key = rsa.generate_private_key(65537, 2048)
        identity = SoftwareIdentity(build_viewer_certificate(
            key, "t", oaep_hash=OaepHash.SHA256, now=dt.datetime.now(dt.UTC)), key)
        with ArchiverSession(url, timeout=0.3) as session, \
                pytest.raises(ArchiverUnreachable, match="timeout"):
            session.login(identity, lambda cert: None)
