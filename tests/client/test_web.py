"""The operator's viewer (`fusion-client view`) in a real browser: Debian's Chromium driven by
Playwright, a real Archiver under uvicorn, a SoftHSM viewer token, ffmpeg-made H.264 video.

The test video burns its own time into the picture twice: as text (for people reading the
screenshots in docs/viewer.md) and as an 8-bit barcode in the top 32 rows (bit i of
floor(seconds) is the block at x = 40*i .. 40*i+39), which the tests read from the decoded frame.
"""

from __future__ import annotations

import fcntl
import http.server
import json
import os
import pty
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets.sync.client as ws_client
from playwright.sync_api import Browser, Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fusion_testkit.pki import SiteCa
from fusion_testkit.server import production_archiver
from fusion_testkit.web import ViewerProcess
from keyservice.exitcodes import ExitCode
from tests.fixtures.server import ArchiverServer, free_port
from tests.fixtures.tokens import TokenHandle, enroll_viewer

from .proxy import TamperingProxy

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parents[2]
# FUSION_DOCS_SCREENSHOTS=1 refreshes the pictures of docs/viewer.md; otherwise they go to a
# temporary directory (a test run leaves the work tree as it was).
DOCS_IMAGES = REPO_ROOT / "docs" / "viewer"
RATE = 10
# testsrc2 + readable time + the barcode; a keyframe every second, so every 1 s chunk starts
# with one (as a camera's HLS segments do).
VIDEO_FILTER = (
    "drawtext=font=DejaVu Sans:text='t=%{pts\\:hms}':x=10:y=200:fontsize=24:fontcolor=white"
    ":box=1:boxcolor=black@0.7,"
    "geq=lum='if(lt(Y\\,32)\\,255*mod(floor(T/pow(2\\,floor(X/40)))\\,2)\\,lum(X\\,Y))'"
    ":cb='if(lt(Y\\,32)\\,128\\,cb(X\\,Y))':cr='if(lt(Y\\,32)\\,128\\,cr(X\\,Y))'")
CODECS = {"h264": ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"],
          "hevc": ["-c:v", "libx265", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                   "-x265-params", "log-level=error"]}

# Reads the barcode of the frame the <video> element shows (its natural size, not the tile's).
READ_BARCODE = """(camera) => {
  const video = document.querySelector(`.tile[data-camera="${camera}"] video`);
  const c = document.createElement('canvas');
  c.width = video.videoWidth; c.height = video.videoHeight;
  const g = c.getContext('2d');
  g.drawImage(video, 0, 0);
  let value = 0;
  for (let i = 0; i < 8; i++) {
    const p = g.getImageData(40 * i + 20, 16, 1, 1).data;
    if ((p[0] + p[1] + p[2]) / 3 > 128) value |= 1 << i;
  }
  return value;
}"""
# How many distinct colours the shown frame has (a blank or black frame has one or two).
FRAME_COLOURS = """(camera) => {
  const video = document.querySelector(`.tile[data-camera="${camera}"] video`);
  const c = document.createElement('canvas');
  c.width = video.videoWidth; c.height = video.videoHeight;
  const g = c.getContext('2d');
  g.drawImage(video, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  const seen = new Set();
  for (let i = 0; i < d.length; i += 4 * 97) seen.add((d[i] >> 4) << 8 | (d[i+1] >> 4) << 4 | d[i+2] >> 4);
  return seen.size;
}"""


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Debian's chromium is not installed; run scripts/setup.sh")
    return path


