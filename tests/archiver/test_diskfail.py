"""A disk fails (issue 22, item 9): a holder that is alive but cannot archive (its archive disk
full, nothing left to evict) gives its cameras with standbys to the first standby at once,
instead of keeping their leases while they go unrecorded; it says why (log, audit
``camera.released`` with ``storage_failed``, /healthz, /metrics); it does not take them back
once its disk works again (the rule: stay); and, as a standby, it takes nothing over while its
disk fails.

Real parts: a real PostgreSQL, 2 real Archiver processes in production mode (HTTPS under a
site CA), a1's archive directory on a real 16 MiB tmpfs in a1's own mount namespace, filled by
a file outside the archive (the kernel answers ENOSPC; retention finds nothing to evict: only
today's video), a real gst-rtsp-server camera and a pushed camera with ``--archivers a1,a2``,
a real SoftHSM viewer and the real fusion-client playing across the release.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from fusion_testkit.client_cli import Client, Viewer, play
from fusion_testkit.server import ArchiverServer, server_env
from fusion_testkit.tokens import enroll_viewer
from tests.fixtures.camera import requires_ffmpeg
from tests.fixtures.rtsp import requires_gstreamer, wait_for
from tests.fixtures.server import SiteCa, production_archiver

TIMEOUT = 90  # a loaded machine: generous, always polled


def _cli(server: ArchiverServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "archiver", *args, "--archiver", server.url,
         "--admin-token", server.admin_token, "--tls-ca", str(server.tls_ca)],
        env=server_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _segments(server: ArchiverServer, camera: str) -> list[tuple[int, int]]:
    """(start_ms, end_ms) of ``camera``'s video segments in ``server``'s own index."""
    index = server.data_dir / "archiver.sqlite3"
    with sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute("SELECT capture_ms, end_ms FROM segments WHERE camera = ? AND "
                            "stream = 0 ORDER BY capture_ms", (camera,)).fetchall()


def _audit(server: ArchiverServer, action: str) -> list[dict]:
    lines = (server.data_dir / "audit.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["action"] == action]


def _placements(postgres_url: str, camera: str) -> list[str]:
    with psycopg.connect(postgres_url) as conn:
        return [a for (a,) in conn.execute("SELECT archiver FROM camera_placements WHERE "
                                           "camera = %s ORDER BY since_ms", (camera,))]


def _push(server: ArchiverServer, token: str) -> httpx.Response:
    return httpx.put(f"{server.url}/ingest/door/seg.ts", content=b"d" * 2000, timeout=30,
                     headers={"Authorization": f"Bearer {token}"}, verify=server.verify)


def _get(server: ArchiverServer, path: str) -> httpx.Response:
    return httpx.get(f"{server.url}{path}", verify=server.verify, timeout=30,
                     headers={"Authorization": f"Bearer {server.admin_token}"})


def _heartbeat(via: ArchiverServer, name: str) -> int:
    listed = _cli(via, "site", "archivers", "--json")
    assert listed.returncode == 0, listed.stderr
    return {a["name"]: a for a in json.loads(listed.stdout)["archivers"]}[name]["heartbeat_ms"]


def _fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last page, with a file outside the
    archive's camera directories (retention never removes it)."""
    filler = directory / "filler.bin"
    with open(filler, "wb", buffering=0) as out:
        for size in (1 << 20, 4096):
            try:
                while True:
                    out.write(bytes(size))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def _namespace_wrapper() -> tuple[str, ...]:
    # As root a mount namespace is enough; otherwise a user namespace maps us to root in it.
    return ("unshare", "--mount") if os.geteuid() == 0 else (
        "unshare", "--user", "--map-root-user", "--mount")


@dataclass
class SmallDiskArchiver(ArchiverServer):
    """An Archiver whose archive directory is a tmpfs of ``size``, mounted in a private mount
    namespace of its own (nothing mounted here outlives it). ``archive`` is where this process
    sees that tmpfs: through /proc/PID/root."""

    size: str = "16m"

    def command(self) -> list[str]:
        # exec: the wrapper's pid becomes the server's (its /proc/PID/root, kill).
        mount = (f"mount -t tmpfs -o size={self.size},mode=0700 fusion-test "
                 f"'{self.data_dir / 'archive'}'")
        return [*_namespace_wrapper(), "sh", "-ec", f'{mount}\nexec "$@"', "sh",
                *super().command()]

    @property
    def archive(self) -> Path:
        assert self.process is not None
        return Path(f"/proc/{self.process.pid}/root{self.data_dir}/archive")


