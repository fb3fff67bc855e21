"""A site of two real Archivers (``--name a1``/``a2``, HTTPS under a site CA) sharing a real
PostgreSQL directory, and a camera recorded across a ``cameras move`` between them (ffmpeg as
the camera: 4 s at a1, then 4 s of other frames at a2). The site's tests share these (test
modules import them from here, never from each other); a failover looks the same to viewers.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from fusion_testkit.camera import frame_hashes, make_source, push
from fusion_testkit.client_cli import Client, Viewer, now_ms, wait_for_segments
from fusion_testkit.pki import SiteCa
from fusion_testkit.server import ArchiverServer, production_archiver

if TYPE_CHECKING:
    from archiver.directory import Directory

__all__ = ["Moved", "TwoArchivers", "authorize_on_the_site", "other_source", "pin",
           "record_across_a_move", "signing_cert", "two_archivers", "wait_until_accepted"]


@dataclass
class TwoArchivers:
    ca: SiteCa
    a1: ArchiverServer
    a2: ArchiverServer
    directory: Directory
    certs: dict[str, Path]  # each Archiver's signing certificate (PEM), to pin


def signing_cert(server: ArchiverServer) -> x509.Certificate:
    """The Archiver's signing certificate, as it serves it."""
    answer = httpx.get(f"{server.url}/v1/archiver", verify=server.verify, timeout=30)
    assert answer.status_code == 200, answer.text
    return x509.load_pem_x509_certificate(answer.json()["certificate"].encode())


@contextmanager
def two_archivers(postgres_url: str, tmp_path: Path) -> Iterator[TwoArchivers]:
    """a1 and a2 running on one directory, each registered with its signing certificate."""
    # The Archiver's package (the directory's client): only these tests need it installed.
    from archiver.directory import ArchiverRow, open_directory

    ca = SiteCa.create(tmp_path / "site-ca")
    a1 = production_archiver(ca, tmp_path / "a1",
                             extra_args=("--directory", postgres_url, "--name", "a1"))
    a2 = production_archiver(ca, tmp_path / "a2",
                             extra_args=("--directory", postgres_url, "--name", "a2"))
    directory = open_directory(postgres_url, tmp_path / "directory-client")
    with a1, a2:
        certs = {}
        for name, server in (("a1", a1), ("a2", a2)):
            cert = signing_cert(server)
            # The registry (site-admin registers at start as well: the same row).
            directory.register_archiver(ArchiverRow(name, server.url, cert.public_bytes(
                Encoding.DER), now_ms(), now_ms()))
            certs[name] = tmp_path / f"{name}-signing.pem"
            certs[name].write_bytes(cert.public_bytes(Encoding.PEM))
        try:
            yield TwoArchivers(ca, a1, a2, directory, certs)
        finally:
            directory.close()


def other_source(path: Path, seconds: float) -> Path:
    """Another deterministic H.264 stream than make_source's (other frames: the judge can tell
    the two Archivers' video apart)."""
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
         "-i", "testsrc=size=320x240:rate=25", "-t", str(seconds), "-c:v", "libx264",
         "-preset", "ultrafast", "-g", "25", "-keyint_min", "25", "-sc_threshold", "0",
         "-pix_fmt", "yuv420p", "-f", "mpegts", str(path)], check=True)
    return path


def wait_until_accepted(server: ArchiverServer, camera: str, token: str) -> None:
    """After a move the new Archiver takes the camera's pushes (at once, or once it re-read
    the cameras it holds): a playlist PUT, which archives nothing, says when."""
    deadline = time.monotonic() + 60
    while server.put_segment(camera, token, b"#EXTM3U\n", name="index.m3u8") >= 300:
        assert time.monotonic() < deadline, f"{server.url} never took {camera}'s pushes"
        time.sleep(0.2)


def authorize_on_the_site(site: TwoArchivers, viewer: Viewer, camera: str) -> None:
    """Authorize the viewer through a1; a2 knows it after a restart (an authorization made on
    one Archiver reaches a running other one through site-notify's LISTEN/NOTIFY, which is not
    what these tests are about)."""
    site.a1.add_viewer(viewer.pem, [camera])
    site.a2.stop()
    site.a2.start()


@dataclass
class Moved:
    camera: str
    start: int
    moved: int
    end: int
    first: list[str]   # the frames a1 recorded, then a2
    second: list[str]


def record_across_a_move(site: TwoArchivers, tmp_path: Path, camera: str,
                         authorize: Callable[[], object], noticed_after_ms: int = 0) -> Moved:
    """4 s recorded by a1, the camera moved to a2, 4 s recorded by a2. ``noticed_after_ms``:
    the move is dated that long before a1's last video (a1 recorded on until it noticed)."""
    token = site.a1.add_camera(camera)  # recorded by a1 (the Archiver the command went to)
    authorize()  # before recording: each Archiver's key chains start with the viewer in them
    first_source = make_source(tmp_path / "first.ts", seconds=4)
    second_source = other_source(tmp_path / "second.ts", seconds=4)
    start = now_ms()
    push(first_source, site.a1.url, camera, token, realtime=True, hls_time=1)
    wait_for_segments(site.a1, camera, 4)
    moved = now_ms() - noticed_after_ms
    assert site.directory.move_camera(camera, "a2", moved)
    wait_until_accepted(site.a2, camera, token)
    push(second_source, site.a2.url, camera, token, realtime=True, hls_time=1)
    wait_for_segments(site.a2, camera, 4)
    end = now_ms() + 1
    first, second = frame_hashes(first_source), frame_hashes(second_source)
    assert len(first) == len(second) == 100 and first != second
    return Moved(camera, start, moved, end, first, second)


def pin(client: Client, viewer: Viewer, server: ArchiverServer, cert: Path) -> None:
    """Pin an Archiver's signing certificate for its URL, as a viewer does once."""
    done = client("cameras", "--archiver", server.url, "--token", viewer.uri,
                  "--archiver-cert", str(cert))
    assert done.code == 0, done.stderr
