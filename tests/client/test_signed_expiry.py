"""A 410 "expired" is believed only when the pinned Archiver signed it for this request
(issue 19, left open): a real retention run makes a day expire and the viewer reports it as
"Expired (signed by the Archiver)", exit 54; a hostile middle (a proxy in front of the real
Archiver) that answers 410 for video it withholds, unsigned, with a bad signature, or with a
genuine statement replayed from another request, is reported as WITHHELD, exit 59."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fusion_testkit.client_cli import Client, Viewer, iso
from keyservice.expiry import LABEL
from tests.archiver.retention_helpers import DAY_MS, cli, generate, today_ms
from tests.fixtures.server import ArchiverServer, SiteCa, production_archiver
from tests.fixtures.tokens import TokenHandle, enroll_viewer

from .proxy import TamperingProxy

EXIT_EXPIRED, EXIT_WITHHELD = 54, 59
SEGMENT_S = 1800


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _removed(data: Path) -> int:
    log = data / "audit.jsonl"
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text().splitlines()
               if line.strip() and json.loads(line).get("action") == "retention.remove")


def test_expiry_is_signed_and_an_unsigned_410_is_a_withheld_range(
        tmp_path: Path, site_ca: SiteCa, softhsm_token: TokenHandle, client: Client) -> None:
    pem = enroll_viewer(softhsm_token, "alice", bits=2048)
    alice = Viewer("alice", softhsm_token, softhsm_token.object_uri("alice"), pem)
    data = tmp_path / "archiver"
    start = today_ms() - 5 * DAY_MS  # three days: 5, 4 and 3 days ago
    generate(data, "door", start, 72, SEGMENT_S, 4096, [pem])
    server = production_archiver(site_ca, data,
                                 extra_args=("--retention-interval", "0.2")).start()
    try:
        assert server.tls_ca is not None
        url = ["--url", server.url, "--data", str(data), "--tls-ca", str(server.tls_ca)]
        cli("cameras", "retention", "door", "4", *url)  # the oldest day goes, the last stays
        _wait(lambda: _removed(data) >= 1, 60, "retention to remove the oldest day")
        old = (start + 3600_000, start + 7200_000)  # expired
        kept = (start + 2 * DAY_MS + 3600_000, start + 2 * DAY_MS + 7200_000)  # still there

        def play(archiver: str, span: tuple[int, int], name: str, *tls: str) -> tuple[int, str]:
            out = tmp_path / f"{name}.ts"
            done = client("play", "--archiver", archiver, "--token", alice.uri, "--camera",
                          "door", "--from", iso(span[0]), "--to", iso(span[1]), "-o", str(out),
                          *tls)
            assert not out.exists() or done.code == 0
            return done.code, done.stderr

        direct = ("--tls-ca", str(server.tls_ca))
        code, stderr = play(server.url, kept, "kept", *direct)
        assert code == 0, stderr
        code, stderr = play(server.url, old, "expired", *direct)
        assert code == EXIT_EXPIRED, stderr
        assert "Expired (signed by the Archiver)" in stderr and "by retention (4 days)" in stderr

        with TamperingProxy(server.url, verify=server.verify) as proxy:
            # Through the proxy, untouched: the signature still verifies.
            code, stderr = play(proxy.url, old, "via-proxy")
            assert code == EXIT_EXPIRED and "signed by the Archiver" in stderr, stderr
            # The attack: "410 expired" for a day the Archiver still holds, as the Archiver
            # words it, but unsigned.
            message = ("The video of camera 'door' in the requested range has expired: it was "
                       "removed (retention; its keys destroyed).")
            proxy.refusal = (410, {"error": "expired", "message": message})
            code, stderr = play(proxy.url, kept, "unsigned")
            assert code == EXIT_WITHHELD, stderr
            assert "WITHHELD" in stderr and "without a signed statement" in stderr
            # Signed, but by a key that is not the pinned Archiver's.
            rogue = ec.generate_private_key(ec.SECP256R1())
            payload = json.dumps({"camera": "door", "from_ms": kept[0], "to_ms": kept[1],
                                  "nonce": "00" * 16, "made_ms": kept[1], "expired": [
                                      {"from_ms": kept[0], "to_ms": kept[1],
                                       "reason": "retention", "removed_ms": kept[1],
                                       "retention_days": 1}]}).encode()
            forged = {"statement": base64.b64encode(payload).decode(),
                      "signature": base64.b64encode(rogue.sign(
                          LABEL + payload, ec.ECDSA(hashes.SHA256()))).decode()}
            proxy.refusal = (410, {"error": "expired", "message": message, "expiry": forged})
            code, stderr = play(proxy.url, kept, "badly-signed")
            assert code == EXIT_WITHHELD and "not signed by the pinned Archiver" in stderr, stderr
            # The Archiver's own signed statement for the expired day, replayed for the day
            # it still holds: it answers another request.
            proxy.refusal = None
            genuine = httpx.get(f"{server.url}/v1/cameras/door/recording", params={
                "from_ms": old[0], "to_ms": old[1], "nonce": "11" * 16},
                headers={"Authorization": f"Bearer {_session(server, alice)}"},
                verify=server.verify, timeout=30)
            assert genuine.status_code == 410 and "expiry" in genuine.json()
            proxy.refusal = (410, genuine.json())
            code, stderr = play(proxy.url, kept, "replayed")
            assert code == EXIT_WITHHELD and "answers another request" in stderr, stderr
    finally:
        server.stop()


def _session(server: ArchiverServer, viewer: Viewer) -> str:
    """A viewer session token from a real login with the viewer's token."""
    from keyservice.token import Token
    from tests.fixtures.viewer import login
    identity = Token.open(viewer.token.uri).identity(viewer.name)
    return login(server.url, identity, verify=server.verify)