@pytest.fixture
def viewer(softhsm_token_factory: Callable[[], object]) -> Viewer:
    token = softhsm_token_factory()
    pem = enroll_viewer(token, "vera", bits=2048)  # type: ignore[arg-type]
    return Viewer("vera", token, token.object_uri("vera"), pem)  # type: ignore[attr-defined]


@requires_ffmpeg
@requires_gstreamer
@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is not installed")
def test_a_holder_whose_disk_fills_gives_its_cameras_to_the_standby_and_stays_a_standby(
        postgres_url: str, rtsp_camera, viewer: Viewer, tmp_path: Path) -> None:
    archive = tmp_path / "a1" / "archive"
    archive.mkdir(parents=True, mode=0o700)
    tried = subprocess.run([*_namespace_wrapper(), "mount", "-t", "tmpfs", "-o", "size=1m",
                            "fusion-test", str(archive)], capture_output=True, text=True)
    if tried.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({tried.stderr.strip()}): a disk "
                    "that fills up cannot be made")
    site_ca = SiteCa.create(tmp_path / "site-ca")
    env = server_env({"FUSION_DIRECTORY": postgres_url})
    cert, key = site_ca.issue_tls_server(tmp_path / "a1-tls")
    a1 = SmallDiskArchiver(tmp_path / "a1", tls_ca=site_ca.path, env=env, start_timeout_s=TIMEOUT,
                           extra_args=("--tls-cert", str(cert), "--tls-key", str(key),
                                       "--name", "a1"))
    a2 = production_archiver(site_ca, tmp_path / "a2", extra_args=("--name", "a2"), env=env,
                             start_timeout_s=TIMEOUT)
    try:
        a1.start()
        a1.add_viewer(viewer.pem, "all")
        a2.start()
        camera = rtsp_camera(kbps=150).start()
        added = _cli(a1, "cameras", "add", "gate", "--rtsp", camera.url(), "--archivers",
                     "a1,a2")
        assert added.returncode == 0, added.stderr
        pushed = _cli(a1, "cameras", "add", "door", "--archivers", "a1,a2", "--json")
        assert pushed.returncode == 0, pushed.stderr
        token = json.loads(pushed.stdout)["ingest_token"]
        assert _push(a1, token).status_code == 201
        wait_for(lambda: len(_segments(a1, "gate")) >= 3, TIMEOUT, "3 segments of gate on a1")
        start_ms = _segments(a1, "gate")[0][0]

        # a1's archive disk fills up. a1 is alive: it heartbeats and holds the leases' locks,
        # so before this a2 waited forever while gate and door went unrecorded.
        filler = _fill(a1.archive)
        # The pushed camera sees each refusal (507, the disk is full). (A push may still fit in
        # the last page of its file: then it is archived, and the count starts again.)
        answers = []
        while answers.count(507) < 3 and 421 not in answers and len(answers) < 20:
            refused = _push(a1, token)
            answers.append(refused.status_code)
            if refused.status_code == 507:
                assert refused.json()["error"] == "storage_full", refused.text
        assert set(answers) <= {201, 507, 421} and 507 in answers, answers
        # ...and a1 gives both cameras to a2, which takes them over at once.
        wait_for(lambda: _segments(a2, "gate"), TIMEOUT, "a2 to take gate over")
        wait_for(lambda: _push(a2, token).status_code == 201, TIMEOUT, "a2 to accept door")
        misdirected = _push(a1, token)
        assert misdirected.status_code == 421, misdirected.text
        assert misdirected.json()["archiver_url"] == a2.url
        for name in ("gate", "door"):
            assert _placements(postgres_url, name) == ["a1", "a2"], name
        released = {e["camera"]: e for e in _audit(a1, "camera.released")}
        assert {name: e["reason"] for name, e in released.items()} == {
            "gate": "storage_failed", "door": "storage_failed"}
        assert released["door"]["failures"] >= 3
        assert "The archive disk is full" in released["gate"]["message"]
        took = {e["camera"]: e["from"] for e in _audit(a2, "camera.takeover")}
        since = released["gate"]["since_ms"]
        print(f"disk failed: gate's first refused segment to its release by a1 "
              f"{(released['gate']['ts_ms'] - since) / 1000:.1f} s, to a2's first archived "
              f"segment (its end) {(_segments(a2, 'gate')[0][1] - since) / 1000:.1f} s")
        assert took == {"gate": "a1", "door": "a1"}
        assert "(its lease expired)" in a2.log()  # the row a1 expired: no 15 s TTL to wait
        assert re.search(r"camera gate: released to its standbys: this Archiver could not "
                         r"archive it \(\d+ segment\(s\) refused", a1.log()), a1.log()[-3000:]
        health = httpx.get(f"{a1.url}/healthz", verify=a1.verify, timeout=30).json()
        assert health["status"] == "degraded" and health["storage"] == {"state": "failing"}
        metrics = _get(a1, "/metrics").text
        assert re.search(r"^fusion_site_storage_failing 1\.0$", metrics, re.M), metrics
        assert re.search(r"^fusion_site_storage_releases_total 2\.0$", metrics, re.M), metrics
        assert re.search(r"^fusion_site_leases_held 0\.0$", metrics, re.M), metrics

        # The disk is freed: a1 is a standby like any other (the rule: stay). Over two of its
        # heartbeats after it said so, a2 records on and a1 records nothing.
        a1_gate = _segments(a1, "gate")
        filler.unlink()
        wait_for(lambda: "this Archiver's disk takes writes again" in a1.log(), TIMEOUT,
                 "a1 to find its disk writable")
        assert httpx.get(f"{a1.url}/healthz", verify=a1.verify, timeout=30).json()[
            "status"] == "ok"
        for _ in range(2):
            heard = _heartbeat(a2, "a1")
            wait_for(lambda: _heartbeat(a2, "a1") > heard, TIMEOUT, "a1's heartbeat")
        grown = len(_segments(a2, "gate"))
        wait_for(lambda: len(_segments(a2, "gate")) >= grown + 2, TIMEOUT, "2 more on a2")
        assert _segments(a1, "gate") == a1_gate
        for name in ("gate", "door"):
            assert _placements(postgres_url, name) == ["a1", "a2"], name
        assert _push(a1, token).status_code == 421

        # The viewer plays the range across the release in ONE command, through a1: part 1
        # from a1, part 2 from a2, each verified against its own signer.
        client = Client(tmp_path / "client-home", tls_ca=site_ca.path)
        for server in (a1, a2):
            cert = x509.load_pem_x509_certificate(httpx.get(
                f"{server.url}/v1/archiver", verify=server.verify, timeout=30
            ).json()["certificate"].encode())
            pin = tmp_path / f"{server.data_dir.name}-signing.pem"
            pin.write_bytes(cert.public_bytes(Encoding.PEM))
            done = client("cameras", "--archiver", server.url, "--token", viewer.uri,
                          "--archiver-cert", str(pin))
            assert done.code == 0, done.stderr
        whole = tmp_path / "across.ts"
        done = play(client, a1.url, viewer, whole, start_ms, _segments(a2, "gate")[-1][0] + 500,
                    camera="gate")
        assert done.code == 0, done.stderr
        assert re.search(r"part 1 of 2: .* recorded by Archiver a1, verified against a1 ",
                         done.stderr), done.stderr
        assert re.search(r"part 2 of 2: .* recorded by Archiver a2, verified against a2 ",
                         done.stderr), done.stderr
        assert "complete (every part's signed end record verified)" in done.stderr
        assert whole.stat().st_size > 0

        # A standby whose own disk fails takes nothing over: a1's disk fills again, a2 dies
        # (kill -9: its locks are free at once), and a1 probes its disk before the takeover,
        # refuses it and says so. Once its disk is freed, it takes both cameras over.
        filler = _fill(a1.archive)
        assert a2.process is not None
        os.kill(a2.process.pid, signal.SIGKILL)
        a2.process.wait()
        wait_for(lambda: "camera gate: not taken over from Archiver a2: this Archiver cannot "
                 "archive (the disk of" in a1.log(), TIMEOUT, "a1 to refuse the takeover")
        assert _placements(postgres_url, "gate") == ["a1", "a2"]
        assert _segments(a1, "gate") == a1_gate
        filler.unlink()
        wait_for(lambda: len(_segments(a1, "gate")) > len(a1_gate), TIMEOUT,
                 "a1 to take gate over once its disk works")
        assert _placements(postgres_url, "gate") == ["a1", "a2", "a1"]
        wait_for(lambda: _push(a1, token).status_code == 201, TIMEOUT, "a1 to accept door")
    finally:
        for server in (a1, a2):
            server.stop()
        for server in (a1, a2):
            assert "Traceback" not in server.log(), server.log()[-3000:]
