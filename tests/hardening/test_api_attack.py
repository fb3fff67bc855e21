"""The API's attack surface, against a real running Archiver.

- schemathesis fuzzes every operation of /openapi.json, once per role (anonymous, camera,
  viewer, admin), and must find no 5xx;
- every endpoint (enumerated from /openapi.json, so a new one cannot slip by unreviewed) is
  called without credentials, with garbage, with every other role's credentials, with an
  expired session and with a revoked viewer's session;
- replayed login proofs and sessions from before a restart are refused;
- path traversal in camera and segment names, oversized headers and bodies, and slow-loris
  uploads (which time out) harm nothing.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import random
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from keyservice.crypto import admin_login_context, answer_login_challenge, login_context
from keyservice.identity import Identity, OaepHash, fingerprint
from tests.fixtures.viewer import login
from tests.hardening.conftest import WrappedServer, check_archive, scale

SESSION_TTL_S = 3
UPLOAD_TIMEOUT_S = 2


def _serve(data_dir: Path, *extra: str) -> Iterator[WrappedServer]:
    # --api-docs: these tests enumerate and fuzz the API from its /openapi.json.
    archiver = WrappedServer(data_dir, extra_args=("--api-docs", *extra)).start()
    try:
        yield archiver
    finally:
        archiver.stop()
    log = archiver.log()
    # Whatever was thrown at it: no unexpected error, no traceback.
    assert "Traceback" not in log and "unexpected error" not in log, log[-4000:]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[WrappedServer]:
    """Short sessions and upload timeout, to test their expiry."""
    yield from _serve(tmp_path / "archiver", "--session-ttl", str(SESSION_TTL_S),
                      "--upload-timeout", str(UPLOAD_TIMEOUT_S))


@pytest.fixture
def fuzz_server(tmp_path: Path) -> Iterator[WrappedServer]:
    """Default settings: the fuzzer's viewer session must outlive its run."""
    # Limits raised: the fuzzer sends far more requests a second than a viewer would.
    yield from _serve(tmp_path / "archiver", "--viewer-rate", "10000", "--login-rate", "10000",
                      "--viewer-concurrency", "64")


# --- schemathesis -----------------------------------------------------------------------------
def _schemathesis(server: WrappedServer, tmp_path: Path, role: str, token: str | None,
                  parameters: dict[str, str | float], include: str | None = None) -> str:
    config = tmp_path / f"schemathesis-{role}.toml"
    config.write_text("[parameters]\n" + "".join(
        f"{name} = {value!r}\n".replace("'", '"') for name, value in parameters.items()))
    seed = int(os.environ.get("FUSION_HARDENING_SEED", random.randrange(2**31)))
    command = [sys.executable, "-m", "schemathesis.cli", "--no-color", "--config-file",
               str(config), "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error",
               "--max-examples", str(scale("FUZZ_EXAMPLES", 10)), "--seed", str(seed),
               "--request-timeout", "30", "--workers", "1"]
    if token is not None:
        command += ["--header", f"Authorization: Bearer {token}"]
    if include is not None:
        command += ["--include-path-regex", include]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    summary = result.stdout[-3000:]
    cases = next((line.strip() for line in summary.splitlines()
                  if re.match(r"\s*\d+ generated", line)), "?")
    print(f"schemathesis {role} (seed {seed}): {cases}")
    assert result.returncode == 0, f"schemathesis ({role}, seed {seed}) found:\n{result.stdout}"
    assert "generated" in summary  # it did run test cases
    return summary


@pytest.mark.skipif(importlib.util.find_spec("schemathesis") is None,
                    reason="schemathesis is not installed (pip install schemathesis)")