def make_chunks(directory: Path, seconds: int, codec: str = "h264") -> list[bytes]:
    """1-second MPEG-TS chunks of the barcoded test video (chunk k shows seconds k .. k+1)."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
         "-i", f"testsrc2=size=320x240:rate={RATE}", "-t", str(seconds), "-vf", VIDEO_FILTER,
         *CODECS[codec], "-g", str(RATE), "-keyint_min", str(RATE), "-sc_threshold", "0",
         "-f", "segment", "-segment_time", "1", "-segment_format", "mpegts",
         str(directory / "c%03d.ts")], check=True)
    return [p.read_bytes() for p in sorted(directory.glob("c*.ts"))]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Pushed:
    before: list[int]   # wall clock just before each chunk's upload
    after: list[int]    # ... and just after the Archiver acknowledged it


def push_chunks(server: ArchiverServer, camera: str, token: str, chunks: list[bytes],
                spacing_s: float, pause_after: int | None = None, pause_s: float = 0) -> Pushed:
    pushed = Pushed([], [])
    for i, data in enumerate(chunks):
        pushed.before.append(now_ms())
        assert server.put_segment(camera, token, data) == 201
        pushed.after.append(now_ms())
        time.sleep(pause_s if pause_after is not None and i == pause_after else spacing_s)
    return pushed


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=chromium_path(),
                                      args=["--autoplay-policy=no-user-gesture-required"])
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Setup:
    server: ArchiverServer
    ingest: dict[str, str]
    viewer_uri: str
    home: Path


@pytest.fixture
def setup(https_archiver: ArchiverServer, softhsm_token: TokenHandle, tmp_path: Path) -> Setup:
    """Production mode: the Archiver speaks HTTPS with a certificate of the site CA, which the
    viewer is given with --tls-ca (its streams and exports must use it too)."""
    pem = enroll_viewer(softhsm_token, "operator")
    ingest = {name: https_archiver.add_camera(name) for name in ("lobby", "gate")}
    https_archiver.add_viewer(pem, ["lobby", "gate"])
    return Setup(https_archiver, ingest, softhsm_token.object_uri("operator"),
                 tmp_path / "client-home")


@pytest.fixture
def open_viewer(setup: Setup) -> Iterator[Callable[..., ViewerProcess]]:
    started: list[ViewerProcess] = []

    def start(archiver_url: str | None = None) -> ViewerProcess:
        process = ViewerProcess(archiver_url or setup.server.url, setup.viewer_uri, setup.home,
                                setup.server.tls_ca)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


# Page waits bound a hang only: the suite runs in parallel, and Chromium and the viewer may
# each wait seconds for a core (a grid tile's first verified segment took over 30 s once).
HANG_S = 90


def open_page(browser: Browser, viewer: ViewerProcess) -> Page:
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.set_default_timeout(HANG_S * 1000)
    page.goto(viewer.url)
    page.wait_for_function("() => window.fusionViewer && window.fusionViewer.camerasLoaded")
    return page


def tile(page: Page, camera: str) -> dict[str, Any]:
    return page.evaluate("(c) => window.fusionViewer.tiles.get(c).snapshot()", camera)


def wait_tile(page: Page, camera: str, condition: str, timeout_s: float = HANG_S) -> dict[str, Any]:
    try:
        page.wait_for_function(f"(c) => {{ const t = window.fusionViewer.tiles.get(c); "
                               f"if (!t) return false; const s = t.snapshot(); "
                               f"return {condition}; }}", arg=camera, timeout=timeout_s * 1000)
    except PlaywrightTimeout:  # what the tile was doing instead, for the report
        raise AssertionError(f"{camera} never reached {condition}: "
                             f"{page.evaluate(_SNAPSHOT_IF_ANY, camera)}") from None
    return tile(page, camera)


_SNAPSHOT_IF_ANY = "(c) => { const t = window.fusionViewer.tiles.get(c); return t && t.snapshot(); }"


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("FUSION_DOCS_SCREENSHOTS") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        return DOCS_IMAGES
    return tmp_path_factory.mktemp("screenshots")


def shot(page: Page, directory: Path, name: str) -> None:
    page.screenshot(path=str(directory / name))


def click_timeline(page: Page, camera: str, ms: int) -> int:
    """Clicks the camera's timeline where ``ms`` is; returns the time the page took the click
    for. The timeline runs to now, so under load it has moved on by the time the click
    arrives (a loaded run saw 105 ms): what the page seeks to is the time it read."""
    page.evaluate("""(c) => {
        const t = window.fusionViewer.tiles.get(c);
        t.clickedMs = null;
        if (!t.recordsClicks) {
          const playFrom = t.playFrom.bind(t);
          t.playFrom = (ms) => { t.clickedMs = ms; return playFrom(ms); };
          t.recordsClicks = true;
        }
      }""", camera)
    canvas = page.locator(f'.tile[data-camera="{camera}"] canvas.timeline')
    span = page.evaluate("(c) => window.fusionViewer.tiles.get(c).span()", camera)
    box = canvas.bounding_box()
    assert box is not None
    x = (ms - span[0]) / (span[1] - span[0]) * box["width"]
    canvas.click(position={"x": x, "y": box["height"] / 2})
    clicked = page.evaluate("(c) => window.fusionViewer.tiles.get(c).clickedMs", camera)
    assert clicked is not None, "the click on the timeline did not seek"
    return int(clicked)


# --- the page: cameras, live, grid, latency --------------------------------------------------
def test_lists_cameras_and_plays_live(setup: Setup, open_viewer: Callable[..., ViewerProcess],
                                      browser: Browser, tmp_path: Path, shots: Path) -> None:
    chunks = make_chunks(tmp_path / "lobby", 10)
    push_chunks(setup.server, "lobby", setup.ingest["lobby"], chunks[:2], 0.2)
    viewer = open_viewer()
    page = open_page(browser, viewer)
    names = page.locator("#cameras li b").all_inner_texts()
    assert names == ["lobby", "gate"] or sorted(names) == ["gate", "lobby"]
    lobby = page.locator('#cameras li[data-camera="lobby"]')
    assert "2 segments" in lobby.inner_text()
    assert "nothing recorded" in page.locator('#cameras li[data-camera="gate"]').inner_text()

    lobby.get_by_role("button", name="Watch").click()
    # The camera goes on sending, one 1-second chunk a second, while the operator watches.
    live: list[Pushed] = []
    camera = threading.Thread(target=lambda: live.append(push_chunks(
        setup.server, "lobby", setup.ingest["lobby"], chunks[2:], 1.0)), daemon=True)
    camera.start()
    state = wait_tile(page, "lobby", "s.shown >= 2 && s.currentTime > 0")
    first_time = state["currentTime"]
    state = wait_tile(page, "lobby", f"s.currentTime > {first_time} + 1.5 && s.shown >= 4")
    assert state["state"] == "verified" and not state["stopped"]
    assert "verified" in state["stateText"]
    assert page.evaluate(FRAME_COLOURS, "lobby") > 20, "the live frame is blank"
    # What is on screen is the camera's picture: its barcode counts the camera's seconds.
    assert 1 <= page.evaluate(READ_BARCODE, "lobby") <= 10
    shot(page, shots, "live.png")
    camera.join(30)
    [pushed] = live
    # Latency: the Archiver acknowledged chunk i (seq 2+i) at pushed.after[i]; its first frame
    # was on screen at firstFrames[seq] (same clock: one machine).
    frames = wait_tile(page, "lobby", "Object.keys(s.firstFrames).length >= 5")["firstFrames"]
    latencies = [frames[str(seq)] - pushed.after[seq - 2]
                 for seq in range(3, len(chunks)) if str(seq) in frames]
    assert latencies and all(lat > 0 for lat in latencies)
    print(f"\nlatency Archiver acknowledgement -> first frame on screen: median "
          f"{statistics.median(latencies):.0f} ms, all {latencies}")
    page.close()


def test_grid_of_cameras_and_h265_message(setup: Setup,
                                          open_viewer: Callable[..., ViewerProcess],
                                          browser: Browser, tmp_path: Path,
                                          shots: Path) -> None:
    h264 = make_chunks(tmp_path / "lobby", 3)
    hevc = make_chunks(tmp_path / "gate", 3, codec="hevc")
    push_chunks(setup.server, "lobby", setup.ingest["lobby"], h264, 0.1)
    push_chunks(setup.server, "gate", setup.ingest["gate"], hevc, 0.1)
    viewer = open_viewer()
    page = open_page(browser, viewer)
    page.get_by_role("button", name="Watch all (grid)").click()
    assert page.locator(".tile").count() == 2
    first = page.evaluate("() => window.fusionViewer.cameras.get('lobby').first_ms")
    page.evaluate("(ms) => { for (const t of window.fusionViewer.tiles.values()) t.playFrom(ms); }",
                  first - 1)
    wait_tile(page, "lobby", "s.shown >= 1 && s.currentTime > 0.5")
    gate = wait_tile(page, "gate", "s.codec === 'unsupported' && s.verified >= 1")
    assert gate["state"] == "unsupported" and gate["shown"] == 0
    message = page.locator('.tile[data-camera="gate"] .overlay')
    assert "cannot decode H.265" in message.inner_text()
    shot(page, shots, "grid-h265.png")
    # Export still works for the H.265 camera: a verified MPEG-TS file.
    page.locator('.tile[data-camera="gate"] .ex-from').fill(_local_input(page, first - 1000))
    page.locator('.tile[data-camera="gate"] .ex-to').fill(_local_input(page, now_ms() + 1000))
    page.locator('.tile[data-camera="gate"] button.export').click()
    page.locator('.tile[data-camera="gate"] .ex-msg.done').wait_for(timeout=30_000)
    exported = list(viewer.export_dir.glob("gate-*.ts"))
    assert len(exported) == 1 and exported[0].read_bytes() == b"".join(hevc)
    page.close()


def _local_input(page: Page, ms: int) -> str:
    return page.evaluate("(ms) => new Date(ms - new Date(ms).getTimezoneOffset() * 60000)"
                         ".toISOString().slice(0, 19)", ms)


# --- the timeline: seek, gaps, export ----------------------------------------------------------
def test_timeline_seek_gap_and_export(setup: Setup, open_viewer: Callable[..., ViewerProcess],
                                      browser: Browser, tmp_path: Path, shots: Path) -> None:
    source = make_chunks(tmp_path / "lobby", 12)
    # A camera outage: chunks 0-3 arrive one a second, chunks 4-7 are lost (4 s: its clock runs
    # on, the Archiver hears nothing), chunks 8-11 arrive. Segment j is chunks[j].
    chunks = source[:4] + source[8:]
    pushed = push_chunks(setup.server, "lobby", setup.ingest["lobby"], chunks, 1.0,
                         pause_after=3, pause_s=5.0)
    viewer = open_viewer()
    page = open_page(browser, viewer)
    page.evaluate("() => window.fusionViewer.watch('lobby', false)")

    # Play everything from before the first chunk: the silence is reported and drawn as a gap,
    # exactly between the signed end of chunk 4 and the signed start of chunk 5.
    click_timeline(page, "lobby", pushed.before[0] - 1500)
    state = wait_tile(page, "lobby", "s.stateText.includes('to the end')")
    segments = state["segments"]
    assert [seg["seq"] for seg in segments] == list(range(8)) and not state["stopped"]
    assert all(seg["duration_ms"] == 1000 for seg in segments)
    [gap] = state["gaps"]
    assert gap["kind"] == "none"
    assert gap["from_ms"] == segments[3]["capture_ms"] + segments[3]["duration_ms"]
    assert gap["to_ms"] == segments[4]["capture_ms"]
    assert 3000 < gap["to_ms"] - gap["from_ms"] < 6000
    mid = (gap["from_ms"] + gap["to_ms"]) // 2
    colour = page.evaluate("""([c, ms]) => {
        const t = window.fusionViewer.tiles.get(c); t.draw();
        const x = Math.round(t.xAt(ms));
        return Array.from(t.canvas.getContext('2d').getImageData(x, 20, 1, 1).data.slice(0, 3));
      }""", ["lobby", mid])
    assert colour == [0x54, 0x5D, 0x68], "the gap is not drawn as a gap"

    # Seek, paused, to the middle of segment k by its signed capture time: its picture (the
    # barcode counts the source's seconds: segment 6 is the source's second 10) is on screen.
    page.locator('.tile[data-camera="lobby"] button.pause').click()
    k = 6
    target = click_timeline(page, "lobby",
                            segments[k]["capture_ms"] + segments[k]["duration_ms"] // 2)
    state = wait_tile(page, "lobby", "s.shown >= 1 && s.positionMs !== null")
    page.wait_for_function("(c) => { const v = document.querySelector(`.tile[data-camera=\"${c}\"]"
                           " video`); return !v.seeking && v.readyState >= 2; }", arg="lobby")
    state = tile(page, "lobby")
    assert state["paused"]
    # Segment k was played already: the seek shows it from the media in the browser (issue 23).
    assert state["requests"] == 1
    assert page.evaluate("(c) => { const t = window.fusionViewer.tiles.get(c); "
                         "return t.segmentAt(t.video.currentTime).seq; }", "lobby") == k
    assert abs(state["positionMs"] - target) < 100  # the frame at the time clicked (25 fps)
    assert page.evaluate(READ_BARCODE, "lobby") == 10
    shot(page, shots, "seek.png")

    # The same in 2-second windows, as long recordings are fetched: every chunk exactly once,
    # an empty window skipped, and the gap found across windows (the same one, not a second).
    page.locator('.tile[data-camera="lobby"] button.pause').click()
    page.evaluate("() => { window.fusionViewer.windowMs = 1500; }")
    click_timeline(page, "lobby", pushed.before[0] - 1500)
    state = wait_tile(page, "lobby", "s.stateText.includes('to the end')")
    assert [seg["seq"] for seg in state["segments"]] == list(range(8))
    assert not state["stopped"]
    assert state["gaps"] == [gap]

    # Export a range; the file is the verified plaintext, exactly the chunks in the range.
    tile_el = page.locator('.tile[data-camera="lobby"]')
    tile_el.locator(".ex-from").fill(_local_input(page, gap["to_ms"] - 1000))
    tile_el.locator(".ex-to").fill(_local_input(page, pushed.after[-1] + 1000))
    tile_el.locator("button.export").click()
    tile_el.locator(".ex-msg.done").wait_for(timeout=30_000)
    assert "verified" in tile_el.locator(".ex-msg").inner_text()
    [exported] = viewer.export_dir.glob("lobby-*.ts")
    assert exported.read_bytes() == b"".join(chunks[4:])
    assert exported.with_suffix(".fusion").stat().st_size > exported.stat().st_size
    # The download link asks for a single-use ticket: the browser gets the file once with it.
    with page.expect_download() as info:
        tile_el.locator(".ex-msg a.download").click()
    download = info.value
    assert Path(download.path()).read_bytes() == exported.read_bytes()
    assert "ticket=" in download.url
    assert httpx.get(download.url, timeout=10).status_code == 403, "a spent ticket"
    shot(page, shots, "timeline-export.png")
    page.close()


def stream_requests(server: ArchiverServer, camera: str) -> dict[str, int]:
    """The fusion streams the Archiver served for the camera, by its audit log."""
    counts = {"stream.playback": 0, "stream.live": 0}
    for line in (server.data_dir / "audit.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry["action"] in counts and entry.get("camera") == camera:
            counts[entry["action"]] += 1
    return counts


def seek_and_show(page: Page, camera: str, ms: int) -> dict[str, Any]:
    """The page's seek (what a click on the timeline or Go does), then the frame on screen."""
    page.evaluate("([c, ms]) => window.fusionViewer.tiles.get(c).playFrom(ms)", [camera, ms])
    try:
        wait_tile(page, camera, f"s.positionMs !== null && Math.abs(s.positionMs - {ms}) < 150")
    except Exception:
        raise AssertionError(f"{ms}: {tile(page, camera)}") from None
    page.wait_for_function("(c) => { const v = document.querySelector(`.tile[data-camera=\"${c}\"]"
                           " video`); return !v.seeking && v.readyState >= 2; }", arg=camera,
                           timeout=60_000)
    return tile(page, camera)


