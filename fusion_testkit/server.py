"""A real Archiver: ``fusion-archiver serve`` (or any launcher with its options) in a
subprocess, on a free port of 127.0.0.1, and its admin API.

It runs the installed ``archiver`` package of this interpreter, from any working directory:
``python -P -m archiver`` does not put the working directory on the import path, so a checkout
(or a developer's own ``archiver`` directory) in the current directory cannot shadow it."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fusion_testkit import forkserver
from fusion_testkit.forkserver import ForkedProcess, fork_server
from fusion_testkit.pki import SiteCa, write_tls_pair
from keyservice.tls import trust as tls_trust

# The Archiver makes its own SoftHSM signing token in its data directory (the production
# default): it must not see the callers' SoftHSM store or viewer PIN.
PRIVATE_ENV = ("SOFTHSM2_CONF", "FUSION_PIN")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for an Archiver subprocess: ``base`` (default: ours) without the
    caller's SoftHSM configuration and PIN."""
    return {k: v for k, v in (base if base is not None else os.environ).items()
            if k not in PRIVATE_ENV}


def wait_until_healthy(process: subprocess.Popen[bytes] | ForkedProcess, url: str, timeout: float,
                       verify: ssl.SSLContext | bool = True) -> bool:
    """Wait for a started Archiver to answer /healthz: True when it does, False on timeout;
    RuntimeError if it exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Archiver exited at start (status {process.returncode})")
        try:
            if httpx.get(f"{url}/healthz", timeout=1, verify=verify).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


def self_signed_tls(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A server certificate (and its key) for ``host`` that no CA issued: nobody verifies it
    unless given it as CA (--tls-ca)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "archiver.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return write_tls_pair(cert, key, directory / "tls.crt", directory / "tls.key")


class UnexpectedStatus(AssertionError):
    """An API call did not answer the status the caller expected (a failed test, a broken
    benchmark run)."""


@dataclass
class ArchiverServer:
    """``python -P -m archiver serve`` (see ``command``) in a subprocess, logging to
    ``DATA-server.log`` beside the data directory. ``tls_ca``: the server was given
    --tls-cert/--tls-key in ``extra_args``; its URL is https and calls verify against this CA."""

    data_dir: Path
    key_period_s: int = 2
    port: int = field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | ForkedProcess | None = None
    env: dict[str, str] | None = None
    # The working directory (None: ours). Not where the code comes from: that is the
    # interpreter's installed package, or PYTHONPATH in ``env`` (a benchmark comparing checkouts).
    cwd: Path | None = None
    tls_ca: Path | None = None
    start_timeout_s: float = 30
    stop_timeout_s: float = 10
    # None: as forkserver.fork_commands() says. Only the default launcher, from this interpreter's own
    # packages, is forked (a wrapper or another checkout's PYTHONPATH runs as a subprocess).
    forked: bool | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_ca else 'http'}://127.0.0.1:{self.port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        # The programs' own trust rule (keyservice.tls), given this server's CA.
        return tls_trust(self.tls_ca) if self.tls_ca else True

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-server.log"

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()

    def serve_args(self) -> list[str]:
        """``fusion-archiver``'s arguments: ``serve`` and its options."""
        return ["serve", "--data", str(self.data_dir), "--port", str(self.port),
                "--key-period", str(self.key_period_s), *self.extra_args]

    def command(self) -> list[str]:
        """How the server is launched (subclasses may wrap it or run another launcher)."""
        return [sys.executable, "-P", "-m", "archiver", *self.serve_args()]

    def start(self, timeout: float | None = None) -> ArchiverServer:
        if self.process is not None and self.process.poll() is None:
            # A second start would orphan the running process (``with server.start():`` starts
            # twice: __enter__ starts too).
            raise RuntimeError("this Archiver is already running: start it once")
        timeout = self.start_timeout_s if timeout is None else timeout
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._forks():
            env = server_env(self.env)
            self.process = fork_server(server_env()).spawn(
                "archiver", self.serve_args(), env, self.cwd, self.log_path)
        else:
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(self.command(), stdout=log,
                                                stderr=subprocess.STDOUT,
                                                env=server_env(self.env), cwd=self.cwd)
        try:
            healthy = wait_until_healthy(self.process, self.url, timeout, self.verify)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; log {self.log_path}:\n{self.log()[-4000:]}") from None
        if not healthy:
            self.stop()
            raise RuntimeError(f"the Archiver did not start within {timeout:.0f} s; log "
                               f"{self.log_path}:\n{self.log()[-4000:]}")
        return self

    def _forks(self) -> bool:
        forked = forkserver.enabled() if self.forked is None else self.forked
        return (forked and type(self).command is ArchiverServer.command
                and "PYTHONPATH" not in (self.env or {}))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> ArchiverServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the admin API ----------------------------------------------------------------------
    def admin(self, method: str, path: str, body: Any = None, expect: int | None = None,
              client: httpx.Client | None = None) -> Any:
        """One admin call; with ``expect``, any other status raises UnexpectedStatus."""
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        if client is not None:
            response = client.request(method, self.url + path, json=body, headers=headers)
        else:
            response = httpx.request(method, self.url + path, json=body, timeout=60,
                                     headers=headers, verify=self.verify)
        if expect is not None and response.status_code != expect:
            raise UnexpectedStatus(f"{method} {path}: HTTP {response.status_code} (expected "
                                  f"{expect}) {response.text[:500]}")
        return response.json() if response.content else None

    def metric(self, name: str) -> float:
        """An unlabelled sample of ``/metrics`` (a counter or gauge), read with the admin token."""
        body = httpx.get(f"{self.url}/metrics", verify=self.verify, timeout=30,
                         headers={"Authorization": f"Bearer {self.admin_token}"}).text
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} is not in /metrics")

    def add_camera(self, name: str, client: httpx.Client | None = None) -> str:
        """Returns the camera's ingest token."""
        return self.admin("POST", "/v1/admin/cameras", {"name": name}, expect=201,
                          client=client)["ingest_token"]

    def add_viewer(self, pem: Path | str, cameras: list[str] | str = "all",
                   client: httpx.Client | None = None) -> str:
        """Authorize a viewer certificate; returns its fingerprint."""
        text = pem.read_text() if isinstance(pem, Path) else pem
        return self.admin("POST", "/v1/admin/viewers", {"certificate": text, "cameras": cameras},
                          expect=201, client=client)["fingerprint"]

    def revoke(self, fingerprint: str, delete_key_streams: bool = False) -> None:
        self.admin("POST", f"/v1/admin/viewers/{fingerprint}/revoke",
                   {"delete_key_streams": delete_key_streams}, expect=200)

    def sleep_into_next_key_period(self) -> None:
        """Sleep until just after the next key-period boundary (wall clock, as the Archiver's):
        a revocation takes effect there (the cameras keep the current period's key, which the
        revoked viewer holds already)."""
        period_ms = self.key_period_s * 1000
        time.sleep((period_ms - time.time_ns() // 1_000_000 % period_ms) / 1000 + 0.05)

    def put_segment(self, camera: str, token: str, data: bytes, name: str = "seg.ts") -> int:
        response = httpx.put(f"{self.url}/ingest/{camera}/{name}", content=data, timeout=30,
                             headers={"Authorization": f"Bearer {token}"}, verify=self.verify)
        return response.status_code


def production_archiver(site_ca: SiteCa, data_dir: Path, **kwargs: Any) -> ArchiverServer:
    """An (unstarted) Archiver in production mode: HTTPS with a TLS certificate that the site
    CA issued for 127.0.0.1 and localhost; callers verify it against the CA (``tls_ca``)."""
    cert, key = site_ca.issue_tls_server(data_dir.parent / f"{data_dir.name}-tls")
    extra = ("--tls-cert", str(cert), "--tls-key", str(key), *kwargs.pop("extra_args", ()))
    return ArchiverServer(data_dir, tls_ca=site_ca.path, extra_args=extra, **kwargs)
