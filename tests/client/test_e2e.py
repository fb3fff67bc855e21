"""fusion-client end to end: real SoftHSM (and software TPM) viewer tokens, a real Archiver under
uvicorn, real ffmpeg as camera and judge, the real fusion-client command in a subprocess.

Where only the bytes matter, segments are pushed with put_segment (small synthetic chunks, fast,
exact byte comparison); where the video matters, ffmpeg pushes a generated H.264 stream and the
decoded frames are compared with framemd5.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from fusion_testkit.client_cli import (
    EXIT,
    Client,
    Viewer,
    assert_nothing_written,
    chunk,
    iso,
    now_ms,
    play,
    put,
    read_exactly,
    token_operations,
    wait_for_audit,
    wait_for_segments,
)
from keyservice.pkcs11uri import Pkcs11Uri
from keyservice.timespec import parse_time
from tests.fixtures.camera import (
    frame_hashes,
    is_contiguous_run,
    make_source,
    push,
    requires_ffmpeg,
)
from tests.fixtures.server import ArchiverServer, SiteCa, free_port, production_archiver
from tests.fixtures.tokens import TokenHandle, enroll_viewer

from .proxy import TamperingProxy


@pytest.fixture(params=["http", "https"])
def any_archiver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ArchiverServer]:
    """A fresh Archiver in plain HTTP (loopback, development) and in production mode (HTTPS
    with a certificate of the site CA)."""
    if request.param == "https":
        server = production_archiver(SiteCa.create(tmp_path / "site-ca"), tmp_path / "archiver")
    else:
        server = ArchiverServer(tmp_path / "archiver")
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- the video itself ---------------------------------------------------------------------
@requires_ffmpeg
def test_export_is_frame_identical_for_two_viewers_each_with_its_own_key_stream(
        any_archiver: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    archiver_server = any_archiver
    client.tls_ca = archiver_server.tls_ca  # production mode: the site CA, FUSION_TLS_CA
    alice, bob = make_viewer("alice"), make_viewer("bob")
    ingest = archiver_server.add_camera("cam1")
    archiver_server.add_viewer(alice.pem, ["cam1"])
    archiver_server.add_viewer(bob.pem, "all")
    source = make_source(tmp_path / "source.ts", seconds=4)
    start = now_ms()
    # In real time, as a camera: unthrottled, ffmpeg's HLS PUTs of consecutive segments can
    # overlap and reach the Archiver out of order (it archives in arrival order).
    push(source, archiver_server.url, "cam1", ingest, realtime=True, hls_time=1)
    wait_for_segments(archiver_server, "cam1", 4)
    end = now_ms() + 1

    alice_out, bob_out = tmp_path / "alice.ts", tmp_path / "bob.ts"
    saved = tmp_path / "alice.fusion"
    first = play(client, archiver_server.url, alice, alice_out, start, end,
                 "--save-stream", str(saved))
    assert first.code == 0, first.stderr
    assert "trusting the Archiver" in first.stderr and "on first use" in first.stderr
    assert "complete (verified signed end record)" in first.stderr
    source_frames = frame_hashes(source)
    assert len(source_frames) == 100
    assert frame_hashes(alice_out) == source_frames, first.stderr
    # One login and one epoch opener: the token is not used per minute key.
    assert token_operations(first.stderr) == (2, 1, 1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("alice")) == [
        "alice.fusion", "alice.ts"]

    second = play(client, archiver_server.url, bob, bob_out, start, end)
    assert second.code == 0, second.stderr
    assert "trusting" not in second.stderr  # the Archiver is pinned now
    assert bob_out.read_bytes() == alice_out.read_bytes()

    # Alice's stream, intercepted, opened with Bob's token: nothing for Bob in it.
    stolen = tmp_path / "stolen.ts"
    intercepted = client("open", str(saved), "--token", bob.uri, "--archiver",
                         archiver_server.url, "-o", str(stolen))
    assert intercepted.code == EXIT["no_match"], intercepted.stderr
    assert "not to yours" in intercepted.stderr
    assert_nothing_written(stolen)
    # ... while Alice can verify and decrypt it offline against the pinned Archiver.
    again = tmp_path / "again.ts"
    offline = client("open", str(saved), "--token", alice.uri, "--archiver",
                     archiver_server.url, "-o", str(again))
    assert offline.code == 0, offline.stderr
    assert again.read_bytes() == alice_out.read_bytes()


# --- who may see what ---------------------------------------------------------------------
def test_revoked_viewer_gets_nothing_for_the_minutes_after_revocation(
        https_archiver: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    """Production mode: HTTPS under the site CA."""
    archiver_server = https_archiver
    client.tls_ca = archiver_server.tls_ca
    alice = make_viewer("alice")
    ingest = archiver_server.add_camera("cam1")
    fp = archiver_server.add_viewer(alice.pem, ["cam1"])
    before = [chunk(f"before{i}") for i in range(3)]
    during = [chunk(f"revoked{i}") for i in range(3)]
    after = [chunk(f"after{i}") for i in range(2)]
    t0 = now_ms()
    put(archiver_server, "cam1", ingest, *before)
    time.sleep(0.05)
    archiver_server.revoke(fp)
    t_revoked = now_ms()
    # The camera keeps the revocation's key period's key (she holds it already); a chain
    # without her starts with the next period (issue 23): "during" is recorded from then on.
    archiver_server.sleep_into_next_key_period()
    put(archiver_server, "cam1", ingest, *during)
    time.sleep(0.05)
    t_reauthorized = now_ms()

    out = tmp_path / "out.ts"
    refused = play(client, archiver_server.url, alice, out, t0, now_ms())
    assert refused.code == EXIT["revoked"], refused.stderr
    assert "revoked" in refused.stderr
    assert_nothing_written(out)

    # Authorized again: the minutes while revoked stay dark -- no key records were made.
    archiver_server.add_viewer(alice.pem, ["cam1"])
    # She joins the running chain from its next key period (issue 23).
    period_ms = archiver_server.key_period_s * 1000
    time.sleep((period_ms - now_ms() % period_ms) / 1000 + 0.05)
    put(archiver_server, "cam1", ingest, *after)
    t_end = now_ms() + 1
    dark = play(client, archiver_server.url, alice, out, t_revoked, t_reauthorized)
    assert dark.code == EXIT["nothing_authorized"], dark.stderr
    assert "not authorized" in dark.stderr
    assert_nothing_written(out)

    whole = play(client, archiver_server.url, alice, out, t0, t_end)
    assert whole.code == 0, whole.stderr
    assert out.read_bytes() == b"".join(before + after)
    assert "gap: camera cam1: 3 segment(s)" in whole.stderr
    assert "not authorized" in whole.stderr


def test_viewer_authorized_later_sees_nothing_from_before(
        archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    alice, late = make_viewer("alice"), make_viewer("late")
    ingest = archiver_server.add_camera("cam1")
    archiver_server.add_viewer(alice.pem, ["cam1"])
    early = [chunk(f"early{i}") for i in range(3)]
    later = [chunk(f"later{i}") for i in range(3)]
    t0 = now_ms()
    put(archiver_server, "cam1", ingest, *early)
    time.sleep(0.05)
    t_auth = now_ms()
    archiver_server.add_viewer(late.pem, ["cam1"])
    # It joins the running chain from the first key period none of whose segments was recorded
    # before its authorization (issue 23): the next one, as "early" used this one.
    period_ms = archiver_server.key_period_s * 1000
    time.sleep((period_ms - now_ms() % period_ms) / 1000 + 0.05)
    put(archiver_server, "cam1", ingest, *later)
    t_end = now_ms() + 1

    out = tmp_path / "late.ts"
    dark = play(client, archiver_server.url, late, out, t0, t_auth)
    assert dark.code == EXIT["nothing_authorized"], dark.stderr
    assert "All 3 segment(s)" in dark.stderr
    assert token_operations(dark.stderr)[2] == 0  # nothing to open: the token was not asked
    assert_nothing_written(out)

    whole = play(client, archiver_server.url, late, out, t0, t_end)
    assert whole.code == 0, whole.stderr
    assert out.read_bytes() == b"".join(later)
    assert "gap: camera cam1: 3 segment(s)" in whole.stderr

    # The viewer authorized from the start gets all of it.
    full = play(client, archiver_server.url, alice, tmp_path / "alice.ts", t0, t_end)
    assert full.code == 0, full.stderr
    assert (tmp_path / "alice.ts").read_bytes() == b"".join(early + later)


def test_enrolled_but_not_authorized_viewers_and_bad_requests(
        archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    alice, stranger, other = make_viewer("alice"), make_viewer("stranger"), make_viewer("other")
    ingest = archiver_server.add_camera("cam1")
    archiver_server.add_camera("cam2")
    archiver_server.add_viewer(alice.pem, ["cam1"])
    archiver_server.add_viewer(other.pem, ["cam2"])
    t0 = now_ms()
    put(archiver_server, "cam1", ingest, chunk("x"), chunk("y"))
    t1 = now_ms() + 1
    out = tmp_path / "out.ts"
    url = archiver_server.url

    # Enrolled on its token, never added to the Archiver.
    result = play(client, url, stranger, out, t0, t1)
    assert result.code == EXIT["not_enrolled"], result.stderr
    assert "fusion-archiver viewers add" in result.stderr
    # Added, but for another camera.
    result = play(client, url, other, out, t0, t1)
    assert result.code == EXIT["not_authorized"], result.stderr
    listed = client("cameras", "--archiver", url, "--token", other.uri, "--json")
    assert listed.code == 0, listed.stderr
    assert b'"name": "cam2"' in listed.stdout and b"cam1" not in listed.stdout
    assert_nothing_written(out)

    # No such camera: the same answer as "not yours" (names cannot be enumerated).
    result = play(client, url, alice, out, t0, t1, camera="nope")
    assert result.code == EXIT["not_authorized"], result.stderr
    result = play(client, url, alice, out, t0 - 3_600_000, t0 - 1_800_000)
    assert result.code == EXIT["no_recording"], result.stderr
    assert_nothing_written(out)

    listed = client("cameras", "--archiver", url, "--token", alice.uri)
    assert listed.code == 0, listed.stderr
    assert re.search(rb"cam1\s+(\w+\s+)?2 segments", listed.stdout), listed.stdout  # state column

    # Bad time, inverted range: refused before the token or the Archiver are bothered.
    result = client("play", "--archiver", url, "--token", alice.uri, "--camera", "cam1",
                    "--from", "yesterday", "-o", str(out))
    assert result.code == EXIT["usage"] and "Cannot read the time" in result.stderr
    result = client("play", "--archiver", url, "--token", alice.uri, "--camera", "cam1",
                    "--from", "now", "--to", "-1h", "-o", str(out))
    assert result.code == EXIT["usage"] and "before it starts" in result.stderr

    # Wrong PIN: one clear sentence, its own exit code, tried once.
    parsed = Pkcs11Uri.parse(alice.uri)
    wrong = Pkcs11Uri(token=parsed.token, object=parsed.object, module_path=parsed.module_path,
                      pin_value="99999999" if alice.token.pin != "99999999" else "11111111")
    result = client("play", "--archiver", url, "--token", wrong.to_uri(), "--camera", "cam1",
                    "--from", iso(t0), "--to", iso(t1), "-o", str(out))
    assert result.code == EXIT["pin"], result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "PIN" in result.stderr
    assert_nothing_written(out)

    # Nothing listens there.
    result = play(client, f"http://127.0.0.1:{free_port()}", alice, out, t0, t1)
    assert result.code == EXIT["unreachable"], result.stderr
    assert "Cannot reach the Archiver" in result.stderr
    assert_nothing_written(out)


def test_archiver_pinning(archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer],
                          client: Client, tmp_path: Path) -> None:
    alice = make_viewer("alice")
    ingest = archiver_server.add_camera("cam1")
    archiver_server.add_viewer(alice.pem, ["cam1"])
    t0 = now_ms()
    put(archiver_server, "cam1", ingest, chunk("p"))
    t1 = now_ms() + 1
    out = tmp_path / "out.ts"
    # An explicit pin that is not this Archiver's certificate: refused before the token is used.
    result = play(client, archiver_server.url, alice, out, t0, t1, "--archiver-cert",
                  str(alice.pem))
    assert result.code == EXIT["mismatch"], result.stderr
    assert_nothing_written(out)
    # A remembered pin that differs (as after an impersonation): loud, and nothing decrypted.
    known = client.home / "known_archivers"
    known.parent.mkdir(parents=True, exist_ok=True)
    known.write_text(f"{archiver_server.url} {'ab' * 32}\n")
    result = play(client, archiver_server.url, alice, out, t0, t1)
    assert result.code == EXIT["mismatch"], result.stderr
    assert "HAS CHANGED" in result.stderr
    assert_nothing_written(out)
    # The admin confirms the new certificate: pin it explicitly, it replaces the old pin.
    pem = tmp_path / "archiver.pem"
    pem.write_text(httpx.get(f"{archiver_server.url}/v1/archiver").json()["certificate"])
    result = play(client, archiver_server.url, alice, out, t0, t1, "--archiver-cert", str(pem))
    assert result.code == 0, result.stderr
    assert "replaced the pinned certificate" in result.stderr
    assert play(client, archiver_server.url, alice, out, t0, t1).code == 0


# --- a hostile network ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["flip", "truncate"])
def test_tampered_or_truncated_stream_in_transit(
        archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path, mode: str) -> None:
    alice = make_viewer("alice")
    ingest = archiver_server.add_camera("cam1")
    archiver_server.add_viewer(alice.pem, ["cam1"])
    chunks = [chunk(f"seg{i}", 20_000) for i in range(5)]
    t0 = now_ms()
    put(archiver_server, "cam1", ingest, *chunks)
    t1 = now_ms() + 1
    out = tmp_path / "out.ts"
    with TamperingProxy(archiver_server.url) as proxy:
        proxy.mode, proxy.segment_index = mode, 3
        result = play(client, proxy.url, alice, out, t0, t1)
    expected = EXIT["integrity"] if mode == "flip" else EXIT["truncated"]
    assert result.code == expected, result.stderr
    assert not out.exists()
    assert not (tmp_path / "out.ts.partial").exists()
    kept = (tmp_path / "out.ts.incomplete").read_bytes()
    if mode == "flip":
        assert "failed authentication" in result.stderr
        # Whole verified segments before the altered one, nothing of it or after it.
        assert kept in {b"".join(chunks[:n]) for n in range(1, 4)}
        n = next(n for n in range(1, 4) if kept == b"".join(chunks[:n]))
        assert re.search(rf"output stops after segment {n - 1} of camera cam1 \(captured "
                         r"\d{4}-\d\d-\d\dT[\d:.]+Z\)", result.stderr), result.stderr
    else:
        assert "signed end record" in result.stderr
        assert kept == b"".join(chunks)
        assert "output stops after segment 4 of camera cam1" in result.stderr
    assert "incomplete" in result.stderr


# --- live ---------------------------------------------------------------------------------
def test_live_delivers_each_segment_while_the_camera_is_still_pushing(
        archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    alice = make_viewer("alice")
    ingest = archiver_server.add_camera("cam1")
    archiver_server.add_viewer(alice.pem, ["cam1"])
    put(archiver_server, "cam1", ingest, chunk("before", 2000))  # not live: before the request
    # PYTHONFAULTHANDLER: if the viewer ever hangs after Ctrl-C (it did once, in CI), SIGABRT
    # makes it print where each thread is, and the failure shows it.
    process = subprocess.Popen(
        client.command("live", "--archiver", archiver_server.url, "--token", alice.uri,
                       "--camera", "cam1", "--duration", "60", "-o", "-"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**client.env(), "PYTHONFAULTHANDLER": "1"}, stdin=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        fd = process.stdout.fileno()
        # The live stream starts at the viewer's request: once the Archiver has it (audited),
        # every segment archived after it is delivered, in order, and none from before. Each
        # one must arrive before the next one is even pushed. (An event, not a quiet period: a
        # loaded machine can be quiet for a second in the middle of a segment.)
        wait_for_audit(archiver_server, "stream.live")
        pushed = [chunk("first", 2000), *(chunk(f"live{i}", 5000 + i) for i in range(4))]
        for segment in pushed:
            put(archiver_server, "cam1", ingest, segment)
            assert read_exactly(fd, len(segment), 60) == segment  # bounds a hang only
        process.send_signal(signal.SIGINT)  # the viewer stops watching
        try:
            _, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            _, err = process.communicate(timeout=30)
            raise AssertionError("the viewer did not stop on Ctrl-C:\n"
                                 + err.decode(errors="replace")) from None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = err.decode(errors="replace")
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert re.search(rf"\b{len(pushed)} segment\(s\)", stderr), stderr
    assert "stopped by you" in stderr


@requires_ffmpeg
def test_live_video_to_file_while_ffmpeg_pushes(
        archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    alice = make_viewer("alice")
    ingest = archiver_server.add_camera("cam1")
    archiver_server.add_viewer(alice.pem, ["cam1"])
    # 8 s of camera for a 3.5 s live view: the first video must reach the viewer's file while
    # the camera still pushes, with seconds to spare on a loaded machine (the suite runs in
    # parallel).
    source = make_source(tmp_path / "source.ts", seconds=8)
    out = tmp_path / "live.ts"
    viewer = subprocess.Popen(
        client.command("live", "--archiver", archiver_server.url, "--token", alice.uri,
                       "--camera", "cam1", "--duration", "3.5", "-o", str(out)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=client.env(),
        stdin=subprocess.DEVNULL)
    wait_for_audit(archiver_server, "stream.live")  # the viewer is connected
    camera = push(source, archiver_server.url, "cam1", ingest, realtime=True, hls_time=1,
                  wait=False)
    partial = tmp_path / "live.ts.partial"
    try:
        # Decrypted video reaches the viewer's file while the camera is still pushing.
        while camera.poll() is None and not (partial.exists() and partial.stat().st_size):
            time.sleep(0.05)
        assert camera.poll() is None, "no live video arrived while the camera was pushing"
        _, err = viewer.communicate(timeout=60)
    finally:
        camera.wait(60)
        if viewer.poll() is None:
            viewer.kill()
            viewer.wait()
    stderr = err.decode(errors="replace")
    assert viewer.returncode == 0, stderr
    assert "live stream ended (verified end record)" in stderr
    frames = frame_hashes(out)
    source_frames = frame_hashes(source)
    assert 25 <= len(frames) < len(source_frames)
    assert is_contiguous_run(frames, source_frames)


# --- a TPM-backed viewer ------------------------------------------------------------------
@pytest.mark.tpm
def test_tpm_viewer_end_to_end(archiver_server: ArchiverServer, tpm_token: TokenHandle,
                               client: Client, tmp_path: Path) -> None:
    pem = enroll_viewer(tpm_token, "tpm-viewer")
    viewer = Viewer("tpm-viewer", tpm_token, tpm_token.object_uri("tpm-viewer"), pem)
    ingest = archiver_server.add_camera("cam1")
    archiver_server.add_viewer(pem, ["cam1"])
    chunks = [chunk(f"tpm{i}") for i in range(4)]
    t0 = now_ms()
    put(archiver_server, "cam1", ingest, *chunks[:2])
    time.sleep(archiver_server.key_period_s + 0.1)  # a key rotation in between
    put(archiver_server, "cam1", ingest, *chunks[2:])
    out = tmp_path / "tpm.ts"
    result = play(client, archiver_server.url, viewer, out, t0, now_ms() + 1)
    assert result.code == 0, result.stderr
    assert out.read_bytes() == b"".join(chunks)
    assert token_operations(result.stderr) == (2, 1, 1)


@requires_ffmpeg
def test_playback_across_a_camera_outage_reports_the_gap(
        archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    """A camera that stops for 8 s and comes back: the viewer gets every frame sent before and
    after, in one verified file, and the summary names the gap with its times."""
    viewer = make_viewer("alice")
    token = archiver_server.add_camera("cam1")
    archiver_server.add_viewer(viewer.pem, ["cam1"])
    before, after = (make_source(tmp_path / f"{name}.ts", seconds=4) for name in ("a", "b"))
    start = now_ms()
    # Each side pushed as fast as ffmpeg reads (the camera's pace is not what is tested: the
    # frames around the outage and where the gap ends are); the outage itself is real time.
    push(before, archiver_server.url, "cam1", token, realtime=False, hls_time=2)
    time.sleep(8)
    outage_end = now_ms()
    push(after, archiver_server.url, "cam1", token, realtime=False, hls_time=2)
    wait_for_segments(archiver_server, "cam1", 4)
    out = tmp_path / "out.ts"
    result = play(client, archiver_server.url, viewer, out, start - 1000, now_ms() + 1000)
    assert result.code == 0, result.stderr
    assert frame_hashes(out) == frame_hashes(before) + frame_hashes(after)
    gaps = re.findall(r"gap: .*", result.stderr)
    assert len(gaps) == 1 and "no recording" in gaps[0], result.stderr
    # The gap is where the camera was silent: it ends when the second push began.
    gap_end = re.findall(r"(\d{4}-\d\d-\d\dT[0-9:.]+Z?)", gaps[0])[-1]
    assert abs(parse_time(gap_end, now_ms()) - outage_end) < 3000, (gaps[0], iso(outage_end))


# --- standard output: a reader that stops early ---------------------------------------------
def test_a_reader_that_closes_the_pipe_early_is_not_an_error(
        https_archiver: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    """`play -o - | head -c 1000` (or `| ffprobe -`): the reader takes what it wants and
    closes the pipe. Not our failure: exit 0 and one quiet line, no traceback, no "Exception
    ignored" at exit. (Before: exit 52, "cannot be written".)"""
    alice = make_viewer("alice")
    ingest = https_archiver.add_camera("cam1")
    https_archiver.add_viewer(alice.pem, ["cam1"])
    client.tls_ca = https_archiver.tls_ca
    t0 = now_ms()
    # 800 kB: far more than a pipe holds, so the writer meets the closed end for certain.
    put(https_archiver, "cam1", ingest, *(chunk(f"s{i}", 200_000) for i in range(4)))
    t1 = now_ms() + 1
    command = client.command("play", "--archiver", https_archiver.url, "--token", alice.uri,
                             "--camera", "cam1", "--from", iso(t0), "--to", iso(t1), "-o", "-")
    player = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, env=client.env())
    assert player.stdout is not None
    head = subprocess.run(["head", "-c", "1000"], stdin=player.stdout, capture_output=True,
                          timeout=120)
    player.stdout.close()  # only head holds the read end now
    _, err = player.communicate(timeout=120)
    stderr = err.decode(errors="replace")
    assert head.returncode == 0 and len(head.stdout) == 1000
    assert player.returncode == 0, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert "closed it after" in stderr and "not an error" in stderr, stderr
    assert "complete" not in stderr  # it did not get the whole range, and is not told so
    # The first 1000 bytes are the verified start of the first segment.
    whole = play(client, https_archiver.url, alice, tmp_path / "whole.ts", t0, t1)
    assert whole.code == 0, whole.stderr
    assert head.stdout == (tmp_path / "whole.ts").read_bytes()[:1000]
