"""The guard rails a first day needs (issue 20, item 4), on real parts: real `fusion-archiver`
processes on real data directories, in production mode (HTTPS under a site CA).

- one Archiver per data directory (a lock the kernel releases, kill -9 included);
- a port in use is found before anything starts, with its own exit code;
- a pulled (RTSP) camera has no working ingest token;
- a viewer's cameras change explicitly, `viewers revoke` takes a prefix or the certificate file,
  and a file holding a private key is refused before anything is sent."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from archiver.auth import digest
from archiver.check import EXIT_DAMAGED
from archiver.datadir import EXIT_DATA_DIR_IN_USE, LOCK_NAME
from archiver.server import EXIT_ADDRESS_IN_USE
from fusion_testkit import forkserver
from keyservice.errors import RequestRefused
from keyservice.identity import fingerprint
from tests.fixtures.server import ArchiverServer, SiteCa, free_port, production_archiver

SEGMENT = b"\x47" + b"\x00" * 187  # one MPEG-TS packet: the Archiver archives any bytes


def run(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    done = forkserver.run([sys.executable, "-m", "archiver", *args], capture_output=True,
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
    """4 and 5 are fusion-archiver's own: no error class of the three CLIs uses them, and 3
    means only a damaged archive (check's verdict, or an index found damaged)."""
    import archiver.server
    import client.evidence
    import client.player
    import client.session
    import client.web.media
    import keyservice.evidence.layout
    from archiver.check import IndexDamaged
    from archiver.datadir import DataDirInUse
    from keyservice.errors import KeyServiceError

    assert client.session and client.player and client.evidence and client.web.media
    assert keyservice.evidence.layout

    def subclasses(cls: type) -> list[type]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    others = {cls.exit_code for cls in subclasses(KeyServiceError)
              if cls not in (DataDirInUse, archiver.server.AddressInUse, IndexDamaged)}
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


# --- viewers: explicit camera changes, revoke by prefix or file, private keys stay home --------
@pytest.fixture
def site_archiver(site_ca: SiteCa, tmp_path: Path) -> Iterator[ArchiverServer]:
    """Production mode, as a site runs it: HTTPS under the site CA, and viewer certificates
    must be issued by it (--site-ca)."""
    server = production_archiver(site_ca, tmp_path / "archiver",
                                 extra_args=("--site-ca", str(site_ca.path))).start()
    try:
        yield server
    finally:
        server.stop()


def viewer_certificate(site_ca: SiteCa, directory: Path, name: str) -> tuple[Path, str]:
    """A site-CA-issued EC viewer certificate (PEM file) and its fingerprint."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = site_ca.issue(key.public_key(), name)
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, fingerprint(cert).hex()


def viewers(server: ArchiverServer) -> dict[str, dict[str, Any]]:
    return {v["fingerprint"]: v for v in server.admin("GET", "/v1/admin/viewers", expect=200)}


def test_viewer_cameras_are_added_and_set_explicitly(site_archiver: ArchiverServer,
                                                     site_ca: SiteCa, tmp_path: Path) -> None:
    """The bug: `viewers add` on an existing viewer replaced its cameras, silently dropping
    one. Now it is refused, pointing to `viewers cameras`, which says what changed."""
    common = admin_args(site_archiver)
    for camera in ("lobby", "door", "yard"):
        site_archiver.add_camera(camera)
    pem, fp = viewer_certificate(site_ca, tmp_path, "alice")
    added = run("viewers", "add", str(pem), "--cameras", "lobby,door", *common)
    assert added.returncode == 0, added.stderr
    assert "authorized on door,lobby" in added.stdout
    again = run("viewers", "add", str(pem), "--cameras", "yard", *common)
    assert again.returncode == RequestRefused.exit_code, again.stderr
    line = one_sentence(again.stderr)
    assert "authorized already" in line and "viewers cameras" in line, line
    assert viewers(site_archiver)[fp]["cameras"] == ["door", "lobby"]  # nothing dropped
    same = run("viewers", "add", str(pem), "--cameras", "door,lobby", *common)
    assert same.returncode == 0 and "cameras unchanged, epoch renewed" in same.stdout, same

    def change(*args: str) -> subprocess.CompletedProcess[str]:
        return run("viewers", "cameras", fp[:16], *args, *common)

    done = change("--add", "yard")
    assert done.returncode == 0, done.stderr
    assert "door,lobby -> door,lobby,yard; added yard" in done.stdout, done.stdout
    done = change("--add", "lobby")
    assert "cameras unchanged" in done.stdout, done.stdout
    both = change("--remove", "door", "--add", "door")
    assert both.returncode == RequestRefused.exit_code
    assert "both added and removed" in one_sentence(both.stderr)
    done = run("viewers", "cameras", str(pem), "--remove", "door", *common, "--json")
    assert json.loads(done.stdout)["removed"] == ["door"]
    done = change("--set", "all")
    assert "-> all cameras; added all" in done.stdout, done.stdout
    refused = change("--remove", "lobby")
    assert refused.returncode == RequestRefused.exit_code
    assert "all cameras" in one_sentence(refused.stderr) and "--set" in refused.stderr
    done = change("--set", "yard")
    assert "all cameras -> yard; removed all" in done.stdout, done.stdout
    assert viewers(site_archiver)[fp]["cameras"] == ["yard"]
    unknown = change("--add", "nosuch")
    assert unknown.returncode == RequestRefused.exit_code and "nosuch" in unknown.stderr
    usage = change("--set", "lobby", "--add", "door")
    assert usage.returncode == 2 and "--set alone" in one_sentence(usage.stderr)
    audit = [json.loads(line) for line in
             (site_archiver.data_dir / "audit.jsonl").read_text().splitlines()]
    assert sum(entry.get("action") == "viewer.cameras" for entry in audit) == 4


def colliding_certificates(site_ca: SiteCa, directory: Path) -> tuple[Path, Path, str]:
    """Two viewer certificates whose fingerprints start with the same 4 hex digits."""
    seen: dict[str, Any] = {}
    for i in range(20000):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = site_ca.issue(key.public_key(), f"twin{i}")
        prefix = fingerprint(cert).hex()[:4]
        if prefix in seen:
            paths = []
            for n, c in enumerate((seen[prefix], cert)):
                path = directory / f"twin{n}.pem"
                path.write_bytes(c.public_bytes(serialization.Encoding.PEM))
                paths.append(path)
            return paths[0], paths[1], prefix
        seen[prefix] = cert
    raise AssertionError("no two fingerprints share 4 hex digits")


def test_viewers_revoke_takes_a_prefix_or_the_certificate_file(
        site_archiver: ArchiverServer, site_ca: SiteCa, tmp_path: Path) -> None:
    """Before: only the whole 64-digit fingerprint (a 16-digit one, as other commands print,
    was refused by the Archiver). Now the certificate file or a unique prefix; an ambiguous
    prefix is refused, listing the candidates."""
    common = admin_args(site_archiver)
    site_archiver.add_camera("lobby")
    alice, alice_fp = viewer_certificate(site_ca, tmp_path, "alice")
    bob, bob_fp = viewer_certificate(site_ca, tmp_path, "bob")
    twin0, twin1, prefix = colliding_certificates(site_ca, tmp_path)
    twins = [site_archiver.add_viewer(p, ["lobby"]) for p in (twin0, twin1)]
    for path in (alice, bob):
        assert run("viewers", "add", str(path), "--cameras", "lobby", *common).returncode == 0

    short = run("viewers", "revoke", bob_fp[:16], *common)
    assert short.returncode == 0, short.stderr
    assert f"viewer {bob_fp} revoked" in short.stdout
    by_file = run("viewers", "revoke", str(alice), *common, "--json")
    assert by_file.returncode == 0, by_file.stderr
    assert json.loads(by_file.stdout)["fingerprint"] == alice_fp
    ambiguous = run("viewers", "revoke", prefix, *common)
    assert ambiguous.returncode == 2, ambiguous.stderr
    line = one_sentence(ambiguous.stderr)
    assert all(fp[:16] in line for fp in twins) and "give more digits" in line, line
    nobody = run("viewers", "revoke", "ffff0000ffff", *common)
    assert nobody.returncode == RequestRefused.exit_code
    assert "No viewer's fingerprint starts with" in nobody.stderr
    state = viewers(site_archiver)
    assert state[alice_fp]["revoked_ms"] and state[bob_fp]["revoked_ms"]
    assert not any(state[fp]["revoked_ms"] for fp in twins)


class Recorder:
    """A listener on 127.0.0.1 that records every connection made to it (and closes it)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.connections = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.sock.close()


def test_a_private_key_never_leaves_the_admins_machine(
        site_archiver: ArchiverServer, site_ca: SiteCa, tmp_path: Path) -> None:
    """Before: `viewers add` sent a file holding the viewer's private key to the Archiver,
    which then refused it. Now it is refused locally: no connection is even made."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = site_ca.issue(key.public_key(), "carol").public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    bundle = tmp_path / "carol-with-key.pem"
    bundle.write_bytes(cert + key_pem)
    clean = tmp_path / "carol.pem"
    clean.write_bytes(cert)
    recorder = Recorder()
    try:
        token = ["--admin-token", "x", "--url", recorder.url]
        for command in (["viewers", "add", str(bundle), "--cameras", "all"],
                        ["viewers", "revoke", str(bundle)],
                        ["viewers", "cameras", str(bundle), "--set", "all"]):
            done = run(*command, *token)
            assert done.returncode == 2, done.stderr
            assert "holds a private key, so nothing was sent" in one_sentence(done.stderr)
        assert recorder.connections == 0
        # The recorder does see a command that sends (the test can fail).
        sent = run("viewers", "add", str(clean), "--cameras", "all", *token)
        assert sent.returncode != 0 and recorder.connections == 1
    finally:
        recorder.close()
    # Against the real Archiver: refused before sending, so nothing is authorized.
    refused = run("viewers", "add", str(bundle), "--cameras", "all",
                  *admin_args(site_archiver))
    assert refused.returncode == 2
    assert viewers(site_archiver) == {}
    assert "viewer.add" not in (site_archiver.data_dir / "audit.jsonl").read_text()


# --- one time parser ---------------------------------------------------------------------------
def test_holds_take_the_times_fusion_client_takes(https_archiver: ArchiverServer) -> None:
    """Before: `holds add --from -10m` was refused (ISO 8601 only), while `fusion-client play
    --from -10m` worked. Now both use keyservice.timespec."""
    import time

    import client.timespec
    import keyservice.timespec

    # fusion-client's commands import keyservice.timespec's parser when they run (start-up).
    assert client.timespec.parse_time is keyservice.timespec.parse_time
    assert client.timespec.parse_range is keyservice.timespec.parse_range
    https_archiver.add_camera("lobby")
    before = int(time.time() * 1000)
    held = run("holds", "add", "lobby", "--from", "-10m", "--to", "now", "--reason", "case 7",
               *admin_args(https_archiver), "--json")
    after = int(time.time() * 1000)
    assert held.returncode == 0, held.stderr
    hold = json.loads(held.stdout)
    assert before - 600_000 <= hold["from_ms"] <= after - 600_000
    assert before <= hold["to_ms"] <= after
    naive = run("holds", "add", "lobby", "--from", "2026-01-01 10:00", "--to", "2026-01-01",
                "--reason", "x", *admin_args(https_archiver))
    assert naive.returncode == 2 and "before it starts" in one_sentence(naive.stderr)
