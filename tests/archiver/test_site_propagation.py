"""Issue 21, item 4, end to end: three real Archivers (HTTPS under a site CA) share a real
PostgreSQL directory; a real ffmpeg camera pushes to one of them and a viewer on its own SoftHSM
token watches it live. A viewer authorized through Archiver 1 gets keys on Archiver 3 and logs
in on 2 and 3; revoked through Archiver 2, its open live stream on Archiver 3 ends, it is
refused on 1 and 3, and no segment Archiver 3 seals after the revocation's key period is under
a chain the viewer holds. The propagation time is measured and printed (not asserted). With
NOTIFY turned off (--no-site-notify), the poll alone converges."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from fusion_testkit.camera import make_source, push
from fusion_testkit.server import UnexpectedStatus, server_env
from keyservice.crypto import split_key_id
from keyservice.reader import SegmentPlaintext, StreamReader
from tests.archiver.conftest import Viewer
from tests.fixtures.camera import requires_ffmpeg
from tests.fixtures.server import ArchiverServer, SiteCa, production_archiver
from tests.fixtures.viewer import login

pytestmark = requires_ffmpeg
KEY_PERIOD_S = 4


class LiveWatcher(threading.Thread):
    """Reads one live stream (asked for ten minutes), verifying it, until it ends."""

    def __init__(self, server: ArchiverServer, session: str, viewer: Viewer,
                 camera: str) -> None:
        super().__init__(daemon=True)
        self.server, self.session, self.viewer, self.camera = server, session, viewer, camera
        self.segments: list[bytes] = []
        self.ended_by_end_record: bool | None = None
        self.ended_at: float | None = None
        self.error: BaseException | None = None
        self.opened = threading.Event()  # answered 200: the stream is open

    def run(self) -> None:
        try:
            reader = StreamReader(self.viewer.identity, lambda cert: None)
            with httpx.stream("GET", f"{self.server.url}/v1/cameras/{self.camera}/live",
                              timeout=60, verify=self.server.verify,
                              params={"duration_s": 600, "nonce": os.urandom(16).hex()},
                              headers={"Authorization": f"Bearer {self.session}"}) as response:
                assert response.status_code == 200, response.read()[:300]
                self.opened.set()
                for chunk in response.iter_bytes():
                    self.segments += [e.data for e in reader.feed(chunk)
                                      if isinstance(e, SegmentPlaintext)]
            self.ended_by_end_record = reader.ended
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.ended_at = time.monotonic()


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def refused(server: ArchiverServer, viewer: Viewer) -> bool:
    try:
        login(server.url, viewer.identity, verify=server.verify)
    except UnexpectedStatus as exc:
        assert "403" in str(exc) or "401" in str(exc), exc
        return True
    return False


@contextmanager
def site(postgres_url: str, tmp_path: Path, count: int,
         *extra: str) -> Iterator[list[ArchiverServer]]:
    site_ca = SiteCa.create(tmp_path / "site-ca")
    with ExitStack() as stack:
        servers = []
        for i in range(1, count + 1):
            server = production_archiver(
                site_ca, tmp_path / f"a{i}", key_period_s=KEY_PERIOD_S,
                extra_args=("--directory", postgres_url, "--name", f"a{i}", "--rtsp-workers",
                            "0", *extra))
            servers.append(stack.enter_context(server))
        yield servers


def chains_held_after(server: ArchiverServer, camera: str, fingerprint: str,
                      after_ms: int) -> tuple[int, int]:
    """(segments of ``camera`` sealed at or after ``after_ms``, those under a chain the
    viewer holds a record of) in the Archiver's local index."""
    with sqlite3.connect(f"file:{server.data_dir / 'archiver.sqlite3'}?mode=ro", uri=True) as db:
        segments = db.execute("SELECT key_id FROM segments WHERE camera = ? AND capture_ms >= ?",
                              (camera, after_ms)).fetchall()
        held = {bytes(row[0]) for row in db.execute(
            "SELECT chain_id FROM chain_records WHERE fingerprint = ?", (fingerprint,))}
    chains = [split_key_id(bytes(key_id))[0] for (key_id,) in segments]
    return len(chains), sum(chain in held for chain in chains)


