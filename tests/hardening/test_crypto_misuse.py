"""Crypto misuse checks.

1. Nonces: AES-GCM segment nonces are derived from sequence numbers, so uniqueness rests on
   (key, seq) never repeating: checked on the archive files themselves after concurrent
   streams, a clean restart and a SIGKILL. Key ids, epoch ids and key-record nonces (random)
   never repeat either, and every restart starts new epochs.
2. Nothing secret in logs: a full run (enrolment CLI, admin CLI, ingest, login, playback, live,
   a refused login, revocation, a SIGKILL and recovery) and then its server log, audit log and
   CLI outputs are searched for every secret a viewer could observe (KEK0s, ratcheted KEKs,
   minute keys, the login challenge secret), the viewer's PINs, the Archiver's token PIN, and
   the admin, camera and session bearer tokens.
3. Constant-time comparison of bearer tokens and login proofs: shown at code level (every
   secret comparison goes through hmac.compare_digest; no == on secrets in the Archiver). This
   does not measure timing.
"""

from __future__ import annotations

import ast
import base64
import hmac
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

from archiver.app import create_app
from archiver.settings import Settings
from keyservice.crypto import LABEL_LOGIN_CHALLENGE, answer_login_challenge, login_context
from keyservice.format import decode_record
from keyservice.identity import OaepHash, SoftwareSigner, fingerprint
from keyservice.token import Token
from tests.fixtures.tokens import TokenHandle
from tests.fixtures.viewer import fetch, login, observed_secrets, play
from tests.hardening.conftest import (
    Uploader,
    WrappedServer,
    assert_nonces_unique,
    check_archive,
    open_index_copy,
)

REPO = Path(__file__).resolve().parents[2]


# --- 1. nonces ----------------------------------------------------------------------------------
def _ingest_concurrently(server: WrappedServer, tokens: dict[str, str], seconds: float
                         ) -> list[Uploader]:
    # Two uploaders per camera: concurrent segments of one stream share a minute key.
    uploaders = [Uploader(server.url, cam, token, number=n, sizes=(500, 5_000)).start()
                 for cam, token in tokens.items() for n in range(2)]
    time.sleep(seconds)
    return uploaders


def test_nonces_and_key_ids_never_repeat_across_streams_and_restarts(tmp_path: Path,
                                                                       make_viewer) -> None:
    viewer = make_viewer("nonce-viewer")
    server = WrappedServer(tmp_path / "archiver").start()
    tokens = {f"cam{i}": server.add_camera(f"cam{i}") for i in range(4)}
    fp = server.add_viewer(viewer.pem, "all")
    lifetimes: list[set[bytes]] = []
    known: set[bytes] = set()
    try:
        for restart in ("stop", "kill", None):
            uploaders = _ingest_concurrently(server, tokens, 1.5)
            for uploader in uploaders:
                uploader.stop()
            assert all(set(u.statuses) == {201} for u in uploaders)
            keys = check_archive(server.data_dir).key_ids
            lifetimes.append(keys - known)
            known |= keys
            if restart == "stop":
                server.stop()
            elif restart == "kill":
                server.kill()
            if restart:
                server = WrappedServer(server.data_dir, port=server.port).start()
        report = check_archive(server.data_dir)
        assert_nonces_unique(report)
        # Each server lifetime sealed with keys of its own (keys live in memory only).
        assert all(lifetimes), "a lifetime archived nothing"
        assert sum(len(keys) for keys in lifetimes) == len(report.key_ids)

        db = open_index_copy(server.data_dir)
        epochs = [row[0] for row in db.execute(
            "SELECT epoch_id FROM epochs WHERE fingerprint=?", (fp,))]
        records = [row[0] for row in db.execute("SELECT record FROM chain_records")]
        db.close()
        # A restart ends every epoch: at least one opener per lifetime, ids never reused.
        assert len(epochs) >= len(lifetimes) and len(set(epochs)) == len(epochs)
        # Key records are wrapped under random 96-bit nonces: none may repeat.
        nonces = Counter(decode_record(record).nonce for record in records)
        assert nonces and max(nonces.values()) == 1
        # And the viewer still opens all of it, across the three lifetimes.
        session = login(server.url, viewer.identity)
        for cam in tokens:
            played = play(viewer.identity, fetch(server.url, session, cam).content)
            assert played.ended and not played.skipped
    finally:
        server.stop()


