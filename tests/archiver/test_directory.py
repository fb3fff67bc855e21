"""The site directory's behaviour (issue 21, item 1), the same on both backends: SQLite (the
embedded default, the data directory's file) and a real PostgreSQL server (the
``postgres_url`` fixture: initdb and pg_ctl, a database per test)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy.exc import IntegrityError

from archiver.directory import (
    AdminRow,
    ArchiverRow,
    AuditEvent,
    Directory,
    NewViewer,
    Placement,
    open_directory,
)
from archiver.grants import AccessGrantRow, GrantState
from keyservice.errors import UsageError

FP_A, FP_B = "a1" * 32, "b2" * 32


@pytest.fixture(params=["sqlite", "postgresql"])
def directory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Directory]:
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    opened = open_directory(url, tmp_path)
    assert opened.backend == request.param
    try:
        yield opened
    finally:
        opened.close()


def test_cameras_are_added_once_removed_with_their_name_reserved_and_keep_retention(
        directory: Directory) -> None:
    assert directory.add_camera("door", b"\1" * 32, None, 1000)
    assert not directory.add_camera("door", b"\2" * 32, None, 2000)  # the name is taken
    assert directory.add_camera("yard", b"\3" * 32, "rtsp://cam/yard", 1500, archiver="a1")
    assert [c.name for c in directory.cameras()] == ["door", "yard"]
    door = directory.camera("door")
    assert door is not None and door.token_sha256 == b"\1" * 32 and door.created_ms == 1000
    assert door.retention_days is None and door.archiver is None
    assert directory.set_retention("door", 7) and directory.camera("door").retention_days == 7
    assert not directory.set_retention("nope", 7)
    assert directory.remove_camera("door", 3000)
    assert not directory.remove_camera("door", 4000)  # removed once, at its first time
    assert [c.name for c in directory.cameras()] == ["yard"]
    removed = [c for c in directory.cameras(include_removed=True) if c.name == "door"]
    assert removed[0].removed_ms == 3000
    assert not directory.add_camera("door", b"\4" * 32, None, 5000)  # evidence keeps the name
    assert directory.cameras_held("a1") == ["yard"]
    # Millisecond times past 2^31 (every real one) survive on both backends.
    assert directory.add_camera("late", b"\5" * 32, None, 1_765_000_000_000)
    assert directory.camera("late").created_ms == 1_765_000_000_000


def test_viewers_are_authorized_changed_revoked_and_reauthorized(directory: Directory) -> None:
    directory.add_viewer(FP_A, b"cert-a", "CN=alice", 2, ["door", "yard"], 10)
    directory.add_viewer(FP_B, b"cert-b", "CN=bob", 1, None, 20)  # all cameras
    alice = directory.viewer(FP_A)
    assert alice is not None and alice.cameras == ("door", "yard") and not alice.all_cameras
    assert alice.certificate == b"cert-a" and alice.authorized_on("door")
    assert not alice.authorized_on("lobby")
    assert directory.viewer(FP_B).authorized_on("anything")
    assert [v.fingerprint for v in directory.viewers()] == [FP_A, FP_B]  # in order added
    assert directory.set_viewer_cameras(FP_A, ["lobby"])
    assert directory.viewer(FP_A).cameras == ("lobby",)
    assert directory.revoke_viewer(FP_A, 100)
    assert directory.revoke_viewer(FP_A, 200)  # known: still true, revoked at its first time
    revoked = directory.viewer(FP_A)
    assert revoked.revoked_ms == 100 and not revoked.authorized_on("lobby")
    assert not directory.set_viewer_cameras(FP_A, None)  # a revoked viewer has no cameras
    assert not directory.revoke_viewer("00" * 32, 100)
    assert directory.viewer("00" * 32) is None
    directory.mark_key_streams_deleted(FP_A)
    assert directory.viewer(FP_A).key_streams_deleted
    # Authorized again: active, its new cameras; added_ms stays the first enrolment's.
    directory.add_viewer(FP_A, b"cert-a", "CN=alice", 2, ["yard"], 300)
    again = directory.viewer(FP_A)
    assert again.revoked_ms is None and again.cameras == ("yard",) and again.added_ms == 10


def test_a_batch_of_viewers_is_added_and_read_back_in_one_query_each(
        directory: Directory) -> None:
    directory.add_viewer(FP_A, b"cert-a", "CN=alice", 2, ["door"], 10)
    directory.revoke_viewer(FP_A, 11)
    fps = [f"{i:02x}" * 32 for i in range(3, 40)]
    directory.add_viewers([NewViewer(FP_A, b"cert-a", "CN=alice", 2, ("yard",)),
                           *(NewViewer(fp, fp.encode(), f"CN={fp[:4]}", 1,
                                       None if i % 2 else ("door", "lobby"))
                             for i, fp in enumerate(fps))], 50)
    found = directory.viewers_named([FP_A, FP_B, *fps])
    assert sorted(found) == sorted([FP_A, *fps])  # bob was never added
    alice = found[FP_A]  # authorized again: active, its new cameras, its first added_ms
    assert alice.revoked_ms is None and alice.cameras == ("yard",) and alice.added_ms == 10
    assert found[fps[0]].cameras == ("door", "lobby") and not found[fps[0]].all_cameras
    assert found[fps[1]].all_cameras and found[fps[1]].added_ms == 50
    assert found == {fp: directory.viewer(fp) for fp in [FP_A, *fps]}
    directory.add_viewers([], 60)  # nothing to add: no transaction


def test_holds_are_kept_listed_per_camera_and_their_ids_never_reused(directory: Directory) -> None:
    first = directory.add_hold("door", 1000, 2000, "case 12", "alice (0123)", 5)
    second = directory.add_hold("yard", 3000, 4000, "case 13", "admin", 6)
    assert [h.hold_id for h in directory.holds()] == [first.hold_id, second.hold_id]
    assert directory.holds("door") == [first]
    assert directory.remove_hold(second.hold_id) == second
    assert directory.remove_hold(second.hold_id) is None
    third = directory.add_hold("yard", 1, 2, "case 14", "admin", 7)
    # An audit entry names a hold by id: a removed hold's id is never given again.
    assert third.hold_id > second.hold_id


def _grant(grant_id: str, grantor: str = FP_A, grantee: str = FP_B,
           created_ms: int = 1) -> AccessGrantRow:
    return AccessGrantRow(grant_id, "door", 1000, 2000, grantor, grantee, 3, created_ms,
                          GrantState.PENDING, None, None, "for the case")


def test_access_grants_keep_their_blob_and_follow_the_allowed_decisions(
        directory: Directory) -> None:
    assert directory.add_access_grant(_grant("g1"), b"\0opaque\xff")
    assert not directory.add_access_grant(_grant("g1"), b"other")  # the id is taken
    assert directory.add_access_grant(_grant("g2", FP_B, "cc" * 32, created_ms=2), b"2")
    assert directory.access_grant_blob("g1") == b"\0opaque\xff"
    assert directory.access_grant("g1").state is GrantState.PENDING
    assert [g.grant_id for g in directory.access_grants()] == ["g2", "g1"]  # newest first
    assert [g.grant_id for g in directory.access_grants(party="cc" * 32)] == ["g2"]
    approved = directory.decide_access_grant("g1", "approve", "alice (0123)", 50, None)
    assert approved.state is GrantState.APPROVED and approved.decided_by == "alice (0123)"
    assert approved.note == "for the case"  # no new note: the grantor's stays
    # Approving again or rejecting an approved grant does not apply: the grant is unchanged.
    assert directory.decide_access_grant("g1", "reject", "bob", 60, "no") == approved
    revoked = directory.decide_access_grant("g1", "revoke", "bob (4567)", 70, "case closed")
    assert revoked.state is GrantState.REVOKED and revoked.note == "case closed"
    assert [g.grant_id for g in directory.access_grants(state=GrantState.PENDING)] == ["g2"]
    assert directory.decide_access_grant("nope", "approve", "x", 1, None) is None


def test_two_admins_deciding_one_grant_at_once_apply_one_decision(directory: Directory) -> None:
    directory.add_access_grant(_grant("g1"), b"blob")
    start = threading.Barrier(2)
    results: dict[str, GrantState] = {}

    def decide(decision: str) -> None:
        start.wait(10)
        row = directory.decide_access_grant("g1", decision, decision, 9, None)
        results[decision] = row.state

    threads = [threading.Thread(target=decide, args=(d,)) for d in ("approve", "reject")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    final = directory.access_grant("g1")
    assert final.state in (GrantState.APPROVED, GrantState.REJECTED)
    assert final.decided_by == {GrantState.APPROVED: "approve",
                                GrantState.REJECTED: "reject"}[final.state]


def _admin(fp: str, name: str, added_ms: int = 1) -> AdminRow:
    return AdminRow(fp, name, b"der", f"CN={name}", 2, added_ms, "admin", None, None)


def test_admins_are_unique_by_name_and_certificate_found_by_prefix_and_revoked_once(
        directory: Directory) -> None:
    assert directory.add_admin(_admin(FP_A, "alice"))
    assert not directory.add_admin(_admin(FP_A, "alice2"))  # the certificate is taken
    assert not directory.add_admin(_admin("cc" * 32, "alice"))  # the name is taken
    assert directory.add_admin(_admin(FP_B, "bob", 2))
    assert directory.active_admins() == 2
    assert directory.find_admin("alice").fingerprint == FP_A
    assert directory.find_admin(FP_B[:8]).name == "bob"
    assert directory.find_admin("a1a1a1") is None  # too short a prefix
    assert directory.find_admin("zz") is None
    assert directory.revoke_admin(FP_A, "bob (b2b2)", 10)
    assert not directory.revoke_admin(FP_A, "bob (b2b2)", 11)
    row = directory.admin(FP_A)
    assert row.revoked_ms == 10 and row.revoked_by == "bob (b2b2)"
    assert directory.active_admins() == 1
    assert [a.name for a in directory.admins()] == ["alice", "bob"]
    # A revoked admin's name stays reserved (the audit log names admins by it).
    assert not directory.add_admin(_admin("dd" * 32, "alice"))


def test_the_archiver_registry_and_the_site_audit_log(directory: Directory) -> None:
    directory.register_archiver(ArchiverRow("a1", "https://a1:8443", b"cert1", 100, None))
    directory.register_archiver(ArchiverRow("a2", "https://a2:8443", b"cert2", 200, None))
    directory.register_archiver(ArchiverRow("a1", "https://a1.site:8443", b"cert1b", 300, None))
    assert directory.heartbeat("a1", 400) and not directory.heartbeat("a9", 400)
    assert directory.archivers() == [
        ArchiverRow("a1", "https://a1.site:8443", b"cert1b", 100, 400),
        ArchiverRow("a2", "https://a2:8443", b"cert2", 200, None)]
    events = [AuditEvent("a1", 1, 50, "admin", "camera.add", '{"camera":"door"}', "0" * 64),
              AuditEvent("a2", 1, 40, "admin", "viewer.add", "{}", "1" * 64),
              AuditEvent("a1", 2, 60, "alice (a1a1)", "viewer.revoke", "{}", "2" * 64)]
    for event in events:
        directory.append_audit(event)
    assert directory.audit_events() == [events[1], events[0], events[2]]  # in time order
    assert directory.audit_events(archiver="a1", since_ms=55) == [events[2]]
    assert directory.last_audit_seq("a1") == 2 and directory.last_audit_seq("a3") == 0
    with pytest.raises(IntegrityError):  # one line of one Archiver's log is kept once
        directory.append_audit(events[0])


def test_a_moved_camera_keeps_where_each_part_was_recorded(directory: Directory) -> None:
    assert directory.add_camera("yard", b"t" * 32, None, 1_000, archiver="a1")
    assert directory.add_camera("hall", b"t" * 32, None, 1_000)  # a standalone's: never placed
    assert directory.archiver("a1") is None
    assert directory.move_camera("yard", "a2", 5_000)
    assert not directory.move_camera("yard", "a2", 6_000)  # a2 records it already
    assert not directory.move_camera("nowhere", "a2", 6_000)
    assert directory.camera("yard").archiver == "a2"  # type: ignore[union-attr]
    first, second = Placement("yard", "a1", 1_000, 5_000), Placement("yard", "a2", 5_000, None)
    assert directory.placements("yard") == [first, second]
    assert directory.placements("yard", 2_000, 4_000) == [first]
    assert directory.placements("yard", 4_999, 5_001) == [first, second]
    assert directory.placements("yard", 5_000, None) == [second]  # [from, to): a1 ends at 5 000
    assert directory.placements("hall") == []
    assert directory.remove_camera("yard", 7_000)
    assert not directory.move_camera("yard", "a1", 8_000)  # a removed camera stays where it was


def test_an_unreachable_postgresql_directory_is_one_sentence_without_its_password(
        tmp_path: Path) -> None:
    url = "postgresql://fusion:s3cret-pw@127.0.0.1:1/site"  # nothing listens on port 1
    with pytest.raises(UsageError) as refused:
        open_directory(url, tmp_path)
    message = str(refused.value)
    assert "cannot be reached" in message and "127.0.0.1:1" in message
    assert "s3cret-pw" not in message and "***" in message


@pytest.mark.parametrize("url", ["mysql://x@db/site", "postgresql:///site", "site.sqlite3"])
def test_a_directory_url_that_is_not_postgresql_is_refused(url: str, tmp_path: Path) -> None:
    from archiver.settings import Settings

    with pytest.raises(UsageError, match="not a PostgreSQL URL"):
        Settings(data_dir=tmp_path, directory_url=url)


@pytest.mark.parametrize("case", ["unreachable", "wrong password"])
def test_serve_refuses_a_directory_it_cannot_use_with_one_sentence_before_starting(
        case: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if case == "unreachable":
        url, said = "postgresql://fusion:s3cret-pw@127.0.0.1:1/site", "Connection refused"
    else:  # the real server, another password
        parts = urlsplit(request.getfixturevalue("postgres_url"))
        url = parts._replace(netloc=f"{parts.username}:s3cret-pw@{parts.hostname}:"
                                    f"{parts.port}").geturl()
        said = "password authentication failed"
    done = subprocess.run(
        [sys.executable, "-P", "-m", "archiver", "serve", "--data", str(tmp_path / "data"),
         "--port", "0"], env={**os.environ, "FUSION_DIRECTORY": url}, capture_output=True,
        text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert said in lines[0] and "s3cret-pw" not in done.stderr and "***" in lines[0]


def test_a_camera_keeps_its_archivers_in_order_and_whether_they_all_record_it(
        directory: Directory) -> None:
    assert directory.add_camera("gate", b"t" * 32, "rtsp://cam/gate", 1_000, archiver="a1",
                                standbys=("a3", "a2"))
    assert directory.add_camera("dock", b"t" * 32, "rtsp://cam/dock", 1_000, archiver="a2",
                                standbys=("a1",), redundant=True)
    assert directory.add_camera("yard", b"t" * 32, None, 1_000, archiver="a1")
    assert directory.camera_archivers() == {"gate": ("a1", "a3", "a2"), "dock": ("a2", "a1")}
    assert directory.camera_archivers("gate") == {"gate": ("a1", "a3", "a2")}
    assert directory.camera_archivers("yard") == {}  # one Archiver: cameras.archiver only
    dock, gate = directory.cameras()[:2]
    assert (dock.redundant, gate.redundant) == (True, False)
    assert directory.camera("yard").redundant is False  # type: ignore[union-attr]
