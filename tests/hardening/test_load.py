"""Load and soak: 50 cameras push segments while 20 viewers watch live, plus one viewer that
stops reading. Nothing acknowledged is lost, every live stream verifies, the stalled viewer is
dropped without slowing ingest, and the Archiver's memory (RSS from /proc) stays bounded.

CI runs ~30 s; ``python -m tests.hardening.longrun soak`` runs 10 minutes and prints the figures
docs/security.md quotes.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from keyservice.format import End
from keyservice.framing import RecordSplitter
from keyservice.reader import SegmentPlaintext, StreamEnded, StreamReader
from tests.fixtures.viewer import login
from tests.hardening.conftest import (
    TokenViewer,
    Uploader,
    WrappedServer,
    assert_nonces_unique,
    check_archive,
    check_played,
    enroll_many,
    memory_kib,
    play_camera,
    scale,
    wait_for,
)

CAMERAS = 50
VIEWERS = 20
SEND_TIMEOUT_S = 5


@dataclass
class LiveViewer:
    """Watches one camera live for duration_s, verifying and decrypting as bytes arrive."""

    url: str
    viewer: TokenViewer
    session: str
    camera: str
    duration_s: float
    digests: list[bytes] = field(default_factory=list)
    ended: bool = False
    error: BaseException | None = None
    received_bytes: int = 0
    thread: threading.Thread | None = None

    def start(self) -> LiveViewer:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            reader = StreamReader(self.viewer.identity, lambda cert: None)
            with httpx.Client(timeout=60) as client, client.stream(
                    "GET", f"{self.url}/v1/cameras/{self.camera}/live",
                    params={"duration_s": self.duration_s, "nonce": "00" * 16},
                    headers={"Authorization": f"Bearer {self.session}"}) as response:
                assert response.status_code == 200, response.read()
                for chunk in response.iter_bytes():
                    self.received_bytes += len(chunk)
                    for event in reader.feed(chunk):
                        if isinstance(event, SegmentPlaintext):
                            self.digests.append(hashlib.sha256(event.data).digest())
                        elif isinstance(event, StreamEnded):
                            self.ended = True
            reader.finish()
        except BaseException as exc:  # reported by the test thread
            self.error = exc


class StalledViewer:
    """Asks for a live stream, reads the response head, then stops reading (small receive
    buffer) while keeping the connection open."""

    def __init__(self, port: int, session: str, camera: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(f"GET /v1/cameras/{camera}/live?duration_s=86400&nonce={'00' * 16} HTTP/1.1\r\n"
                          f"Host: archiver\r\nAuthorization: Bearer {session}\r\n\r\n".encode())
        self.head = self.sock.recv(1024)

    def read_rest(self, timeout: float = 60) -> bytes:
        """Resume reading: everything still buffered, up to the server's close (EOF)."""
        self.sock.settimeout(timeout)
        parts = [self.head]
        while chunk := self.sock.recv(1 << 20):
            parts.append(chunk)
        self.sock.close()
        return b"".join(parts)


def _body_records(raw: bytes) -> list[object]:
    """The fusion stream records in a raw chunked HTTP/1.1 response (as far as it goes)."""
    _, _, body = raw.partition(b"\r\n\r\n")
    data = bytearray()
    while body:
        size_line, sep, rest = body.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        data += rest[:size]
        body = rest[size + 2:]
    splitter = RecordSplitter()
    return [record for record, _ in splitter.feed(bytes(data))]