def test_schemathesis_finds_no_server_error_for_any_role(fuzz_server: WrappedServer,
                                                         tmp_path: Path, make_viewer) -> None:
    server = fuzz_server
    viewer = make_viewer("fuzz-viewer")
    camera_token = server.add_camera("cam1")
    server.add_viewer(viewer.pem, ["cam1"])
    for i in range(3):
        assert server.put_segment("cam1", camera_token, bytes([i]) * 1000) == 201
    # Fixed values where a random one would only meet 403/404 and never reach the real code;
    # a short live duration so that live requests end at once.
    _schemathesis(server, tmp_path, "anonymous", None, {})
    _schemathesis(server, tmp_path, "camera", camera_token, {"camera": "cam1", "name": "s.ts"},
                  include="^/ingest/")
    _schemathesis(server, tmp_path, "camera-any-name", camera_token, {"camera": "cam1"},
                  include="^/ingest/")
    session = login(server.url, viewer.identity)
    _schemathesis(server, tmp_path, "viewer", session, {"camera": "cam1", "duration_s": 0.05},
                  include="^/v1/cameras")
    # The session was valid to the end: the run was not just a series of 401s.
    assert httpx.get(f"{server.url}/v1/cameras",
                     headers={"Authorization": f"Bearer {session}"}).status_code == 200
    cameras = server.admin("GET", "/v1/admin/cameras", expect=200)
    assert sum(c["segments"] for c in cameras) > 3  # the fuzzer reached the real ingest path
    check_archive(server.data_dir)
    # Last: the admin run may remove cam1.
    _schemathesis(server, tmp_path, "admin", server.admin_token, {}, include="^/v1/admin/")
    check_archive(server.data_dir)


# --- every endpoint, every wrong credential ------------------------------------------------------
PUBLIC = {("GET", "/healthz"), ("GET", "/v1/archiver"),
          ("POST", "/v1/sessions/challenge"), ("POST", "/v1/sessions"),
          # an admin's proof-of-possession login (archiver/routers/admins.py)
          ("POST", "/v1/sessions/admin/challenge"), ("POST", "/v1/sessions/admin")}


def _role_of(method: str, path: str) -> str:
    if (method, path) in PUBLIC:
        return "public"
    if path == "/metrics":
        return "metrics"
    if path.startswith("/v1/admin/"):
        return "admin"
    if path.startswith("/ingest/"):
        return "camera"
    # Another Archiver of the site, by its signature in the body (no bearer token of any kind
    # opens it: a viewer must not bulk-download the key streams), issue 22.
    if path == "/v1/site/consolidation/export":
        return "archiver"
    # /v1/site/archivers: the registry a viewer checks a redirect against (issue 21).
    if path.startswith(("/v1/cameras", "/v1/grants", "/v1/site/")):
        return "viewer"
    raise AssertionError(f"{method} {path} is a new endpoint: decide who may call it and add "
                         "it to this test")


def _admin_session(url: str, identity: Identity) -> str:
    """An admin's session: proof of possession under the admin context (routers/admins.py)."""
    pem = identity.certificate.public_bytes(Encoding.PEM).decode()
    body = httpx.post(f"{url}/v1/sessions/admin/challenge", json={"certificate": pem}).json()
    archiver = x509.load_pem_x509_certificate(body["archiver_certificate"].encode())
    context = admin_login_context(fingerprint(archiver), fingerprint(identity.certificate),
                                  bytes.fromhex(body["challenge_id"]))
    proof = answer_login_challenge(identity, base64.b64decode(body["ciphertext"]),
                                   OaepHash.from_label(body["oaep_hash"]), context)
    opened = httpx.post(f"{url}/v1/sessions/admin", json={
        "challenge_id": body["challenge_id"], "proof": base64.b64encode(proof).decode()})
    assert opened.status_code == 201, opened.text
    return opened.json()["session_token"]


def _concrete(path: str, fp: str) -> str:
    return (path.replace("{camera}", "cam1").replace("{name}", "seg.ts")
            .replace("{fp}", fp).replace("{grant_id}", "0" * 32)
            .replace("{decision}", "approve").replace("{who}", "alice"))


