"""fusion-archiver admin subcommands against a real server: JSON output, exit codes, messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fusion_testkit import forkserver
from tests.fixtures.server import ArchiverServer


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return forkserver.run([sys.executable, "-m", "archiver", *args], capture_output=True,
                          text=True, input=stdin, timeout=60)


def test_admin_commands(archiver_server: ArchiverServer, make_viewer) -> None:
    common = ["--url", archiver_server.url, "--data", str(archiver_server.data_dir)]
    added = run("cameras", "add", "lobby", *common, "--json")
    assert added.returncode == 0, added.stderr
    camera = json.loads(added.stdout)
    assert camera["name"] == "lobby" and camera["ingest_url"].endswith("/ingest/lobby/index.m3u8")
    assert len(camera["ingest_token"]) >= 32
    assert archiver_server.put_segment("lobby", camera["ingest_token"], b"v" * 10) == 201

    duplicate = run("cameras", "add", "lobby", *common)
    assert duplicate.returncode == 41 and "exists already" in duplicate.stderr
    assert "Traceback" not in duplicate.stderr

    viewer = make_viewer("ivan")
    client = run("viewers", "add", str(viewer.pem), "--cameras", "lobby", *common, "--json")
    assert client.returncode == 0, client.stderr
    fp = json.loads(client.stdout)["fingerprint"]
    assert len(fp) == 64

    listed = json.loads(run("viewers", "list", *common, "--json").stdout)
    assert [c["fingerprint"] for c in listed["viewers"]] == [fp]
    # The old names still work for one release: the hidden `clients` command, /v1/admin/clients.
    assert json.loads(run("clients", "list", *common, "--json").stdout) == listed
    assert "clients" not in run("--help").stdout
    assert [c["fingerprint"] for c in archiver_server.admin("GET", "/v1/admin/clients",
                                                            expect=200)] == [fp]
    nobody = archiver_server.admin("POST", f"/v1/admin/viewers/{'0' * 64}/revoke",
                                   {"delete_key_streams": False}, expect=404)
    assert nobody["error"] == "unknown_viewer"
    assert json.loads(run("cameras", "list", *common, "--json").stdout)["cameras"][0][
        "segments"] == 1

    refused = run("viewers", "revoke", fp, "--delete-key-streams", *common)
    assert refused.returncode == 2 and "irreversible" in refused.stderr
    revoked = run("viewers", "revoke", fp, "--delete-key-streams", "--yes", *common, "--json")
    assert json.loads(revoked.stdout) == {"fingerprint": fp, "revoked": True,
                                          "key_streams_deleted": True}

    unknown = run("viewers", "add", str(viewer.pem), "--cameras", "nosuch", *common)
    assert unknown.returncode == 41 and "nosuch" in unknown.stderr
    missing = run("viewers", "add", "/nonexistent.pem", "--cameras", "lobby", *common)
    assert missing.returncode == 2 and "Cannot read" in missing.stderr
    removed = run("cameras", "remove", "lobby", *common, "--json")
    assert json.loads(removed.stdout)["removed"] is True
    assert archiver_server.put_segment("lobby", camera["ingest_token"], b"v" * 10) == 403


def test_errors_without_tracebacks(tmp_path: Path, archiver_server: ArchiverServer) -> None:
    unreachable = run("cameras", "list", "--url", "http://127.0.0.1:9", "--admin-token", "x")
    assert unreachable.returncode == 40 and "Cannot reach" in unreachable.stderr
    wrong = run("cameras", "list", "--url", archiver_server.url, "--admin-token", "wrong")
    assert wrong.returncode == 41 and "not the admin token" in wrong.stderr
    no_token = run("cameras", "list", "--url", archiver_server.url)
    assert no_token.returncode == 2 and "admin token" in no_token.stderr
    insecure = run("serve", "--data", str(tmp_path / "d"), "--host", "0.0.0.0")
    assert insecure.returncode == 2 and "without TLS" in insecure.stderr
    for result in (unreachable, wrong, no_token, insecure):
        assert "Traceback" not in result.stderr