def test_seek_inside_the_buffer_asks_the_archiver_nothing(
        setup: Setup, open_viewer: Callable[..., ViewerProcess], browser: Browser,
        tmp_path: Path) -> None:
    """Issue 23: a seek to media the browser holds already (verified when it came) is shown
    from there, with no new fusion stream; a seek outside it asks the Archiver again, as
    before. The Archiver's audit log counts the streams it served."""
    chunks = make_chunks(tmp_path / "lobby", 6)
    # In real time, as a camera sends them (the index then places each where it was captured).
    push_chunks(setup.server, "lobby", setup.ingest["lobby"], chunks, 1.0)
    viewer = open_viewer()
    page = open_page(browser, viewer)
    # The signed capture times, from playing it all once in a tile that is then closed.
    first = page.evaluate("() => window.fusionViewer.cameras.get('lobby').first_ms")
    page.evaluate("(ms) => window.fusionViewer.watch('lobby', false).playFrom(ms)", first - 1)
    state = wait_tile(page, "lobby", "s.stateText.includes('to the end')")
    segments = {seg["seq"]: seg for seg in state["segments"]}
    assert sorted(segments) == list(range(6))
    page.evaluate("() => window.fusionViewer.tiles.get('lobby').close()")
    assert stream_requests(setup.server, "lobby") == {"stream.playback": 1, "stream.live": 0}

    # A new tile plays from segment 2 on: segments 2..5 are in the browser, 0 and 1 are not.
    page.evaluate("() => window.fusionViewer.watch('lobby', false)")
    page.locator('.tile[data-camera="lobby"] button.pause').click()  # frames stay put
    seek_and_show(page, "lobby", segments[2]["capture_ms"] + 500)
    state = wait_tile(page, "lobby", "s.stateText.includes('to the end')")
    assert [seg["seq"] for seg in state["segments"]] == [2, 3, 4, 5]
    assert stream_requests(setup.server, "lobby") == {"stream.playback": 2, "stream.live": 0}
    assert state["requests"] == 1

    # Inside: segment 4's middle (the barcode counts the source's seconds: 4).
    target = segments[4]["capture_ms"] + 500
    state = seek_and_show(page, "lobby", target)
    assert page.evaluate(READ_BARCODE, "lobby") == 4
    assert abs(state["positionMs"] - target) < 100 and state["paused"]
    assert state["requests"] == 1 and [s["seq"] for s in state["segments"]] == [2, 3, 4, 5]
    # and back to segment 2, still without the Archiver
    state = seek_and_show(page, "lobby", segments[2]["capture_ms"] + 300)
    assert page.evaluate(READ_BARCODE, "lobby") == 2
    assert state["requests"] == 1
    assert stream_requests(setup.server, "lobby") == {"stream.playback": 2, "stream.live": 0}

    # Outside: segment 1 never came to the browser; a new stream brings it.
    target = segments[2]["capture_ms"] - 500
    state = seek_and_show(page, "lobby", target)
    assert page.evaluate(READ_BARCODE, "lobby") == 1
    assert state["segments"][0]["seq"] == 1 and state["requests"] == 2
    assert stream_requests(setup.server, "lobby") == {"stream.playback": 3, "stream.live": 0}
    page.close()


