"""The two-person rule of access grants with admins who are people (issue 20, item 5): the
grantor cannot approve their own grant as admin, another admin can, and the audit log tells the
two people apart.

Real parts: SoftHSM tokens, an Archiver in production mode (HTTPS under a site CA), the real
fusion-client and fusion-archiver commands.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable

from fusion_testkit import forkserver
from fusion_testkit.client_cli import Client, Viewer, chunk, iso, now_ms, put
from keyservice.certs import load_certificate
from keyservice.identity import fingerprint
from tests.fixtures.server import ArchiverServer

EXIT_REFUSED = 41


def archiver_cli(server: ArchiverServer, *args: str, token: str | None = None
                 ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FUSION_ADMIN_TOKEN", "FUSION_PIN")}
    auth = ["--admin-token", token] if token else ["--data", str(server.data_dir)]
    return forkserver.run([sys.executable, "-m", "archiver", *args, "--url", server.url,
                           "--tls-ca", str(server.tls_ca), *auth], capture_output=True,
                          text=True, timeout=120, env=env)


def admin_session(server: ArchiverServer, person: Viewer) -> str:
    added = archiver_cli(server, "admins", "add", str(person.pem), "--name", person.name)
    assert added.returncode == 0, added.stderr
    env = {k: v for k, v in os.environ.items() if k != "FUSION_PIN"}
    login = forkserver.run([sys.executable, "-m", "archiver", "admins", "login", "--token",
                            person.uri, "--url", server.url, "--tls-ca", str(server.tls_ca)],
                           capture_output=True, text=True, timeout=120, env=env)
    assert login.returncode == 0, login.stderr
    return login.stdout.strip()


def fp(person: Viewer) -> str:
    return fingerprint(load_certificate(person.pem.read_bytes())).hex()


def test_the_grantor_cannot_approve_their_own_grant(
        https_archiver: ArchiverServer, client: Client,
        make_viewer: Callable[[str], Viewer]) -> None:
    server = https_archiver
    # alice watches cam1 and is an admin with the same certificate; bob is another admin.
    alice, investigator, bob = make_viewer("alice"), make_viewer("investigator"), make_viewer("bob")
    ingest = server.add_camera("cam1")
    server.add_viewer(alice.pem, ["cam1"])
    server.add_viewer(investigator.pem, [])
    alice_admin, bob_admin = admin_session(server, alice), admin_session(server, bob)

    t0 = now_ms()
    put(server, "cam1", ingest, *(chunk(f"seg{i}") for i in range(3)))
    t1 = now_ms() + 1
    made = client("grant", "--archiver", server.url, "--tls-ca", str(server.tls_ca), "--token",
                  alice.uri, "--camera", "cam1", "--from", iso(t0), "--to", iso(t1),
                  "--to-cert", str(investigator.pem), "--note", "case 4711")
    assert made.code == 0, made.stderr
    found = re.search(rb"grant ([0-9a-f]{32}): pending", made.stdout)
    assert found, made.stdout
    grant_id = found[1].decode()

    own = archiver_cli(server, "grants", "approve", grant_id, token=alice_admin)
    assert own.returncode == EXIT_REFUSED, own.stderr
    assert "another admin must approve it" in own.stderr and "Traceback" not in own.stderr
    listed = archiver_cli(server, "grants", "list", "--json", token=bob_admin)
    assert [g["state"] for g in json.loads(listed.stdout)["grants"]] == ["pending"]

    other = archiver_cli(server, "grants", "approve", grant_id, token=bob_admin)
    assert other.returncode == 0, other.stderr

    entries = [json.loads(line) for line in
               (server.data_dir / "audit.jsonl").read_text().splitlines()]
    created = next(e for e in entries if e["action"] == "grant.create")
    [approved] = [e for e in entries if e["action"] == "grant.approve"]
    # Two people, told apart: the grantor's certificate made it, bob's approved it.
    assert created["actor"] == fp(alice) == approved["grantor"]
    assert approved["actor"] == f"bob ({fp(bob)[:16]})"
    assert approved["admin_fingerprint"] == fp(bob) != approved["grantor"]