# --- 2. nothing secret in logs ------------------------------------------------------------------
def _forms(secret: bytes | str) -> set[bytes]:
    """The ways a secret could be written into a text log."""
    raw = secret.encode() if isinstance(secret, str) else secret
    forms = {raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw),
             base64.urlsafe_b64encode(raw), base64.urlsafe_b64encode(raw).rstrip(b"=")}
    if isinstance(secret, bytes):
        forms.add(repr(secret).encode())
    return {f for f in forms if len(f) >= 4}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=REPO, stdin=subprocess.DEVNULL)


def test_no_key_or_pin_in_any_log_of_a_full_run(tmp_path: Path, softhsm_token: TokenHandle,
                                                 make_viewer) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FUSION_PIN"}
    outputs: list[str] = []
    bare_uri = softhsm_token.object_uri("erin", pin=False)
    # Enrolment with the CLI, PIN from the environment; then one wrong PIN.
    enrolled = _cli("-m", "keyservice.cli", "enroll", "--token", bare_uri, "--out",
                    str(tmp_path / "erin.pem"), "--key", "rsa2048",
                    env={**env, "FUSION_PIN": softhsm_token.pin})
    assert enrolled.returncode == 0, enrolled.stderr
    wrong_pin = "99999999" if softhsm_token.pin != "99999999" else "88888888"
    refused = _cli("-m", "keyservice.cli", "selftest", "--token", bare_uri,
                   env={**env, "FUSION_PIN": wrong_pin})
    assert refused.returncode != 0
    outputs += [enrolled.stdout, enrolled.stderr, refused.stdout, refused.stderr]
    identity = Token.open(softhsm_token.uri).identity("erin")
    other = make_viewer("frank")

    server = WrappedServer(tmp_path / "archiver").start()
    common = ["--url", server.url, "--data", str(server.data_dir), "--json"]
    try:
        added = _cli("-m", "archiver", "cameras", "add", "cam1", *common, env=env)
        assert added.returncode == 0, added.stderr
        camera_token = json.loads(added.stdout)["ingest_token"]
        client = _cli("-m", "archiver", "viewers", "add", str(tmp_path / "erin.pem"),
                      "--cameras", "cam1", *common, env=env)
        assert client.returncode == 0, client.stderr
        frank_fp = server.add_viewer(other.pem, ["cam1"])
        for i in range(6):
            assert server.put_segment("cam1", camera_token, bytes([i]) * 3000) == 201
            if i == 2:
                time.sleep(server.key_period_s)  # a second minute key
        assert server.put_segment("cam1", "not-the-token", b"x") == 403

        # Login by hand, to see the challenge secret the token decrypts.
        pem = identity.certificate.public_bytes(Encoding.PEM).decode()
        body = httpx.post(f"{server.url}/v1/sessions/challenge", json={"certificate": pem}).json()
        plaintext = identity.rsa_decrypt(base64.b64decode(body["ciphertext"]),
                                         OaepHash.from_label(body["oaep_hash"]))
        challenge_secret = plaintext[len(LABEL_LOGIN_CHALLENGE):]
        archiver = x509.load_pem_x509_certificate(body["archiver_certificate"].encode())
        proof = answer_login_challenge(identity, base64.b64decode(body["ciphertext"]),
                                       OaepHash.from_label(body["oaep_hash"]), login_context(
                                           fingerprint(archiver), fingerprint(identity.certificate),
                                           bytes.fromhex(body["challenge_id"])))
        opened = httpx.post(f"{server.url}/v1/sessions", json={
            "challenge_id": body["challenge_id"], "proof": base64.b64encode(proof).decode()})
        assert opened.status_code == 201
        session = opened.json()["session_token"]
        refused_login = httpx.post(f"{server.url}/v1/sessions", json={
            "challenge_id": body["challenge_id"], "proof": base64.b64encode(proof).decode()})
        assert refused_login.status_code == 401
        stream = fetch(server.url, session, "cam1").content
        assert play(identity, stream).ended
        live = httpx.get(f"{server.url}/v1/cameras/cam1/live", params={"duration_s": 0.5, "nonce": "00" * 16},
                         headers={"Authorization": f"Bearer {session}"}, timeout=30)
        assert live.status_code == 200
        secrets = observed_secrets(identity, stream)
        assert len(secrets) >= 4  # KEK0, KEKs, two minute keys at least
        revoked = _cli("-m", "archiver", "viewers", "revoke", frank_fp, *common, env=env)
        assert revoked.returncode == 0, revoked.stderr
        server.kill()  # and a recovery at the next start
        server = WrappedServer(server.data_dir, port=server.port).start()
        assert server.put_segment("cam1", camera_token, b"after" * 100) == 201
        session2 = login(server.url, identity)
        stream2 = fetch(server.url, session2, "cam1").content
        secrets |= observed_secrets(identity, stream2)
        outputs += [added.stderr, client.stdout, client.stderr, revoked.stdout, revoked.stderr]
    finally:
        server.stop()

    # The search can find what it looks for: the ingest token is printed by `cameras add`
    # (once, by design), so it must show up there.
    assert any(form in added.stdout.encode() for form in _forms(camera_token))
    archiver_pin = (server.data_dir / "token" / "pin").read_text().strip()
    needles: dict[str, set[bytes]] = {
        "a minute key or KEK": set().union(*(_forms(s) for s in secrets)),
        "the login challenge secret": _forms(challenge_secret),
        "the viewer's PIN": _forms(softhsm_token.pin),
        "the viewer's SO PIN": _forms(softhsm_token.so_pin),
        "the Archiver token's PIN": _forms(archiver_pin),
        "the admin token": _forms(server.admin_token),
        "a camera token": _forms(camera_token),
        "a session token": _forms(session) | _forms(session2),
    }
    logs = {"server log": Path(server.log_path).read_bytes(),
            "audit log": (server.data_dir / "audit.jsonl").read_bytes(),
            "CLI output": "\n".join(outputs).encode()}
    assert len(logs["server log"]) > 2000 and logs["audit log"].count(b"\n") >= 8
    assert b"recovery" in logs["audit log"] and b"viewer.revoke" in logs["audit log"]
    for log_name, content in logs.items():
        for what, forms in needles.items():
            for form in forms:
                assert form not in content, f"{what} appears in the {log_name}"


