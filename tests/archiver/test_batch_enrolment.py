"""Batch enrolment: many viewer certificates authorized in one request, all or none, with one
audit entry each, against a real Archiver in production mode (HTTPS under a site CA)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from archiver import admin_client
from archiver.admin_cli import add_in_batches
from archiver.admin_client import AdminClient, AdminRefused, viewer_batches
from archiver.audit import verify_audit_log
from keyservice.certs import build_viewer_certificate, certificate_pem
from keyservice.keyscheme import KeyScheme
from keyservice.wire import VIEWER_BATCH_BYTES, VIEWER_BATCH_MAX
from tests.fixtures.server import ArchiverServer

KEY = ec.generate_private_key(ec.SECP256R1())  # the Archiver only ever sees public keys


def _pems(first: int, count: int) -> list[str]:
    """Certificates of distinct viewers (one software key, different names and serials)."""
    now = dt.datetime.now(dt.UTC)
    return [certificate_pem(build_viewer_certificate(
        KEY, f"viewer-{i:04d}", oaep_hash=KeyScheme.ECDH_P256, now=now, days=2,
        serial=1000 + i)).decode() for i in range(first, first + count)]


def _write(directory: Path, pems: list[str]) -> list[Path]:
    directory.mkdir(exist_ok=True)
    paths = []
    for number, pem in enumerate(pems):
        paths.append(directory / f"viewer-{number:04d}.pem")
        paths[-1].write_text(pem)
    return paths


def _audit(server: ArchiverServer) -> list[dict]:
    path = server.data_dir / "audit.jsonl"
    assert verify_audit_log(path) is None
    return [json.loads(line) for line in path.read_text().splitlines()]


def _cli(server: ArchiverServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FUSION_ADMIN_TOKEN", "FUSION_TLS_CA")}
    return subprocess.run(
        [sys.executable, "-m", "archiver", "viewers", "add", *args, "--json", "--archiver",
         server.url, "--tls-ca", str(server.tls_ca), "--data", str(server.data_dir)],
        capture_output=True, text=True, timeout=120, env=env, check=False)


def test_a_batch_is_authorized_at_once_and_each_viewer_joins_the_running_chain(
        https_archiver: ArchiverServer, tmp_path: Path) -> None:
    server = https_archiver
    token = server.add_camera("door")
    server.add_camera("gate")
    assert server.put_segment("door", token, b"\x47" * 188 * 64, "a.ts") == 201
    paths = _write(tmp_path / "certs", _pems(0, 3))
    done = _cli(server, *map(str, paths), "--cameras", "door")
    assert done.returncode == 0, done.stderr
    viewers = json.loads(done.stdout)["viewers"]
    assert [v["subject"] for v in viewers] == [f"CN=viewer-{i:04d}" for i in range(3)]
    assert all(v["cameras"] == ["door"] and not v["reauthorized"] for v in viewers)
    # One audit entry per viewer (the site's propagation reads them), in one chain.
    adds = [e for e in _audit(server) if e["action"] == "viewer.add"]
    assert [e["fingerprint"] for e in adds] == [v["fingerprint"] for v in viewers]
    # They join the door's running chain at its next segment, one join record each; no chain
    # starts for them.
    started = server.metric("fusion_key_chains_started_total")
    assert server.put_segment("door", token, b"\x47" * 188 * 64, "b.ts") == 201
    assert server.metric("fusion_key_chain_joins_total") == 3
    assert server.metric("fusion_key_chains_started_total") == started

    # The same certificates on the same cameras: re-authorized (their epochs renew).
    again = _cli(server, *map(str, paths[:2]), "--cameras", "door")
    assert again.returncode == 0, again.stderr
    assert all(v["reauthorized"] for v in json.loads(again.stdout)["viewers"])
    # Grantees of access grants, on no camera: audited as such (they used to read "all").
    grantees = _cli(server, *map(str, _write(tmp_path / "grantees", _pems(10, 2))),
                    "--cameras", "none")
    assert grantees.returncode == 0, grantees.stderr
    assert [e["cameras"] for e in _audit(server)[-2:]] == [[], []]


def test_a_refused_certificate_refuses_its_whole_batch(
        https_archiver: ArchiverServer, tmp_path: Path) -> None:
    server = https_archiver
    server.add_camera("door")
    server.add_camera("gate")
    first, second, third = _pems(0, 3)
    with AdminClient(server.url, server.admin_token, tls_ca=server.tls_ca) as admin:
        admin.add_viewer(first, ["door"])
        lines = len(_audit(server))
        # The first viewer exists on other cameras: the batch names it and authorizes nobody.
        with pytest.raises(AdminRefused) as refused:
            admin.add_viewers([second, first, third], ["gate"])
        assert (refused.value.code, refused.value.status) == ("viewer_exists", 409)
        assert "Certificate 2 of 3" in str(refused.value)
        assert "Nobody in this batch was authorized" in str(refused.value)
        with pytest.raises(AdminRefused) as refused:
            admin.add_viewers([second, third, second], ["gate"])
        assert "Certificates 1 and 3 of the batch are the same" in str(refused.value)
        with pytest.raises(AdminRefused) as refused:
            admin.add_viewers([second, "not a certificate"], ["gate"])
        assert refused.value.code == "bad_certificate" and "Certificate 2 of 2" in str(
            refused.value)
        assert len(admin.viewers()) == 1
        assert len(_audit(server)) == lines
        # The CLI refuses a certificate given twice before sending anything.
        paths = _write(tmp_path / "certs", [second, third])
        twice = _cli(server, str(paths[0]), str(paths[1]), str(paths[0]), "--cameras", "gate")
        assert twice.returncode != 0 and "are the same certificate" in twice.stderr
        assert "Traceback" not in twice.stderr
        assert len(admin.viewers()) == 1


def test_the_cli_cuts_batches_and_says_what_a_refusal_left_authorized(
        https_archiver: ArchiverServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = https_archiver
    server.add_camera("door")
    server.add_camera("gate")
    pems = _pems(0, 5)
    paths = _write(tmp_path / "certs", pems)
    with AdminClient(server.url, server.admin_token, tls_ca=server.tls_ca) as admin:
        admin.add_viewer(pems[3], ["door"])  # in the second batch, on other cameras
        monkeypatch.setattr(admin_client, "VIEWER_BATCH_MAX", 2)
        with pytest.raises(AdminRefused) as refused:
            add_in_batches(admin, paths, pems, ["gate"], None)
        message = str(refused.value)
        assert f"in the batch of {paths[2]} to {paths[3]}, which authorized nobody" in message
        assert f"2 viewers ({paths[0]} to {paths[1]}) were authorized before it" in message
        assert "the 1 after it were not sent" in message
        names = sorted(v.subject for v in admin.viewers())
    assert names == ["CN=viewer-0000", "CN=viewer-0001", "CN=viewer-0003"]


def test_a_full_batch_fits_the_archivers_body_limit(
        https_archiver: ArchiverServer) -> None:
    """VIEWER_BATCH_MAX certificates with a long camera list, cut by the CLI's rule, are taken
    in one request each (not 413), and the batches together hold every certificate once."""
    server = https_archiver
    cameras = [f"camera-with-a-long-name-{i:03d}" for i in range(40)]
    for camera in cameras:
        server.add_camera(camera)
    pems = _pems(0, VIEWER_BATCH_MAX + 20)
    batches = viewer_batches(pems, cameras)
    assert [pem for batch in batches for pem in batch] == pems
    for batch in batches:
        body = json.dumps({"viewers": [{"certificate": pem, "cameras": cameras,
                                        "key_scheme": None} for pem in batch]})
        assert len(body) <= VIEWER_BATCH_BYTES and len(batch) <= VIEWER_BATCH_MAX
    with AdminClient(server.url, server.admin_token, tls_ca=server.tls_ca,
                     timeout=120) as admin:
        added = [v for batch in batches for v in admin.add_viewers(batch, cameras)]
        assert len({v.fingerprint for v in added}) == len(pems)
        assert len(admin.viewers()) == len(pems)
        # One request past the limits is refused as a whole, by the Archiver too.
        with pytest.raises(AdminRefused) as refused:
            admin.add_viewers(_pems(2000, VIEWER_BATCH_MAX + 1), "all")
        assert refused.value.status == 422
    # A body past VIEWER_BATCH_BYTES is refused before it is read whole.
    too_big = httpx.post(f"{server.url}/v1/admin/viewers/batch", content=b" " * (
        VIEWER_BATCH_BYTES + 1), verify=server.verify, timeout=60, headers={
        "Authorization": f"Bearer {server.admin_token}", "Content-Type": "application/json"})
    assert too_big.status_code == 413, too_big.text
