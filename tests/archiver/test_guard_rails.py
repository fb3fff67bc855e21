"""The guard rails a first day needs (issue 20, item 4), on real parts: real `fusion-archiver`
processes on real data directories, in production mode (HTTPS under a site CA).

- one Archiver per data directory (a lock the kernel releases, kill -9 included);
- a port in use is found before anything starts, with its own exit code;
- a pulled (RTSP) camera has no working ingest token."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx

from archiver.auth import digest
from archiver.cli import EXIT_DAMAGED
from archiver.datadir import EXIT_DATA_DIR_IN_USE, LOCK_NAME
from archiver.server import EXIT_ADDRESS_IN_USE
from tests.fixtures.server import ArchiverServer, free_port

SEGMENT = b"\x47" + b"\x00" * 187  # one MPEG-TS packet: the Archiver archives any bytes


def run(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "archiver", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def admin_args(server: ArchiverServer) -> list[str]:
    assert server.tls_ca is not None
    return ["--url", server.url, "--data", str(server.data_dir), "--tls-ca", str(server.tls_ca)]


def one_sentence(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fusion-archiver: "), stderr
    return lines[0]


# --- one Archiver per data directory ---------------------------------------------------------
def test_one_archiver_per_data_directory(https_archiver: ArchiverServer) -> None:
    """Tried before the lock: a second `serve` on the same directory started, the two raised
    UNIQUE-constraint tracebacks and lost pulled video. Now the second `serve`, a `reindex` and
    a `check --rebuild-index` are refused, naming the holder's pid; a kill -9 leaves no stale
    lock."""
    data = https_archiver.data_dir
    assert https_archiver.process is not None
    holder = f"pid {https_archiver.process.pid}"
    cert, key = (https_archiver.extra_args[1], https_archiver.extra_args[3])
    second = run("serve", "--data", str(data), "--port", str(free_port()), "--tls-cert", cert,
                 "--tls-key", key, timeout=60)
    assert second.returncode == EXIT_DATA_DIR_IN_USE, second.stderr
    line = one_sentence(second.stderr)
    assert "in use by fusion-archiver serve" in line and holder in line, line
    for command in (["reindex"], ["check", "--rebuild-index"]):
        refused = run(*command, "--data", str(data))
        assert refused.returncode == EXIT_DATA_DIR_IN_USE, refused.stderr
        assert holder in one_sentence(refused.stderr)
        assert refused.stdout == ""  # refused before the check ran, not after
    # Checking alone only reads: allowed while serving.
    assert run("check", "--data", str(data)).returncode == 0
    # The running Archiver was not disturbed.
    assert httpx.get(f"{https_archiver.url}/healthz", verify=https_archiver.verify,
                     timeout=10).status_code == 200
    # kill -9: the kernel drops the lock with the process; nothing to clean up by hand.
    https_archiver.kill()
    assert (data / LOCK_NAME).exists()
    rebuilt = run("reindex", "--data", str(data))
    assert rebuilt.returncode == 0, rebuilt.stderr
    https_archiver.start()  # and serve takes it again


# --- a port in use ---------------------------------------------------------------------------
def test_a_port_in_use_is_found_before_anything_starts(tmp_path: Path) -> None:
    """Before: uvicorn found the port taken only after the application's start-up (token,
    index, audit log, RTSP pullers) and exited 3, the code `check` uses for a damaged archive.
    Now: one sentence, its own code, and nothing in the data directory but the lock."""
    data = tmp_path / "fresh"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = run("serve", "--data", str(data), "--port", str(port), timeout=60)
    assert done.returncode == EXIT_ADDRESS_IN_USE != EXIT_DAMAGED, done.stderr
    line = one_sentence(done.stderr)
    assert f"Port {port} on 127.0.0.1 is already in use" in line and "--port" in line, line
    # No token, no index, no audit log, no admin token: the start-up never ran.
    assert sorted(os.listdir(data)) == [LOCK_NAME]


def test_new_exit_codes_collide_with_nothing() -> None:
    """4 and 5 are fusion-archiver's own: no error class of the three CLIs uses them, nor 3."""
    import archiver.server
    import client.evidence
    import client.player
    import client.session
    import client.web.media
    import keyservice.evidence.layout
    from archiver.datadir import DataDirInUse
    from keyservice.errors import KeyServiceError

    assert client.session and client.player and client.evidence and client.web.media
    assert keyservice.evidence.layout

    def subclasses(cls: type) -> list[type]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    others = {cls.exit_code for cls in subclasses(KeyServiceError)
              if cls not in (DataDirInUse, archiver.server.AddressInUse)}
    assert not others & {EXIT_DAMAGED, EXIT_DATA_DIR_IN_USE, EXIT_ADDRESS_IN_USE}
    assert len({EXIT_DAMAGED, EXIT_DATA_DIR_IN_USE, EXIT_ADDRESS_IN_USE}) == 3


# --- a pulled camera has no ingest token -------------------------------------------------------
def test_a_pulled_camera_takes_no_pushed_video(https_archiver: ArchiverServer) -> None:
    """The attack: `cameras add door --rtsp URL` printed an ingest token, and a PUT with it put
    outside video into the pulled camera's signed archive (201). Now no token is issued, and a
    PUT to a pulled camera is refused even with a token it once had."""
    common = admin_args(https_archiver)
    rtsp = f"rtsp://127.0.0.1:{free_port()}/stream"  # nothing there: the puller backs off
    added = run("cameras", "add", "door", "--rtsp", rtsp, *common, "--json")
    assert added.returncode == 0, added.stderr
    result = json.loads(added.stdout)
    printed = result["ingest_token"]
    assert printed is None and result["ingest_url"] is None, result
    human = run("cameras", "add", "gate", "--rtsp", rtsp, *common)
    assert "no ingest token" in human.stdout and "ingest token:" not in human.stdout

    def push(camera: str, token: str) -> httpx.Response:
        return httpx.put(f"{https_archiver.url}/ingest/{camera}/seg.ts", content=SEGMENT,
                         headers={"Authorization": f"Bearer {token}"},
                         verify=https_archiver.verify, timeout=30)

    # With whatever `cameras add` printed (before the fix: a working token, 201).
    assert push("door", str(printed)).status_code == 403
    # A camera added before the fix has a token: give `door` one the test knows, as such an
    # index would hold, and try it.
    https_archiver.stop()
    with sqlite3.connect(https_archiver.data_dir / "archiver.sqlite3") as conn:
        conn.execute("UPDATE cameras SET token_sha256=? WHERE name='door'", (digest("known"),))
    conn.close()
    https_archiver.start()
    refused = push("door", "known")
    assert refused.status_code == 403 and refused.json()["error"] == "pulled_camera", refused.text
    # A wrong token gets the one answer for unknown cameras and wrong tokens (no enumeration).
    assert push("door", "wrong").json()["error"] == "forbidden"
    cameras = {c["name"]: c for c in https_archiver.admin("GET", "/v1/admin/cameras", expect=200)}
    assert cameras["door"]["segments"] == 0
    # A pushing camera is not affected.
    pushed = json.loads(run("cameras", "add", "lobby", *common, "--json").stdout)
    assert push("lobby", pushed["ingest_token"]).status_code == 201