def test_every_endpoint_refuses_every_wrong_credential(server: WrappedServer,
                                                       make_viewer) -> None:
    url = server.url
    alice, bob, carol = make_viewer("alice"), make_viewer("bob"), make_viewer("carol")
    cam1_token, cam2_token = server.add_camera("cam1"), server.add_camera("cam2")
    alice_fp = server.add_viewer(alice.pem, ["cam1"])
    server.add_viewer(bob.pem, ["cam2"])
    carol_fp = server.add_viewer(carol.pem, ["cam1"])
    assert server.put_segment("cam1", cam1_token, b"x" * 100) == 201

    expired = login(url, alice.identity)
    revoked = login(url, carol.identity)
    server.revoke(carol_fp)
    time.sleep(SESSION_TTL_S + 0.5)  # let `expired` run out (not a speed measurement)
    alice_session = login(url, alice.identity)
    # An admin who is a person: their session is no viewer's session and no camera's token.
    dave = make_viewer("dave")
    server.admin("POST", "/v1/admin/admins", {"certificate": dave.pem.read_text(),
                                              "name": "dave"}, expect=201)
    admin_session = _admin_session(url, dave.identity)

    wrong: dict[str, dict[str, str | None]] = {
        "admin": {"none": None, "garbage": secrets.token_urlsafe(32), "camera": cam1_token,
                  "viewer": alice_session, "expired": expired, "revoked": revoked},
        "camera": {"none": None, "garbage": secrets.token_urlsafe(32), "admin":
                   server.admin_token, "other camera": cam2_token, "viewer": alice_session,
                   "expired": expired, "admin session": admin_session},
        "viewer": {"none": None, "garbage": secrets.token_urlsafe(32), "admin":
                   server.admin_token, "camera": cam1_token, "expired": expired,
                   "revoked": revoked, "admin session": admin_session},
        "metrics": {"none": None, "garbage": secrets.token_urlsafe(32), "camera": cam1_token,
                    "viewer": alice_session},
        "archiver": {"none": None, "admin": server.admin_token, "viewer": alice_session,
                     "camera": cam1_token, "admin session": admin_session},
    }
    # A well-formed export request, unsigned (its signature is garbage): what a token holder
    # who is no Archiver can send.
    unsigned_export = {"archiver": "a9", "camera": "cam1", "from_ms": 0, "to_ms": 2**40,
                       "issued_ms": int(time.time() * 1000), "nonce": "0" * 32,
                       "signature": base64.b64encode(b"x" * 70).decode()}
    expected_refusal = {  # (status, error code) for "none", then for any other wrong token
        "admin": ((401, "unauthenticated"), (403, "forbidden")),
        "camera": ((401, "unauthenticated"), (403, "forbidden")),
        "viewer": ((401, "unauthenticated"), (401, "session_invalid")),
        "metrics": ((401, "unauthenticated"), (403, "forbidden")),
        "archiver": ((401, "unauthenticated"), (401, "unauthenticated")),
    }
    spec = httpx.get(f"{url}/openapi.json").json()
    operations = [(method.upper(), path) for path, item in spec["paths"].items()
                  for method in item]
    assert len(operations) >= 16
    checked = 0
    for method, path in operations:
        role = _role_of(method, path)
        if role == "public":
            continue
        target = url + _concrete(path, alice_fp)
        params = {"from_ms": 0, "to_ms": 2**62, "duration_s": 0.1} if role == "viewer" else {}
        for name, token in wrong[role].items():
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = httpx.request(method, target, headers=headers, params=params,
                                     json=(unsigned_export if role == "archiver" else {})
                                     if method in ("POST",) else None,
                                     content=b"segment" if method == "PUT" else None)
            status, code = expected_refusal[role][0 if token is None else 1]
            assert (response.status_code, response.json()["error"]) == (status, code), (
                method, path, name, response.text)
            checked += 1
    assert checked >= 40

    # Nothing was changed by any refused call.
    assert [c["name"] for c in server.admin("GET", "/v1/admin/cameras", expect=200)] == [
        "cam1", "cam2"]
    assert server.admin("GET", "/v1/admin/cameras")[0]["segments"] == 1
    # The right credentials still work, and a viewer's session opens only its own cameras.
    alice_session, bob_session = login(url, alice.identity), login(url, bob.identity)
    watch = {"Authorization": f"Bearer {bob_session}"}
    everything = {"from_ms": 0, "to_ms": 2**62, "nonce": "00" * 16}
    assert httpx.get(f"{url}/v1/cameras/cam1/recording", params=everything,
                     headers=watch).json()["error"] == "not_authorized"
    assert [c["name"] for c in httpx.get(f"{url}/v1/cameras", headers=watch).json()] == ["cam2"]
    assert httpx.get(f"{url}/v1/cameras/cam1/recording", params=everything,
                     headers={"Authorization": f"Bearer {alice_session}"}).status_code == 200