def test_looking_back_while_live_keeps_the_stream(
        setup: Setup, open_viewer: Callable[..., ViewerProcess], browser: Browser,
        tmp_path: Path) -> None:
    """Issue 23: while watching live, a seek back into the media the page holds is shown from
    there: the live stream goes on (no new one), and the page stops pulling the playhead to the
    live edge until Live is pressed, which starts a new live stream."""
    chunks = make_chunks(tmp_path / "lobby", 10)
    viewer = open_viewer()
    page = open_page(browser, viewer)
    page.evaluate("() => window.fusionViewer.watch('lobby')")
    deadline = time.monotonic() + 60
    while stream_requests(setup.server, "lobby")["stream.live"] < 1:
        assert time.monotonic() < deadline, "the live stream did not reach the Archiver"
        time.sleep(0.05)
    camera = threading.Thread(target=push_chunks, daemon=True, args=(
        setup.server, "lobby", setup.ingest["lobby"], chunks, 1.0))
    camera.start()
    state = wait_tile(page, "lobby", "s.shown >= 4 && s.followLive")
    back = state["segments"][0]
    # The barcode counts the camera's seconds: segment n shows second n.
    state = seek_and_show(page, "lobby", back["capture_ms"] + 500)
    assert page.evaluate(READ_BARCODE, "lobby") == back["seq"]
    assert not state["followLive"] and state["live"] and state["requests"] == 1
    shown = state["shown"]
    # The live stream goes on, and the playhead stays where the operator put it (it would
    # have been pulled to the newest segment more than 2 s ahead).
    state = wait_tile(page, "lobby", f"s.shown >= {shown + 2}")
    newest = state["segments"][-1]
    assert state["positionMs"] is not None and state["positionMs"] < newest["capture_ms"] - 1500
    assert state["requests"] == 1
    assert stream_requests(setup.server, "lobby") == {"stream.playback": 0, "stream.live": 1}
    # Live again: a new live stream, following the edge.
    page.locator('.tile[data-camera="lobby"] button.live').click()
    state = wait_tile(page, "lobby", "s.followLive && s.requests === 2")
    deadline = time.monotonic() + 60
    while stream_requests(setup.server, "lobby")["stream.live"] < 2:
        assert time.monotonic() < deadline, "Live did not start a new stream"
        time.sleep(0.05)
    camera.join(60)
    page.close()


def test_a_stopped_live_stream_ends_at_the_archiver(
        site_ca: SiteCa, softhsm_token: TokenHandle, browser: Browser, tmp_path: Path) -> None:
    """A tile that leaves live (a seek) closes its stream, and the Archiver learns it at once,
    even from a silent camera: before, the blocked read kept the socket open, so the Archiver
    kept the stream (and one of the viewer's stream slots, 2 here) until the camera's next
    segment, and the grid's seek was refused "HTTP 429" on every tile."""
    server = production_archiver(site_ca, tmp_path / "archiver",
                                 extra_args=("--viewer-streams", "2")).start()
    viewer: ViewerProcess | None = None
    try:
        pem = enroll_viewer(softhsm_token, "operator")
        ingest = {name: server.add_camera(name) for name in ("lobby", "gate")}
        server.add_viewer(pem, ["lobby", "gate"])
        for name, token in ingest.items():
            push_chunks(server, name, token, make_chunks(tmp_path / name, 3), 0.1)
        viewer = ViewerProcess(server.url, softhsm_token.object_uri("operator"),
                               tmp_path / "home", server.tls_ca)
        page = open_page(browser, viewer)
        page.get_by_role("button", name="Watch all (grid)").click()
        deadline = time.monotonic() + 60
        while any(stream_requests(server, name)["stream.live"] < 1 for name in ingest):
            assert time.monotonic() < deadline, "the live streams did not reach the Archiver"
            time.sleep(0.05)
        first = page.evaluate("() => Math.min(...[...window.fusionViewer.cameras.values()]"
                              ".map((c) => c.first_ms))")
        page.evaluate("(ms) => { for (const t of window.fusionViewer.tiles.values()) "
                      "t.playFrom(ms); }", first - 1)
        for name in ingest:
            state = wait_tile(page, name, "s.stopped || s.stateText.includes('to the end')")
            assert not state["stopped"], state["stateText"]
            assert state["shown"] == 3
        page.close()
    finally:
        if viewer is not None:
            viewer.stop()
        server.stop()


