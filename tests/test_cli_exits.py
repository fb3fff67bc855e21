"""The three CLIs share one error-to-exit path (keyservice.exits): --version, and a connection
that fails says what failed -- TLS verification with its reason, refused, timed out, no DNS --
against real servers and sockets."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from client.session import ArchiverSession, NotEnrolled
from fusion_testkit import forkserver
from fusion_testkit.pki import SiteCa
from keyservice.certs import build_viewer_certificate
from keyservice.errors import ArchiverUnreachable, TlsCaError
from keyservice.exits import connection_failure, failure
from keyservice.identity import OaepHash, SoftwareIdentity
from tests.fixtures.server import ArchiverServer
from tests.fixtures.tokens import TokenHandle, enroll_viewer

CLIS = {"fusion-keys": "keyservice.cli", "fusion-archiver": "archiver", "fusion-client": "client"}


def run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    done = forkserver.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
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


# --- one trust configuration (keyservice.tls): --tls-ca, else FUSION_TLS_CA -------------------
def run_env(module: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = forkserver.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, env=env)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any trust setting of its own (nor a PIN or token)."""
    drop = ("FUSION_TLS_CA", "SSL_CERT_FILE", "SSL_CERT_DIR", "FUSION_PIN", "FUSION_TOKEN")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def test_fusion_client_honours_fusion_tls_ca(https_archiver: ArchiverServer,
                                             softhsm_token: TokenHandle, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The README offers FUSION_TLS_CA to fusion-client as to fusion-archiver: the same
    variable, the same meaning (the --tls-ca option wins over it), in the CLI and the library."""
    assert https_archiver.tls_ca is not None
    pem = enroll_viewer(softhsm_token, "alice")
    https_archiver.add_camera("lobby")
    https_archiver.add_viewer(pem, ["lobby"])
    home = str(tmp_path / "home")
    args = ("cameras", "--archiver", https_archiver.url, "--token",
            softhsm_token.object_uri("alice"))
    untrusted = run_env("client", clean_env(FUSION_CLIENT_HOME=home), *args)
    assert untrusted.returncode == ArchiverUnreachable.exit_code, untrusted.stderr
    assert "TLS certificate verification failed" in untrusted.stderr
    trusted = run_env("client", clean_env(FUSION_CLIENT_HOME=home,
                                          FUSION_TLS_CA=str(https_archiver.tls_ca)), *args)
    assert trusted.returncode == 0, trusted.stderr
    assert trusted.stdout.split()[0] == "lobby"
    # An explicit --tls-ca wins over the variable (here: a variable naming a missing file).
    explicit = run_env("client", clean_env(FUSION_CLIENT_HOME=home,
                                           FUSION_TLS_CA=str(tmp_path / "missing.pem")),
                       *args, "--tls-ca", str(https_archiver.tls_ca))
    assert explicit.returncode == 0, explicit.stderr

    # The library: ArchiverSession(url) follows the same rule. The TLS handshake succeeds and
    # the Archiver answers (an unknown certificate: not enrolled, 43, not unreachable, 40).
    key = rsa.generate_private_key(65537, 2048)
    stranger = SoftwareIdentity(build_viewer_certificate(
        key, "stranger", oaep_hash=OaepHash.SHA256, now=dt.datetime.now(dt.UTC)), key)
    for name in ("FUSION_TLS_CA", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    with ArchiverSession(https_archiver.url) as session, \
            pytest.raises(ArchiverUnreachable, match="TLS certificate verification failed"):
        session.login(stranger, lambda cert: None)
    monkeypatch.setenv("FUSION_TLS_CA", str(https_archiver.tls_ca))
    with ArchiverSession(https_archiver.url) as session, pytest.raises(NotEnrolled):
        session.login(stranger, lambda cert: None)


def bad_ca_files(directory: Path) -> dict[str, tuple[Path, str]]:
    """CA files an admin might give by mistake, and what the one sentence must say."""
    directory.mkdir()
    site = SiteCa.create(directory / "site")
    leaf, key = site.issue_tls_server(directory / "server")
    garbage = directory / "notes.txt"
    garbage.write_text("the site CA is on the admin's laptop\n")
    return {"missing": (directory / "missing.pem", "no such file"),
            "not PEM": (garbage, "no PEM certificate"),
            "a private key": (key, "no PEM certificate"),
            "the server's own certificate": (leaf, "no CA certificate"),
            "a directory": (directory, "is a directory")}


@pytest.mark.parametrize("prog", ["fusion-client", "fusion-archiver"])
def test_a_bad_tls_ca_is_one_sentence_and_its_own_exit_code(prog: str, tmp_path: Path) -> None:
    """Refused before anything is sent (the URL's port is closed: reaching for it would be
    exit 40), from the option and from FUSION_TLS_CA alike."""
    url = f"https://127.0.0.1:{closed_port()}"
    args = (["cameras", "--archiver", url, "--token", "pkcs11:token=none;object=x"]
            if prog == "fusion-client" else ["cameras", "list", "--url", url,
                                             "--admin-token", "x"])
    for what, (path, reason) in bad_ca_files(tmp_path / "cas").items():
        for given in ("option", "env"):
            env = clean_env(FUSION_CLIENT_HOME=str(tmp_path / "home"))
            extra = ["--tls-ca", str(path)] if given == "option" else []
            if given == "env":
                env["FUSION_TLS_CA"] = str(path)
            done = run_env(CLIS[prog], env, *args, *extra)
            assert done.returncode == TlsCaError.exit_code == 32, (what, given, done.stderr)
            [line] = done.stderr.strip().splitlines()
            assert line.startswith(f"{prog}: Cannot use {path} as the TLS CA"), line
            assert reason in line and line.endswith("."), (what, line)


def test_the_client_exit_table_has_one_row_per_code_and_every_client_code() -> None:
    """docs/client.md's exit table: each code once, and every code the viewer's commands
    raise (their error classes, evidence verify's verdicts, a withheld 410) is in it."""
    import importlib
    import re

    from tests.fixtures.server import REPO_ROOT
    table = [int(code) for code in re.findall(r"^\| (\d+) \|",
                                              (REPO_ROOT / "docs" / "client.md").read_text(),
                                              re.M)]
    assert len(table) == len(set(table)), sorted(c for c in table if table.count(c) > 1)
    from keyservice.errors import KeyServiceError
    for module in ("client.cli", "client.evidence", "client.grants", "client.player",
                   "client.session", "client.web.media", "keyservice.expiry"):
        importlib.import_module(module)

    def subclasses(cls: type) -> list[type]:
        return [c for s in cls.__subclasses__() for c in (s, *subclasses(s))]
    raised = {c.exit_code for c in subclasses(KeyServiceError)
              if c.__module__.startswith("client.") or c.__module__ == "keyservice.expiry"}
    from client import evidence
    verdicts = {evidence.EXIT_NOT_VERIFIED, evidence.EXIT_PARTLY_VERIFIED,
                evidence.EXIT_INCOMPLETE, evidence.EXIT_SIGNER_NOT_ESTABLISHED}
    # Each verdict has a code of its own (an unreadable package is NOT VERIFIED, 60).
    assert len(verdicts) == 4 and not (verdicts - {evidence.EXIT_NOT_VERIFIED}) & raised
    assert raised | verdicts <= set(table), sorted((raised | verdicts) - set(table))


def test_every_refusal_is_a_keyservice_error_with_wire_code_and_status(
        https_archiver: ArchiverServer) -> None:
    """Issue 24: AdminRefused was a bare Exception, and the admin client dropped the Archiver's
    wire code and HTTP status. Now every refusal is a KeyServiceError that keeps both."""
    from archiver import admin, admins
    from archiver.admin_client import raise_for_refusal
    from keyservice.errors import KeyServiceError, RequestRefused
    from keyservice.wire import ErrorCode

    for refused in (admin.AdminRefused(ErrorCode.UNKNOWN_CAMERA, "No camera named x."),
                    admins.AdminRefused(ErrorCode.UNKNOWN_CAMERA, "No camera named x.")):
        assert isinstance(refused, KeyServiceError) and isinstance(refused, RequestRefused)
        assert refused.wire_code == "unknown_camera" and str(refused) == "No camera named x."
    # A real refusal from a real Archiver: the viewer API without a session.
    response = httpx.get(f"{https_archiver.url}/v1/cameras", verify=https_archiver.verify,
                         timeout=30)
    with pytest.raises(RequestRefused) as caught:
        raise_for_refusal(response)
    assert caught.value.http_status == response.status_code == 401
    assert caught.value.wire_code == response.json()["error"]
    assert failure(caught.value) == (str(caught.value), RequestRefused.exit_code)