# --- replayed proofs and sessions ---------------------------------------------------------------
def _challenge(url: str, pem: str) -> dict[str, str]:
    response = httpx.post(f"{url}/v1/sessions/challenge", json={"certificate": pem})
    assert response.status_code == 200, response.text
    return response.json()


def _proof(identity, body: dict[str, str]) -> str:
    archiver = x509.load_pem_x509_certificate(body["archiver_certificate"].encode())
    context = login_context(fingerprint(archiver), fingerprint(identity.certificate),
                            bytes.fromhex(body["challenge_id"]))
    proof = answer_login_challenge(identity, base64.b64decode(body["ciphertext"]),
                                   OaepHash.from_label(body["oaep_hash"]), context)
    return base64.b64encode(proof).decode()


def test_replayed_proofs_and_sessions_are_refused(server: WrappedServer, make_viewer,
                                                  softhsm_token_factory) -> None:
    url = server.url
    alice = make_viewer("alice")
    server.add_camera("cam1")
    server.add_viewer(alice.pem, ["cam1"])
    pem = alice.identity.certificate.public_bytes(Encoding.PEM).decode()

    # A valid proof opens one session; the same proof again opens none.
    first = _challenge(url, pem)
    answer = {"challenge_id": first["challenge_id"], "proof": _proof(alice.identity, first)}
    assert httpx.post(f"{url}/v1/sessions", json=answer).status_code == 201
    replay = httpx.post(f"{url}/v1/sessions", json=answer)
    assert (replay.status_code, replay.json()["error"]) == (401, "proof_refused")
    # A proof is bound to its challenge: one made for challenge A does not answer challenge B.
    a, b = _challenge(url, pem), _challenge(url, pem)
    crossed = httpx.post(f"{url}/v1/sessions", json={"challenge_id": b["challenge_id"],
                                                     "proof": _proof(alice.identity, a)})
    assert crossed.status_code == 401
    # A certificate that is enrolled nowhere gets no challenge at all.
    stranger = make_viewer("stranger")
    refused = httpx.post(f"{url}/v1/sessions/challenge",
                         json={"certificate": stranger.pem.read_text()})
    assert (refused.status_code, refused.json()["error"]) == (403, "not_enrolled")

    # Sessions live in memory: a restart logs everyone out.
    session = login(url, alice.identity)
    headers = {"Authorization": f"Bearer {session}"}
    assert httpx.get(f"{url}/v1/cameras", headers=headers).status_code == 200
    server.stop()
    server.start()
    after = httpx.get(f"{url}/v1/cameras", headers=headers)
    assert (after.status_code, after.json()["error"]) == (401, "session_invalid")
    # ... and so does expiry (SESSION_TTL_S here).
    session = login(url, alice.identity)
    time.sleep(SESSION_TTL_S + 0.5)
    expired = httpx.get(f"{url}/v1/cameras", headers={"Authorization": f"Bearer {session}"})
    assert (expired.status_code, expired.json()["error"]) == (401, "session_invalid")