def test_a_tile_waits_while_the_archiver_is_busy(
        site_ca: SiteCa, softhsm_token: TokenHandle, browser: Browser, tmp_path: Path) -> None:
    """The Archiver refuses a viewer's request beyond its limits with 429 (one stream here).
    The tile asks again, with a new request, until the other stream ends, and then plays,
    instead of stopping with "HTTP 429" (tiles of a grid start together)."""
    server = production_archiver(site_ca, tmp_path / "archiver",
                                 extra_args=("--viewer-streams", "1")).start()
    viewer: ViewerProcess | None = None
    try:
        pem = enroll_viewer(softhsm_token, "operator")
        ingest = {name: server.add_camera(name) for name in ("lobby", "gate")}
        server.add_viewer(pem, ["lobby", "gate"])
        viewer = ViewerProcess(server.url, softhsm_token.object_uri("operator"),
                               tmp_path / "home", server.tls_ca)
        page = open_page(browser, viewer)
        page.evaluate("() => window.fusionViewer.watch('lobby')")
        deadline = time.monotonic() + 60
        while stream_requests(server, "lobby")["stream.live"] < 1:
            assert time.monotonic() < deadline, "the live stream did not reach the Archiver"
            time.sleep(0.05)
        page.evaluate("() => window.fusionViewer.watch('gate')")  # refused 429 while lobby's
        time.sleep(3)  # the refusal comes at once; the tile must still be waiting after it
        waiting = tile(page, "gate")
        assert not waiting["stopped"], waiting["stateText"]
        assert stream_requests(server, "gate")["stream.live"] == 0
        page.evaluate("() => window.fusionViewer.tiles.get('lobby').close()")
        deadline = time.monotonic() + 60
        while stream_requests(server, "gate")["stream.live"] < 1:
            assert time.monotonic() < deadline, "the waiting tile never got its stream"
            time.sleep(0.05)
        push_chunks(server, "gate", ingest["gate"], make_chunks(tmp_path / "gate", 2), 1.0)
        state = wait_tile(page, "gate", "s.stopped || s.shown >= 1")
        assert not state["stopped"], state["stateText"]
        page.close()
    finally:
        if viewer is not None:
            viewer.stop()
        server.stop()


