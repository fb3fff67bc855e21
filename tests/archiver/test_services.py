"""The Archiver's services called from Python, without HTTP and without app.state (issue 24,
item 4): ``create_services(settings)`` on a real SQLite data directory with a real SoftHSM
signing token, viewers enrolled on their own SoftHSM tokens. Each refusal is a ``Refused``
carrying its wire ``ErrorCode``, and archiver/deps.py maps every code a service raises to an
HTTP status."""

from __future__ import annotations

import ast
import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from archiver.admins import AdminPrincipal
from archiver.deps import HTTP_STATUS
from archiver.grants import AccessGrantRow, GrantState
from archiver.services import Refused
from archiver.services.container import ArchiverServices, create_services
from archiver.settings import Settings
from keyservice.crypto import answer_login_challenge, login_context
from keyservice.identity import OaepHash, fingerprint
from keyservice.wire import ErrorCode
from tests.archiver.conftest import Viewer
from tests.fixtures.tokens import TokenHandle

ARCHIVER = Path(__file__).resolve().parents[2] / "archiver"


@pytest.fixture
def services(tmp_path: Path, softhsm_token: TokenHandle) -> Iterator[ArchiverServices]:
    settings = Settings(data_dir=tmp_path / "archiver", signer_token_uri=softhsm_token.uri,
                        key_period_s=2)
    with create_services(settings) as opened:
        yield opened


def _audit(services: ArchiverServices) -> list[dict]:
    path = services.settings.audit_log_path
    return [json.loads(line) for line in path.read_text().splitlines()]


def _refused(code: ErrorCode, call: Callable[[], object]) -> Refused:
    with pytest.raises(Refused) as caught:
        call()
    assert caught.value.code == code, caught.value.message
    return caught.value


def test_holds_and_retention_from_python(services: ArchiverServices) -> None:
    services.admin.add_camera("alice", "door")
    retention = services.retention
    _refused(ErrorCode.UNKNOWN_CAMERA, lambda: retention.set_retention("alice", "gate", 3))
    retention.set_retention("alice", "door", 3)
    status = services.cameras.status("door")
    assert (status.retention_days, status.retention_default) == (3, False)
    _refused(ErrorCode.BAD_RANGE, lambda: retention.add_hold("alice", "door", 10, 5, "case"))
    _refused(ErrorCode.UNKNOWN_CAMERA, lambda: retention.add_hold("alice", "gate", 1, 5, "x"))
    hold = retention.add_hold("alice", "door", 1_000, 5_000, "case 12")
    assert retention.holds("door") == [hold] and services.cameras.status("door").holds == 1
    assert retention.remove_hold("alice", hold.hold_id) == hold
    _refused(ErrorCode.UNKNOWN_HOLD, lambda: retention.remove_hold("alice", hold.hold_id))
    assert retention.storage().retention_days == services.settings.retention_days
    actions = [(e["actor"], e["action"]) for e in _audit(services)]
    assert [a for a in actions if a[1] in ("camera.retention", "hold.add", "hold.remove")] == [
        ("alice", "camera.retention"), ("alice", "hold.add"), ("alice", "hold.remove")]


def test_a_viewer_logs_in_through_the_login_service(
        services: ArchiverServices, make_viewer: Callable[[str], Viewer]) -> None:
    services.admin.add_camera("admin", "door")
    bob = make_viewer("bob")
    pem = bob.pem.read_text()
    logins = services.logins
    _refused(ErrorCode.NOT_ENROLLED, lambda: logins.viewer_challenge(pem))
    _refused(ErrorCode.BAD_CERTIFICATE, lambda: logins.viewer_challenge("not a certificate"))
    # Named cameras must exist (a viewer of all cameras needs no lookup of them).
    unknown = _refused(ErrorCode.UNKNOWN_CAMERA, lambda: services.admin.authorize_viewer(
        "admin", pem.encode(), ["door", "gate"]))
    assert unknown.message == "Unknown camera(s): gate."
    _refused(ErrorCode.NOT_ENROLLED, lambda: logins.viewer_challenge(pem))
    row = services.admin.authorize_viewer("admin", pem.encode(), ["door"])
    issued = logins.viewer_challenge(pem)
    # A wrong proof is refused, and the challenge is gone (taken once, right or wrong).
    _refused(ErrorCode.PROOF_REFUSED, lambda: logins.open_viewer_session(
        issued.challenge_id, base64.b64encode(b"\0" * 32).decode()))
    issued = logins.viewer_challenge(pem)
    archiver_fp = fingerprint(services.archive.signer.certificate)
    proof = answer_login_challenge(
        bob.identity, base64.b64decode(issued.ciphertext), OaepHash.from_label(issued.oaep_hash),
        login_context(archiver_fp, bytes.fromhex(row.fingerprint),
                      bytes.fromhex(issued.challenge_id)))
    session = logins.open_viewer_session(issued.challenge_id, base64.b64encode(proof).decode())
    assert session.fingerprint == row.fingerprint
    assert logins.viewer_of(session.session_token).fingerprint == row.fingerprint
    assert [c.name for c in services.cameras.of_viewer(row)] == ["door"]
    _refused(ErrorCode.NOT_AUTHORIZED, lambda: services.cameras.authorize(row, "gate"))
    # Revoked: its session is worth nothing from now on.
    services.admin.revoke_viewer("admin", row.fingerprint)
    _refused(ErrorCode.SESSION_INVALID, lambda: logins.viewer_of(session.session_token))
    _refused(ErrorCode.REVOKED, lambda: logins.viewer_challenge(pem))
    actions = [e["action"] for e in _audit(services)]
    assert "viewer.add" in actions and "viewer.revoke" in actions
    assert "session.open" in actions and not any(a.startswith("client.") for a in actions)