# --- 3. constant-time comparisons ---------------------------------------------------------------
SECRET_WORDS = ("token", "secret", "digest", "proof", "mac", "pin", "password", "key")


def _secret_comparisons(path: Path) -> list[str]:
    """Every == / != in a module where one side is named like a secret."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare) and any(
                isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
            # Sides that are themselves comparisons (`x is None`) compare booleans, not values.
            sides = [side for side in (node.left, *node.comparators)
                     if not isinstance(side, ast.Compare | ast.Constant)]
            names = [n.id if isinstance(n, ast.Name) else n.attr
                     for side in sides for n in ast.walk(side)
                     if isinstance(n, ast.Name | ast.Attribute)]
            if any(word in name.lower() for name in names for word in SECRET_WORDS):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.filterwarnings("ignore:Using .httpx. with .starlette.testclient.")
def test_secrets_are_compared_in_constant_time(tmp_path: Path, monkeypatch) -> None:
    # Code level: no == / != on anything named like a secret anywhere in the Archiver.
    offenders = [line for path in sorted((REPO / "archiver").rglob("*.py"))
                 for line in _secret_comparisons(path)]
    assert not offenders, "compare secrets with hmac.compare_digest:\n" + "\n".join(offenders)

    # Behaviour: every bearer token and every login proof reaching the app is checked through
    # hmac.compare_digest (spied), on the real request path of an in-process app.
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    from fastapi.testclient import TestClient  # warns on import (starlette on httpx)

    keys = REPO / "tests" / "vectors" / "keys"
    signer = SoftwareSigner(
        x509.load_pem_x509_certificate((keys / "TEST-ONLY-archiver.cert.pem").read_bytes()),
        load_pem_private_key((keys / "TEST-ONLY-archiver-p256.key.pem").read_bytes(), None))
    app = create_app(Settings(data_dir=tmp_path / "data"), signer=signer)
    with TestClient(app) as client:
        admin_token = (tmp_path / "data" / "admin-token").read_text().strip()
        for token, expected in ((admin_token, 200), ("wrong-" + admin_token, 403)):
            before = len(calls)
            response = client.get("/v1/admin/cameras", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == expected
            assert len(calls) > before  # the admin token went through compare_digest
        camera = client.post("/v1/admin/cameras", json={"name": "cam1"},
                             headers={"Authorization": f"Bearer {admin_token}"}).json()
        before = len(calls)
        assert client.put("/ingest/cam1/a.ts", content=b"x" * 10, headers={
            "Authorization": f"Bearer {camera['ingest_token']}"}).status_code == 201
        assert client.put("/ingest/cam1/a.ts", content=b"x", headers={
            "Authorization": "Bearer wrong"}).status_code == 403
        assert len(calls) >= before + 2  # both camera tokens went through compare_digest
        # Every digest compared had the full SHA-256 length: no early exit on a prefix.
        assert all(len(a) == len(b) == 32 for a, b in calls)
    # Login proofs: verify_login_proof is compare_digest over the HMAC (keyservice.crypto).
    from keyservice.crypto import verify_login_proof

    before = len(calls)
    assert not verify_login_proof(b"s" * 32, b"context", b"\0" * 32)
    assert len(calls) == before + 1