def test_unauthorized_range_is_drawn_and_skipped(setup: Setup, softhsm_token: TokenHandle,
                                                 open_viewer: Callable[..., ViewerProcess],
                                                 browser: Browser, tmp_path: Path) -> None:
    """Segments recorded while the viewer was revoked have no key for it: the page says so
    on the timeline and plays on with what came after."""
    chunks = make_chunks(tmp_path / "lobby", 6)
    pem = softhsm_token.workdir / f"{softhsm_token.label}-operator.pem"
    fp = setup.server.add_viewer(pem, ["lobby", "gate"])  # the same certificate: its fingerprint
    push_chunks(setup.server, "lobby", setup.ingest["lobby"], chunks[:2], 0.3)
    setup.server.revoke(fp)
    setup.server.sleep_into_next_key_period()  # where a revocation takes effect (issue 23)
    push_chunks(setup.server, "lobby", setup.ingest["lobby"], chunks[2:4], 0.3)
    setup.server.add_viewer(pem, ["lobby", "gate"])
    setup.server.sleep_into_next_key_period()  # where a viewer added joins the chain (issue 23)
    push_chunks(setup.server, "lobby", setup.ingest["lobby"], chunks[4:], 0.3)
    viewer = open_viewer()
    page = open_page(browser, viewer)
    first = page.evaluate("() => window.fusionViewer.cameras.get('lobby').first_ms")
    page.evaluate("(ms) => window.fusionViewer.watch('lobby', false).playFrom(ms)", first - 1)
    state = wait_tile(page, "lobby", "s.state === 'verified' && s.stateText.includes('to the end')")
    assert state["shown"] == 4 and not state["stopped"]
    [gap] = state["gaps"]
    assert gap["kind"] == "unauthorized" and gap["segments"] == 2
    # Exactly the two withheld segments' signed span: from the end of the last one shown
    # before to the start of the first one after. (Where that span lies against the test's
    # own clock depends on the Archiver's placement rules, archiver/cameras.py: a push that
    # follows on the stream clock keeps it.)
    before, after = state["segments"][1], state["segments"][2]
    assert (before["seq"], after["seq"]) == (1, 4)
    assert gap["from_ms"] == before["capture_ms"] + before["duration_ms"]
    assert gap["to_ms"] == after["capture_ms"]
    colour = page.evaluate("""([c, ms]) => {
        const t = window.fusionViewer.tiles.get(c); t.draw();
        const x = Math.round(t.xAt(ms));
        return Array.from(t.canvas.getContext('2d').getImageData(x, 20, 1, 1).data.slice(0, 3));
      }""", ["lobby", (gap["from_ms"] + gap["to_ms"]) // 2])
    assert colour == [0xC9, 0x3C, 0x37], "the unauthorized range is not drawn"
    page.close()


def launch_token(viewer: ViewerProcess) -> str:
    return re.split(r"[=#]", viewer.url)[-1]


def raw_session(viewer: ViewerProcess) -> dict[str, str]:
    """What the page does, by a raw client: spend the launch token for the session secret."""
    answer = httpx.post(f"{viewer.base}/api/session", json={"launch": launch_token(viewer)},
                        headers={"Origin": viewer.base}, timeout=10)
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['secret']}"}


# --- verification: a tampered stream stops playback ---------------------------------------------
def test_tampered_stream_stops_playback(setup: Setup, open_viewer: Callable[..., ViewerProcess],
                                        browser: Browser, tmp_path: Path, shots: Path) -> None:
    chunks = make_chunks(tmp_path / "lobby", 6)
    pushed = push_chunks(setup.server, "lobby", setup.ingest["lobby"], chunks, 0.1)
    with TamperingProxy(setup.server.url, verify=setup.server.verify) as proxy:
        proxy.mode, proxy.segment_index = "flip", 3
        viewer = open_viewer(proxy.url)
        page = open_page(browser, viewer)
        page.evaluate("(ms) => window.fusionViewer.watch('lobby', false).playFrom(ms)",
                      pushed.before[0] - 500)
        state = wait_tile(page, "lobby", "s.stopped")
        assert state["state"] == "failed" and state["error"] == "INTEGRITY"
        assert state["code"] == ExitCode.INTEGRITY == 11
        assert "STOPPED" in state["stateText"] and "failed authentication" in state["stateText"]
        overlay = page.locator('.tile[data-camera="lobby"] .overlay')
        assert overlay.is_visible() and "Playback stopped" in overlay.inner_text()
        # Only segments before the altered one reached the video; it stays paused.
        assert state["shown"] <= 3
        time.sleep(1)
        later = tile(page, "lobby")
        assert later["paused"] and later["shown"] == state["shown"]
        if later["segments"]:
            assert later["currentTime"] <= later["segments"][-1]["end"] + 0.05
        shot(page, shots, "tampered.png")
        page.close()


# --- who may talk to the viewer -----------------------------------------------------------------
def test_url_token_host_and_origin(setup: Setup, open_viewer: Callable[..., ViewerProcess],
                                   browser: Browser) -> None:
    viewer = open_viewer()
    base = viewer.base
    host = f"127.0.0.1:{viewer.port}"
    # Listening on 127.0.0.1 only (the kernel's table of listening TCP sockets, state 0A).
    listening = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                 + Path("/proc/net/tcp6").read_text().splitlines()[1:]
                 if line.split()[3] == "0A" and line.split()[1].endswith(f":{viewer.port:04X}")]
    assert listening == [f"0100007F:{viewer.port:04X}"], listening
    # The page is public (it holds no secret); the API needs the session secret.
    assert httpx.get(f"{base}/").status_code == 200
    assert httpx.get(f"{base}/api/cameras").status_code == 403
    assert httpx.get(f"{base}/api/cameras",
                     headers={"Authorization": f"Bearer {launch_token(viewer)}"}).status_code == 403
    # A wrong launch token buys nothing; the right one buys the session secret once, and no
    # cookie with it.
    wrong = httpx.post(f"{base}/api/session", json={"launch": "wrong"}, headers={"Origin": base})
    assert wrong.status_code == 403
    first = httpx.post(f"{base}/api/session", json={"launch": launch_token(viewer)},
                       headers={"Origin": base})
    assert first.status_code == 200 and "set-cookie" not in first.headers
    again = httpx.post(f"{base}/api/session", json={"launch": launch_token(viewer)},
                       headers={"Origin": base})
    assert again.status_code == 403, "the launch token must be single-use"
    assert "used already" in again.json()["message"]
    good = {"Authorization": f"Bearer {first.json()['secret']}"}
    assert httpx.get(f"{base}/api/cameras", headers=good).status_code == 200
    # DNS rebinding: another host name that resolves here is refused even with the secret.
    assert httpx.get(f"{base}/api/cameras",
                     headers={**good, "Host": f"evil.example:{viewer.port}"}).status_code == 403
    # CSRF: a foreign Origin (or none) on a state-changing request is refused.
    body = {"camera": "lobby", "from_ms": 0, "to_ms": 1000}
    for origin in ("http://evil.example", f"http://127.0.0.1:{viewer.port + 1}"):
        refused = httpx.post(f"{base}/api/exports", json=body,
                             headers={**good, "Origin": origin})
        assert refused.status_code == 403, refused.text
    assert httpx.post(f"{base}/api/exports", json=body, headers=good).status_code == 403
    # Cross-site WebSocket hijacking: the stream refuses a foreign Origin at the upgrade.
    stream_url = f"ws://{host}/api/stream"
    opening = json.dumps({"secret": good["Authorization"].split()[1], "camera": "lobby",
                          "mode": "live"})
    with pytest.raises(InvalidStatus) as refused_ws:
        ws_client.connect(stream_url, origin="http://evil.example", open_timeout=10)
    assert refused_ws.value.response.status_code == 403
    # The stream's first message must carry the secret; a wrong one, or none, closes it.
    for first_message in (json.dumps({"secret": "x" * 43, "camera": "lobby", "mode": "live"}),
                          '{"camera": "lobby", "mode": "live"}', "not json"):
        with ws_client.connect(stream_url, origin=f"http://{host}", open_timeout=10) as sock:
            sock.send(first_message)
            with pytest.raises(ConnectionClosed) as closed:
                sock.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    with ws_client.connect(stream_url, origin=f"http://{host}", open_timeout=10) as sock:
        sock.send(opening)
        assert '"start"' in sock.recv(timeout=10)


