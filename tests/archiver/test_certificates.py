"""Viewer certificates over time (issue 12, findings 5 and 7): expiry is checked at every
login, every request and every key wrap, not only when the admin authorizes; admins see
expiries coming; a certificate subject cannot drive the admin's terminal."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa

from fusion_testkit import forkserver
from keyservice.certs import build_viewer_certificate, certificate_pem
from keyservice.format import CHAIN_ID_LEN
from keyservice.identity import OaepHash, fingerprint
from keyservice.token import Token
from tests.fixtures.server import ArchiverServer
from tests.fixtures.tokens import TokenHandle
from tests.fixtures.viewer import login

VALID_FOR_S = 15  # the test viewer's certificate expires this long after it is made


def _archiver(*args: str) -> subprocess.CompletedProcess[str]:
    return forkserver.run([sys.executable, "-m", "archiver", *args], capture_output=True,
                          text=True, timeout=60)


def _key_ids(server: ArchiverServer, fp: str | None = None) -> set[bytes]:
    """The key chains of the archived segments (a segment's key id starts with its chain id),
    or those a viewer holds a chain record of."""
    with sqlite3.connect(server.data_dir / "archiver.sqlite3") as conn:
        if fp is None:
            rows = conn.execute("SELECT substr(key_id, 1, ?) FROM segments",
                                (CHAIN_ID_LEN,)).fetchall()
        else:
            rows = conn.execute("SELECT chain_id FROM chain_records WHERE fingerprint=?",
                                (fp,)).fetchall()
    return {row[0] for row in rows}


def test_an_expired_viewer_is_refused_everywhere_and_audited(
        archiver_server: ArchiverServer, softhsm_token_factory: Callable[[], TokenHandle],
        make_viewer) -> None:
    server = archiver_server
    token = softhsm_token_factory()
    # A real token identity whose certificate runs out VALID_FOR_S from now.
    made = dt.datetime.now(dt.UTC) - dt.timedelta(days=1, seconds=-VALID_FOR_S)
    with Token.open(token.uri) as opened:
        enrolled = opened.enroll("eve", bits=2048, days=1, now=made)
    cert = enrolled.certificate
    assert cert is not None
    pem = token.workdir / "eve.pem"
    pem.write_bytes(certificate_pem(cert))
    identity = Token.open(token.uri).identity("eve")
    other = make_viewer("olga")  # valid for a year

    ingest = server.add_camera("cam1")
    fp = server.add_viewer(pem, ["cam1"])
    server.add_viewer(other.pem, ["cam1"])
    listed = _archiver("viewers", "list", "--url", server.url, "--data", str(server.data_dir))
    assert "EXPIRES IN 0 DAYS" in listed.stdout and "expiring within 30 days" in listed.stdout
    session = login(server.url, identity)
    assert server.put_segment("cam1", ingest, b"a" * 100) == 201
    assert _key_ids(server) <= _key_ids(server, fp)  # while valid, it gets every key

    time.sleep(max(0.0, cert.not_valid_after_utc.timestamp() - time.time()) + 1.5)

    # Login: refused with a clear sentence, before any challenge is encrypted to it.
    pem_text = pem.read_text()
    refused = httpx.post(f"{server.url}/v1/sessions/challenge", json={"certificate": pem_text})
    assert (refused.status_code, refused.json()["error"]) == (403, "certificate_expired")
    assert "expired on" in refused.json()["message"]
    assert "enrol a new identity" in refused.json()["message"]
    # A session opened before the expiry ends with it.
    headers = {"Authorization": f"Bearer {session}"}
    for path in ("/v1/cameras", "/v1/cameras/cam1/recording?from_ms=0&to_ms=99999999999999"):
        answer = httpx.get(f"{server.url}{path}", headers=headers)
        assert (answer.status_code, answer.json()["error"]) == (403, "certificate_expired")

    # Key wrap: the next key periods' keys are wrapped for the valid viewer only.
    time.sleep(server.key_period_s + 0.2)
    assert server.put_segment("cam1", ingest, b"b" * 100) == 201
    new_keys = _key_ids(server) - _key_ids(server, fp)
    assert new_keys, "the expired viewer still got the new key"
    assert new_keys <= _key_ids(server, fingerprint(other.identity.certificate).hex())

    # The audit log says so: the refused login and the end of its key material.
    entries = [json.loads(line) for line in
               (server.data_dir / "audit.jsonl").read_text().splitlines()]
    assert any(e["action"] == "access.refused" and e.get("error") == "certificate_expired"
               and e.get("fingerprint") == fp for e in entries)
    assert any(e["action"] == "viewer.expired" and e["fingerprint"] == fp for e in entries)
    listed = _archiver("viewers", "list", "--url", server.url, "--data", str(server.data_dir))
    assert listed.returncode == 0, listed.stderr
    assert f"{fp}" in listed.stdout and "EXPIRED" in listed.stdout


# A subject that would clear the admin's screen, retitle its terminal and fake a new line.
EVIL_NAME = "mallory\x1b[2J\x1b]0;owned\x07\u2028\r\nfake line\u202e"


def _clean(text: str) -> bool:
    return not any(ch in text for ch in "\x1b\x07\u2028\r\u202e")


def test_certificate_subjects_cannot_drive_the_admin_terminal(archiver_server: ArchiverServer,
                                                              tmp_path: Path) -> None:
    key = rsa.generate_private_key(65537, 2048)
    cert = build_viewer_certificate(key, EVIL_NAME, oaep_hash=OaepHash.SHA256,
                                    now=dt.datetime.now(dt.UTC))
    pem = tmp_path / "mallory.pem"
    pem.write_bytes(certificate_pem(cert))
    common = ["--url", archiver_server.url, "--data", str(archiver_server.data_dir)]
    added = _archiver("viewers", "add", str(pem), "--cameras", "all", *common)
    assert added.returncode == 0, added.stderr
    listed = _archiver("viewers", "list", *common)
    assert listed.returncode == 0, listed.stderr
    for output in (added.stdout, listed.stdout):
        assert _clean(output), repr(output)
        assert "mallory\\x1b[2J\\x1b]0\\;owned\\x07\\u2028\\x0d\\x0afake line\\u202e" in output
    # One line per viewer: the subject's line break did not make a second one.
    assert len(listed.stdout.strip().splitlines()) == 1
    # --json is for scripts: exact, and escaped by JSON itself.
    as_json = _archiver("viewers", "list", *common, "--json")
    assert _clean(as_json.stdout)
    assert json.loads(as_json.stdout)["viewers"][0]["subject"] == cert.subject.rfc4514_string()
    # An error message quoting hostile text is escaped too.
    refused = _archiver("cameras", "remove", "no\x1b[2Jpe", *common)
    assert refused.returncode != 0 and _clean(refused.stderr), repr(refused.stderr)
