"""Issue 23 item 1, end to end: a viewer authorized while a camera's key chain runs *joins* it
(a join record with the chain's state from its join step, and a signed join statement); the
chain is not restarted. Production mode (HTTPS under the site CA), viewers on real SoftHSM
tokens, ffmpeg as the camera's video and as the judge of what the real fusion-client decrypts.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fusion_testkit import forkserver
from fusion_testkit.client_cli import (
    Client,
    Viewer,
    chunk,
    now_ms,
    play,
    put,
    wait_for_audit,
)
from keyservice.crypto import split_key_id
from keyservice.format import ChainRecord, Segment, decode_record
from tests.fixtures.camera import frame_hashes, make_source, requires_ffmpeg
from tests.fixtures.server import ArchiverServer, SiteCa, production_archiver

PERIOD_S = 2  # the test Archiver's key period
CAMERA = "cam-join"


def _pieces(source: Path, directory: Path) -> list[bytes]:
    """The source cut at its keyframes (one a second) into stand-alone MPEG-TS segments."""
    directory.mkdir()
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-i",
                    str(source), "-c", "copy", "-f", "segment", "-segment_time", "1",
                    str(directory / "seg%03d.ts")], check=True)
    return [p.read_bytes() for p in sorted(directory.glob("seg*.ts"))]


def _next_period(period_s: int = PERIOD_S) -> None:
    """Into the next key period (the chain steps: a new minute key, no new record)."""
    period_ms = period_s * 1000
    time.sleep((period_ms - now_ms() % period_ms) / 1000 + 0.05)


def _archived_segments(server: ArchiverServer) -> list[Segment]:
    segments = []
    for path in sorted((server.data_dir / "archive" / CAMERA).glob("*.fsa")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            end = pos + 5 + int.from_bytes(data[pos + 1:pos + 5], "big")
            record = decode_record(data[pos:end])
            if isinstance(record, Segment):
                segments.append(record)
            pos = end
    return sorted(segments, key=lambda s: s.seq)


def _chain_records(server: ArchiverServer, fp: str) -> list[ChainRecord]:
    db = sqlite3.connect(f"file:{server.data_dir / 'archiver.sqlite3'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT record FROM chain_records WHERE fingerprint=?", (fp,))
        records = [decode_record(row[0]) for row in rows]
    finally:
        db.close()
    assert all(isinstance(r, ChainRecord) for r in records)
    return records  # type: ignore[return-value]


def _read_until(fd: int, tail: bytes, timeout: float) -> bytes:
    """Everything read from ``fd`` until it ends with ``tail`` (bounds a hang only)."""
    deadline, got = time.monotonic() + timeout, b""
    while not got.endswith(tail):
        left = deadline - time.monotonic()
        assert left > 0, f"got {len(got)} bytes, not ending with the expected ones"
        if select.select([fd], [], [], left)[0]:
            data = os.read(fd, 1 << 16)
            assert data, "the stream ended early"
            got += data
    return got


def _frames(pieces: list[bytes], path: Path) -> list[str]:
    path.write_bytes(b"".join(pieces))
    return frame_hashes(path)


@requires_ffmpeg
def test_a_joining_viewer_opens_exactly_from_its_join_and_the_chain_runs_on(
        https_archiver: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    server = https_archiver
    client.tls_ca = server.tls_ca
    alice, bob = make_viewer("alice"), make_viewer("bob")
    ingest = server.add_camera(CAMERA)
    alice_fp = server.add_viewer(alice.pem, [CAMERA])
    pieces = _pieces(make_source(tmp_path / "source.ts", seconds=10), tmp_path / "pieces")
    assert len(pieces) == 10

    t0 = now_ms()
    put(server, CAMERA, ingest, *pieces[:3])  # alice's chain starts with the first segment
    chains_before = server.metric("fusion_key_chains_started_total")
    assert chains_before == 1
    bob_fp = server.add_viewer(bob.pem, [CAMERA])  # bob is authorized while the chain runs
    put(server, CAMERA, ingest, pieces[3])  # maybe in the same key period: then not bob's
    _next_period()
    put(server, CAMERA, ingest, *pieces[4:6])
    _next_period()
    put(server, CAMERA, ingest, *pieces[6:8])

    # The chain was not restarted: one chain id for all, no chain started, alice still has
    # her one record; bob has one join record, from a step after every segment archived
    # before he was added.
    segments = _archived_segments(server)
    assert len(segments) == 8
    assert len({split_key_id(s.key_id)[0] for s in segments}) == 1
    assert server.metric("fusion_key_chains_started_total") == chains_before
    assert [r.first_step for r in _chain_records(server, alice_fp)] == [0]
    (join,) = _chain_records(server, bob_fp)
    steps = [split_key_id(s.key_id)[1] for s in segments]
    assert join.chain_id == split_key_id(segments[0].key_id)[0]
    assert max(steps[:3]) < join.first_step <= steps[4]

    # Bob: the segments from his join step on, decrypted and judged by ffmpeg; the ones
    # before, reported as not authorized (the signed join statement shows they precede his
    # join), never decrypted.
    t_end = now_ms() + 30_000
    bob_out = tmp_path / "bob.ts"
    played = play(client, server.url, bob, bob_out, t0, t_end, camera=CAMERA)
    assert played.code == 0, played.stderr
    opened = [i for i, step in enumerate(steps) if step >= join.first_step]
    assert opened == list(range(opened[0], 8)) and opened[0] in (3, 4)
    assert bob_out.read_bytes() == b"".join(pieces[i] for i in opened)
    assert frame_hashes(bob_out) == _frames([pieces[i] for i in opened], tmp_path / "exp.ts")
    assert f"gap: camera {CAMERA}: {opened[0]} segment(s)" in played.stderr
    assert "not authorized" in played.stderr

    # Alice, the older viewer, is unaffected: everything, frame for frame.
    alice_out = tmp_path / "alice.ts"
    whole = play(client, server.url, alice, alice_out, t0, t_end, camera=CAMERA)
    assert whole.code == 0, whole.stderr
    assert frame_hashes(alice_out) == _frames(pieces[:8], tmp_path / "all.ts")

    # A revocation still starts a new chain, without alice, from the next key period (the
    # cameras keep the current period's key, which she holds: issue 23); bob reads on.
    server.revoke(alice_fp)
    server.sleep_into_next_key_period()
    put(server, CAMERA, ingest, *pieces[8:])
    segments = _archived_segments(server)
    assert server.metric("fusion_key_chains_started_total") == chains_before + 1
    assert split_key_id(segments[8].key_id)[0] != split_key_id(segments[7].key_id)[0]
    assert [r.first_step for r in _chain_records(server, alice_fp)] == [0]
    assert sorted(r.first_step for r in _chain_records(server, bob_fp)) == [0, join.first_step]
    played = play(client, server.url, bob, bob_out, t0, now_ms() + 30_000, camera=CAMERA)
    assert played.code == 0, played.stderr
    assert bob_out.read_bytes() == b"".join(pieces[i] for i in [*opened, 8, 9])

    # The archive check verifies the join statement's signature and index row as the others'.
    server.stop()
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "FUSION_PIN")}
    checked = forkserver.run([sys.executable, "-m", "archiver", "check", "--data",
                              str(server.data_dir), "--json"], capture_output=True, text=True,
                             env=env, timeout=300, check=False)
    report = json.loads(checked.stdout.splitlines()[0])
    assert checked.returncode == 0 and report["ok"] and report["problems"] == [], checked.stdout


def test_a_live_viewer_watching_when_it_joins_gets_its_join_statement_in_time(
        site_ca: SiteCa, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    """Bob watches live from his authorization: a segment before his join step comes as a
    manifest with the chain's start statement (not authorized), and his join statement,
    signed after the stream began, still reaches him before his join record (the stream sends
    every statement it has not sent yet), so he sees the live video from his join on. (It
    reached him only if no statement of the chain had been sent yet: a withheld segment first
    made the stream send his join record without its statement, and his viewer refused it.)
    A 15 s key period, so that "before", his authorization, the live start and "early" share
    one."""
    period_s = 15
    alice, bob = make_viewer("alice"), make_viewer("bob")
    server = production_archiver(site_ca, tmp_path / "archiver", key_period_s=period_s).start()
    try:
        _live_join(server, period_s, alice, bob, client)
    finally:
        server.stop()


def _live_join(server: ArchiverServer, period_s: int, alice: Viewer, bob: Viewer,
               client: Client) -> None:
    client.tls_ca = server.tls_ca
    ingest = server.add_camera(CAMERA)
    server.add_viewer(alice.pem, [CAMERA])
    _next_period(period_s)
    put(server, CAMERA, ingest, chunk("before", 2000))  # the chain runs
    bob_fp = server.add_viewer(bob.pem, [CAMERA])
    process = subprocess.Popen(
        client.command("live", "--archiver", server.url, "--token", bob.uri, "--camera", CAMERA,
                       "--duration", "60", "-o", "-"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=client.env(),
        stdin=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        wait_for_audit(server, "stream.live")
        early = chunk("early", 2000)  # his authorization's period: before his join step
        put(server, CAMERA, ingest, early)
        _next_period(period_s)
        joined = [chunk(f"joined{i}", 3000 + i) for i in range(3)]
        put(server, CAMERA, ingest, *joined)
        got = _read_until(process.stdout.fileno(), b"".join(joined), 60)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = err.decode(errors="replace")
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    # "early" shares the period of his authorization: not his; everything after is.
    (join,) = _chain_records(server, bob_fp)
    steps = [split_key_id(s.key_id)[1] for s in _archived_segments(server)]
    assert steps[0] == steps[1] < join.first_step <= steps[2]
    assert got == b"".join(joined)
    assert "not authorized" in stderr