def test_foreign_page_in_the_browser_is_refused(setup: Setup,
                                                open_viewer: Callable[..., ViewerProcess],
                                                browser: Browser, tmp_path: Path) -> None:
    """A page of another local web server, open in the operator's browser (same site, other
    port), cannot start an export or open a stream."""
    viewer = open_viewer()
    context = browser.new_context()
    page = context.new_page()
    page.goto(viewer.url)
    page.wait_for_function("() => window.fusionViewer && window.fusionViewer.camerasLoaded")
    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    (evil_dir / "index.html").write_text("<!doctype html><title>evil</title>")
    port = free_port()
    evil = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                             "127.0.0.1", "--directory", str(evil_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        attacker = context.new_page()
        for _ in range(50):
            try:
                attacker.goto(f"http://127.0.0.1:{port}/")
                break
            except Exception:
                time.sleep(0.1)
        outcome = attacker.evaluate("""async (base) => {
            const out = {};
            await fetch(base + '/api/exports', {method: 'POST', mode: 'no-cors',
              credentials: 'include', headers: {'Content-Type': 'text/plain'},
              body: JSON.stringify({camera: 'lobby', from_ms: 0, to_ms: 1000})}).catch(() => {});
            out.ws = await new Promise((resolve) => {
              const ws = new WebSocket(base.replace('http', 'ws') +
                                       '/api/stream?camera=lobby&mode=live');
              ws.onopen = () => resolve('open'); ws.onerror = () => resolve('refused');
            });
            return out;
          }""", viewer.base)
        assert outcome["ws"] == "refused"
        # No export was started by the foreign page.
        status = page.evaluate("() => window.fusionViewer.api('/api/exports/1')"
                               ".then(() => 200, (err) => err.message)")
        assert status == "HTTP 404", status
    finally:
        evil.terminate()
        evil.wait(10)
        context.close()


def test_session_renewed_without_pin(archiver_server: ArchiverServer,
                                     softhsm_token: TokenHandle, tmp_path: Path) -> None:
    """The Archiver's viewer session expires (3 s here); the viewer proves possession again
    with the token it holds open, without asking for a PIN, and the page keeps working."""
    archiver_server.stop()
    server = ArchiverServer(tmp_path / "short", extra_args=("--session-ttl", "3")).start()
    try:
        pem = enroll_viewer(softhsm_token, "operator")
        server.add_camera("lobby")
        server.add_viewer(pem, ["lobby"])
        viewer = ViewerProcess(server.url, softhsm_token.object_uri("operator"),
                               tmp_path / "home")
        try:
            good = raw_session(viewer)
            for _ in range(3):
                answer = httpx.get(f"{viewer.base}/api/cameras", headers=good)
                assert answer.status_code == 200, answer.text
                assert [c["name"] for c in answer.json()] == ["lobby"]
                time.sleep(2)
        finally:
            viewer.stop()
        audit = (tmp_path / "short" / "audit.jsonl").read_text()
        assert audit.count('"session.open"') >= 2  # the first login and at least one renewal
    finally:
        server.stop()


def test_view_without_pin_fails_cleanly(setup: Setup, softhsm_token: TokenHandle) -> None:
    """No PIN source and no terminal: one sentence and a non-zero exit, before serving."""
    pem = enroll_viewer(softhsm_token, "nopin")
    setup.server.add_viewer(pem, ["lobby"])
    env = {k: v for k, v in os.environ.items() if k not in ("FUSION_PIN", "FUSION_TOKEN")}
    env["FUSION_CLIENT_HOME"] = str(setup.home)
    done = subprocess.run(
        [sys.executable, "-m", "client", "view", "--archiver", setup.server.url, "--token",
         softhsm_token.object_uri("nopin", pin=False), "--no-browser"],
        capture_output=True, timeout=60, stdin=subprocess.DEVNULL, env=env, text=True)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert re.search(r"No PIN given", done.stderr), done.stderr
    assert "http://127.0.0.1" not in done.stdout


def test_pin_from_the_terminal_or_pin_source(setup: Setup, softhsm_token: TokenHandle,
                                             tmp_path: Path) -> None:
    """The PIN is asked on the terminal (a real pseudo-terminal here), or read from the file
    pin-source names; the page never asks for it. Enter there prints a new one-time link."""
    env = {k: v for k, v in os.environ.items() if k not in ("FUSION_PIN", "FUSION_TOKEN")}
    env["FUSION_CLIENT_HOME"] = str(setup.home)
    env["FUSION_TLS_CA"] = str(setup.server.tls_ca)  # the site CA, from the environment
    uri = softhsm_token.object_uri("operator", pin=False)
    master, slave = pty.openpty()

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    process = subprocess.Popen(
        [sys.executable, "-m", "client", "view", "--archiver", setup.server.url, "--token", uri,
         "--no-browser"], stdin=slave, stdout=subprocess.PIPE, stderr=slave, env=env,
        preexec_fn=controlling_terminal)
    os.close(slave)
    try:
        seen = b""
        deadline = time.monotonic() + 60
        while b"PIN for token" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                seen += os.read(master, 4096)
        assert b"PIN for token" in seen, seen
        os.write(master, softhsm_token.pin.encode() + b"\n")
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 60)
        first = process.stdout.readline().decode().strip() if ready else ""
        assert first.startswith("http://127.0.0.1:"), first
        base = first[:first.index("/", len("http://"))]
        # Enter on the terminal prints a new one-time link (after a reload): the old one,
        # spent or not, opens nothing; the new one opens the viewer once.
        os.write(master, b"\n")
        ready, _, _ = select.select([process.stdout], [], [], 30)
        second = process.stdout.readline().decode().strip() if ready else ""
        assert second.startswith(base + "/#token=") and second != first, second
        for url, status in ((first, 403), (second, 200), (second, 403)):
            answer = httpx.post(f"{base}/api/session", headers={"Origin": base},
                                json={"launch": url.rsplit("=", 1)[1]}, timeout=10)
            assert answer.status_code == status, (url, answer.text)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(20)
        os.close(master)
    assert process.returncode == 0

    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm_token.pin)
    pin_file.chmod(0o600)
    viewer = ViewerProcess(setup.server.url, f"{uri}?pin-source=file:{pin_file}"
                           if "?" not in uri else f"{uri}&pin-source=file:{pin_file}",
                           setup.home, setup.server.tls_ca)
    raw_session(viewer)
    viewer.stop()


# --- another local web server in the operator's browser (issue 19, finding 1) -------------------
class RecordingServer:
    """A real HTTP server on another port of 127.0.0.1 (another user's dev server, any local
    tool) that records every request's headers, as a hostile one would."""

    def __init__(self) -> None:
        seen: list[dict[str, str]] = []
        self.seen = seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
                if self.path.startswith("/pixel"):
                    body, kind = PIXEL, "image/gif"
                elif self.path.startswith("/page"):
                    # The page the operator lands on loads an image from its own server.
                    body, kind = b'<!doctype html><title>dev</title><img id="px" src="/pixel.gif">', \
                        "text/html"
                else:
                    body, kind = (f'<!doctype html><a id="go" href="http://127.0.0.1:'
                                  f'{self.server.server_address[1]}/page">docs</a>').encode(), \
                        "text/html"
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> RecordingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# The smallest GIF (1x1, transparent).
PIXEL = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000"
                      "010001000002024401003b")


