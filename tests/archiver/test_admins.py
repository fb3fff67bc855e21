"""Admins are people (issue 20, item 5): each admin logs in on their own token (proof of
possession, as viewers do) and the audit log names the person; unknown, impostor and revoked
admins are refused; the bootstrap admin token still works. Also the Archiver's certificate and
fingerprint for a first day (item 6): `fusion-archiver certificate` and the line `serve` logs.

Real parts: SoftHSM tokens, an Archiver in production mode (HTTPS under a site CA), the real
fusion-archiver command in subprocesses.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fusion_testkit import forkserver
from keyservice.crypto import (
    admin_login_context,
    answer_login_challenge,
    login_context,
)
from keyservice.errors import ArchiverMismatch, KeyServiceError
from keyservice.identity import OaepHash, fingerprint
from keyservice.token import Token
from tests.fixtures.server import ArchiverServer
from tests.fixtures.tokens import TokenHandle, enroll_viewer

EXIT_REFUSED = 41


@dataclass
class Person:
    name: str
    token: TokenHandle
    uri: str  # the identity's PKCS#11 URI (with its PIN, as a test may)
    pem: Path

    @property
    def fingerprint(self) -> str:
        from keyservice.certs import load_certificate
        return fingerprint(load_certificate(self.pem.read_bytes())).hex()


@pytest.fixture
def make_person(softhsm_token_factory: Callable[[], TokenHandle]) -> Callable[[str], Person]:
    def make(name: str) -> Person:
        token = softhsm_token_factory()
        pem = enroll_viewer(token, name)
        return Person(name, token, token.object_uri(name), pem)
    return make


def cli(server: ArchiverServer, *args: str, token: str | None = None,
        bootstrap: bool = False) -> subprocess.CompletedProcess[str]:
    """fusion-archiver against ``server`` (HTTPS: verified with --tls-ca), authenticated with an
    admin session ``token`` or the bootstrap token (--data)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("FUSION_ADMIN_TOKEN", "FUSION_PIN", "FUSION_TLS_CA")}
    auth = (["--admin-token", token] if token else []) + (
        ["--data", str(server.data_dir)] if bootstrap else [])
    return forkserver.run([sys.executable, "-m", "archiver", *args, "--url", server.url,
                           "--tls-ca", str(server.tls_ca), *auth], capture_output=True,
                          text=True, timeout=120, env=env)


def login(server: ArchiverServer, person: Person) -> subprocess.CompletedProcess[str]:
    return cli(server, "admins", "login", "--token", person.uri)


def audit(server: ArchiverServer) -> list[dict]:
    return [json.loads(line) for line in (server.data_dir / "audit.jsonl").read_text().splitlines()]


def add_admin(server: ArchiverServer, person: Person) -> None:
    added = cli(server, "admins", "add", str(person.pem), "--name", person.name, bootstrap=True)
    assert added.returncode == 0, added.stderr


def test_an_admin_on_their_own_token_is_named_in_the_audit_log(
        https_archiver: ArchiverServer, make_person: Callable[[str], Person]) -> None:
    alice, viewer = make_person("alice"), make_person("vera")
    add_admin(https_archiver, alice)
    session = login(https_archiver, alice)
    assert session.returncode == 0, session.stderr
    token = session.stdout.strip()
    assert "admin session for alice" in session.stderr

    camera = cli(https_archiver, "cameras", "add", "door", token=token)
    assert camera.returncode == 0, camera.stderr
    added = cli(https_archiver, "viewers", "add", str(viewer.pem), "--cameras", "door",
                token=token)
    assert added.returncode == 0, added.stderr

    actor = f"alice ({alice.fingerprint[:16]})"
    by_action = {e["action"]: e for e in audit(https_archiver)}
    assert by_action["admin.add"]["actor"] == "admin"  # the bootstrap token added alice
    assert by_action["admin.add"]["fingerprint"] == alice.fingerprint
    assert by_action["admin.session.open"]["actor"] == actor
    assert by_action["admin.session.open"]["fingerprint"] == alice.fingerprint
    assert by_action["camera.add"]["actor"] == actor
    assert by_action["viewer.add"]["actor"] == actor
    assert by_action["viewer.add"]["fingerprint"] == viewer.fingerprint

    listed = cli(https_archiver, "admins", "list", "--json", token=token)
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)["admins"]
    assert (row["name"], row["fingerprint"], row["actor"]) == ("alice", alice.fingerprint, actor)


