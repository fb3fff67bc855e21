"""Access grants end to end: real SoftHSM viewer tokens, a real Archiver under uvicorn, the real
fusion-client and fusion-archiver commands in subprocesses, ffmpeg as camera and judge.

A viewer grants a range it holds to an enrolled certificate authorized on no camera; the
Archiver serves it only once an admin approved it, and only that range; the grantee plays it
with its own token; the Archiver never holds a plaintext minute key.
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from client.player import Player, StreamTruncated, archiver_pin_check
from client.session import ArchiverSession, OutsideGrant, RequestRefused, playback_request
from fusion_testkit import forkserver
from fusion_testkit.client_cli import Client, Viewer, chunk, iso, now_ms, put, wait_for_segments
from keyservice.certs import load_certificate, read_oaep_hash
from keyservice.errors import IntegrityError, NoMatchingIdentity
from keyservice.format import DataStream
from keyservice.grants import GrantKey, decode_grant, encode_grant, make_grant, open_grant
from keyservice.identity import OaepHash, Recipient
from keyservice.token import Token
from tests.fixtures.camera import frame_hashes, is_contiguous_run, make_source, push, requires_ffmpeg
from tests.fixtures.server import ArchiverServer
from tests.fixtures.tokens import TokenHandle

EXIT_OK, EXIT_NOT_USABLE, EXIT_OUTSIDE, EXIT_UNKNOWN = 0, 55, 56, 57


def grant(client: Client, server: ArchiverServer, grantor: Viewer, grantee: Viewer,
          start: int, end: int, camera: str = "cam1") -> str:
    result = client("grant", "--archiver", server.url, "--token", grantor.uri, "--camera", camera,
                    "--from", iso(start), "--to", iso(end), "--to-cert", str(grantee.pem),
                    "--note", "case 4711")
    assert result.code == 0, result.stderr
    found = re.search(rb"grant ([0-9a-f]{32}): pending", result.stdout)
    assert found, result.stdout
    return found[1].decode()


def play_grant(client: Client, server: ArchiverServer, viewer: Viewer, grant_id: str, out: Path,
               *extra: str) -> tuple[int, str]:
    result = client("grants", "play", grant_id, "--archiver", server.url, "--token", viewer.uri,
                    "-o", str(out), *extra)
    return result.code, result.stderr


def admin(server: ArchiverServer, *args: str) -> subprocess.CompletedProcess[str]:
    """fusion-archiver (the admin CLI) against the running server (over HTTPS: --tls-ca)."""
    tls = ["--tls-ca", str(server.tls_ca)] if server.tls_ca is not None else []
    return forkserver.run([sys.executable, "-m", "archiver", "grants", *args, "--url", server.url,
                           "--data", str(server.data_dir), *tls], capture_output=True,
                          text=True, timeout=60)


def segments(server: ArchiverServer, camera: str = "cam1") -> list[tuple[int, int, bytes]]:
    """(capture_ms, end_ms, key_id) of every archived segment, from the Archiver's index."""
    with sqlite3.connect(f"file:{server.data_dir / 'archiver.sqlite3'}?mode=ro", uri=True) as db:
        return [(a, b, bytes(k)) for a, b, k in db.execute(
            "SELECT capture_ms, end_ms, key_id FROM segments WHERE camera = ? ORDER BY seq",
            (camera,))]


def fetch_blob(server: ArchiverServer, viewer: Viewer, grant_id: str) -> bytes:
    """The grant as the Archiver serves it to ``viewer`` (logged in on its token, in-process)."""
    with Token.open(viewer.token.uri) as token, \
            ArchiverSession(server.url, tls_ca=server.tls_ca) as session:
        session.login(token.identity(viewer.name), lambda cert: None)
        return base64.b64decode(session._json("GET", f"/v1/grants/{grant_id}", auth=True)["grant"])


def audit(server: ArchiverServer) -> list[dict]:
    return [json.loads(line) for line in (server.data_dir / "audit.jsonl").read_text().splitlines()]


@pytest.fixture
def parties(archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer]
            ) -> tuple[Viewer, Viewer, str]:
    return make_parties(archiver_server, make_viewer)