def test_another_local_server_gets_nothing_that_opens_the_viewer(
        setup: Setup, open_viewer: Callable[..., ViewerProcess], browser: Browser,
        tmp_path: Path) -> None:
    """The operator watches; in the same browser they follow a link on a localhost page to
    another local web server, whose page loads an image from that server. Whatever the browser
    sent it, replayed by a raw client that writes its own Host and Origin, opens nothing."""
    chunks = make_chunks(tmp_path / "lobby", 3)
    push_chunks(setup.server, "lobby", setup.ingest["lobby"], chunks, 0.1)
    viewer = open_viewer()
    context = browser.new_context()
    page = context.new_page()
    page.goto(viewer.url)
    page.wait_for_function("() => window.fusionViewer && window.fusionViewer.camerasLoaded")
    first = page.evaluate("() => window.fusionViewer.cameras.get('lobby').first_ms")
    page.evaluate("(ms) => window.fusionViewer.watch('lobby', false).playFrom(ms)", first - 1)
    # The page itself still plays, with the secret in its memory: frames on screen.
    wait_tile(page, "lobby", "s.shown >= 1 && s.currentTime > 0.5")
    assert page.evaluate(FRAME_COLOURS, "lobby") > 20, "the frame is blank"
    with RecordingServer() as other:
        visitor = context.new_page()
        visitor.goto(f"http://localhost:{other.port}/")
        visitor.click("#go")
        visitor.wait_for_function("() => document.getElementById('px') && "
                                  "document.getElementById('px').complete")
        assert any(r["path"] == "/pixel.gif" for r in other.seen), other.seen
        captured = other.seen
    # Everything the browser sent the other server, as headers a raw client can replay.
    cookies = sorted({r["cookie"] for r in captured if "cookie" in r})
    replay = {"Cookie": "; ".join(cookies)} if cookies else {}
    for value in (v for r in captured for v in r.values()):
        assert launch_token(viewer) not in value
    host = f"127.0.0.1:{viewer.port}"
    forged = {**replay, "Host": host, "Origin": f"http://{host}"}
    outcome: dict[str, Any] = {}
    outcome["cameras"] = httpx.get(f"{viewer.base}/api/cameras", headers=forged,
                                   timeout=10).status_code
    # Any value the browser sent, tried as the session secret too.
    values = sorted({v for r in captured for v in r.values()})
    outcome["as_bearer"] = sorted({httpx.get(
        f"{viewer.base}/api/cameras", headers={**forged, "Authorization": f"Bearer {value}"},
        timeout=10).status_code for value in values})
    outcome["export"] = httpx.post(f"{viewer.base}/api/exports", headers=forged, timeout=10,
                                   json={"camera": "lobby", "from_ms": 0,
                                         "to_ms": now_ms()}).status_code
    # A stream, the old way (parameters in the URL) and the page's way (a first message that
    # would carry a secret: the attacker has only what it captured).
    got: list[str | bytes] = []
    secret = cookies[0].split("=", 1)[-1] if cookies else ""
    for url, first in ((f"ws://{host}/api/stream?camera=lobby&mode=range&from_ms=0"
                        f"&to_ms={now_ms()}", None),
                       (f"ws://{host}/api/stream", json.dumps(
                           {"secret": secret, "camera": "lobby", "mode": "range",
                            "from_ms": 0, "to_ms": now_ms()}))):
        try:
            with ws_client.connect(url, origin=f"http://{host}", additional_headers=replay,
                                   open_timeout=10) as sock:
                if first is not None:
                    sock.send(first)
                while True:
                    got.append(sock.recv(timeout=10))
        except InvalidStatus as refused:
            got.append(f"refused {refused.response.status_code}")
        except (ConnectionClosed, TimeoutError):
            pass
    outcome["video_bytes"] = sum(len(m) for m in got if isinstance(m, bytes))
    outcome["segments"] = sum(1 for m in got if isinstance(m, str) and '"segment"' in m)
    # The export, once done, cannot be downloaded with what was captured either.
    deadline = time.monotonic() + 30
    while outcome["export"] == 202 and time.monotonic() < deadline and httpx.get(
            f"{viewer.base}/api/exports/1", headers=forged, timeout=10).json()["state"] == "running":
        time.sleep(0.3)  # before the fix: it was started, wait for it to finish
    outcome["download"] = httpx.get(f"{viewer.base}/api/exports/1/file", headers=forged,
                                    timeout=10).status_code
    print(f"\nthe other server received {len(captured)} requests, {len(cookies)} cookie "
          f"header(s); replayed: {outcome}")
    assert outcome["cameras"] in (401, 403), outcome
    assert set(outcome["as_bearer"]) <= {401, 403}, outcome
    assert outcome["export"] in (401, 403), outcome
    assert outcome["video_bytes"] == 0 and outcome["segments"] == 0, outcome
    assert outcome["download"] in (401, 403, 404), outcome
    context.close()


def test_spent_link_gets_a_readable_page(setup: Setup, open_viewer: Callable[..., ViewerProcess],
                                         browser: Browser) -> None:
    """A browser following a spent one-time link, a page without one, or an API address typed
    into the address bar gets a page saying what to do, not raw JSON."""
    viewer = open_viewer()
    context = browser.new_context()
    page = context.new_page()
    page.goto(viewer.url)
    page.wait_for_function("() => window.fusionViewer && window.fusionViewer.camerasLoaded")
    assert page.url == f"{viewer.base}/", "the launch token stays in the address bar"
    again = context.new_page()
    again.goto(viewer.url)
    again.locator("#gate").wait_for(state="visible")
    text = again.locator("#gate").inner_text()
    assert "used already" in text and "fusion-client view" in text, text
    assert not again.locator("#layout").is_visible()
    assert not again.evaluate("() => window.fusionViewer.camerasLoaded")
    # A reload forgets the session on purpose (it was in the page's memory only).
    page.reload()
    page.locator("#gate").wait_for(state="visible")
    assert "link printed by 'fusion-client view'" in page.locator("#gate").inner_text()
    typed = context.new_page()
    response = typed.goto(f"{viewer.base}/api/cameras")
    assert response is not None and response.status == 403
    assert response.headers["content-type"].startswith("text/html")
    assert "link printed by 'fusion-client view'" in typed.locator("body").inner_text()
    context.close()


def test_timeline_says_index_gaps_are_unsigned(setup: Setup,
                                               open_viewer: Callable[..., ViewerProcess],
                                               browser: Browser) -> None:
    """What the timeline shows before playback comes from the Archiver's unsigned index, and
    the tile says so under the timeline."""
    viewer = open_viewer()
    page = open_page(browser, viewer)
    page.evaluate("() => window.fusionViewer.watch('lobby', false)")
    note = page.locator('.tile[data-camera="lobby"] .index-note')
    assert note.is_visible()
    assert "from the Archiver's index, unsigned; verified when played" in " ".join(
        note.inner_text().split())
    page.close()


def test_launch_file_removed_on_every_exit(setup: Setup, browser: Browser,
                                           tmp_path: Path) -> None:
    """The private launch file holds the one-time URL: removed once Chromium opened the viewer
    with it, and on SIGTERM, SIGHUP and Ctrl-C (a real `fusion-client view` that opens a
    browser)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    opened = tmp_path / "opened"
    browser_cmd = tmp_path / "browser"
    browser_cmd.write_text(f'#!/bin/sh\necho "$1" > "{opened}.part" && mv "{opened}.part" '
                           f'"{opened}"\n')
    browser_cmd.chmod(0o755)
    env = {"BROWSER": str(browser_cmd), "TMPDIR": str(tmp)}
    for how in (signal.SIGTERM, signal.SIGHUP, None):
        viewer = ViewerProcess(setup.server.url, setup.viewer_uri, setup.home,
                               setup.server.tls_ca, browser_env=env)
        deadline = time.monotonic() + 30
        while not opened.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        launch = Path(opened.read_text().strip().removeprefix("file://"))
        opened.unlink()
        assert launch.parent == tmp and launch.stat().st_mode & 0o777 == 0o600
        assert launch_token(viewer) in launch.read_text()
        if how is None:
            # What the operator's browser does with it: file:// forwards to the viewer (a
            # cross-site navigation), the page spends the link, and the file is gone.
            page = browser.new_page()
            page.goto(launch.as_uri())
            page.wait_for_function("() => window.fusionViewer && window.fusionViewer.camerasLoaded")
            assert page.url == f"{viewer.base}/"
            assert not launch.exists()
            page.close()
        viewer.stop(how or signal.SIGINT)
        assert not launch.exists(), how
        assert list(tmp.iterdir()) == [], list(tmp.iterdir())