def test_the_bootstrap_token_still_works_and_is_audited_as_admin(
        https_archiver: ArchiverServer) -> None:
    added = cli(https_archiver, "cameras", "add", "yard", bootstrap=True)
    assert added.returncode == 0, added.stderr
    assert [e["actor"] for e in audit(https_archiver) if e["action"] == "camera.add"] == ["admin"]


def test_unknown_and_impostor_admins_are_refused(
        https_archiver: ArchiverServer, make_person: Callable[[str], Person]) -> None:
    alice, mallory = make_person("alice"), make_person("mallory")
    add_admin(https_archiver, alice)

    # A token whose certificate is no admin's: refused before any challenge.
    unknown = login(https_archiver, mallory)
    assert unknown.returncode == EXIT_REFUSED, unknown.stderr
    assert "not an admin's" in unknown.stderr and "Traceback" not in unknown.stderr

    url, verify = https_archiver.url, https_archiver.verify
    with httpx.Client(base_url=url, verify=verify, timeout=60) as http:
        # Alice's certificate is public: mallory posts it, but only alice's token can answer.
        challenge = http.post("/v1/sessions/admin/challenge",
                              json={"certificate": alice.pem.read_text()}).json()
        with Token.open(mallory.token.uri) as token:
            identity = token.identity("mallory")
            ciphertext = base64.b64decode(challenge["ciphertext"])
            with pytest.raises(KeyServiceError):  # not mallory's key: the token cannot answer
                answer_login_challenge(identity, ciphertext, OaepHash.SHA256, b"x")
        guessed = http.post("/v1/sessions/admin", json={
            "challenge_id": challenge["challenge_id"],
            "proof": base64.b64encode(os.urandom(32)).decode()})
        assert guessed.status_code == 401, guessed.text

        # Alice's own token, but a *viewer's* login proof (another context): no admin session,
        # so a viewer login can never be turned into an admin one.
        challenge = http.post("/v1/sessions/admin/challenge",
                              json={"certificate": alice.pem.read_text()}).json()
        archiver_fp = bytes.fromhex(http.get("/v1/archiver").json()["fingerprint"])
        challenge_id = bytes.fromhex(challenge["challenge_id"])
        with Token.open(alice.token.uri) as token:
            identity = token.identity("alice")
            viewer_proof = answer_login_challenge(
                identity, base64.b64decode(challenge["ciphertext"]),
                OaepHash.from_label(challenge["oaep_hash"]),
                login_context(archiver_fp, bytes.fromhex(alice.fingerprint), challenge_id))
        refused = http.post("/v1/sessions/admin", json={
            "challenge_id": challenge["challenge_id"],
            "proof": base64.b64encode(viewer_proof).decode()})
        assert refused.status_code == 401, refused.text

        # The same token with the admin context: accepted (the test's control).
        challenge = http.post("/v1/sessions/admin/challenge",
                              json={"certificate": alice.pem.read_text()}).json()
        challenge_id = bytes.fromhex(challenge["challenge_id"])
        with Token.open(alice.token.uri) as token:
            proof = answer_login_challenge(
                token.identity("alice"), base64.b64decode(challenge["ciphertext"]),
                OaepHash.from_label(challenge["oaep_hash"]),
                admin_login_context(archiver_fp, bytes.fromhex(alice.fingerprint), challenge_id))
        opened = http.post("/v1/sessions/admin", json={
            "challenge_id": challenge["challenge_id"], "proof": base64.b64encode(proof).decode()})
        assert opened.status_code == 201, opened.text

    # Neither a guessed bearer nor a wrong --archiver-fingerprint gets anything.
    forged = cli(https_archiver, "cameras", "list", token="x" * 43)
    assert forged.returncode == EXIT_REFUSED and "not the admin token" in forged.stderr
    pinned = cli(https_archiver, "admins", "login", "--token", alice.uri,
                 "--archiver-fingerprint", "ab" * 32)
    assert pinned.returncode == ArchiverMismatch.exit_code, pinned.stderr
    assert "not the one given" in pinned.stderr
    assert "Traceback" not in pinned.stderr