def test_the_bootstrap_token_and_a_bad_credential(services: ArchiverServices) -> None:
    token = services.settings.admin_token_path.read_text().strip()
    assert services.logins.admin_of(token) == AdminPrincipal("admin")
    _refused(ErrorCode.FORBIDDEN, lambda: services.logins.admin_of("not-the-token"))


def test_grant_decisions_from_python(services: ArchiverServices,
                                     make_viewer: Callable[[str], Viewer]) -> None:
    services.admin.add_camera("admin", "door")
    alice = services.admin.authorize_viewer("admin", make_viewer("alice").pem.read_bytes(),
                                            ["door"])
    bob = services.admin.authorize_viewer("admin", make_viewer("bob").pem.read_bytes(), [])
    grants = services.grants
    _refused(ErrorCode.BAD_GRANT, lambda: grants.create(alice, "not base64!", None))
    grant_id = "ab" * 16
    # A grant as the store keeps it (its making and checking against a recording are the
    # HTTP tests' part: tests/client/test_grants.py).
    assert services.archive.directory.add_access_grant(AccessGrantRow(
        grant_id, "door", 0, 9_000, alice.fingerprint, bob.fingerprint, 1, 5, GrantState.PENDING,
        None, None, "case 7"), b"grant bytes")
    _refused(ErrorCode.GRANT_PENDING, lambda: grants.fetch(bob, grant_id))
    _refused(ErrorCode.UNKNOWN_GRANT, lambda: grants.fetch(alice, grant_id))  # not alice's
    # Two people decide: the grantor's own admin identity cannot approve.
    grantor = AdminPrincipal("alice (admin)", alice.fingerprint)
    _refused(ErrorCode.OWN_GRANT, lambda: grants.decide(grantor, grant_id, "approve"))
    approved = grants.decide(AdminPrincipal("admin"), grant_id, "approve", "checked")
    assert approved.state == GrantState.APPROVED and approved.decided_by == "admin"
    _refused(ErrorCode.GRANT_STATE, lambda: grants.decide(AdminPrincipal("admin"), grant_id,
                                                          "approve"))
    fetched = grants.fetch(bob, grant_id)
    assert fetched.blob == b"grant bytes" and fetched.row.note == "checked"
    assert [g.grant_id for g in grants.of_viewer(alice)] == [grant_id]
    assert [g.grant_id for g in grants.list(GrantState.APPROVED)] == [grant_id]
    _refused(ErrorCode.OUTSIDE_GRANT, lambda: grants.recording(bob, grant_id, 0, 10_000,
                                                               b"n" * 16))
    assert grants.decide(grantor, grant_id, "revoke").state == GrantState.REVOKED
    _refused(ErrorCode.GRANT_REVOKED, lambda: grants.fetch(bob, grant_id))
    _refused(ErrorCode.UNKNOWN_GRANT, lambda: grants.decide(grantor, "cd" * 16, "reject"))
    by_action = {e["action"]: e for e in _audit(services)}
    assert by_action["grant.approve"]["grantor"] == alice.fingerprint
    assert by_action["grant.revoke"]["admin_fingerprint"] == alice.fingerprint
    assert by_action["grant.fetch"]["actor"] == bob.fingerprint


def _codes_raised(path: Path) -> set[str]:
    """The ErrorCode members a module passes to Refused(...)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("Refused", "AdminRefused") and node.args
                and isinstance(node.args[0], ast.Attribute)):
            found.add(node.args[0].attr)
    return found


def test_every_code_a_service_raises_has_its_http_status() -> None:
    modules = [*sorted((ARCHIVER / "services").glob("*.py")), ARCHIVER / "admin.py",
               ARCHIVER / "admins.py"]
    raised = set().union(*(_codes_raised(m) for m in modules))
    assert len(raised) > 30  # the scan finds the refusals
    assert sorted(raised - {code.name for code in HTTP_STATUS}) == []
