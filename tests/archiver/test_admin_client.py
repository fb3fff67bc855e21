"""The Python admin client (archiver/admin_client.py) against a real Archiver in production
mode (HTTPS under a site CA): typed results for cameras, retention, storage, viewers, holds and
grants, and refusals that keep the wire error code and the HTTP status (issue 24, item 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from archiver.admin_client import (
    AdminClient,
    AdminRefused,
    CameraCreated,
    CameraInfo,
    HoldInfo,
    StorageInfo,
    ViewerInfo,
)
from fusion_testkit.server import free_port
from keyservice.errors import ArchiverUnreachable, RequestRefused
from tests.archiver.conftest import Viewer
from tests.fixtures.server import ArchiverServer


def test_the_admin_client_against_a_real_archiver(
        https_archiver: ArchiverServer, make_viewer: Callable[[str], Viewer]) -> None:
    server = https_archiver
    with AdminClient(server.url, server.admin_token, tls_ca=server.tls_ca) as admin:
        created = admin.add_camera("door")
        # A key enrolled on SoftHSM between two HTTPS requests of one process: SoftHSM's
        # initialisation used to leave an OpenSSL error behind that failed the next TLS
        # handshake (NO_SUCH_ENGINE); keyservice.token clears it.
        bob_pem = make_viewer("bob").pem.read_text()
        assert isinstance(created, CameraCreated) and created.ingest_token
        assert created.ingest_url is not None and created.ingest_url.endswith(
            "/ingest/door/index.m3u8")
        [camera] = admin.cameras()
        assert isinstance(camera, CameraInfo) and (camera.name, camera.segments) == ("door", 0)
        assert admin.set_retention("door", 5).retention_days == 5
        assert admin.set_retention("door", None).retention_default
        assert isinstance(admin.storage(), StorageInfo)

        hold = admin.add_hold("door", 1_000, 2_000, "case 12")
        assert isinstance(hold, HoldInfo) and hold.created_by == "admin"
        assert admin.holds("door") == [hold] and admin.holds("gate") == []
        assert admin.remove_hold(hold.hold_id) == hold
        with pytest.raises(AdminRefused) as refused:
            admin.remove_hold(hold.hold_id)
        assert (refused.value.code, refused.value.status) == ("unknown_hold", 404)
        with pytest.raises(AdminRefused) as refused:
            admin.add_hold("door", 2_000, 1_000, "backwards")
        assert (refused.value.code, refused.value.status) == ("bad_range", 422)

        bob = admin.add_viewer(bob_pem, ["door"])
        assert isinstance(bob, ViewerInfo) and bob.cameras == ["door"] and not bob.reauthorized
        change = admin.change_viewer_cameras(bob.fingerprint, set_to="all")
        assert (change.before, change.cameras, change.added) == (["door"], "all", ["all"])
        assert [v.fingerprint for v in admin.viewers()] == [bob.fingerprint]
        revoked = admin.revoke_viewer(bob.fingerprint)
        assert revoked.revoked and not revoked.key_streams_deleted
        assert admin.viewers()[0].revoked_ms is not None

        assert admin.grants() == [] and admin.grants("pending") == []
        with pytest.raises(AdminRefused) as refused:
            admin.approve_grant("ab" * 16)
        assert (refused.value.code, refused.value.status) == ("unknown_grant", 404)
        assert "There is no grant" in str(refused.value)
        admin.remove_camera("door")
        assert admin.cameras() == []

    # A wrong credential: refused with its code and status, and still a RequestRefused (the
    # CLIs' exit code for a refusal).
    with AdminClient(server.url, "not-the-token", tls_ca=server.tls_ca) as intruder:
        with pytest.raises(AdminRefused) as refused:
            intruder.cameras()
    assert (refused.value.code, refused.value.status) == ("forbidden", 403)
    assert isinstance(refused.value, RequestRefused)
    audit = [json.loads(line) for line in (server.data_dir / "audit.jsonl").read_text().splitlines()]
    actions = [e["action"] for e in audit if e["actor"] == "admin"]
    assert actions == ["camera.add", "camera.retention", "camera.retention", "hold.add",
                       "hold.remove", "viewer.add", "viewer.cameras", "viewer.revoke",
                       "camera.remove"]


def test_an_unreachable_archiver_is_said_so() -> None:
    with AdminClient(f"http://127.0.0.1:{free_port()}", "token") as admin:
        with pytest.raises(ArchiverUnreachable):
            admin.cameras()


def test_the_cli_authorizes_a_grantee_on_no_camera(
        https_archiver: ArchiverServer, make_viewer: Callable[[str], Viewer]) -> None:
    # What the refusal of an unknown grantee tells the admin to run (it used to name the old
    # 'clients add', and '--cameras ""' was refused by the CLI itself).
    pem = make_viewer("investigator").pem
    env = {k: v for k, v in os.environ.items() if k not in ("FUSION_ADMIN_TOKEN", "FUSION_TLS_CA")}
    done = subprocess.run(
        [sys.executable, "-m", "archiver", "viewers", "add", str(pem), "--cameras", "none",
         "--json", "--archiver", https_archiver.url, "--tls-ca", str(https_archiver.tls_ca),
         "--data", str(https_archiver.data_dir)],
        capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["cameras"] == []
    with AdminClient(https_archiver.url, https_archiver.admin_token,
                     tls_ca=https_archiver.tls_ca) as admin:
        [viewer] = admin.viewers()
    assert viewer.cameras == [] and viewer.revoked_ms is None