def make_parties(archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer]
                 ) -> tuple[Viewer, Viewer, str]:
    """alice (authorized on cam1) and an investigator enrolled on no camera; cam1's ingest token."""
    alice, investigator = make_viewer("alice"), make_viewer("investigator")
    ingest = archiver_server.add_camera("cam1")
    archiver_server.add_viewer(alice.pem, ["cam1"])
    archiver_server.add_viewer(investigator.pem, [])
    return alice, investigator, ingest


# --- the video: exactly the range, frame for frame ---------------------------------------------
@requires_ffmpeg
def test_grant_plays_exactly_its_range_and_not_a_minute_more(
        archiver_server: ArchiverServer, parties: tuple[Viewer, Viewer, str], client: Client,
        tmp_path: Path) -> None:
    alice, investigator, ingest = parties
    period_ms = archiver_server.key_period_s * 1000
    source = make_source(tmp_path / "source.ts", seconds=10)
    push(source, archiver_server.url, "cam1", ingest, realtime=True, hls_time=1)
    wait_for_segments(archiver_server, "cam1", 10)
    rows = segments(archiver_server)
    # Minute keys (key periods of 2 s here) in recording order. The range: from the first
    # segment of the second key to the last segment of the last key but one, so that the
    # segments of a whole key lie on either side.
    keys = list(dict.fromkeys(k for _, _, k in rows))
    assert len(keys) >= 4, rows
    inside = [r for r in rows if r[2] in keys[1:-1]]
    # Mid-way into the first segment: the one before it (another key period) ends before it.
    start, end = (inside[0][0] + inside[0][1]) // 2, inside[-1][0]

    grant_id = grant(client, archiver_server, alice, investigator, start, end)
    assert admin(archiver_server, "approve", grant_id).returncode == 0

    granted, reference = tmp_path / "granted.ts", tmp_path / "alice.ts"
    code, err = play_grant(client, archiver_server, investigator, grant_id, granted)
    assert code == EXIT_OK, err
    assert "complete (verified signed end record)" in err
    own = client("play", "--archiver", archiver_server.url, "--token", alice.uri, "--camera",
                 "cam1", "--from", iso(start), "--to", iso(end), "-o", str(reference))
    assert own.code == 0, own.stderr
    # ffmpeg as the judge: the grantee decodes exactly the frames the grantor sees for the
    # range, a contiguous run of the source, and not all of it.
    frames, source_frames = frame_hashes(granted), frame_hashes(source)
    assert frames == frame_hashes(reference)
    assert is_contiguous_run(frames, source_frames)
    assert 0 < len(frames) < len(source_frames)
    assert granted.read_bytes() == reference.read_bytes()

    # A key period outside the range: the client refuses it from the opened grant...
    before = iso(start - period_ms)
    code, err = play_grant(client, archiver_server, investigator, grant_id, tmp_path / "x.ts",
                           "--from", before, "--to", iso(end))
    assert code == EXIT_OUTSIDE, err
    assert "covers camera cam1 from" in err
    # ... the Archiver refuses it too, asked directly ...
    with Token.open(investigator.token.uri) as token, ArchiverSession(archiver_server.url) as s:
        s.login(token.identity("investigator"), lambda cert: None)
        for a, b in ((start - period_ms, end), (start, end + period_ms)):
            asked = playback_request("cam1", a, b)
            with pytest.raises(OutsideGrant, match="goes outside"):
                with s._stream(f"/v1/grants/{grant_id}/recording",
                               {"from_ms": a, "to_ms": b, "nonce": asked.nonce.hex()}, None):
                    pass
        # ... and the grantee could not decrypt it anyway: the grant carries exactly the keys
        # of the segments in the range, none of the key periods around it.
        opened = open_grant(token.identity("investigator"), fetch_blob(
            archiver_server, investigator, grant_id))
    in_range = {k for a, b, k in rows if a <= end and (b >= start)}
    assert set(opened.keys) == in_range
    assert keys[0] not in opened.keys and keys[-1] not in opened.keys


