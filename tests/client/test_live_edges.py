"""Issue 19, left open: live streams prove their edges as recorded ranges do. A relay between
the real fusion-client and a real Archiver (production mode: HTTPS under the site CA) holds the
live request back, or moves its start later; the Archiver starts the stream at the viewer's own
start (from_ms), sends the last manifest issued before it bare as the opening edge and states
the chain head in END, and the client checks both (the format-level cases are vectors
live-start-unproven and live-end-unproven)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from fusion_testkit.client_cli import (
    EXIT,
    Client,
    Viewer,
    assert_nothing_written,
    audited,
    chunk,
    live,
    put,
    wait_for_audit,
)
from tests.fixtures.server import ArchiverServer

from .proxy import TamperingProxy

HOLD_S = 4.0


def test_a_relay_holding_the_live_request_back_skips_nothing(
        https_archiver: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    """Before: the Archiver started a live stream at its own clock when the request reached
    it, so a relay that held the request for 4 s made the viewer miss the segments archived
    meanwhile, with exit 0 (2 of 4 delivered). After: the stream starts at the viewer's
    start, and those segments come too (4 of 4); the one archived before the request is the
    bare opening edge, not delivered."""
    alice = make_viewer("alice")
    token = https_archiver.add_camera("cam1")
    https_archiver.add_viewer(alice.pem, ["cam1"])
    before = chunk("before")
    put(https_archiver, "cam1", token, before)
    out = tmp_path / "live.ts"
    with TamperingProxy(https_archiver.url, verify=https_archiver.verify) as relay:
        relay.mode, relay.hold_s = "hold", HOLD_S
        viewer = subprocess.Popen(
            client.command("live", "--archiver", relay.url, "--token", alice.uri, "--camera",
                           "cam1", "--duration", "8", "-o", str(out)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=client.env(),
            stdin=subprocess.DEVNULL)
        try:
            assert relay.live_seen.wait(60), "the viewer never sent its live request"
            held = [chunk(f"held-{i}") for i in range(2)]
            put(https_archiver, "cam1", token, *held)
            # Archived while the relay still holds the request: the Archiver has not seen it.
            assert not audited(https_archiver, "stream.live")
            wait_for_audit(https_archiver, "stream.live")
            after = [chunk(f"after-{i}") for i in range(2)]
            put(https_archiver, "cam1", token, *after)
            _, err = viewer.communicate(timeout=120)
        finally:
            if viewer.poll() is None:
                viewer.kill()
                viewer.wait()
    stderr = err.decode()
    assert viewer.returncode == 0, stderr
    assert out.read_bytes() == b"".join(held + after), stderr


def test_a_relay_moving_the_live_start_later_is_refused(
        https_archiver: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    """A relay that moves the request's start 3 s later (to skip what the camera sent first):
    the signed header names the start the Archiver used, which is not the viewer's."""
    alice = make_viewer("alice")
    token = https_archiver.add_camera("cam1")
    https_archiver.add_viewer(alice.pem, ["cam1"])
    put(https_archiver, "cam1", token, chunk("before"))
    out = tmp_path / "live.ts"
    with TamperingProxy(https_archiver.url, verify=https_archiver.verify) as relay:
        relay.mode, relay.shift_ms = "shift", 3000
        result = live(client, relay.url, alice, "cam1", out, duration=2)
        # A start far from the Archiver's clock is refused by the Archiver itself.
        relay.shift_ms = 120_000
        far = live(client, relay.url, alice, "cam1", out, duration=2)
    stderr = result.stderr.decode()
    assert result.returncode == EXIT["request_mismatch"], stderr
    assert "This live stream covers" in stderr and "not the requested" in stderr, stderr
    stderr = far.stderr.decode()
    assert far.returncode != 0 and "check both clocks" in stderr, stderr
    assert "Traceback" not in stderr
    assert_nothing_written(out)