def test_a_revocation_through_one_archiver_ends_streams_and_keys_on_every_other(
        postgres_url: str, tmp_path: Path, make_viewer: Callable[[str], Viewer]) -> None:
    viewer, other = make_viewer("rita"), make_viewer("otto")
    camera = f"prop{uuid.uuid4().hex[:8]}"
    source = make_source(tmp_path / "camera.ts", 90)
    with site(postgres_url, tmp_path, 3) as (a1, a2, a3):
        token = a3.add_camera(camera)
        # Pushing to Archiver 3 before anyone is authorized: it records under chains for nobody.
        camera_process = push(source, a3.url, camera, token, hls_time=1, wait=False)
        try:
            # Authorized through Archiver 1 (and a second viewer that stays).
            fp = a1.add_viewer(viewer.pem, [camera])
            a1.add_viewer(other.pem, [camera])
            # It logs in on 2 and 3, and Archiver 3 wraps keys for it: its live stream there
            # decrypts (verified by its own reader).
            login(a2.url, viewer.identity, verify=a2.verify)
            watcher = LiveWatcher(a3, login(a3.url, viewer.identity, verify=a3.verify), viewer,
                                  camera)
            keeper = LiveWatcher(a3, login(a3.url, other.identity, verify=a3.verify), other,
                                 camera)
            watcher.start()
            keeper.start()
            assert wait_for(lambda: bool(watcher.segments and keeper.segments), 90), (
                watcher.error, keeper.error, a3.log()[-3000:])
            # Revoked through Archiver 2, early in a key period (the rule is "within one key
            # period": a revocation late in one would leave the next period to the network).
            a2.sleep_into_next_key_period()
            revoked_at_ms = time.time_ns() // 1_000_000
            started = time.monotonic()
            a2.revoke(fp)
            watcher.join(60)
            assert not watcher.is_alive(), "the live stream on Archiver 3 is still open"
            assert watcher.error is None, watcher.error
            assert watcher.ended_by_end_record is False  # cut off, not a clean end
            assert watcher.ended_at is not None
            ended_s = watcher.ended_at - started
            assert refused(a3, viewer) and refused(a1, viewer)
            refused_s = time.monotonic() - started
            print(f"site propagation (NOTIFY): revoked through a2; live stream on a3 ended "
                  f"{ended_s:.3f} s after the request was sent; refused on a1 and a3 "
                  f"{refused_s:.3f} s after (key period {KEY_PERIOD_S} s)")
            # No key the revoked viewer can derive from the next key period on: every segment
            # Archiver 3 seals from then on is under a chain it holds no record of.
            period_ms = KEY_PERIOD_S * 1000
            # (A second later: a segment's time is its stream's, anchored to its arrival; one
            # that began just before the boundary may be sealed just before it.)
            next_period_ms = (revoked_at_ms // period_ms + 1) * period_ms + 1000
            assert wait_for(lambda: chains_held_after(a3, camera, fp, next_period_ms)[0] >= 3,
                            60), a3.log()[-3000:]
            sealed, held = chains_held_after(a3, camera, fp, next_period_ms)
            assert held == 0, f"{held} of {sealed} segments are under a chain it holds"
            # The viewer kept still gets them.
            before = len(keeper.segments)
            assert wait_for(lambda: len(keeper.segments) > before, 60), keeper.error
            assert "authorized" in a3.log() and "notify" in a3.log()
        finally:
            camera_process.kill()
            camera_process.wait()


def test_polling_alone_converges_without_notify(
        postgres_url: str, tmp_path: Path, make_viewer: Callable[[str], Viewer]) -> None:
    viewer = make_viewer("polly")
    camera = f"poll{uuid.uuid4().hex[:8]}"
    with site(postgres_url, tmp_path, 2, "--no-site-notify", "--site-poll", "3") as (a1, a2):
        token = a2.add_camera(camera)
        fp = a1.add_viewer(viewer.pem, [camera])
        # Archiver 2 learns of it by its poll: segments it seals from then on are for it.
        assert wait_for(lambda: "through another Archiver (poll)" in a2.log(), 30), a2.log()
        session = login(a2.url, viewer.identity, verify=a2.verify)
        watcher = LiveWatcher(a2, session, viewer, camera)
        watcher.start()

        def delivered() -> bool:
            assert a2.put_segment(camera, token, os.urandom(3000)) == 201
            return bool(watcher.segments)

        assert wait_for(delivered, 60, step=0.3), (watcher.error, a2.log()[-3000:])
        started = time.monotonic()
        a1.revoke(fp)
        watcher.join(30)
        assert not watcher.is_alive() and watcher.error is None, watcher.error
        print(f"site propagation (polling every 3 s, NOTIFY off): the live stream on a2 "
              f"ended {time.monotonic() - started:.3f} s after the revocation through a1")
        assert refused(a2, viewer)
        # Authorized again and revoked again quickly (likely between two of a2's polls: the
        # poll sees "revoked" before and after, at another time): its stream ends too.
        fp = a1.add_viewer(viewer.pem, [camera])
        again = LiveWatcher(a2, login(a2.url, viewer.identity, verify=a2.verify), viewer,
                            camera)
        again.start()
        assert again.opened.wait(30), again.error
        a1.revoke(fp)
        again.join(30)
        assert not again.is_alive() and again.error is None, again.error
        assert refused(a2, viewer)
        assert "(notify)" not in a2.log()


def test_the_audit_log_of_the_site_shows_every_archivers_entries(
        postgres_url: str, tmp_path: Path, make_viewer: Callable[[str], Viewer]) -> None:
    viewer = make_viewer("audra")
    with site(postgres_url, tmp_path, 2) as (a1, a2):
        camera = f"aud{uuid.uuid4().hex[:8]}"
        a1.add_camera(camera)
        fp = a1.add_viewer(viewer.pem, [camera])
        a2.revoke(fp)

        def site_log() -> list[dict]:
            return a2.admin("GET", "/v1/admin/audit", expect=200)["entries"]

        # Read through Archiver 2: Archiver 1's admin changes are there, named after it.
        def changes() -> list[tuple[str, str]]:
            return [(e["archiver"], e["action"]) for e in site_log() if e["action"] in (
                "camera.add", "viewer.add", "viewer.revoke")]

        assert wait_for(lambda: len(changes()) == 3, 30), changes()
        assert changes() == [("a1", "camera.add"), ("a1", "viewer.add"), ("a2", "viewer.revoke")]
        entries = site_log()
        assert {e["archiver"] for e in entries if e["action"] == "start"} == {"a1", "a2"}
        added = next(e for e in entries if e["action"] == "viewer.add")
        assert added["entry"]["fingerprint"] == fp and added["entry"]["actor"] == "admin"
        # The CLI shows the same log.
        shown = subprocess.run(
            [sys.executable, "-P", "-m", "archiver", "audit", "--archiver", a2.url, "--tls-ca",
             str(a2.tls_ca), "--admin-token", a2.admin_token],
            env=server_env(), capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert "a1" in shown.stdout and "viewer.add" in shown.stdout and fp[:16] in shown.stdout


def _key_streams(server: ArchiverServer, fingerprint: str) -> int:
    with sqlite3.connect(f"file:{server.data_dir / 'archiver.sqlite3'}?mode=ro", uri=True) as db:
        return sum(db.execute(f"SELECT COUNT(*) FROM {table} WHERE fingerprint = ?",
                              (fingerprint,)).fetchone()[0] for table in ("chain_records",
                                                                          "epochs"))


def test_key_streams_deleted_through_one_archiver_are_deleted_on_every_other(
        postgres_url: str, tmp_path: Path, make_viewer: Callable[[str], Viewer]) -> None:
    viewer = make_viewer("shreda")
    camera = f"shred{uuid.uuid4().hex[:8]}"
    with site(postgres_url, tmp_path, 2) as (a1, a2):
        token = a2.add_camera(camera)
        fp = a1.add_viewer(viewer.pem, [camera])

        def wrapped_for_it() -> bool:  # Archiver 2 records the camera under chains for it
            assert a2.put_segment(camera, token, os.urandom(3000)) == 201
            return _key_streams(a2, fp) > 0

        assert wait_for(wrapped_for_it, 60, step=0.3), a2.log()[-3000:]
        # Revoked through Archiver 1 with its key streams deleted: Archiver 2's go as well
        # (crypto-shredding for the viewer on the whole site, not on the Archiver asked).
        a1.revoke(fp, delete_key_streams=True)
        assert wait_for(lambda: _key_streams(a2, fp) == 0, 30), _key_streams(a2, fp)
        assert refused(a2, viewer)
