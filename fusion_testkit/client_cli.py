"""The viewer's command (``fusion-client``) in a subprocess, and the helpers its end-to-end
tests share: a viewer enrolled on a token, synthetic segments pushed over HTTP, waits on the
Archiver's state (polled, never a fixed sleep), and reads from a live stream's pipe.

Test modules import these from here, never from each other.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fusion_testkit import forkserver
from fusion_testkit.server import ArchiverServer
from fusion_testkit.tokens import TokenHandle
from keyservice.exitcodes import ExitCode
from keyservice.timespec import format_ms

# fusion-client's exit codes, by what they mean (docs/client.md).
# The viewer's exit codes by the short names the tests use (the one enum: keyservice/exitcodes.py).
EXIT = {"usage": ExitCode.USAGE, "integrity": ExitCode.INTEGRITY,
        "no_match": ExitCode.NO_MATCHING_IDENTITY, "request_mismatch": ExitCode.REQUEST_MISMATCH,
        "pin": ExitCode.PIN_INCORRECT, "mismatch": ExitCode.ARCHIVER_MISMATCH,
        "unreachable": ExitCode.ARCHIVER_UNREACHABLE, "not_enrolled": ExitCode.NOT_ENROLLED,
        "revoked": ExitCode.VIEWER_REVOKED, "not_authorized": ExitCode.NOT_AUTHORIZED,
        "unknown_camera": ExitCode.UNKNOWN_CAMERA, "no_recording": ExitCode.NO_RECORDING,
        "truncated": ExitCode.STREAM_TRUNCATED, "nothing_authorized": ExitCode.NOTHING_AUTHORIZED}


@dataclass
class Viewer:
    name: str
    token: TokenHandle
    uri: str
    pem: Path


@dataclass
class Result:
    code: int
    stdout: bytes
    stderr: str


class Client:
    """Runs `python -m client` (the fusion-client command) with a private FUSION_CLIENT_HOME.
    ``tls_ca``: production mode, the site CA given as FUSION_TLS_CA (as a site's shell does)."""

    def __init__(self, home: Path, tls_ca: Path | None = None) -> None:
        self.home = home
        self.tls_ca = tls_ca

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("FUSION_PIN", "FUSION_TOKEN", "FUSION_TLS_CA", "FUSION_SITE_CA")}
        env["FUSION_CLIENT_HOME"] = str(self.home)
        if self.tls_ca is not None:
            env["FUSION_TLS_CA"] = str(self.tls_ca)
        return env

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "client", *args]

    def __call__(self, *args: str, timeout: float = 120) -> Result:
        done = forkserver.run(self.command(*args), capture_output=True, env=self.env(),
                              timeout=timeout, stdin=subprocess.DEVNULL)
        stderr = done.stderr.decode(errors="replace")
        assert "Traceback" not in stderr, stderr
        return Result(done.returncode, done.stdout, stderr)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso(ms: int) -> str:
    return format_ms(ms)


def chunk(tag: str, size: int = 3000) -> bytes:
    """Distinct, recognisable synthetic segment bodies."""
    return (tag.encode() + b"|" + os.urandom(16)) * (size // (len(tag) + 17))


def put(server: ArchiverServer, camera: str, token: str, *chunks: bytes) -> None:
    """PUT each chunk as a segment of ``camera``, in order; each must be archived (201)."""
    for body in chunks:
        assert server.put_segment(camera, token, body) == 201


def play(client: Client, server_url: str, viewer: Viewer, out: Path, start: int, end: int,
         *extra: str, camera: str = "cam1") -> Result:
    return client("play", "--archiver", server_url, "--token", viewer.uri, "--camera", camera,
                  "--from", iso(start), "--to", iso(end), "-o", str(out), *extra)


def live(client: Client, url: str, viewer: Viewer, camera: str, out: Path, *extra: str,
         duration: float = 5) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        client.command("live", "--archiver", url, "--token", viewer.uri, "--camera", camera,
                       "--duration", str(duration), "-o", str(out), *extra),
        capture_output=True, env=client.env(), timeout=120, stdin=subprocess.DEVNULL)


def token_operations(stderr: str) -> tuple[int, int, int]:
    """(operations, logins, epoch openers) from the player's summary line."""
    found = re.search(r"token operations: (\d+) \((\d+) login, (\d+) epoch", stderr)
    assert found, stderr
    return int(found[1]), int(found[2]), int(found[3])


def assert_nothing_written(out: Path) -> None:
    siblings = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name))
    assert siblings == [], siblings


def wait_for_segments(server: ArchiverServer, camera: str, count: int,
                      timeout: float = 20) -> None:
    """ffmpeg's HLS muxer does not wait for the answers to its PUTs: wait until the Archiver
    has acknowledged them all."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cams = {c["name"]: c for c in server.admin("GET", "/v1/admin/cameras")}
        if cams[camera]["segments"] >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"the Archiver did not archive {count} segments of {camera}")


def audited(server: ArchiverServer, action: str) -> bool:
    """Whether the Archiver's audit log records ``action`` (e.g. a live stream was opened)."""
    log = server.data_dir / "audit.jsonl"
    return log.exists() and any(json.loads(line).get("action") == action
                                for line in log.read_text().splitlines() if line.strip())


def wait_for_audit(server: ArchiverServer, action: str, timeout: float = 30) -> None:
    """Until the Archiver's audit log records ``action``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if audited(server, action):
            return
        time.sleep(0.05)
    raise AssertionError(f"the Archiver did not record {action}")


def read_exactly(fd: int, size: int, timeout: float) -> bytes:
    """Up to ``size`` bytes from a pipe, waiting at most ``timeout`` seconds in all."""
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            break
        piece = os.read(fd, size - len(data))
        if not piece:
            break
        data += piece
    return data


def read_until_quiet(fd: int, quiet: float) -> bytes:
    """Whatever arrives until nothing more comes for `quiet` seconds."""
    data = b""
    while select.select([fd], [], [], quiet)[0]:
        piece = os.read(fd, 1 << 16)
        if not piece:
            break
        data += piece
    return data