# --- who decides: pending, rejected, approved, revoked; the audit trail ------------------------
def test_grant_is_served_only_while_approved_and_audited(
        https_archiver: ArchiverServer, client: Client, make_viewer: Callable[[str], Viewer],
        tmp_path: Path) -> None:
    """Production mode: HTTPS under the site CA, for the viewers (FUSION_TLS_CA), the admin
    (--tls-ca) and the library (ArchiverSession)."""
    archiver_server = https_archiver
    client.tls_ca = archiver_server.tls_ca
    alice, investigator, ingest = make_parties(archiver_server, make_viewer)
    mallory = make_viewer("mallory")
    mallory_fp = archiver_server.add_viewer(mallory.pem, [])
    t0 = now_ms()
    bodies = [chunk(f"seg{i}") for i in range(4)]
    put(archiver_server, "cam1", ingest, *bodies)
    t1 = now_ms() + 1
    out = tmp_path / "out.ts"

    first = grant(client, archiver_server, alice, investigator, t0, t1)
    # Pending: refused with a clear message and its own exit code, nothing written.
    code, err = play_grant(client, archiver_server, investigator, first, out)
    assert code == EXIT_NOT_USABLE and "waits for an admin's approval" in err, err
    assert not out.exists()
    listed = admin(archiver_server, "list", "--state", "pending")
    assert listed.returncode == 0 and first in listed.stdout and "case 4711" in listed.stdout
    rejected = admin(archiver_server, "reject", first, "--note", "no case")
    assert rejected.returncode == 0, rejected.stderr
    code, err = play_grant(client, archiver_server, investigator, first, out)
    assert code == EXIT_NOT_USABLE and "rejected" in err, err
    again = admin(archiver_server, "approve", first)  # a rejection is final
    assert again.returncode == 41 and "rejected" in again.stderr, again.stderr

    second = grant(client, archiver_server, alice, investigator, t0, t1)
    assert admin(archiver_server, "approve", second).returncode == 0
    code, err = play_grant(client, archiver_server, investigator, second, out)
    assert code == EXIT_OK, err
    assert out.read_bytes() == b"".join(bodies)
    # The token: one login, one grant opening, no epoch opener (the grant replaces them).
    assert "opened on your token" in err and "token operations: 2 (1 login, 0 epoch" in err, err
    mine = client("grants", "list", "--archiver", archiver_server.url, "--token",
                  investigator.uri)
    assert mine.code == 0 and second.encode() in mine.stdout and b"approved" in mine.stdout

    # Another enrolled viewer: the Archiver does not serve it someone else's grant, and its
    # token cannot open the grant even if it got hold of the bytes.
    code, err = play_grant(client, archiver_server, mallory, second, tmp_path / "m.ts")
    assert code == EXIT_UNKNOWN, err
    blob = fetch_blob(archiver_server, investigator, second)
    with Token.open(mallory.token.uri) as token:
        identity = token.identity("mallory")
        with pytest.raises(NoMatchingIdentity):
            open_grant(identity, blob)
        # Relabelled for mallory: the KEK was sealed to the investigator's key, so it fails.
        forged = encode_grant(replace(decode_grant(blob),
                                      grantee_fingerprint=bytes.fromhex(mallory_fp)))
        with pytest.raises(IntegrityError):
            open_grant(identity, forged)

    assert admin(archiver_server, "revoke", second, "--note", "case closed").returncode == 0
    code, err = play_grant(client, archiver_server, investigator, second, tmp_path / "r.ts")
    assert code == EXIT_NOT_USABLE and "revoked" in err, err
    assert not (tmp_path / "r.ts").exists()

    trail = [(e["action"], e.get("grant_id")) for e in audit(archiver_server)
             if e["action"].startswith("grant.")]
    assert ("grant.create", first) in trail and ("grant.reject", first) in trail
    assert ("grant.create", second) in trail and ("grant.approve", second) in trail
    assert ("grant.revoke", second) in trail
    created = next(e for e in audit(archiver_server)
                   if e["action"] == "grant.create" and e["grant_id"] == second)
    assert created["camera"] == "cam1" and created["from_ms"] == t0 and created["to_ms"] == t1
    assert created["grantee"] != created["actor"] and len(created["grantee"]) == 64


