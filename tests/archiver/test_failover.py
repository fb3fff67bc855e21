"""Failover (issue 22, items 1, 2 and 6): a camera with standbys (``cameras add --archivers
a1,a2,a3``) is taken over by its first live standby when its Archiver dies (``kill -9``), plays
across the failover in one ``fusion-client play`` (each part verified against its own signer,
frame-exact on both sides), stays where it went when the dead Archiver returns (no flap), and
survives a cut link between its Archiver and PostgreSQL (both record meanwhile, the old holder
ends its stream when it sees the takeover). A pushed camera with a standby follows the lease:
refused with an error the camera sees while nobody holds it, accepted by the new holder after.

Real parts: a real PostgreSQL (a1 reaches it through a TCP proxy the test cuts), 3 real
Archiver processes in production mode (HTTPS under a site CA), a real gst-rtsp-server camera
(H.264, 25 fps, a keyframe every second: the puller cuts 2 s segments), a real SoftHSM viewer,
the real fusion-client, ffmpeg as the judge.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from archiver.directory import open_directory
from archiver.directory.leases import LeaseLocks
from archiver.directory.rows import LeaseRow
from fusion_testkit.client_cli import Client, Viewer, play
from fusion_testkit.server import ArchiverServer, server_env
from fusion_testkit.tcp_proxy import TcpProxy
from fusion_testkit.tokens import enroll_viewer
from keyservice.timespec import parse_time
from tests.fixtures.camera import frame_hashes, requires_ffmpeg
from tests.fixtures.rtsp import requires_gstreamer, wait_for
from tests.fixtures.server import SiteCa, production_archiver

TIMEOUT = 90  # a loaded machine: generous, always polled


def _archiver(site_ca: SiteCa, tmp_path: Path, name: str, directory_url: str) -> ArchiverServer:
    # The directory through the environment: its URL (with a password) stays off argv.
    return production_archiver(site_ca, tmp_path / name, extra_args=("--name", name),
                               env=server_env({"FUSION_DIRECTORY": directory_url}),
                               start_timeout_s=TIMEOUT)


def _cli(server: ArchiverServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "archiver", *args, "--archiver", server.url,
         "--admin-token", server.admin_token, "--tls-ca", str(server.tls_ca)],
        env=server_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _segments(server: ArchiverServer, camera: str) -> list[tuple[int, int, int]]:
    """(seq, start_ms, end_ms) of ``camera``'s video segments in ``server``'s own index."""
    index = server.data_dir / "archiver.sqlite3"
    if not index.exists():
        return []
    with sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute("SELECT seq, capture_ms, end_ms FROM segments WHERE camera = ? "
                            "AND stream = 0 ORDER BY capture_ms", (camera,)).fetchall()


def _audit(server: ArchiverServer) -> list[dict]:
    return [json.loads(line) for line in (server.data_dir / "audit.jsonl").read_text()
            .splitlines()]


def _cameras(server: ArchiverServer) -> dict[str, dict]:
    listed = _cli(server, "cameras", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return {c["name"]: c for c in json.loads(listed.stdout)["cameras"]}


def _archivers(server: ArchiverServer) -> dict[str, dict]:
    listed = _cli(server, "site", "archivers", "--json")
    assert listed.returncode == 0, listed.stderr
    return {a["name"]: a for a in json.loads(listed.stdout)["archivers"]}


def _placements(postgres_url: str, camera: str) -> list[tuple[str, int]]:
    with psycopg.connect(postgres_url) as conn:
        return [(a, int(s)) for a, s in conn.execute(
            "SELECT archiver, since_ms FROM camera_placements WHERE camera = %s "
            "ORDER BY since_ms", (camera,)).fetchall()]


def _push(server: ArchiverServer, camera: str, token: str, body: bytes) -> int | str:
    """What the camera sees: the HTTP status, or the connection error."""
    try:
        return httpx.put(f"{server.url}/ingest/{camera}/seg.ts", content=body, timeout=30,
                         headers={"Authorization": f"Bearer {token}"},
                         verify=server.verify).status_code
    except httpx.ConnectError as exc:
        return f"connect error: {exc}"


def _pin(client: Client, viewer: Viewer, server: ArchiverServer) -> None:
    answer = httpx.get(f"{server.url}/v1/archiver", verify=server.verify, timeout=30)
    cert = x509.load_pem_x509_certificate(answer.json()["certificate"].encode())
    path = server.data_dir.parent / f"{server.data_dir.name}-signing.pem"
    path.write_bytes(cert.public_bytes(Encoding.PEM))
    done = client("cameras", "--archiver", server.url, "--token", viewer.uri,
                  "--archiver-cert", str(path))
    assert done.code == 0, done.stderr


@pytest.fixture
def viewer(softhsm_token_factory: Callable[[], object]) -> Viewer:
    token = softhsm_token_factory()
    pem = enroll_viewer(token, "vera", bits=2048)  # type: ignore[arg-type]
    return Viewer("vera", token, token.object_uri("vera"), pem)  # type: ignore[attr-defined]


@pytest.fixture
def site(postgres_url: str, tmp_path: Path, viewer: Viewer
         ) -> Iterator[tuple[list[ArchiverServer], TcpProxy, SiteCa]]:
    """a1 (through a proxy to PostgreSQL), a2, a3; the viewer authorized on every camera
    before any is added (each Archiver's chains start with it)."""
    site_ca = SiteCa.create(tmp_path / "site-ca")
    with ExitStack() as stack:
        proxy = stack.enter_context(TcpProxy.to_postgres(postgres_url))
        servers = [_archiver(site_ca, tmp_path, "a1", proxy.url(postgres_url)),
                   _archiver(site_ca, tmp_path, "a2", postgres_url),
                   _archiver(site_ca, tmp_path, "a3", postgres_url)]
        try:
            servers[0].start()
            servers[0].add_viewer(viewer.pem, "all")
            servers[1].start()
            servers[2].start()
            yield servers, proxy, site_ca
        finally:
            for server in servers:
                server.stop()
            for server in servers:
                assert "Traceback" not in server.log(), server.log()[-3000:]


def test_a_takeover_is_a_compare_and_set_and_the_lock_is_freed_with_its_session(
        postgres_url: str, tmp_path: Path) -> None:
    """The lease's two halves, without Archivers: of two standbys that both saw the holder
    gone, one takeover wins (the other is refused: the camera moved already); the epoch grows
    at each change of holder; a session's lock is seen by another and freed when it ends."""
    directory = open_directory(postgres_url, tmp_path / "dir")
    locks = [LeaseLocks(postgres_url) for _ in range(2)]
    try:
        assert directory.add_camera("lot", b"x" * 32, "rtsp://127.0.0.1/s", 1000,
                                    archiver="a1", standbys=("a2", "a3"))
        directory.renew_leases("a1", ["lot"], 2000, 15_000, locked=["lot"])
        assert directory.leases()["lot"] == LeaseRow("lot", "a1", 1, 17_000, locked=True)
        directory.renew_leases("a1", ["lot"], 3000, 15_000, locked=["lot"])  # the same epoch
        assert directory.leases()["lot"] == LeaseRow("lot", "a1", 1, 18_000, locked=True)
        # A standby that saw an older lease, or saw it expired when it is not, takes nothing.
        assert directory.take_over("lot", "a1", "a3", 4000, 15_000, epoch=0) is None
        assert directory.take_over("lot", "a1", "a3", 4000, 15_000, epoch=1,
                                   expired=True) is None
        assert directory.take_over("lot", "a1", "a2", 5000, 15_000, epoch=1, locked=True) == 2
        assert directory.take_over("lot", "a1", "a3", 5001, 15_000, epoch=1) is None  # late
        # a1, which read the camera as its own before the takeover, cannot renew it back.
        directory.renew_leases("a1", ["lot"], 6000, 15_000, locked=["lot"])
        assert directory.leases()["lot"] == LeaseRow("lot", "a2", 2, 20_000, locked=True)
        # Expired, it is taken (without the lock: the row says so).
        assert directory.take_over("lot", "a2", "a3", 21_000, 15_000, epoch=2,
                                   expired=True) == 3
        assert directory.leases()["lot"] == LeaseRow("lot", "a3", 3, 36_000, locked=False)
        assert directory.move_camera("lot", "a2", 22_000)
        directory.renew_leases("a2", ["lot"], 22_000, 15_000)  # a move: a new epoch
        assert directory.leases()["lot"].epoch == 4
        assert directory.camera("lot").archiver == "a2"  # type: ignore[union-attr]
        assert [(p.archiver, p.since_ms) for p in directory.placements("lot")] == [
            ("a1", 1000), ("a2", 5000), ("a3", 21_000), ("a2", 22_000)]
        # The lock: one session holds it, the other sees it held and cannot take it...
        assert locks[0].try_lock("lot") and locks[0].try_lock("lot")  # never stacked
        assert locks[1].locked(["lot", "other"]) == {"lot"}
        assert not locks[1].try_lock("lot")
        # ...until the holder's session ends (what SIGKILL does): freed as its server process
        # exits (asynchronously: polled).
        locks[0].close()
        wait_for(lambda: locks[1].locked(["lot"]) == set(), TIMEOUT, "the lock freed")
        assert locks[1].try_lock("lot") and locks[1].held() == {"lot"}
        locks[1].unlock("lot")
        assert locks[1].locked(["lot"]) == set() and locks[1].held() == frozenset()
    finally:
        for lock in locks:
            lock.close()
        directory.close()


@requires_ffmpeg
@requires_gstreamer
def test_kill_9_of_the_primary_the_first_standby_takes_over_plays_across_and_does_not_flap(
        site: tuple[list[ArchiverServer], TcpProxy, SiteCa], postgres_url: str,
        rtsp_camera, viewer: Viewer, tmp_path: Path) -> None:
    (a1, a2, a3), proxy, site_ca = site
    camera = rtsp_camera(kbps=150).start()
    added = _cli(a1, "cameras", "add", "gate", "--rtsp", camera.url(), "--archivers",
                 "a1,a2,a3")
    assert added.returncode == 0, added.stderr
    assert "(standbys, in order: a2, a3)" in added.stdout
    # A pushed camera may have a standby too: its pushes follow the lease.
    pushed = _cli(a1, "cameras", "add", "door", "--archivers", "a1,a2", "--json")
    assert pushed.returncode == 0, pushed.stderr
    token = json.loads(pushed.stdout)["ingest_token"]
    assert _push(a1, "door", token, b"a" * 2000) == 201
    assert _push(a2, "door", token, b"b" * 2000) == 421  # a standby refuses, naming a1
    wait_for(lambda: len(_segments(a1, "gate")) >= 3, TIMEOUT, "3 segments pulled by a1")
    assert _segments(a2, "gate") == [] and _segments(a3, "gate") == []
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT holder FROM camera_leases WHERE camera = 'gate'"
                            ).fetchone() == ("a1",)

    # kill -9 of the primary (its RTSP workers die with it: they read its pipe).
    start_ms = _segments(a1, "gate")[0][1]
    killed_ms = int(time.time() * 1000)
    assert a1.process is not None
    os.kill(a1.process.pid, signal.SIGKILL)
    a1.process.wait()
    died = time.monotonic()
    first = wait_for(lambda: _segments(a2, "gate"), TIMEOUT, "a2's first segment")
    takeover_s = time.monotonic() - died
    print(f"failover: kill -9 of a1 to a2's first archived segment: {takeover_s:.1f} s")
    # a2, the first standby, took it over; a3 (the next) did not.
    assert _segments(a3, "gate") == []
    assert [a for a, _ in _placements(postgres_url, "gate")] == ["a1", "a2"]
    took_ms = _placements(postgres_url, "gate")[1][1]
    assert killed_ms <= took_ms <= first[0][1], (killed_ms, took_ms, first)
    takeover = [e for e in _audit(a2) if e["action"] == "camera.takeover"]
    assert [(e["camera"], e["from"]) for e in takeover if e["camera"] == "gate"] == [
        ("gate", "a1")]
    assert "camera gate: taken over from Archiver a1 (its lease lock is free)" in a2.log()
    # The pushed camera: refused while a1 is down (the camera sees it), then a2 takes it.
    assert str(_push(a1, "door", token, b"c" * 2000)).startswith("connect error")
    wait_for(lambda: _push(a2, "door", token, b"d" * 2000) == 201, TIMEOUT,
             "a2 to accept door's pushes")

    # a1 returns: it does not take the camera back (the rule: stay). Over several refreshes
    # (2 s each) and two of its heartbeats, a2 records on and a1 records nothing.
    a1.start()
    heard = _archivers(a2)["a1"]["heartbeat_ms"]
    grown = len(_segments(a2, "gate"))
    wait_for(lambda: _archivers(a2)["a1"]["heartbeat_ms"] > heard, TIMEOUT, "a1's heartbeat")
    heard = _archivers(a2)["a1"]["heartbeat_ms"]
    wait_for(lambda: _archivers(a2)["a1"]["heartbeat_ms"] > heard, TIMEOUT, "a1's heartbeat")
    wait_for(lambda: len(_segments(a2, "gate")) >= grown + 3, TIMEOUT, "3 more on a2")
    a1_gate = _segments(a1, "gate")
    assert a1_gate[-1][2] <= killed_ms  # nothing after its death
    assert [a for a, _ in _placements(postgres_url, "gate")] == ["a1", "a2"]
    listed = _cameras(a1)
    assert (listed["gate"]["archiver"], listed["gate"]["archivers"]) == ("a2", ["a1", "a2", "a3"])
    members = _archivers(a3)
    assert members["a2"]["cameras_held"] == ["door", "gate"] and members["a1"]["alive"]
    assert members["a1"]["cameras_held"] == []
    human = _cli(a3, "cameras", "list")
    assert re.search(r"^gate\s+a2 \(a1>a2>a3\)", human.stdout, re.M), human.stdout
    # A push to the returned a1 is refused (421) naming the holder: a camera with several
    # ingest URLs knows where to go.
    refused = httpx.put(f"{a1.url}/ingest/door/seg.ts", content=b"e" * 2000, timeout=30,
                        headers={"Authorization": f"Bearer {token}"}, verify=a1.verify)
    assert refused.status_code == 421 and refused.json()["archiver_url"] == a2.url
    # Every push that got its 201 is archived, on the Archiver that answered it.
    assert len(_segments(a1, "door")) == 1 and len(_segments(a2, "door")) >= 1
    health = httpx.get(f"{a2.url}/metrics", verify=a2.verify, timeout=30,
                       headers={"Authorization": f"Bearer {a2.admin_token}"}).text
    assert re.search(r"^fusion_site_takeovers_total 2\.0$", health, re.M), health
    assert re.search(r'^fusion_site_leases_held 2\.0$', health, re.M), health

    # The viewer plays the range across the failover in ONE command through a1 (which
    # recorded only its first part): two parts, each verified against its own signer, the
    # switch at the signed edges; frame-exact on both sides (each part played alone gives
    # exactly the frames of its side of the whole).
    client = Client(tmp_path / "client-home", tls_ca=site_ca.path)
    for server in (a1, a2):
        _pin(client, viewer, server)
    # The natural edge: 1 ms after a2's last archived segment, so the one a2 records next
    # starts about 1 ms before --to (and is in the range). The range is played once a2 has
    # archived past it: every play below then sees the same archive (a range reaching past
    # what is archived yet gets what is there when it is asked, and a later play more).
    end_ms = _segments(a2, "gate")[-1][2] + 1
    wait_for(lambda: _segments(a2, "gate")[-1][2] > end_ms, TIMEOUT, "a2 to archive past --to")
    edge = [(s, e) for _, s, e in _segments(a2, "gate") if s <= end_ms < e]
    print(f"failover: --to {end_ms}, a2's segment at it {edge}")
    whole = tmp_path / "across.ts"
    done = play(client, a1.url, viewer, whole, start_ms, end_ms, camera="gate")
    assert done.code == 0, done.stderr
    assert re.search(r"part 1 of 2: .* recorded by Archiver a1, verified against a1 ",
                     done.stderr), done.stderr
    assert re.search(r"part 2 of 2: .* recorded by Archiver a2, verified against a2 ",
                     done.stderr), done.stderr
    switch = re.search(r"switch from Archiver a1 to a2: a1's last segment ends (\S+) "
                       r"\(signed\); a2's first segment starts (\S+) \(signed\)", done.stderr)
    assert switch, done.stderr
    last_end, first_start = (parse_time(t, 0) for t in switch.groups())
    assert last_end <= killed_ms < took_ms <= first_start, done.stderr
    print(f"failover: video lost {(first_start - last_end) / 1000:.1f} s "
          f"(a1's last signed end {switch[1]}, a2's first signed start {switch[2]})")
    assert "complete (every part's signed end record verified)" in done.stderr
    sides = []
    # (--to is inclusive: a1's side ends just before the takeover.)
    for server, (lo, hi) in ((a1, (start_ms, took_ms - 1)), (a2, (took_ms, end_ms))):
        out = tmp_path / f"{server.data_dir.name}-side.ts"
        alone = play(client, server.url, viewer, out, lo, hi, camera="gate")
        assert alone.code == 0, alone.stderr
        sides.append(frame_hashes(out))
    assert sides[0] and sides[1]
    assert frame_hashes(whole) == sides[0] + sides[1]

    # The link between a1 and PostgreSQL is cut (the proxy resets both ends). a1 cannot tell
    # an outage from a cut: it records on. PostgreSQL ends a1's sessions, so the lease lock of
    # a camera a1 records is free and its standby (a3) takes over: both record for a while,
    # each under its own chains and signature. When a1 reaches PostgreSQL again and sees the
    # camera taken, it ends its stream as a move does (its last segment archived and signed)
    # and becomes a standby.
    added = _cli(a2, "cameras", "add", "dock", "--rtsp", camera.url(), "--archivers", "a1,a3")
    assert added.returncode == 0, added.stderr
    wait_for(lambda: len(_segments(a1, "dock")) >= 2, TIMEOUT, "2 segments of dock on a1")
    proxy.cut()
    cut = time.monotonic()
    wait_for(lambda: _segments(a3, "dock"), TIMEOUT, "a3 to take dock over")
    print(f"failover: link cut to a3's first archived segment: {time.monotonic() - cut:.1f} s")
    a3_first = _segments(a3, "dock")[0]
    # a1 records on meanwhile: a segment of a1 ends after a3's first began (two copies).
    wait_for(lambda: _segments(a1, "dock")[-1][2] > a3_first[1] + 2000, TIMEOUT,
             "a1 to record on while cut off")
    proxy.restore()
    wait_for(lambda: "camera dock: no longer recorded by this Archiver (taken over by a3 while "
             "this Archiver could not renew its lease; a standby now)" in a1.log(), TIMEOUT,
             "a1 to end its stream of dock")
    released = [e for e in _audit(a1) if e["action"] == "camera.released"]
    assert [(e["camera"], e["to"], e.get("lease_lost")) for e in released] == [
        ("dock", "a3", True)]
    a1_dock = _segments(a1, "dock")
    wait_for(lambda: _segments(a3, "dock")[-1][2] > a1_dock[-1][2] + 4000, TIMEOUT,
             "a3 to record 4 s more")
    assert _segments(a1, "dock") == a1_dock  # a1 stopped: a standby for dock now
    assert _cameras(a1)["dock"]["archiver"] == "a3"
    # a1's stream of dock ended with its signed end record: its copy plays whole from a1.
    # (--to is inclusive and a segment's end is not its video: a1's last instant is its end
    # - 1 ms. A range to its end itself holds an instant only a3 recorded, and plays a3's
    # segment there too, as a3's own play of that share does.)
    out = tmp_path / "dock-a1.ts"
    alone = play(client, a1.url, viewer, out, a1_dock[0][1], a1_dock[-1][2] - 1,
                 camera="dock")
    assert alone.code == 0, alone.stderr
    assert "signed end record verified)" in alone.stderr, alone.stderr
    assert frame_hashes(out)
    # To a1's end itself: a1's video ends exactly at --to, and a3's segment holding that
    # instant, if a3 has one (the cut leaves gaps in both copies), is played after it, from
    # a3, exactly as a3 alone plays it (it was left out: the next part [--to + 1, --to] was
    # empty, a3 never asked); if a3 has none there, a1's copy plays alone, as before.
    a1_end = a1_dock[-1][2]
    _pin(client, viewer, a3)
    to_end = tmp_path / "dock-to-a1-end.ts"
    done = play(client, a1.url, viewer, to_end, a1_dock[0][1], a1_end, camera="dock")
    assert done.code == 0, done.stderr
    if any(s <= a1_end <= e for _, s, e in _segments(a3, "dock")):
        assert re.search(r"part 2 of 2: .* recorded by Archiver a3, verified against a3 ",
                         done.stderr), done.stderr
        at_end = tmp_path / "dock-a3-at-a1-end.ts"
        # The command refuses a range of one instant ("empty"): a3's segment holding a1_end
        # is the one holding [a1_end, a1_end + 1] (its segments are 2 s long).
        a3_alone = play(client, a3.url, viewer, at_end, a1_end, a1_end + 1, camera="dock")
        assert a3_alone.code == 0, a3_alone.stderr
        assert frame_hashes(at_end)
        assert frame_hashes(to_end) == frame_hashes(out) + frame_hashes(at_end)
    else:
        assert "part 1 of 1: " in done.stderr, done.stderr
        assert frame_hashes(to_end) == frame_hashes(out)

    # A link that drops packets but keeps its sockets (a black hole): a1's sessions look alive
    # to PostgreSQL (the proxy's kernel answers their keepalives, so this is the lease row's
    # expiry, the backstop, not the keepalives' path), its lock stays held, and it cannot renew
    # its lease. Once the lease expired (15 s) a2 takes the camera without the lock; a1 records
    # on; when the packets flow again a1 ends its stream and is a standby.
    added = _cli(a2, "cameras", "add", "yard", "--rtsp", camera.url(), "--archivers", "a1,a2")
    assert added.returncode == 0, added.stderr
    wait_for(lambda: len(_segments(a1, "yard")) >= 2, TIMEOUT, "2 segments of yard on a1")
    proxy.black_hole()
    wait_for(lambda: _segments(a2, "yard"), TIMEOUT, "a2 to take yard over")
    assert "camera yard: taken over from Archiver a1 (its lease expired)" in a2.log()
    a2_first = _segments(a2, "yard")[0]
    wait_for(lambda: _segments(a1, "yard")[-1][2] > a2_first[1], TIMEOUT,
             "a1 to record on while black-holed")
    proxy.restore()
    wait_for(lambda: "camera yard: no longer recorded by this Archiver (taken over by a2 while "
             "this Archiver could not renew its lease; a standby now)" in a1.log(), TIMEOUT,
             "a1 to end its stream of yard")
    a1_yard = _segments(a1, "yard")
    wait_for(lambda: _segments(a2, "yard")[-1][2] > a1_yard[-1][2] + 4000, TIMEOUT,
             "a2 to record 4 s more")
    assert _segments(a1, "yard") == a1_yard
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT holder FROM camera_leases WHERE camera = 'yard'"
                            ).fetchone() == ("a2",)
    # Nothing flapped: a1, back from the black hole with a view of the leases seconds old,
    # took none of the other cameras (before: it took all three from their holders).
    for name, order in (("gate", ["a1", "a2"]), ("door", ["a1", "a2"]), ("dock", ["a1", "a3"]),
                        ("yard", ["a1", "a2"])):
        assert [a for a, _ in _placements(postgres_url, name)] == order, name
    assert "taken over from Archiver" not in a1.log()