def test_fifty_cameras_twenty_live_viewers_and_a_stalled_one(tmp_path: Path,
                                                             softhsm_token) -> None:
    duration = scale("SOAK_S", 30)
    viewers = enroll_many(softhsm_token, [f"live{i}" for i in range(VIEWERS)])
    server = WrappedServer(tmp_path / "archiver", key_period_s=2,
                           extra_args=("--stream-send-timeout", str(SEND_TIMEOUT_S))).start()
    samples: list[tuple[float, int]] = []
    stop_sampling = threading.Event()
    try:
        tokens = {f"cam{i:02d}": server.add_camera(f"cam{i:02d}") for i in range(CAMERAS)}
        busy_token = server.add_camera("busy")
        for viewer in viewers:
            server.add_viewer(viewer.pem, "all")
        sessions = [login(server.url, v.identity) for v in viewers]

        def sample() -> None:
            while not stop_sampling.wait(0.5):
                samples.append((time.monotonic(), memory_kib(server.pid)[0]))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # 50 cameras, one 10-40 kB segment a second each; one busy camera at ~0.5 MB/s for the
        # stalled viewer, so that its socket buffers fill within seconds.
        uploaders = [Uploader(server.url, cam, token, sizes=(10_000, 40_000), interval_s=1.0,
                              stop_on_connection_error=False).start()
                     for cam, token in tokens.items()]
        busy = Uploader(server.url, "busy", busy_token, sizes=(100_000, 100_000), interval_s=0.2,
                        stop_on_connection_error=False).start()
        cams = list(tokens)
        live = [LiveViewer(server.url, v, s, cams[i], duration - 4).start()
                for i, (v, s) in enumerate(zip(viewers, sessions, strict=True))]
        stalled = StalledViewer(server.port, sessions[0], "busy")
        assert stalled.head.startswith(b"HTTP/1.1 200"), stalled.head
        started = time.monotonic()
        acked_when_stalled_dropped: int | None = None
        while time.monotonic() - started < duration:
            if acked_when_stalled_dropped is None and "stopped reading" in server.log():
                acked_when_stalled_dropped = len(busy.acked)
            time.sleep(0.5)
        for viewer_thread in live:
            assert viewer_thread.thread is not None
            viewer_thread.thread.join(60)  # bounds a hang only
        for uploader in [*uploaders, busy]:
            uploader.stop()
        stop_sampling.set()
        sampler.join()
        rss_now, rss_peak = memory_kib(server.pid)

        # Ingest never stalled: every upload of every camera was acknowledged, none hung.
        for uploader in [*uploaders, busy]:
            assert set(uploader.statuses) == {201}, (uploader.camera, uploader.statuses,
                                                     uploader.error_bodies)
            assert uploader.max_put_s < 30  # bounds a hang; not a speed requirement

        # The stalled viewer was dropped by the server, and ingest of its camera went on.
        wait_for(lambda: "stopped reading" in server.log(), 60, "the stalled viewer's drop")
        if acked_when_stalled_dropped is not None:
            assert len(busy.acked) > acked_when_stalled_dropped
        records = _body_records(stalled.read_rest())
        assert records and not any(isinstance(r, End) for r in records)  # cut, not ended

        # Every live stream verified, ended with its signed end record, and is a gapless run
        # of its camera's acknowledged segments.
        by_camera = {u.camera: u for u in uploaders}
        for viewer_stream in live:
            assert viewer_stream.error is None, repr(viewer_stream.error)
            assert viewer_stream.ended and viewer_stream.digests
            acked = by_camera[viewer_stream.camera].acked
            first = acked.index(viewer_stream.digests[0])
            assert acked[first:first + len(viewer_stream.digests)] == viewer_stream.digests

        # No segment lost: each camera's whole recording plays back, all acknowledged segments.
        session = login(server.url, viewers[1].identity)
        for uploader in [*uploaders, busy]:
            check_played(play_camera(server.url, viewers[1].identity, uploader.camera, session),
                         [uploader])
        report = check_archive(server.data_dir)
        assert_nonces_unique(report)
        assert report.segments == sum(len(u.acked) for u in [*uploaders, busy])

        # Memory bounded: the peak stays far below what buffering the streams would take,
        # and the last third of the run does not climb above the first two thirds' peak.
        third = samples[len(samples) * 2 // 3][0]
        early = max(rss for t, rss in samples if t < third)
        late = max(rss for t, rss in samples if t >= third)
        live_bytes = sum(v.received_bytes for v in live)
        print(f"\nsoak: {duration} s, {len(uploaders)} cameras + 1 busy, {len(live)} live viewers;"
              f" {report.segments} segments ({sum(report.files.values()) / 2**20:.0f} MiB)"
              f" archived, {live_bytes / 2**20:.1f} MiB streamed live; Archiver RSS peak"
              f" {rss_peak / 1024:.0f} MiB, first 2/3 max {early / 1024:.0f} MiB, last 1/3 max"
              f" {late / 1024:.0f} MiB, at end {rss_now / 1024:.0f} MiB")
        assert rss_peak < 512 * 1024
        assert late <= early + 64 * 1024
    finally:
        stop_sampling.set()
        server.stop()