def test_archiver_never_holds_a_granted_plaintext_key(
        archiver_server: ArchiverServer, parties: tuple[Viewer, Viewer, str], client: Client,
        tmp_path: Path) -> None:
    alice, investigator, ingest = parties
    t0 = now_ms()
    put(archiver_server, "cam1", ingest, chunk("a"))
    time.sleep(archiver_server.key_period_s)  # a second minute key
    put(archiver_server, "cam1", ingest, chunk("b"))
    t1 = now_ms() + 1
    grant_id = grant(client, archiver_server, alice, investigator, t0, t1)
    assert admin(archiver_server, "approve", grant_id).returncode == 0
    code, err = play_grant(client, archiver_server, investigator, grant_id, tmp_path / "o.ts")
    assert code == EXIT_OK, err
    with Token.open(investigator.token.uri) as token:
        keys = open_grant(token.identity("investigator"),
                          fetch_blob(archiver_server, investigator, grant_id)).keys
    assert len(keys) >= 2
    # Every byte the Archiver keeps (SQLite with its WAL, archive files, audit log, tokens).
    archiver_server.stop()
    kept = b"".join(p.read_bytes() for p in archiver_server.data_dir.rglob("*") if p.is_file())
    assert len(kept) > 10_000
    for key in keys.values():
        for form in (key, key.hex().encode(), base64.b64encode(key)):
            assert form not in kept


def test_grant_refusals_at_creation(
        archiver_server: ArchiverServer, parties: tuple[Viewer, Viewer, str], client: Client,
        make_viewer: Callable[[str], Viewer], tmp_path: Path) -> None:
    alice, investigator, ingest = parties
    stranger = make_viewer("stranger")  # enrolled on its token, never added to the Archiver
    t0 = now_ms()
    put(archiver_server, "cam1", ingest, chunk("x"))
    t1 = now_ms() + 1
    result = client("grant", "--archiver", archiver_server.url, "--token", alice.uri,
                    "--camera", "cam1", "--from", iso(t0), "--to", iso(t1), "--to-cert",
                    str(stranger.pem))
    assert result.code == 41 and "not an enrolled, active viewer" in result.stderr, result.stderr
    # The investigator holds no key of cam1: nothing to grant (refused by its own reader's
    # verdict and by the Archiver before that).
    result = client("grant", "--archiver", archiver_server.url, "--token", investigator.uri,
                    "--camera", "cam1", "--from", iso(t0), "--to", iso(t1), "--to-cert",
                    str(alice.pem))
    assert result.code == 45, result.stderr
    assert httpx.get(f"{archiver_server.url}/v1/admin/grants").status_code == 401

    # A viewer authorized later knows the earlier segments' key ids (signed manifests list
    # them) but never held their keys: a grant of them, made by hand, is refused. It joins
    # the running chain (a chain record that opens from a later step): holding a record of
    # a chain is not holding its earlier keys.
    late = make_viewer("late")
    late_fp = archiver_server.add_viewer(late.pem, ["cam1"])
    early = [GrantKey(DataStream.VIDEO, k, bytes(32)) for _, _, k in segments(archiver_server)]
    chain_ids = {key.key_id[:12] for key in early}
    index = f"file:{archiver_server.data_dir / 'archiver.sqlite3'}?mode=ro"
    deadline = time.monotonic() + 30
    while True:  # the join is made off the ingest path, by the preparing thread
        with sqlite3.connect(index, uri=True) as db:
            joined = {bytes(c) for (c,) in db.execute(
                "SELECT chain_id FROM chain_records WHERE fingerprint = ?", (late_fp,))}
        if chain_ids <= joined or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert chain_ids <= joined, "the late viewer never joined the running chain"
    cert = load_certificate(investigator.pem.read_bytes())
    recipient = Recipient(cert, read_oaep_hash(cert) or OaepHash.SHA1)
    blob = make_grant(recipient, "cam1", t0, t1, early, t1)
    with Token.open(late.token.uri) as token, ArchiverSession(archiver_server.url) as s:
        s.login(token.identity("late"), lambda cert: None)
        with pytest.raises(RequestRefused, match="never held"):
            s._json("POST", "/v1/grants", {"grant": base64.b64encode(blob).decode()}, auth=True)
        # Keys of no segment in the range: refused as well.
        stray = make_grant(recipient, "cam1", t0, t1,
                           [GrantKey(DataStream.VIDEO, bytes(16), bytes(32))], t1)
        with pytest.raises(RequestRefused, match="no segment recorded"):
            s._json("POST", "/v1/grants", {"grant": base64.b64encode(stray).decode()}, auth=True)
    assert archiver_server.admin("GET", "/v1/admin/grants") == []


