"""The Archiver as a real uvicorn server: ingest, rotation, per-viewer key streams, access."""

from __future__ import annotations

import base64
import socket
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from archiver.audit import verify_audit_log
from keyservice.errors import NoMatchingIdentity
from keyservice.format import ChainRecord, decode_record
from tests.fixtures.camera import frame_hashes, make_source, push, requires_ffmpeg
from tests.fixtures.server import ArchiverServer, unique_camera
from tests.fixtures.viewer import fetch, login, observed_secrets, play


def _key_ids_of(server: ArchiverServer, fingerprint: str) -> set[bytes]:
    """The key chains a viewer got a record for (indexed by chain id, format v2)."""
    with sqlite3.connect(server.data_dir / "archiver.sqlite3") as db:
        return {row[0] for row in db.execute(
            "SELECT chain_id FROM chain_records WHERE fingerprint=?", (fingerprint,))}


def _segment_key_ids(server: ArchiverServer, camera: str) -> list[bytes]:
    with sqlite3.connect(server.data_dir / "archiver.sqlite3") as db:
        return [row[0] for row in db.execute(
            "SELECT key_id FROM segments WHERE camera=? ORDER BY seq", (camera,))]


def test_keys_rotate_every_period(module_archiver: ArchiverServer, make_viewer) -> None:
    archiver_server, cam = module_archiver, unique_camera()  # a shared Archiver
    viewer = make_viewer("alice")
    token = archiver_server.add_camera(cam)
    archiver_server.add_viewer(viewer.pem, [cam])
    period = archiver_server.key_period_s
    started = time.time()
    assert archiver_server.put_segment(cam, token, b"a" * 1000) == 201
    assert archiver_server.put_segment(cam, token, b"b" * 1000) == 201
    finished = time.time()
    time.sleep(period + 0.2)
    assert archiver_server.put_segment(cam, token, b"c" * 1000) == 201
    keys = _segment_key_ids(archiver_server, cam)
    # Both segments were keyed between `started` and `finished` (the server shares this
    # clock): within one key period they share its key. A loaded machine may take longer.
    if int(started // period) == int(finished // period):
        assert keys[0] == keys[1]
    assert keys[0] != keys[2] and keys[1] != keys[2]  # a period or more later: a new key
    metrics = httpx.get(f"{archiver_server.url}/metrics", headers={
        "Authorization": f"Bearer {archiver_server.admin_token}"}).text
    assert "fusion_key_rotations_total" in metrics
    played = play(viewer.identity, fetch(archiver_server.url, login(
        archiver_server.url, viewer.identity), cam).content)
    assert played.data == b"a" * 1000 + b"b" * 1000 + b"c" * 1000
    assert played.ended


def test_late_viewers_see_only_the_future_and_revoked_get_nothing_new(
        module_archiver: ArchiverServer, make_viewer) -> None:
    archiver_server, cam = module_archiver, unique_camera()  # a shared Archiver
    alice, bob = make_viewer("alice"), make_viewer("bob")
    token = archiver_server.add_camera(cam)
    alice_fp = archiver_server.add_viewer(alice.pem, [cam])
    for chunk in (b"A1", b"A2"):
        assert archiver_server.put_segment(cam, token, chunk * 500) == 201
    bob_fp = archiver_server.add_viewer(bob.pem, [cam])
    # Bob joins the running chain from the first key period that sealed nothing recorded
    # before he was added (issue 23): the next one, if A1/A2 used this one.
    period_ms = archiver_server.key_period_s * 1000
    time.sleep((period_ms - time.time_ns() // 1_000_000 % period_ms) / 1000 + 0.05)
    for chunk in (b"B1", b"B2"):
        assert archiver_server.put_segment(cam, token, chunk * 500) == 201
    alice_session = login(archiver_server.url, alice.identity)
    archiver_server.revoke(alice_fp)
    # The camera keeps the revocation's key period's key (she holds it already); a chain
    # without her starts with the next period (issue 23).
    archiver_server.sleep_into_next_key_period()
    for chunk in (b"C1", b"C2"):
        assert archiver_server.put_segment(cam, token, chunk * 500) == 201

    # Each segment's chain (the first 12 bytes of its key id) and step (the last 4).
    key_ids = _segment_key_ids(archiver_server, cam)
    keys = [key_id[:12] for key_id in key_ids]
    alice_keys, bob_keys = _key_ids_of(archiver_server, alice_fp), _key_ids_of(archiver_server, bob_fp)
    # Alice: keys for what was recorded while she was authorized, none after revocation.
    assert set(keys[:4]) <= alice_keys and not set(keys[4:]) & alice_keys
    # Bob: a record for every chain from his authorization on; for the chain he joined, its
    # state from a step after A1's and A2's (nothing recorded before he was added).
    assert set(keys[2:]) <= bob_keys
    with sqlite3.connect(server_db := archiver_server.data_dir / "archiver.sqlite3") as db:
        (join_raw,) = [row[0] for row in db.execute(
            "SELECT record FROM chain_records WHERE fingerprint=? AND chain_id=?",
            (bob_fp, keys[0]))]
    assert server_db.exists()
    join = decode_record(join_raw)
    assert isinstance(join, ChainRecord)
    steps = [int.from_bytes(key_id[12:], "big") for key_id in key_ids]
    assert keys[0] == keys[1] == keys[2] and max(steps[:2]) < join.first_step <= steps[2]

    # Bob's stream: the first two segments are covered by manifests but not decryptable.
    bob_stream = fetch(archiver_server.url, login(archiver_server.url, bob.identity), cam)
    played = play(bob.identity, bob_stream.content)
    assert [p.data[:2] for p in played.plaintexts] == [b"B1", b"B2", b"C1", b"C2"]
    assert len(played.skipped) == 2 and played.ended
    # Bob's stream is not Alice's: her token finds nothing addressed to her.
    with pytest.raises(NoMatchingIdentity):
        play(alice.identity, bob_stream.content)

    # Revoked: her open session ended with the revocation, and a new login is refused.
    response = fetch(archiver_server.url, alice_session, cam)
    assert response.status_code == 401 and response.json()["error"] == "session_invalid"
    pem = alice.pem.read_text()
    response = httpx.post(f"{archiver_server.url}/v1/sessions/challenge", json={"certificate": pem})
    assert response.status_code == 403 and response.json()["error"] == "revoked"


def test_viewer_on_other_camera_is_refused(module_archiver: ArchiverServer, make_viewer) -> None:
    archiver_server, cam, cam2 = module_archiver, unique_camera(), unique_camera()  # shared
    viewer = make_viewer("carol")
    token = archiver_server.add_camera(cam)
    archiver_server.add_camera(cam2)
    archiver_server.add_viewer(viewer.pem, [cam2])
    assert archiver_server.put_segment(cam, token, b"x" * 100) == 201
    session = login(archiver_server.url, viewer.identity)
    forbidden = fetch(archiver_server.url, session, cam)
    assert forbidden.status_code == 403 and forbidden.json()["error"] == "not_authorized"
    response = fetch(archiver_server.url, session, cam2)
    assert response.status_code == 404 and response.json()["error"] == "no_recording"
    # A camera that does not exist gets the very same answer as one that is not the viewer's:
    # a viewer cannot enumerate camera names (live and recording alike).
    missing = fetch(archiver_server.url, session, "nosuch")
    assert missing.status_code == 403
    assert missing.text.replace("nosuch", cam) == forbidden.text
    for camera in (cam, "nosuch"):
        live = httpx.get(f"{archiver_server.url}/v1/cameras/{camera}/live",
                         params={"duration_s": 0.1, "nonce": "00" * 16},
                         headers={"Authorization": f"Bearer {session}"})
        assert (live.status_code, live.json()["error"]) == (403, "not_authorized")
    listed = httpx.get(f"{archiver_server.url}/v1/cameras",
                       headers={"Authorization": f"Bearer {session}"}).json()
    assert [c["name"] for c in listed] == [cam2]


@requires_ffmpeg
def test_ffmpeg_push_and_nothing_secret_at_rest(module_archiver: ArchiverServer, make_viewer,
                                                tmp_path: Path) -> None:
    archiver_server, cam = module_archiver, unique_camera()  # a shared Archiver
    viewer = make_viewer("dave")
    token = archiver_server.add_camera(cam)
    archiver_server.add_viewer(viewer.pem, [cam])
    source = make_source(tmp_path / "source.ts", seconds=6)
    push(source, archiver_server.url, cam, token, realtime=True)

    cameras = archiver_server.admin("GET", "/v1/admin/cameras", expect=200)
    assert next(c for c in cameras if c["name"] == cam)["segments"] >= 5
    stream = fetch(archiver_server.url, login(archiver_server.url, viewer.identity), cam).content
    played = play(viewer.identity, stream)
    decrypted = tmp_path / "decrypted.ts"
    decrypted.write_bytes(played.data)
    assert frame_hashes(decrypted) == frame_hashes(source)  # every frame, in order
    assert len(set(_segment_key_ids(archiver_server, cam))) >= 2  # rotated while pushing

    secrets = observed_secrets(viewer.identity, stream)
    assert len(secrets) >= 4
    needles = set()
    for secret in secrets:
        needles |= {secret, secret.hex().encode(), base64.b64encode(secret)}
    plaintext_probe = source.read_bytes()[4096:4096 + 64]
    files = [p for p in archiver_server.data_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".fsa" for p in files) and any(p.suffix == ".sqlite3" for p in files)
    for path in files:
        content = path.read_bytes()
        for needle in needles:
            assert needle not in content, f"a key or KEK is at rest in {path.name}"
        if path.suffix in (".fsa", ".sqlite3", ".sqlite3-wal"):
            assert plaintext_probe not in content, f"plaintext video at rest in {path.name}"


def test_restart_keeps_serving_the_old_archive(tmp_path: Path, make_viewer) -> None:
    viewer = make_viewer("erin")
    server = ArchiverServer(tmp_path / "archiver").start()
    try:
        token = server.add_camera("cam1")
        server.add_viewer(viewer.pem, ["cam1"])
        for i in range(3):
            assert server.put_segment("cam1", token, bytes([i]) * 2000) == 201
        cert_before = server.admin("GET", "/v1/archiver")["fingerprint"]
    finally:
        server.stop()
    server = ArchiverServer(tmp_path / "archiver", port=server.port).start()
    try:
        assert server.admin("GET", "/v1/archiver")["fingerprint"] == cert_before
        assert server.put_segment("cam1", token, b"\x09" * 2000) == 201
        played = play(viewer.identity, fetch(server.url, login(server.url, viewer.identity),
                                             "cam1").content)
        # One verified chain across the restart, old and new segments alike.
        assert [p.data[0] for p in played.plaintexts] == [0, 1, 2, 9]
    finally:
        server.stop()


def test_bad_ingest_is_refused_and_harms_nothing(module_archiver: ArchiverServer) -> None:
    archiver_server, cam = module_archiver, unique_camera()  # a shared Archiver
    url = archiver_server.url
    token = archiver_server.add_camera(cam)
    assert archiver_server.put_segment(cam, token, b"good" * 100) == 201

    def put(camera: str, name: str, data: bytes, auth: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {auth}"} if auth else {}
        return httpx.put(f"{url}/ingest/{camera}/{name}", content=data, headers=headers)

    assert put(cam, "a.ts", b"x", None).status_code == 401
    assert put(cam, "a.ts", b"x", "wrong").status_code == 403
    assert put("nosuch", "a.ts", b"x", token).status_code == 403
    assert put(cam, "a.ts", b"", token).json()["error"] == "empty_segment"
    assert put(cam, "..%2F..%2Fetc%2Fpasswd.ts", b"x", token).status_code in (404, 422)
    assert put(cam, "index.m3u8", b"#EXTM3U\n", token).status_code == 204
    assert put(cam, "a.ts", b"x" * (32 * 1024 * 1024 + 1), token).status_code == 413
    admin = {"Authorization": f"Bearer {archiver_server.admin_token}"}
    assert httpx.put(f"{url}/ingest/{cam}/a.ts", content=b"x", headers=admin).status_code == 403

    # A body cut off mid-upload is not archived.
    with socket.create_connection(("127.0.0.1", archiver_server.port)) as sock:
        sock.sendall(f"PUT /ingest/{cam}/cut.ts HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {token}\r\nContent-Length: 100000\r\n\r\n".encode()
                     + b"partial" * 100)
    time.sleep(0.5)
    cameras = archiver_server.admin("GET", "/v1/admin/cameras", expect=200)
    assert next(c for c in cameras if c["name"] == cam)["segments"] == 1
    assert archiver_server.put_segment(cam, token, b"after" * 100) == 201


def test_access_control(module_archiver: ArchiverServer, make_viewer) -> None:
    archiver_server, cam = module_archiver, unique_camera()  # a shared Archiver
    url = archiver_server.url
    viewer = make_viewer("frank")
    camera_token = archiver_server.add_camera(cam)
    archiver_server.add_viewer(viewer.pem, [cam])
    session = login(url, viewer.identity)
    admin_paths = [("GET", "/v1/admin/cameras"), ("POST", "/v1/admin/cameras"),
                   ("GET", "/v1/admin/viewers"), ("POST", "/v1/admin/viewers"),
                   ("DELETE", f"/v1/admin/cameras/{cam}"),
                   ("POST", f"/v1/admin/viewers/{'0' * 64}/revoke"),
                   # the deprecated aliases of /viewers are guarded alike
                   ("GET", "/v1/admin/clients"), ("POST", "/v1/admin/clients"),
                   ("POST", f"/v1/admin/clients/{'0' * 64}/revoke")]
    for method, path in admin_paths:
        for auth, status in ((None, 401), ("garbage", 403), (camera_token, 403), (session, 403)):
            headers = {"Authorization": f"Bearer {auth}"} if auth else {}
            response = httpx.request(method, url + path, headers=headers, json={})
            assert response.status_code == status, (method, path, auth, response.text)
            assert "message" in response.json()
    for auth, status in ((None, 401), (camera_token, 401),
                         (archiver_server.admin_token, 401), ("x" * 43, 401)):
        headers = {"Authorization": f"Bearer {auth}"} if auth else {}
        response = httpx.get(f"{url}/v1/cameras/{cam}/recording?from_ms=0&to_ms=1", headers=headers)
        assert response.status_code == status


def test_login_proofs_cannot_be_forged_or_replayed(module_archiver: ArchiverServer,
                                                   make_viewer) -> None:
    archiver_server, cam = module_archiver, unique_camera()  # a shared Archiver
    url = archiver_server.url
    viewer = make_viewer("grace")
    archiver_server.add_camera(cam)
    archiver_server.add_viewer(viewer.pem, [cam])
    pem = viewer.pem.read_text()
    challenge = httpx.post(f"{url}/v1/sessions/challenge", json={"certificate": pem}).json()
    forged = httpx.post(f"{url}/v1/sessions", json={
        "challenge_id": challenge["challenge_id"], "proof": base64.b64encode(b"\0" * 32).decode()})
    assert forged.status_code == 401 and forged.json()["error"] == "proof_refused"
    # The forged attempt consumed the challenge: single use.
    session = login(url, viewer.identity)
    assert session
    # Replay: the same challenge id and a proof that was once valid.
    challenge = httpx.post(f"{url}/v1/sessions/challenge", json={"certificate": pem}).json()
    assert httpx.post(f"{url}/v1/sessions", json={
        "challenge_id": challenge["challenge_id"], "proof": "AAAA"}).status_code == 401
    assert httpx.post(f"{url}/v1/sessions/challenge",
                      json={"certificate": "not a certificate"}).status_code == 422


def test_bad_certificates_are_refused(module_archiver: ArchiverServer, tmp_path: Path) -> None:
    archiver_server, cam = module_archiver, unique_camera()  # a shared Archiver
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    def cert(bits: int, days: int, start_days: int = 0) -> str:
        key = rsa.generate_private_key(65537, bits)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallory")])
        now = dt.datetime.now(dt.UTC) + dt.timedelta(days=start_days)
        built = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                 .public_key(key.public_key()).serial_number(1).not_valid_before(now)
                 .not_valid_after(now + dt.timedelta(days=days))
                 .add_extension(x509.KeyUsage(True, False, True, False, False, False, False,
                                              False, False), critical=True)
                 .sign(key, hashes.SHA256()))
        return built.public_bytes(serialization.Encoding.PEM).decode()

    archiver_server.add_camera(cam)
    for pem in ("garbage", cert(1024, 30), cert(2048, 1, start_days=-10)):
        response = httpx.post(f"{archiver_server.url}/v1/admin/viewers",
                              headers={"Authorization": f"Bearer {archiver_server.admin_token}"},
                              json={"certificate": pem, "cameras": [cam], "oaep_hash": "sha256"})
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "bad_certificate"


def test_audit_log_and_health(archiver_server: ArchiverServer, make_viewer) -> None:
    viewer = make_viewer("heidi")
    token = archiver_server.add_camera("cam1")
    fp = archiver_server.add_viewer(viewer.pem, ["cam1"])
    archiver_server.put_segment("cam1", token, b"z" * 100)
    fetch(archiver_server.url, login(archiver_server.url, viewer.identity), "cam1")
    archiver_server.revoke(fp)
    log_path = archiver_server.data_dir / "audit.jsonl"
    text = log_path.read_text()
    for action in ("camera.add", "viewer.add", "session.open", "stream.playback", "viewer.revoke"):
        assert f'"action":"{action}"' in text
    assert verify_audit_log(log_path) is None
    lines = log_path.read_bytes().splitlines()
    log_path.write_bytes(b"\n".join(lines[:1] + lines[2:]) + b"\n")  # drop one entry
    assert verify_audit_log(log_path) == 2
    assert httpx.get(f"{archiver_server.url}/healthz").json() == {"status": "ok"}
    # The API's map is not served by default (fusion-archiver serve --api-docs turns it on).
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{archiver_server.url}{path}").status_code == 404
    assert (archiver_server.data_dir / "admin-token").stat().st_mode & 0o777 == 0o600
