"""A viewer on a PIV smartcard, end to end: the real card stack (pcscd + vpcd + OpenSC, the
emulated card), a real Archiver that accepts only site-CA-issued viewers, a SoftHSM viewer beside
it, real ffmpeg as camera and judge, the real fusion-client and fusion-archiver commands."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from fusion_testkit import forkserver
from fusion_testkit.client_cli import (
    EXIT,
    Client,
    Viewer,
    chunk,
    now_ms,
    play,
    put,
    token_operations,
    wait_for_audit,
    wait_for_segments,
)
from fusion_testkit.commands import fusion_keys
from fusion_testkit.pki import SiteCa
from keyservice.token import Token
from tests.fixtures.camera import frame_hashes, make_source, push, requires_ffmpeg
from tests.fixtures.piv.stack import CardHandle
from tests.fixtures.server import ArchiverServer
from tests.fixtures.tokens import TokenHandle

CARD_KEY_ID = b"\x03"  # PIV slot 9D, the key-management slot, in OpenSC and ykcs11


@pytest.fixture
def site_archiver(tmp_path: Path, site_ca: SiteCa) -> Iterator[ArchiverServer]:
    """An Archiver that authorizes only viewers whose certificate the site CA issued."""
    server = ArchiverServer(tmp_path / "archiver", extra_args=("--site-ca", str(site_ca.path)))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def archiver_cli(server: ArchiverServer, *args: str) -> subprocess.CompletedProcess[str]:
    return forkserver.run([sys.executable, "-m", "archiver", *args, "--url", server.url,
                           "--admin-token", server.admin_token], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def card_viewer(card: CardHandle, site_ca: SiteCa, server: ArchiverServer, tmp_path: Path,
                cameras: str = "cam1") -> Viewer:
    """Alice's card as the site hands it out (key + site-CA certificate in 9D), adopted with
    fusion-keys and authorized with the exact command adopt prints."""
    card.provision_site_identity(site_ca, "alice")
    pem = tmp_path / "alice-card.pem"
    adopted = fusion_keys("adopt", "--token", card.uri(card.opensc_module), "--out", str(pem),
                          "--site-ca", str(site_ca.path))
    assert adopted.returncode == 0, adopted.stderr
    command = next(line.split() for line in adopted.stdout.splitlines()
                   if line.strip().startswith("fusion-archiver viewers add"))
    added = archiver_cli(server, *command[1:-1], cameras)  # "... --cameras CAMERAS"
    assert added.returncode == 0, added.stderr
    uri = card.uri(card.opensc_module, key_id=CARD_KEY_ID)
    return Viewer("alice", None, uri, pem)  # type: ignore[arg-type]


def site_softhsm_viewer(token: TokenHandle, site_ca: SiteCa, server: ArchiverServer,
                        cameras: list[str]) -> Viewer:
    """Bob on SoftHSM: key generated on the token, CSR signed by the site CA, cert imported."""
    with Token.open(token.uri) as tok:
        request = tok.enroll("bob", bits=2048, csr=True).csr
        assert request is not None
        cert = site_ca.issue(request.public_key(), "bob")  # type: ignore[arg-type]
        imported = tok.import_certificate(cert, "bob")
    pem = token.workdir / f"{token.label}-bob-site.pem"
    pem.write_bytes(cert.public_bytes(Encoding.PEM))
    server.admin("POST", "/v1/admin/viewers", {"certificate": pem.read_text(), "cameras": cameras,
                                               "oaep_hash": imported.oaep_hash.label}, expect=201)
    return Viewer("bob", token, token.object_uri("bob"), pem)


@requires_ffmpeg
def test_card_viewer_and_softhsm_viewer_play_frame_exact(
        piv_card: CardHandle, site_ca: SiteCa, site_archiver: ArchiverServer,
        softhsm_token: TokenHandle, client: Client, tmp_path: Path) -> None:
    ingest = site_archiver.add_camera("cam1")
    alice = card_viewer(piv_card, site_ca, site_archiver, tmp_path)
    bob = site_softhsm_viewer(softhsm_token, site_ca, site_archiver, ["cam1"])
    # A self-signed certificate is not the site's: the Archiver refuses it.
    refused = site_archiver.admin("POST", "/v1/admin/viewers", {
        "certificate": _self_signed_pem(softhsm_token), "cameras": ["cam1"]}, expect=422)
    assert "not issued by the site CA" in str(refused)

    source = make_source(tmp_path / "source.ts", seconds=4)
    start = now_ms()
    push(source, site_archiver.url, "cam1", ingest, realtime=True, hls_time=1)
    wait_for_segments(site_archiver, "cam1", 4)
    end = now_ms() + 1
    source_frames = frame_hashes(source)
    assert len(source_frames) == 100
    for viewer in (alice, bob):
        out = tmp_path / f"{viewer.name}.ts"
        result = play(client, site_archiver.url, viewer, out, start, end)
        assert result.code == 0, result.stderr
        assert "complete (verified signed end record)" in result.stderr
        assert frame_hashes(out) == source_frames, result.stderr
        # One login answer and one epoch opener on the card: not one operation per minute.
        assert token_operations(result.stderr) == (2, 1, 1)
    assert (tmp_path / "alice.ts").read_bytes() == (tmp_path / "bob.ts").read_bytes()


def _self_signed_pem(token: TokenHandle) -> str:
    with Token.open(token.uri) as tok:
        return tok.enroll("selfsigned", bits=2048).pem().decode()


def test_wrong_pin_is_never_retried_and_the_tries_left_are_shown(
        piv_card: CardHandle, site_ca: SiteCa, site_archiver: ArchiverServer,
        client: Client, tmp_path: Path) -> None:
    site_archiver.add_camera("cam1")
    alice = card_viewer(piv_card, site_ca, site_archiver, tmp_path)
    assert piv_card.pin_tries() == 3
    # ykcs11 reports CKF_USER_PIN_COUNT_LOW after one wrong PIN ...
    first = fusion_keys("list", "--token", piv_card.uri(piv_card.ykcs11_module, pin="654321"))
    assert first.returncode == EXIT["pin"], first.stderr
    assert "not retried" in first.stderr and "few tries are left" in first.stderr
    assert piv_card.pin_tries() == 2  # exactly one VERIFY reached the card
    # ... OpenSC only CKF_USER_PIN_FINAL_TRY, when one is left.
    wrong = piv_card.uri(piv_card.opensc_module, key_id=CARD_KEY_ID, pin="654321")
    out = tmp_path / "x.ts"
    second = client("play", "--archiver", site_archiver.url, "--token", wrong, "--camera", "cam1",
                    "--from", "-1h", "--to", "now", "-o", str(out))
    assert second.code == EXIT["pin"], second.stderr
    assert "not retried" in second.stderr and "ONE try left" in second.stderr
    assert piv_card.pin_tries() == 1
    assert not out.exists()
    # The right PIN resets the card's counter.
    fine = client("cameras", "--archiver", site_archiver.url, "--token", alice.uri)
    assert fine.code == 0, fine.stderr
    assert piv_card.pin_tries() == 3


def test_card_pulled_mid_stream_then_reinserted(
        piv_card: CardHandle, site_ca: SiteCa, site_archiver: ArchiverServer,
        client: Client, tmp_path: Path) -> None:
    ingest = site_archiver.add_camera("cam1")
    alice = card_viewer(piv_card, site_ca, site_archiver, tmp_path)
    # A second viewer (software key), revoked later: a revocation starts a new key chain
    # (adding or re-authorizing a viewer no longer does, issue 23).
    bob_key = ec.generate_private_key(ec.SECP256R1())
    bob_fp = site_archiver.add_viewer(
        site_ca.issue(bob_key.public_key(), "bob").public_bytes(Encoding.PEM).decode(), ["cam1"])
    out = tmp_path / "live.ts"
    t0 = now_ms()
    viewer = subprocess.Popen(
        client.command("live", "--archiver", site_archiver.url, "--token", alice.uri,
                       "--camera", "cam1", "--duration", "60", "-o", str(out)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=client.env(),
        stdin=subprocess.DEVNULL)
    try:
        wait_for_audit(site_archiver, "stream.live")
        # Larger than the output's write buffer, so each reaches the file at once.
        before = [chunk(f"before{i}", 20000) for i in range(2)]
        partial = out.with_name(out.name + ".partial")
        put(site_archiver, "cam1", ingest, *before)
        deadline = time.monotonic() + 30
        while not (partial.exists() and partial.stat().st_size == sum(map(len, before))):
            assert time.monotonic() < deadline, "the live segments were not written"
            time.sleep(0.05)
        piv_card.remove()  # the card is pulled while the viewer is watching
        # The admin re-authorizes Alice (her epoch ends) and revokes Bob (a new chain, wrapped
        # for Alice under a new epoch): the next segment needs the card.
        site_archiver.admin("POST", "/v1/admin/viewers", {
            "certificate": alice.pem.read_text(), "cameras": ["cam1"], "oaep_hash": "sha256"},
            expect=201)
        site_archiver.revoke(bob_fp)
        site_archiver.sleep_into_next_key_period()  # where the revocation's chain begins
        after = chunk("after", 20000)
        put(site_archiver, "cam1", ingest, after)
        _, err = viewer.communicate(timeout=60)
    finally:
        if viewer.poll() is None:
            viewer.kill()
            viewer.wait()
    stderr = err.decode(errors="replace")
    assert "Traceback" not in stderr
    assert viewer.returncode == 28, stderr  # TokenRemoved
    assert "removed" in stderr and "reinsert it" in stderr
    # Nothing unverified, nothing after the pull: only what was verified before it, under a
    # name that says it is incomplete.
    assert not out.exists()
    assert out.with_name(out.name + ".incomplete").read_bytes() == b"".join(before)

    # Pulled: the next command says so at once.
    absent = client("cameras", "--archiver", site_archiver.url, "--token", alice.uri)
    assert absent.code == 23, absent.stderr
    assert "insert the card" in absent.stderr

    piv_card.insert()  # ... and back: the next command works, the whole recording opens.
    again = tmp_path / "again.ts"
    result = play(client, site_archiver.url, alice, again, t0, now_ms() + 1)
    assert result.code == 0, result.stderr
    assert again.read_bytes() == b"".join([*before, after])


# --- EC P-256 viewers: ECDH epoch openers -------------------------------------------------
@requires_ffmpeg
def test_ec_viewers_on_a_card_and_on_softhsm_play_frame_exact(
        piv_card: CardHandle, archiver_server: ArchiverServer, softhsm_token: TokenHandle,
        client: Client, tmp_path: Path) -> None:
    ingest = archiver_server.add_camera("cam1")
    # The card: an EC key enrolled through ykcs11 (management key as SO PIN), in slot 9D ...
    card_pem = tmp_path / "carol-card.pem"
    enrolled = fusion_keys("enroll", "--token", piv_card.uri(piv_card.ykcs11_module, obj="carol"),
                           "--out", str(card_pem), "--key-type", "ec",
                           env={**os.environ, "FUSION_SO_PIN": piv_card.mgmt_key_hex})
    assert enrolled.returncode == 0, enrolled.stderr
    assert "EC P-256" in enrolled.stdout
    archiver_server.add_viewer(card_pem, ["cam1"])
    # ... used through OpenSC, as a viewer machine would.
    carol = Viewer("carol", None, piv_card.uri(piv_card.opensc_module, key_id=CARD_KEY_ID),  # type: ignore[arg-type]
                   card_pem)
    # SoftHSM: an EC viewer too.
    with Token.open(softhsm_token.uri) as tok:
        dave_cert = tok.enroll("dave", key_type="ec").pem()
    dave_pem = tmp_path / "dave.pem"
    dave_pem.write_bytes(dave_cert)
    archiver_server.add_viewer(dave_pem, ["cam1"])
    dave = Viewer("dave", softhsm_token, softhsm_token.object_uri("dave"), dave_pem)

    source = make_source(tmp_path / "source.ts", seconds=3)
    start = now_ms()
    push(source, archiver_server.url, "cam1", ingest, realtime=True, hls_time=1)
    wait_for_segments(archiver_server, "cam1", 3)
    end = now_ms() + 1
    source_frames = frame_hashes(source)
    for viewer in (carol, dave):
        out = tmp_path / f"{viewer.name}.ts"
        result = play(client, archiver_server.url, viewer, out, start, end)
        assert result.code == 0, result.stderr
        assert frame_hashes(out) == source_frames, result.stderr
        # One ECDH for the login, one for the epoch opener.
        assert token_operations(result.stderr) == (2, 1, 1)