def test_a_revoked_admin_is_refused_at_once(
        https_archiver: ArchiverServer, make_person: Callable[[str], Person]) -> None:
    alice, bob = make_person("alice"), make_person("bob")
    add_admin(https_archiver, alice)
    add_admin(https_archiver, bob)
    alice_token = login(https_archiver, alice).stdout.strip()
    bob_token = login(https_archiver, bob).stdout.strip()
    assert cli(https_archiver, "cameras", "list", token=alice_token).returncode == 0

    revoked = cli(https_archiver, "admins", "revoke", "alice", token=bob_token)
    assert revoked.returncode == 0, revoked.stderr
    # Her open session: ended with the revocation, refused at its next request.
    after = cli(https_archiver, "cameras", "list", token=alice_token)
    assert after.returncode == EXIT_REFUSED and \
        "not the admin token, nor a valid admin session" in after.stderr, after.stderr
    again = login(https_archiver, alice)
    assert again.returncode == EXIT_REFUSED and "revoked" in again.stderr, again.stderr
    # Her name stays hers: the audit log names her.
    reuse = cli(https_archiver, "admins", "add", str(make_person("alice").pem), "--name",
                "alice", bootstrap=True)
    assert reuse.returncode == EXIT_REFUSED and "reserved" in reuse.stderr, reuse.stderr
    entry = next(e for e in audit(https_archiver) if e["action"] == "admin.revoke")
    assert entry["actor"] == f"bob ({bob.fingerprint[:16]})"
    assert entry["name"] == "alice" and entry["fingerprint"] == alice.fingerprint


def test_admin_add_refuses_a_private_key_file_and_a_bad_name(
        https_archiver: ArchiverServer, make_person: Callable[[str], Person],
        tmp_path: Path) -> None:
    alice = make_person("alice")
    key_file = tmp_path / "key.pem"
    key_file.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    refused = cli(https_archiver, "admins", "add", str(key_file), "--name", "alice",
                  bootstrap=True)
    assert refused.returncode == 2 and "private key" in refused.stderr, refused.stderr
    bad = cli(https_archiver, "admins", "add", str(alice.pem), "--name", "admin", bootstrap=True)
    assert bad.returncode == EXIT_REFUSED and "not an admin name" in bad.stderr, bad.stderr


def test_certificate_command_and_serve_print_the_archiver_fingerprint(
        https_archiver: ArchiverServer) -> None:
    served = httpx.get(https_archiver.url + "/v1/archiver", verify=https_archiver.verify).json()
    online = cli(https_archiver, "certificate", "--json")
    assert online.returncode == 0, online.stderr
    assert json.loads(online.stdout)["fingerprint"] == served["fingerprint"]
    human = cli(https_archiver, "certificate")
    assert human.stdout.startswith("-----BEGIN CERTIFICATE-----")
    assert f"sha256 fingerprint: {served['fingerprint']}" in human.stdout
    # The line an admin reads at start, to hand out.
    assert served["fingerprint"] in https_archiver.log()

    https_archiver.stop()
    offline = forkserver.run([sys.executable, "-m", "archiver", "certificate", "--data",
                              str(https_archiver.data_dir), "--json"], capture_output=True,
                             text=True, timeout=60)
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["fingerprint"] == served["fingerprint"]
    neither = forkserver.run([sys.executable, "-m", "archiver", "certificate"],
                             capture_output=True, text=True, timeout=60)
    assert neither.returncode == 2 and "either --data" in neither.stderr


def test_a_site_turns_the_bootstrap_token_off_once_admins_are_people(
        https_archiver: ArchiverServer, make_person: Callable[[str], Person],
        tmp_path: Path) -> None:
    # Without any admin, turning it off would lock everybody out: refused before anything starts.
    empty = forkserver.run([sys.executable, "-m", "archiver", "serve", "--data",
                            str(tmp_path / "fresh"), "--no-bootstrap-token"],
                           capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "needs at least one admin" in empty.stderr, empty.stderr

    alice = make_person("alice")
    add_admin(https_archiver, alice)
    https_archiver.stop()
    server = ArchiverServer(https_archiver.data_dir, tls_ca=https_archiver.tls_ca,
                            extra_args=(*https_archiver.extra_args, "--no-bootstrap-token"))
    with server:
        refused = cli(server, "cameras", "add", "door", bootstrap=True)
        assert refused.returncode == EXIT_REFUSED and "turned off" in refused.stderr, \
            refused.stderr
        bootstrap = (server.data_dir / "admin-token").read_text().strip()
        metrics = (server.data_dir / "metrics-token").read_text().strip()
        for token, status in ((bootstrap, 403), (metrics, 200)):
            scraped = httpx.get(server.url + "/metrics", verify=server.verify,
                                headers={"Authorization": f"Bearer {token}"})
            assert scraped.status_code == status, scraped.text
        session = login(server, alice)
        assert session.returncode == 0, session.stderr
        added = cli(server, "cameras", "add", "door", token=session.stdout.strip())
        assert added.returncode == 0, added.stderr
    assert [e["actor"] for e in audit(server) if e["action"] == "camera.add"] == [
        f"alice ({alice.fingerprint[:16]})"]
