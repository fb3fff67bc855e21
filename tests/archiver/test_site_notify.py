"""archiver/directory/notify.py and the site audit log (issue 21, items 4 and 5), on a real
PostgreSQL directory: the change rules (``diff``), a change announced through one Archiver's
audit rows reaching another by LISTEN/NOTIFY, the listener surviving the loss of its
connection, the poll alone converging, and every audit line reaching the directory once, after
an outage too."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest

from archiver.audit import AuditLog
from archiver.directory import Directory, NewViewer, open_directory
from archiver.directory.notify import CHANNEL, SiteChanges, ViewerChange, diff
from tests.fixtures.server import ArchiverServer

FP = "ab" * 32


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# --- the rules ----------------------------------------------------------------------------
def test_diff_follows_the_rules_of_a_local_change() -> None:
    active_on_ab = (None, ("a", "b"), False)
    assert diff(FP, None, active_on_ab) == ViewerChange(FP, True)  # added
    assert diff(FP, (5, ("a",), False), active_on_ab) == ViewerChange(FP, True)  # re-added
    assert diff(FP, active_on_ab, active_on_ab) is None  # nothing
    assert diff(FP, active_on_ab, active_on_ab, renewed=True) == ViewerChange(FP, True)
    assert diff(FP, active_on_ab, (None, ("a", "b", "c"), False)) == ViewerChange(FP, True)
    assert diff(FP, active_on_ab, (None, None, False)) == ViewerChange(FP, True)  # to all
    assert diff(FP, active_on_ab, (None, ("a",), False)) == ViewerChange(FP, False, ["b"])
    assert diff(FP, (None, None, False), (None, ("a",), False)) == ViewerChange(FP, False, None)
    assert diff(FP, active_on_ab, (1234, ("a", "b"), False)) == ViewerChange(
        FP, False, None, revoked=True, at_ms=1234)
    assert diff(FP, active_on_ab, None) == ViewerChange(FP, False, None, revoked=True)
    assert diff(FP, (5, None, False), (5, None, False)) is None  # stays revoked
    # Authorized again and revoked again between two polls: revoked here too.
    assert diff(FP, (5, ("a",), False), (9, ("a",), False)) == ViewerChange(
        FP, False, None, revoked=True, at_ms=9)
    # Added and revoked between two polls: it may have been served meanwhile.
    assert diff(FP, None, (5, None, False)) == ViewerChange(FP, False, None, revoked=True,
                                                            at_ms=5)
    # Revoked with its key streams deleted: here too; seen revoked first, then deleted: only
    # the deletion; deleted already when seen: nothing.
    assert diff(FP, active_on_ab, (7, ("a", "b"), True)) == ViewerChange(
        FP, False, None, revoked=True, at_ms=7, shred=True)
    assert diff(FP, (7, None, False), (7, None, True)) == ViewerChange(
        FP, False, None, revoked=True, at_ms=7, shred=True, shred_only=True)
    assert diff(FP, (7, None, True), (7, None, True)) is None


# --- on PostgreSQL ----------------------------------------------------------------------
@pytest.fixture
def directory(postgres_url: str, tmp_path: Path) -> Iterator[Directory]:
    opened = open_directory(postgres_url, tmp_path)
    try:
        yield opened
    finally:
        opened.close()


class Recorder:
    def __init__(self) -> None:
        self.changes: list[ViewerChange] = []
        self.grant_calls: list[int] = []  # the size of each batch given to apply_grants
        self.lock = threading.Lock()

    def __call__(self, change: ViewerChange) -> None:
        with self.lock:
            self.changes.append(change)

    def grants(self, fingerprints: list[str]) -> None:
        with self.lock:
            self.grant_calls.append(len(fingerprints))
            self.changes += [ViewerChange(fp, True) for fp in fingerprints]

    def seen(self, fp: str) -> list[ViewerChange]:
        with self.lock:
            return [c for c in self.changes if c.fingerprint == fp]


def _site(directory: Directory, name: str, url: str, listen: bool = True,
          poll_s: float = 3600, batched: bool = False) -> tuple[SiteChanges, Recorder]:
    recorder = Recorder()
    site = SiteChanges(directory, name, recorder, url=url, listen=listen, poll_s=poll_s,
                       apply_grants=recorder.grants if batched else None)
    site.start()
    return site, recorder


def settled(site: SiteChanges) -> bool:
    """Listening, and done with the poll that follows connecting: a change made after this
    reaches it only by notification. (A change made during that poll could arrive both ways,
    applied twice as a renewal, and make the test depend on timing.)"""
    return site.connected.is_set() and site.polls == 1


def _audit(tmp_path: Path, directory: Directory, name: str) -> AuditLog:
    return AuditLog(tmp_path / f"{name}-audit.jsonl", directory, name, retry_s=0.2)


@contextmanager
def _announcing(directory: Directory, postgres_url: str, tmp_path: Path, batched: bool = False
                ) -> Iterator[tuple[SiteChanges, SiteChanges, Recorder, AuditLog]]:
    """a1, whose audit log announces its changes, and a2, settled: a2 never polls (an hour),
    so only a notification can bring it a change. ``batched``: a2 applies grants together."""
    a1, _ = _site(directory, "a1", postgres_url, poll_s=3600)
    a2, recorder = _site(directory, "a2", postgres_url, poll_s=3600, batched=batched)
    audit = _audit(tmp_path, directory, "a1")
    audit.on_synced = a1.announce
    try:
        assert wait_for(lambda: settled(a2))
        yield a1, a2, recorder, audit
    finally:
        audit.close()
        a1.stop()
        a2.stop()


def test_a_change_audited_through_one_archiver_reaches_another_by_notify(
        directory: Directory, postgres_url: str, tmp_path: Path) -> None:
    with _announcing(directory, postgres_url, tmp_path) as (a1, a2, recorder, audit):
        fp = os.urandom(32).hex()
        directory.add_viewer(fp, b"cert", "CN=v", 1, ["door"], 1000)
        audit.record("admin", "viewer.add", 1000, fingerprint=fp, cameras=["door"])
        assert wait_for(lambda: recorder.seen(fp) == [ViewerChange(fp, True)])
        directory.revoke_viewer(fp, 2000)
        audit.record("admin", "viewer.revoke", 2000, fingerprint=fp)
        assert wait_for(lambda: len(recorder.seen(fp)) == 2)
        assert recorder.seen(fp)[1] == ViewerChange(fp, False, None, revoked=True, at_ms=2000)
        assert a2.applied_notify == 2 and a2.applied_poll == 0
        # a1 made the change: its own notification does nothing there, and its poll does not
        # apply it again (it took the rows as seen when it announced them).
        assert a1.poll_once() == 0


def test_a_batch_enrolment_reaches_another_archiver_viewer_by_viewer(
        directory: Directory, postgres_url: str, tmp_path: Path) -> None:
    with _announcing(directory, postgres_url, tmp_path, batched=True) as (
            a1, a2, recorder, audit):
        fps = [os.urandom(32).hex() for _ in range(5)]
        directory.add_viewers([NewViewer(fp, b"cert", "CN=v", 1, ("door",)) for fp in fps], 1000)
        audit.record_many("admin", "viewer.add", 1000,
                          [{"fingerprint": fp, "cameras": ["door"]} for fp in fps])
        assert wait_for(lambda: all(recorder.seen(fp) == [ViewerChange(fp, True)]
                                    for fp in fps))
        assert a2.applied_notify == 5 and a2.applied_poll == 0
        # Announced in one commit, received together: applied in one call, not five.
        assert recorder.grant_calls == [5]
        assert a1.poll_once() == 0  # a1 took the batch's rows as seen when it announced them


def test_the_listener_reconnects_and_catches_up_with_what_it_missed(
        directory: Directory, postgres_url: str) -> None:
    a2, recorder = _site(directory, "a2", postgres_url, poll_s=3600)
    try:
        assert wait_for(lambda: settled(a2))
        # A change whose announcement never reaches it (made while it is away, or announced by
        # an Archiver that died first). It is made before the cut so that the reconnection's
        # poll surely sees it, and it is not announced so that only that poll can bring it:
        # with an announcement the outcome would depend on whether the listener was back
        # before the NOTIFY (both paths would apply it, as a renewal).
        fp = os.urandom(32).hex()
        directory.add_viewer(fp, b"cert", "CN=v", 1, None, 1000)
        # The listening connection is cut (as a restart of PostgreSQL or a network cut does).
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE %s AND pid <> pg_backend_pid() "
                "AND datname = current_database()", (f"LISTEN {CHANNEL}%",)
            ).fetchall()
            assert killed == [(True,)]
        # It reconnects, polls at once (what it missed: an hour's poll would not come), and
        # listens again.
        assert wait_for(lambda: recorder.seen(fp) == [ViewerChange(fp, True)])
        assert (a2.polls, a2.applied_poll, a2.applied_notify) == (2, 1, 0)
        assert wait_for(a2.connected.is_set)
        # The catch-up poll is over (it applied fp): from now on only the notification can
        # bring a change.
        fp2 = os.urandom(32).hex()
        directory.add_viewer(fp2, b"cert", "CN=w", 1, None, 1000)
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps(
                {"archiver": "a1", "fingerprint": fp2, "action": "viewer.add"})))
        assert wait_for(lambda: recorder.seen(fp2) == [ViewerChange(fp2, True)])
        assert (a2.applied_poll, a2.applied_notify) == (1, 1)
    finally:
        a2.stop()


def test_polling_alone_converges(directory: Directory, postgres_url: str) -> None:
    a2, recorder = _site(directory, "a2", postgres_url, listen=False, poll_s=0.2)
    try:
        assert not a2.listening
        fp = os.urandom(32).hex()
        directory.add_viewer(fp, b"cert", "CN=v", 1, ["a", "b"], 1000)
        assert wait_for(lambda: recorder.seen(fp) == [ViewerChange(fp, True)])
        directory.set_viewer_cameras(fp, ["a"])
        assert wait_for(lambda: len(recorder.seen(fp)) == 2)
        assert recorder.seen(fp)[1] == ViewerChange(fp, False, ["b"])
        directory.revoke_viewer(fp, 5000)
        assert wait_for(lambda: len(recorder.seen(fp)) == 3)
        assert recorder.seen(fp)[2] == ViewerChange(fp, False, None, revoked=True, at_ms=5000)
        assert a2.applied_notify == 0
    finally:
        a2.stop()


def test_a_malformed_notification_is_ignored(directory: Directory, postgres_url: str) -> None:
    a2, recorder = _site(directory, "a2", postgres_url, poll_s=3600)
    try:
        assert not a2.notified("not json")
        assert not a2.notified(json.dumps({"archiver": "a1"}))
        assert not a2.notified(json.dumps({"archiver": "a2", "fingerprint": FP}))  # its own
        assert recorder.changes == []
    finally:
        a2.stop()


# --- the site audit log -------------------------------------------------------------------
def _site_lines(directory: Directory, name: str) -> list[tuple[int, str]]:
    return [(e.seq, e.entry) for e in directory.audit_events(archiver=name, limit=100_000)]


def test_every_audit_line_reaches_the_directory_once_also_after_an_outage(
        directory: Directory, tmp_path: Path, postgres_url: str) -> None:
    path = tmp_path / "a1-audit.jsonl"
    # Lines written before the Archiver joined the site go too, at start.
    before = AuditLog(path)
    before.record("archiver", "start", 1)
    before.record("admin", "camera.add", 2, camera="door")
    before.close()
    audit = AuditLog(path, directory, "a1", retry_s=0.2)
    audit.record("admin", "viewer.add", 3, fingerprint=FP)
    assert wait_for(lambda: len(_site_lines(directory, "a1")) == 3)
    # The directory's table goes away (every insert fails, as with a server that is down):
    # the requests are still audited in the file, and nothing waits for the directory.
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("ALTER TABLE audit_events RENAME TO audit_events_away")
        started = time.monotonic()
        for i in range(4):
            audit.record("admin", "hold.add", 10 + i, hold=i)
        assert audit.lines == 7
        assert wait_for(lambda: audit.synced() is None or audit.synced() == 3)
        time.sleep(0.5)  # a few failed tries (retry_s 0.2): still nothing written twice
        print(f"4 audited during the outage in {time.monotonic() - started:.3f} s")
        admin.execute("ALTER TABLE audit_events_away RENAME TO audit_events")
    # Back: the missing lines arrive, in order, each once.
    assert wait_for(lambda: len(_site_lines(directory, "a1")) == 7)
    audit.close()
    file_lines = path.read_text().splitlines()
    assert _site_lines(directory, "a1") == list(enumerate(file_lines, start=1))
    # A restart with nothing new writes nothing twice.
    again = AuditLog(path, directory, "a1", retry_s=0.2)
    assert wait_for(lambda: again.synced() == 7)
    again.close()
    assert _site_lines(directory, "a1") == list(enumerate(file_lines, start=1))


def test_lines_that_fell_out_of_memory_are_read_back_from_the_file(
        directory: Directory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("archiver.audit.SYNC_BATCH", 3)
    path = tmp_path / "a9-audit.jsonl"
    seed = AuditLog(path)
    for i in range(8):  # older than this start: only the file has them
        seed.record("archiver", "camera.receiving", i, camera="door")
    seed.close()
    audit = AuditLog(path, directory, "a9", retry_s=0.2)
    audit.record("admin", "viewer.revoke", 99, fingerprint=FP)
    assert wait_for(lambda: len(_site_lines(directory, "a9")) == 9)
    audit.close()
    assert [json.loads(entry)["ts_ms"] for _, entry in _site_lines(directory, "a9")] == [
        *range(8), 99]


# --- a revocation learnt late (keying.py) -------------------------------------------------
def test_a_revocation_learnt_after_its_key_period_ends_drops_the_key_in_use(
        tmp_path: Path) -> None:
    """Another Archiver's revocation learnt in the next key period (a poll): the key this
    Archiver already uses for that period is of the old chain, which the revoked viewer can
    derive; the next segment must be sealed under a new chain without it."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from archiver.db import Database
    from archiver.keying import KeyManager
    from keyservice.crypto import split_key_id
    from keyservice.format import DataStream
    from keyservice.identity import OaepHash, fingerprint

    keys_dir = Path(__file__).parents[1] / "vectors" / "keys"
    period_ms, t0 = 60_000, 40 * 86_400_000
    db = Database(tmp_path / "archiver.sqlite3")
    site = open_directory(None, tmp_path)
    fps = []
    for name in ("a", "b"):
        cert = x509.load_pem_x509_certificate(
            (keys_dir / f"TEST-ONLY-viewer-{name}.cert.pem").read_bytes())
        fps.append(fingerprint(cert).hex())
        site.add_viewer(fps[-1], cert.public_bytes(Encoding.DER), name, int(OaepHash.SHA256),
                        None, 0)
    revoked, kept = fps
    clock = [t0 + 1000]
    keys = KeyManager(db, 60, clock=lambda: clock[0], directory=site)
    try:
        first = keys.key_for("door", DataStream.VIDEO, t0 + 1000)
        chain = split_key_id(first.key_id)[0]
        assert db.chain_record(revoked, chain) is not None
        revoked_at = t0 + 5 * period_ms + 20_000  # revoked elsewhere, in period 5
        site.revoke_viewer(revoked, revoked_at)
        in_next = t0 + 6 * period_ms + 5_000  # period 6 began here under the old chain
        assert split_key_id(keys.key_for("door", DataStream.VIDEO, in_next).key_id)[0] == chain
        clock[0] = in_next + 5_000
        keys.access_removed(revoked, None, revoked_at)  # learnt now, applied at its own time
        later = keys.key_for("door", DataStream.VIDEO, in_next + 10_000)
        new_chain = split_key_id(later.key_id)[0]
        assert new_chain != chain
        assert db.chain_record(revoked, new_chain) is None
        assert db.chain_record(kept, new_chain) is not None
    finally:
        keys.close()
        site.close()
        db.close()


def test_a_standalone_archiver_lists_its_own_audit_file(archiver_server: ArchiverServer) -> None:
    """Without a site the listing is the Archiver's audit.jsonl, as written; an Archiver of
    another name has none there; and only an admin may read it."""
    archiver_server.add_camera(f"solo{os.urandom(3).hex()}")
    body = archiver_server.admin("GET", "/v1/admin/audit", expect=200)
    assert body["site"] is False
    lines = (archiver_server.data_dir / "audit.jsonl").read_text().splitlines()
    assert [e["entry"] for e in body["entries"]] == [json.loads(line) for line in lines]
    assert [e["seq"] for e in body["entries"]] == list(range(1, len(lines) + 1))
    assert body["entries"][-1]["action"] == "camera.add"
    assert archiver_server.admin("GET", "/v1/admin/audit?archiver=elsewhere",
                                 expect=200)["entries"] == []
    assert httpx.get(f"{archiver_server.url}/v1/admin/audit").status_code == 401