# --- hostile names, sizes and speeds -----------------------------------------------------------
def _raw(port: int, request: bytes, timeout: float = 30) -> bytes:
    """One raw HTTP/1.1 exchange (no client-side normalisation of the path): the response
    as far as it came before the server closed (or reset) the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except (ConnectionResetError, BrokenPipeError):
            pass
        return _read_response(sock)


def _read_response(sock: socket.socket, data: bytes = b"") -> bytes:
    """Read until the response's Content-Length is complete, or the connection ends."""
    try:
        while True:
            head, sep, body = data.partition(b"\r\n\r\n")
            length = [line for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length: ")]
            if sep and length and len(body) >= int(length[0].split(b": ")[1]):
                return data
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except (TimeoutError, ConnectionResetError, BrokenPipeError):
        return data


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _files(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*")
            if p.is_file()}


def test_path_traversal_oversize_and_slow_loris(server: WrappedServer, tmp_path: Path) -> None:
    url, port = server.url, server.port
    token = server.add_camera("cam1")
    assert server.put_segment("cam1", token, b"first" * 100) == 201
    before = _files(tmp_path)
    auth = f"Authorization: Bearer {token}\r\n".encode()

    # Path traversal: in the segment name, in the camera name, raw and encoded. The name is
    # never used as a path (the archive is per camera and day), but none may even be accepted.
    for path in (b"/ingest/cam1/../../../etc/passwd.ts", b"/ingest/cam1/..%2F..%2Fx.ts",
                 b"/ingest/cam1/%2e%2e%2f%2e%2e%2fx.ts", b"/ingest/cam1/.ts",
                 b"/ingest/cam1/a%00.ts", b"/ingest/cam1/a%2Fb.ts", b"/ingest/cam1/a\\..\\b.ts",
                 b"/ingest/cam1/" + b"a" * 200 + b".ts", b"/ingest/../cam1/x.ts",
                 b"/ingest/%2e%2e/x.ts", b"/ingest/cam1%2F..%2Fcam1/x.ts", b"/ingest/./x.ts"):
        response = _raw(port, b"PUT " + path + b" HTTP/1.1\r\nHost: a\r\n" + auth
                        + b"Content-Length: 4\r\nConnection: close\r\n\r\nevil")
        assert 400 <= _status(response) < 500, (path, response[:200])
    for name in ("..", ".", "../x", "a/b", "x" * 65, ""):
        response = httpx.post(f"{url}/v1/admin/cameras", json={"name": name},
                              headers={"Authorization": f"Bearer {server.admin_token}"})
        assert response.status_code == 422, (name, response.text)

    # Oversized headers: refused by the HTTP layer (400, or the connection reset while the
    # header is still arriving), before any handler; the server carries on.
    huge = _raw(port, b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 200_000
                + b"\r\n\r\n")
    assert not huge or 400 <= _status(huge) < 500, huge[:200]
    assert httpx.get(f"{url}/healthz").status_code == 200
    # Oversized bodies: a segment over the limit, a 20 MB JSON document, a lying length.
    too_big = httpx.put(f"{url}/ingest/cam1/big.ts", content=b"\0" * (32 * 2**20 + 1),
                        headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert too_big.status_code == 413
    document = httpx.post(f"{url}/v1/admin/viewers", timeout=60, content=b'{"certificate": "'
                          + b"A" * 20_000_000 + b'", "cameras": "all"}',
                          headers={"Authorization": f"Bearer {server.admin_token}",
                                   "Content-Type": "application/json"})
    assert document.status_code in (413, 422), document.text[:200]
    # A length over the limit is refused on its header, before a byte of the body is read ...
    lying = _raw(port, b"PUT /ingest/cam1/lie.ts HTTP/1.1\r\nHost: a\r\n" + auth
                 + b"Content-Length: 999999999999\r\n\r\n" + b"x" * 1000, timeout=UPLOAD_TIMEOUT_S * 5)
    assert _status(lying) == 413
    # ... one within the limit whose body never comes is dropped at the upload timeout.
    lying = _raw(port, b"PUT /ingest/cam1/lie.ts HTTP/1.1\r\nHost: a\r\n" + auth
                 + b"Content-Length: 1000000\r\n\r\n" + b"x" * 1000, timeout=UPLOAD_TIMEOUT_S * 5)
    assert _status(lying) == 408

    # Slow loris: a body trickling in, a byte every half second, is dropped at the upload
    # timeout with 408, and the segment is not archived.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"PUT /ingest/cam1/slow.ts HTTP/1.1\r\nHost: a\r\n" + auth
                     + b"Content-Length: 1000\r\n\r\n")
        answer = b""
        started = time.monotonic()
        while time.monotonic() - started < 30:  # bounds a hang only
            try:
                sock.sendall(b"s")
            except OSError:
                break
            sock.settimeout(0.5)
            try:
                answer = sock.recv(4096)
            except TimeoutError:
                continue
            sock.settimeout(10)
            answer = _read_response(sock, answer)
            break
    assert _status(answer) == 408 and b"upload_timeout" in answer, answer

    # Nothing was written anywhere but the one good segment that follows.
    assert server.put_segment("cam1", token, b"second" * 100) == 201
    after = _files(tmp_path)
    grown = {p for p in after if after[p] != before.get(p)}
    assert all(p.endswith(("-server.log", ".fsa", ".sqlite3", ".sqlite3-wal", ".sqlite3-shm",
                           "audit.jsonl")) for p in grown), grown
    report = check_archive(server.data_dir)
    assert report.segments == 2