def test_ec_grantee_on_its_token(archiver_server: ArchiverServer,
                                 parties: tuple[Viewer, Viewer, str], client: Client,
                                 softhsm_token_factory: Callable[[], TokenHandle],
                                 tmp_path: Path) -> None:
    """An EC P-256 grantee: the grant KEK is ECDH-sealed and opened by one ECDH on its token."""
    alice, _investigator, ingest = parties
    token = softhsm_token_factory()
    with Token.open(token.uri) as opened:
        pem = token.workdir / "ec-investigator.pem"
        pem.write_bytes(opened.enroll("ecinv", key_type="ec").pem())
    ec_viewer = Viewer("ecinv", token, token.object_uri("ecinv"), pem)
    archiver_server.add_viewer(pem, [])
    t0 = now_ms()
    bodies = [chunk(f"ec{i}") for i in range(3)]
    put(archiver_server, "cam1", ingest, *bodies)
    t1 = now_ms() + 1
    grant_id = grant(client, archiver_server, alice, ec_viewer, t0, t1)
    assert decode_grant(fetch_blob_as_admin_view(archiver_server, grant_id)).kind.is_ec
    assert admin(archiver_server, "approve", grant_id).returncode == 0
    code, err = play_grant(client, archiver_server, ec_viewer, grant_id, tmp_path / "ec.ts")
    assert code == EXIT_OK, err
    assert (tmp_path / "ec.ts").read_bytes() == b"".join(bodies)


def fetch_blob_as_admin_view(server: ArchiverServer, grant_id: str) -> bytes:
    """The stored grant, straight from the Archiver's database (what a thief of it gets)."""
    with sqlite3.connect(f"file:{server.data_dir / 'archiver.sqlite3'}?mode=ro", uri=True) as db:
        return bytes(db.execute("SELECT blob FROM access_grants WHERE grant_id = ?",
                                (grant_id,)).fetchone()[0])


def test_revoking_a_grant_stops_the_stream_being_served(
        archiver_server: ArchiverServer, parties: tuple[Viewer, Viewer, str], client: Client,
        tmp_path: Path) -> None:
    """Revoked while its stream is being sent: the Archiver stops at the next manifest, without
    the signed END, so the grantee's reader reports the stream as truncated."""
    alice, investigator, ingest = parties
    t0 = now_ms()
    count, size = 24, 1 << 20  # far more than the socket buffers hold: the sender must wait
    put(archiver_server, "cam1", ingest, *(chunk(f"big{i}", size) for i in range(count)))
    t1 = now_ms() + 1
    grant_id = grant(client, archiver_server, alice, investigator, t0, t1)
    assert admin(archiver_server, "approve", grant_id).returncode == 0
    blob = fetch_blob(archiver_server, investigator, grant_id)
    with Token.open(investigator.token.uri) as token, ArchiverSession(archiver_server.url) as s:
        identity = token.identity("investigator")
        login = s.login(identity, lambda cert: None)
        keys = open_grant(identity, blob).keys
        asked = playback_request("cam1", t0, t1)
        written: list[int] = []

        class Count:
            def write(self, data: bytes) -> None:
                written.append(len(data))

            def commit(self) -> None:
                return None

            def abort(self) -> None:
                return None

        player = Player(identity, archiver_pin_check(login.archiver_fingerprint), Count(),
                        request=asked, known_keys=keys)
        with s._stream(f"/v1/grants/{grant_id}/recording",
                       {"from_ms": t0, "to_ms": t1, "nonce": asked.nonce.hex()}, 60) as chunks:
            for n, data in enumerate(chunks):
                player.feed(data)
                if n == 0:
                    assert admin(archiver_server, "revoke", grant_id).returncode == 0
        with pytest.raises(StreamTruncated):
            player.finish()
    assert 0 <= len(written) < count
